"""epgx.jacobian's dual-state route (epgx/_dual.py) against the generic vmap of jvp.

Oracles: ``torch.func`` forward mode through the pure-torch engine written out here
(``vmap`` of ``jvp`` over one-hot tangents, which shares no code with the dual-state
engine), and central differences in float64. tests/test_derivatives.py checks
``epgx.jacobian`` (now on this route for FSE/GRE) against central differences for every
tissue field; this file pins that the route is taken, equals the generic route to
rounding, and that everything else falls back.
"""

from __future__ import annotations

import pytest
import torch
from test_derivatives import (
    EXACT_RTOL,
    FD_REL_STEP,
    FD_RTOL,
    FLIPS,
    _assert_close_columns,
    _model,
    _params,
)
from torch.func import jvp, vmap

import epgx
from epgx import _dual

# The protocol, tolerances and column check of tests/test_derivatives.py: two exact
# float64 routes (dual states vs torch.func) differ by rounding only (EXACT_RTOL);
# central differences as there (FD_REL_STEP, FD_RTOL).
F64 = torch.float64


def _tissue(kind: str, generic: bool, shape: tuple[int, ...] = (2,)) -> epgx.Tissue:
    """Spins with distinct parameters; ``generic=False``: df = df_b = 0 and one B1 = 1."""
    g = torch.Generator().manual_seed(1)

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=F64)

    common = dict(b1=u(0.8, 1.2), df_hz=u(-20, 20)) if generic else dict(b1=1.0, df_hz=0.0)
    if kind == "single":
        return epgx.Tissue(t1_ms=u(700, 1400), t2_ms=u(40, 110), dtype=F64, **common)
    if kind == "bm":
        return epgx.Tissue.bm(
            t1_ms=(u(700, 1400), u(300, 600)),
            t2_ms=(u(50, 110), u(10, 30)),
            f=u(0.1, 0.3),
            k_ab_per_s=u(5, 30),
            df_b_hz=u(-60, 60) if generic else 0.0,
            dtype=F64,
            **common,
        )
    return epgx.Tissue.mt(
        t1_ms=(u(700, 1400), u(600, 1200)),
        t2_ms=u(40, 90),
        f=u(0.1, 0.25),
        k_ab_per_s=u(3, 8),
        mt_lineshape_us=u(10, 16),
        dtype=F64,
        **common,
    )


