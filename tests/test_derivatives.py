"""Forward-mode derivatives and vmap through the engines (torch.func).

Oracles: central finite differences in float64 (every tissue field of FSE and GRE for
single, BM and MT tissue, at a generic point and at the point where the engines' value
fast paths apply: df = 0, one B1 for all spins) and the batched call for ``vmap``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.func import jvp, vmap

import epgx

F64 = torch.float64
FLIPS = [90.0, 150.0, 120.0, 160.0, 130.0, 170.0]
GRE_FLIPS = [20.0, 35.0, 15.0, 50.0, 25.0, 40.0]
GRE_PHASES = [0.0, 117.0, 351.0, 702.0, 1170.0, 1755.0]
MT_ENERGY = [2.0, 6.0, 5.0, 7.0, 5.5, 6.5]
# relative step of the central differences: truncation ~h², rounding ~1e-16/h
FD_REL_STEP = 1e-6
# FD vs forward mode, relative to the largest derivative of the column: both errors of
# the central difference above stay below 1e-8 of it
FD_RTOL = 1e-7
# the same quantity computed by two exact routes (vmap vs batch, jacfwd vs jvp) in float64
EXACT_RTOL = 1e-12


def _tissue(kind: str, generic: bool) -> epgx.Tissue:
    """Two spins with distinct parameters; ``generic=False``: df = df_b = 0 and B1 = 1."""
    t = lambda *v: torch.tensor(v, dtype=F64)  # noqa: E731
    common = dict(b1=t(0.9, 1.1), df_hz=t(6.0, -4.0)) if generic else dict(b1=1.0, df_hz=0.0)
    if kind == "single":
        return epgx.Tissue(t1_ms=t(900.0, 1300.0), t2_ms=t(80.0, 45.0), dtype=F64, **common)
    if kind == "bm":
        return epgx.Tissue.bm(
            t1_ms=(t(1000.0, 800.0), 500.0),
            t2_ms=(t(100.0, 70.0), t(20.0, 12.0)),
            f=t(0.2, 0.15),
            k_ab_per_s=t(10.0, 25.0),
            df_b_hz=t(30.0, -50.0) if generic else 0.0,
            dtype=F64,
            **common,
        )
    return epgx.Tissue.mt(
        t1_ms=(t(1000.0, 800.0), 1000.0),
        t2_ms=t(70.0, 50.0),
        f=t(0.12, 0.2),
        k_ab_per_s=t(4.0, 6.0),
        mt_lineshape_us=t(14.9, 12.0),
        dtype=F64,
        **common,
    )


def _model(kind: str, seq: str) -> Callable[[epgx.Tissue], torch.Tensor]:
    energy = MT_ENERGY if kind == "mt" else None
    if seq == "fse":
        return lambda t: epgx.fse(t, FLIPS, 9.0, b1sq_tau_ut2ms=energy, backend="torch")
    return lambda t: epgx.gre(t, GRE_FLIPS, 7.0, GRE_PHASES, b1sq_tau_ut2ms=energy, backend="torch")


def _central_difference(model, tissue: epgx.Tissue, name: str) -> torch.Tensor:
    x = getattr(tissue, name)
    h = FD_REL_STEP * x.abs().clamp_min(1.0)
    up = model(tissue.replace(**{name: x + h}))
    down = model(tissue.replace(**{name: x - h}))
    return (up - down) / (2 * h.unsqueeze(-1))


def _assert_close_columns(
    got: torch.Tensor, want: torch.Tensor, signal: torch.Tensor, params: torch.Tensor, rtol: float
) -> None:
    """Per parameter, relative to its largest derivative or, where the signal hardly
    depends on it (FSE echoes refocus df), to |signal| / |parameter| (the FD noise floor)."""
    floor = signal.abs().max() / params.abs().amax(0).clamp_min(1.0)  # params: [B, n_params]
    scale = torch.maximum(want.abs().amax(dim=(0, 1)), floor)
    err = (got - want).abs().amax(dim=(0, 1)) / scale
    assert bool((err <= rtol).all()), f"relative errors per column {err.tolist()}"


def _params(tissue: epgx.Tissue, names: tuple[str, ...]) -> torch.Tensor:
    return torch.stack([getattr(tissue, n).reshape(-1) for n in names], -1)


CASES = [(k, s) for k in ("single", "bm", "mt") for s in ("fse", "gre")]


@pytest.mark.parametrize("generic", [True, False], ids=["generic", "fast-path-point"])
@pytest.mark.parametrize(("kind", "seq"), CASES)
def test_jvp_along_a_direction(kind: str, seq: str, generic: bool) -> None:
    """One jvp moving every field at once, through a Tissue built inside the function."""
    base, model = _tissue(kind, generic), _model(kind, seq)
    names = tuple(base.fields())
    values = tuple(getattr(base, n).contiguous() for n in names)
    gen = torch.Generator().manual_seed(0)
    direction = tuple(torch.randn(v.shape, generator=gen, dtype=F64) * v.abs().clamp_min(1) for v in values)

    def f(*vals: torch.Tensor) -> torch.Tensor:
        return model(base.replace(**dict(zip(names, vals, strict=True))))

    _, tangent = jvp(f, values, direction)
    h = FD_REL_STEP
    up = f(*(v + h * d for v, d in zip(values, direction, strict=True)))
    down = f(*(v - h * d for v, d in zip(values, direction, strict=True)))
    fd = (up - down) / (2 * h)
    assert (tangent - fd).abs().max() <= FD_RTOL * fd.abs().max()


@pytest.mark.parametrize(("kind", "seq"), CASES)
def test_vmap_equals_the_batched_call(kind: str, seq: str) -> None:
    tissue, model = _tissue(kind, True), _model(kind, seq)
    names = tuple(tissue.fields())
    values = tuple(getattr(tissue, n).contiguous() for n in names)

    def one_spin(*vals: torch.Tensor) -> torch.Tensor:
        return model(tissue.replace(**dict(zip(names, vals, strict=True))))

    batched = model(tissue)
    mapped = vmap(one_spin)(*values)
    assert mapped.shape == batched.shape
    assert (mapped - batched).abs().max() <= EXACT_RTOL * batched.abs().max()


def test_triton_backend_refuses_forward_mode() -> None:
    tissue = _tissue("single", True)

    def f(t2: torch.Tensor) -> torch.Tensor:
        return epgx.fse(tissue.replace(t2_ms=t2), FLIPS, 9.0, backend="triton")

    with pytest.raises(ValueError, match=r"torch\.func transforms.*backend='torch'"):
        jvp(f, (tissue.t2_ms.contiguous(),), (torch.ones(2, dtype=F64),))