def _generic(model, tissue: epgx.Tissue, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: vmap of torch.func.jvp over one-hot tangents through the engine."""
    primals = tuple(getattr(tissue, n).contiguous() for n in names)

    def f(*vals: torch.Tensor) -> torch.Tensor:
        return model(tissue.replace(**dict(zip(names, vals, strict=True))))

    basis = tuple(
        torch.stack([torch.ones_like(x) if k == j else torch.zeros_like(x) for k in range(len(names))])
        for j, x in enumerate(primals)
    )
    signal, jac = vmap(lambda *t: jvp(f, primals, t), out_dims=(0, -1))(*basis)
    return signal[0], jac


def _assert_columns(got: torch.Tensor, want: torch.Tensor, signal: torch.Tensor, tissue, names, rtol) -> None:
    _assert_close_columns(got, want, signal, _params(tissue, names), rtol)


def _fast(model, tissue: epgx.Tissue, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    out = _dual.jacobian(model, tissue, names)
    assert out is not None, "the dual-state route was not taken"
    return out


@pytest.mark.parametrize("generic", [True, False], ids=["generic", "shared-b1-df0"])
@pytest.mark.parametrize("seq", ["fse", "gre"])
@pytest.mark.parametrize("kind", ["single", "bm", "mt"])
def test_dual_route_equals_the_generic_route_for_every_field(kind: str, seq: str, generic: bool) -> None:
    tissue, model = _tissue(kind, generic), _model(kind, seq)
    names = tuple(tissue.fields())
    signal, jac = _fast(model, tissue, names)
    want_signal, want = _generic(model, tissue, names)
    assert jac.shape == want.shape and jac.dtype == torch.complex128
    torch.testing.assert_close(signal, want_signal, rtol=EXACT_RTOL, atol=0)
    _assert_columns(jac, want, signal, tissue, names, EXACT_RTOL)
    # the public entry point takes the same route
    torch.testing.assert_close(epgx.jacobian(model, tissue, names), jac, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kind", "seq", "kw"),
    [
        ("bm", "gre", dict(prep=epgx.Prep(flip_deg=180.0, delay_ms=300.0))),
        ("mt", "gre", dict(prep=epgx.Prep(flip_deg=90.0, delay_ms=50.0, b1sq_tau_ut2ms=4.0))),
        ("single", "fse", dict(kmax=2)),
        ("bm", "fse", dict(z_init=(-0.5, 0.1))),
        ("single", "gre", dict(diffusion=epgx.Diffusion([20.0, -5.0], [2.0, 1.0], 2.0))),
        ("bm", "fse", dict(diffusion=epgx.Diffusion([30.0], [1.5], 1.5, "epgx"), chunk_size=3)),
    ],
    ids=["prep-inversion", "prep-mt", "kmax", "z_init", "diffusion", "diffusion-chunks"],
)
def test_dual_route_with_preparation_truncation_and_diffusion(kind: str, seq: str, kw: dict) -> None:
    tissue, model = _tissue(kind, True, (7,)), _model(kind, seq, **kw)
    names = tuple(tissue.fields())
    signal, jac = _fast(model, tissue, names)
    want_signal, want = _generic(model, tissue, names)
    torch.testing.assert_close(signal, want_signal, rtol=EXACT_RTOL, atol=0)
    _assert_columns(jac, want, signal, tissue, names, EXACT_RTOL)


def test_dual_route_matches_central_differences_on_a_two_axis_batch() -> None:
    tissue = _tissue("bm", True, (2, 3)).replace(k_ab_per_s=torch.tensor(15.0, dtype=F64))  # broadcast
    model = _model("bm", "fse")
    names = ("t1_ms", "t2_ms", "f", "k_ab_per_s", "b1")
    signal, jac = epgx.jacobian(model, tissue, wrt=names, return_signal=True)
    assert _dual.jacobian(model, tissue, names) is not None
    assert jac.shape == (2, 3, len(FLIPS) - 1, len(names))
    cols = []
    for name in names:
        x = getattr(tissue, name)
        h = FD_REL_STEP * x.abs().clamp_min(1.0)
        up, down = model(tissue.replace(**{name: x + h})), model(tissue.replace(**{name: x - h}))
        cols.append((up - down) / (2 * h.unsqueeze(-1)))
    _assert_columns(jac, torch.stack(cols, -1), signal, tissue, names, FD_RTOL)


def test_other_models_fall_back_to_the_generic_route() -> None:
    tissue = _tissue("bm", True)
    names = ("t2_ms", "f")
    fse = _model("bm", "fse")
    fallbacks = {
        "post-processed": lambda t: fse(t).abs(),
        "derived tissue": lambda t: fse(t.replace(t2b_ms=t.t2_ms / 4)),
        "two engine calls": lambda t: fse(t) + _model("bm", "gre")(t)[..., 1:],
        "block model": lambda t: epgx.models.fisp_mrf(t, n_pulses=6),
        "return_states": lambda t: epgx.fse(t, FLIPS, 9.0, backend="torch", return_states=True)[0],
    }
    for why, model in fallbacks.items():
        assert _dual.jacobian(model, tissue, names) is None, why
        signal, jac = epgx.jacobian(model, tissue, names, return_signal=True)
        _, want = _generic(model, tissue, names)
        _assert_columns(jac, want, signal, tissue, names, EXACT_RTOL)
    # a field that already carries derivatives (second order): the generic route
    tracked = tissue.replace(b1=tissue.b1.clone().requires_grad_(True))
    assert _dual.jacobian(fse, tracked, names) is None


def test_dual_route_stays_differentiable_wrt_the_flip_angles() -> None:
    """Autograd through the dual states (a CRLB objective's gradient) equals the generic route's."""
    tissue = _tissue("bm", True)
    names = ("t1_ms", "t2_ms", "k_ab_per_s")
    flips = torch.tensor(FLIPS, dtype=F64, requires_grad=True)
    model = lambda t: epgx.fse(t, flips, 9.0, backend="torch")  # noqa: E731
    (fast,) = torch.autograd.grad(_fast(model, tissue, names)[1].abs().sum(), flips)
    (want,) = torch.autograd.grad(_generic(model, tissue, names)[1].abs().sum(), flips)
    torch.testing.assert_close(fast, want, rtol=EXACT_RTOL, atol=EXACT_RTOL * want.abs().max().item())


def test_a_sequence_under_forward_mode_takes_the_generic_route() -> None:
    """d/dflip of a Jacobian column by torch.func.jvp (second order): central differences."""
    tissue = _tissue("single", True)
    flips = torch.tensor(FLIPS, dtype=F64)

    def dt2(fl: torch.Tensor) -> torch.Tensor:
        return epgx.jacobian(lambda t: epgx.fse(t, fl, 9.0, backend="torch"), tissue, "t2_ms")[..., 0]

    direction = torch.linspace(-1.0, 1.0, len(FLIPS), dtype=F64)
    _, got = jvp(dt2, (flips,), (direction,))
    h = 1e-4  # degrees: central differences of a smooth function of the flips
    fd = (dt2(flips + h * direction) - dt2(flips - h * direction)) / (2 * h)
    assert (got - fd).abs().max() <= FD_RTOL * fd.abs().max()
