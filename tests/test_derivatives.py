"""Forward-mode derivatives (torch.func), epgx.jacobian and epgx.crlb.

Oracles: central finite differences in float64 (every tissue field of FSE and GRE for
single, BM and MT tissue, at a generic point and at the point where the engines' value
fast paths apply: df = 0, one B1 for all spins), the batched call for ``vmap``, and the
closed-form Fisher information of a mono-exponential decay computed in numpy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch.func import jacfwd, jvp, vmap

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


def _model(kind: str, seq: str, backend: str = "torch", **kw) -> Callable[[epgx.Tissue], torch.Tensor]:
    """The FSE or GRE protocol of these tests (``kw``: more engine arguments)."""
    energy = MT_ENERGY if kind == "mt" else None
    if seq == "fse":
        return lambda t: epgx.fse(t, FLIPS, 9.0, b1sq_tau_ut2ms=energy, backend=backend, **kw)
    return lambda t: epgx.gre(t, GRE_FLIPS, 7.0, GRE_PHASES, b1sq_tau_ut2ms=energy, backend=backend, **kw)


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
    dims = tuple(range(got.ndim - 1))  # every axis but the parameters'
    scale = torch.maximum(want.abs().amax(dim=dims), floor)
    err = (got - want).abs().amax(dim=dims) / scale
    assert bool((err <= rtol).all()), f"relative errors per column {err.tolist()}"


def _params(tissue: epgx.Tissue, names: tuple[str, ...]) -> torch.Tensor:
    return torch.stack([getattr(tissue, n).reshape(-1) for n in names], -1)


CASES = [(k, s) for k in ("single", "bm", "mt") for s in ("fse", "gre")]


@pytest.mark.parametrize("generic", [True, False], ids=["generic", "fast-path-point"])
@pytest.mark.parametrize(("kind", "seq"), CASES)
def test_jacobian_matches_central_differences(kind: str, seq: str, generic: bool) -> None:
    tissue, model = _tissue(kind, generic), _model(kind, seq)
    names = tuple(tissue.fields())
    signal, jac = epgx.jacobian(model, tissue, wrt=names, return_signal=True)
    assert jac.shape == (2, len(FLIPS) - (seq == "fse"), len(names))
    assert jac.dtype == torch.complex128
    torch.testing.assert_close(signal, model(tissue), rtol=EXACT_RTOL, atol=0)
    fd = torch.stack([_central_difference(model, tissue, n) for n in names], dim=-1)
    _assert_close_columns(jac, fd, signal, _params(tissue, names), FD_RTOL)


@pytest.mark.parametrize("kind", ["single", "bm", "mt"])
@pytest.mark.parametrize("name", ["fisp_mrf", "bssfp_mrf", "mprage"])
def test_jacobian_of_block_models_matches_central_differences(kind: str, name: str) -> None:
    """MR fingerprinting (and a steady-state model) through the block engine, every field."""
    tissue = _tissue(kind, generic=True)
    short = {"fisp_mrf": dict(n_pulses=24), "bssfp_mrf": dict(n_pulses=24), "mprage": dict(n_readouts=12)}
    model = lambda t: epgx.models.MODELS[name](t, **short[name])  # noqa: E731
    names = tuple(tissue.fields())
    signal, jac = epgx.jacobian(model, tissue, wrt=names, return_signal=True)
    torch.testing.assert_close(signal, model(tissue), rtol=EXACT_RTOL, atol=0)
    fd = torch.stack([_central_difference(model, tissue, n) for n in names], dim=-1)
    _assert_close_columns(jac, fd, signal, _params(tissue, names), FD_RTOL)


@pytest.mark.parametrize("generic", [True, False], ids=["generic", "fast-path-point"])
@pytest.mark.parametrize(("kind", "seq"), CASES)
def test_jvp_along_a_direction_and_jacfwd(kind: str, seq: str, generic: bool) -> None:
    """One jvp moving every field at once, and jacfwd, through a Tissue built inside."""
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

    signal, jac = epgx.jacobian(model, base, wrt=names, return_signal=True)
    per_field = jacfwd(lambda *v: torch.view_as_real(f(*v)), argnums=tuple(range(len(names))))(*values)
    # each [2 spins, n, 2 (re, im), 2 spins]: keep the spin-wise diagonal
    diag = [torch.stack([jf[0, ..., 0], jf[1, ..., 1]]) for jf in per_field]
    diag = [torch.view_as_complex(d.contiguous()) for d in diag]
    _assert_close_columns(torch.stack(diag, -1), jac, signal, _params(base, names), EXACT_RTOL)


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


def test_jacobian_of_a_tissue_batch_with_two_axes_and_broadcast_fields() -> None:
    t2 = torch.tensor([[60.0, 80.0, 100.0], [40.0, 50.0, 70.0]], dtype=F64)
    tissue = epgx.Tissue(t1_ms=1000.0, t2_ms=t2, dtype=F64)  # t1 broadcast over [2, 3]
    model = _model("single", "fse")
    jac = epgx.jacobian(model, tissue, wrt=("t1_ms", "t2_ms"))
    assert jac.shape == (2, 3, len(FLIPS) - 1, 2)
    flat = epgx.Tissue(t1_ms=1000.0, t2_ms=t2.reshape(-1), dtype=F64)
    fd = torch.stack([_central_difference(model, flat, n) for n in ("t1_ms", "t2_ms")], -1)
    _assert_close_columns(jac.reshape(6, -1, 2), fd, model(flat), _params(flat, ("t1_ms", "t2_ms")), FD_RTOL)


def test_fast_paths_stay_off_for_fields_tracked_outside_the_jvp() -> None:
    """B1 equal for all spins but tracked by autograd (or an outer jvp): per-spin results."""
    model = _model("bm", "fse")
    tissue = _tissue("bm", False)
    b1 = torch.ones(2, dtype=F64, requires_grad=True)

    def dt2(b: torch.Tensor) -> torch.Tensor:
        return epgx.jacobian(model, tissue.replace(b1=b), wrt="t2_ms")[..., 0]

    (grad,) = torch.autograd.grad(dt2(b1).abs().sum(), b1)
    h = FD_REL_STEP
    loss = lambda b: dt2(b).abs().sum()  # noqa: E731
    fd = torch.stack([(loss(1 + h * e) - loss(1 - h * e)) / (2 * h) for e in torch.eye(2, dtype=F64)])
    assert (grad - fd).abs().max() <= FD_RTOL * fd.abs().max()
    # nested forward mode: d/dB1 of the T2 column, jvp over jvp
    _, nested = jvp(dt2, (b1.detach(),), (torch.ones(2, dtype=F64),))
    fd_nested = (dt2(torch.full((2,), 1 + h, dtype=F64)) - dt2(torch.full((2,), 1 - h, dtype=F64))) / (2 * h)
    assert (nested - fd_nested).abs().max() <= FD_RTOL * fd_nested.abs().max()


def test_triton_backend_refuses_second_order_derivatives() -> None:
    """First-order rules only (tests/test_kernels_grad.py): nesting is refused up front."""
    tissue = _tissue("single", True)
    flips = torch.tensor(FLIPS, dtype=F64, requires_grad=True)
    second_order = r"backend='triton' does not support second-order derivatives.*backend='torch'"
    with pytest.raises(ValueError, match=second_order):  # a CRLB objective w.r.t. flip angles
        epgx.jacobian(lambda t: epgx.fse(t, flips, 9.0, backend="triton"), tissue, wrt="t2_ms")

    def dt1(t2: torch.Tensor) -> torch.Tensor:
        model = lambda t: epgx.fse(t, FLIPS, 9.0, backend="triton")  # noqa: E731
        return epgx.jacobian(model, tissue.replace(t2_ms=t2), wrt="t1_ms")

    with pytest.raises(ValueError, match=second_order):  # jvp over jvp
        jvp(dt1, (tissue.t2_ms.contiguous(),), (torch.ones(2, dtype=F64),))


# --- CRLB -----------------------------------------------------------------------------

TIMES_MS = np.arange(1, 33) * 10.0
MONO_T2, MONO_M0, SIGMA = 80.0, 1.3, 0.02


def _mono_fisher_numpy(with_phase: bool) -> np.ndarray:
    """Closed form: S = M0 exp(−t/T2); columns ∂S/∂T2 = M0 t/T2² e^{−t/T2}, ∂S/∂M0 = e^{−t/T2}."""
    e = np.exp(-TIMES_MS / MONO_T2)
    d_t2 = MONO_M0 * TIMES_MS / MONO_T2**2 * e
    cols = [d_t2, e * MONO_M0]  # scale c of s = c·M0·e at c = 1: ∂s/∂c = s
    fim = np.array([[np.dot(a, b) for b in cols] for a in cols]) / SIGMA**2
    if with_phase:  # the phase column i·s is orthogonal to real-phase columns: Re(conj(J)·i·s) = 0
        fim = np.block([[fim, np.zeros((2, 1))], [np.zeros((1, 2)), np.sum((MONO_M0 * e) ** 2) / SIGMA**2]])
    return fim


def _mono_model() -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tensor(TIMES_MS, dtype=F64)
    s = MONO_M0 * torch.exp(-t / MONO_T2)
    return s, (MONO_M0 * t / MONO_T2**2 * torch.exp(-t / MONO_T2)).unsqueeze(-1)


def test_crlb_of_a_real_monoexponential_matches_the_closed_form() -> None:
    s, jac = _mono_model()
    want_cov = np.linalg.inv(_mono_fisher_numpy(with_phase=False))
    var, cov = epgx.crlb(jac, SIGMA, s, nuisance=("m0",), return_covariance=True)
    assert var.shape == (1,) and cov.shape == (2, 2)
    np.testing.assert_allclose(var.numpy(), want_cov[:1, 0], rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), want_cov, rtol=1e-12, atol=1e-14 * np.abs(want_cov).max())
    no_nuisance = epgx.crlb(jac, SIGMA, nuisance=())
    np.testing.assert_allclose(no_nuisance.numpy(), [SIGMA**2 / np.sum(jac.numpy() ** 2)], rtol=1e-12)
    # the default nuisance includes the phase, which real data do not have
    torch.testing.assert_close(epgx.crlb(jac, SIGMA, s), var, rtol=1e-14, atol=0)


@pytest.mark.parametrize("phase0", [0.0, 0.7])
def test_crlb_of_complex_and_magnitude_data(phase0: float) -> None:
    s, jac = _mono_model()
    rot = torch.polar(torch.ones((), dtype=F64), torch.tensor(phase0, dtype=F64))
    s_c, jac_c = s * rot, jac * rot
    want_cov = np.linalg.inv(_mono_fisher_numpy(with_phase=True))
    var, cov = epgx.crlb(jac_c, torch.tensor(SIGMA, dtype=F64), s_c, return_covariance=True)
    np.testing.assert_allclose(cov.numpy(), want_cov, rtol=1e-12, atol=1e-14 * np.abs(want_cov).max())
    np.testing.assert_allclose(var.numpy(), want_cov[:1, 0], rtol=1e-12)
    mag = epgx.crlb(jac_c, SIGMA, s_c, magnitude=True)
    np.testing.assert_allclose(mag.numpy(), want_cov[:1, 0], rtol=1e-12)


def test_crlb_batches_per_spin_noise_and_flags_unidentifiable_parameters() -> None:
    s, jac = _mono_model()
    jac2 = torch.stack([jac, 2 * jac])  # [2, n, 1]
    var = epgx.crlb(jac2, torch.tensor([SIGMA, 2 * SIGMA]), nuisance=())
    torch.testing.assert_close(var, torch.full((2, 1), var[0, 0].item(), dtype=F64), rtol=1e-13, atol=0)
    # a parameter that changes nothing: inf for it, the others as if it were known
    zero = epgx.crlb(torch.cat([jac, torch.zeros_like(jac)], -1), SIGMA, s, return_covariance=True)
    torch.testing.assert_close(zero[0][0], epgx.crlb(jac, SIGMA, s)[0], rtol=1e-14, atol=0)
    assert torch.isinf(zero[0][1]) and torch.isinf(zero[1][1]).all() and torch.isinf(zero[1][:, 1]).all()
    # two parameters with the same effect: neither is identifiable
    assert torch.isinf(epgx.crlb(torch.cat([jac, 2 * jac], -1), SIGMA, s)).all()


def test_crlb_gradient_wrt_refocusing_flips_matches_central_differences() -> None:
    tissue = epgx.Tissue(t1_ms=torch.tensor([900.0, 1400.0]), t2_ms=torch.tensor([70.0, 110.0]), dtype=F64)

    def objective(refocus: torch.Tensor) -> torch.Tensor:
        flips = torch.cat([refocus.new_tensor([90.0]), refocus])

        def model(t: epgx.Tissue) -> torch.Tensor:
            return epgx.fse(t, flips, 10.0, backend="torch")

        s, jac = epgx.jacobian(model, tissue, wrt=("t2_ms", "t1_ms"), return_signal=True)
        var = epgx.crlb(jac, 0.01, s)
        return (var[:, 0] / tissue.t2_ms**2).sum()

    refocus = torch.tensor([150.0, 120.0, 160.0, 100.0, 140.0, 170.0, 130.0, 110.0], dtype=F64)
    x = refocus.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(x), x)
    h = 1e-4  # degrees
    fd = torch.stack(
        [(objective(refocus + h * e) - objective(refocus - h * e)) / (2 * h) for e in torch.eye(8, dtype=F64)]
    )
    assert (grad - fd).abs().max() <= 1e-6 * fd.abs().max()


# --- bad inputs -----------------------------------------------------------------------


def test_jacobian_rejects_bad_names_and_outputs() -> None:
    tissue, model = _tissue("single", True), _model("single", "fse")
    with pytest.raises(ValueError, match=r"unknown tissue field 't3_ms'.*known fields"):
        epgx.jacobian(model, tissue, wrt=("t2_ms", "t3_ms"))
    with pytest.raises(ValueError, match=r"'single' tissue has no field 't2b_ms'"):
        epgx.jacobian(model, tissue, wrt=("t2b_ms",))
    with pytest.raises(ValueError, match="more than once"):
        epgx.jacobian(model, tissue, wrt=("t2_ms", "t2_ms"))
    with pytest.raises(ValueError, match="no parameter"):
        epgx.jacobian(model, tissue, wrt=())
    with pytest.raises(ValueError, match=r"one signal per spin.*got \(5,\)"):
        epgx.jacobian(lambda t: model(t).sum(0), tissue, wrt="t2_ms")
    with pytest.raises(TypeError, match="epgx.Tissue"):
        epgx.jacobian(model, {"t2_ms": 1.0}, wrt="t2_ms")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"replace.*\['t2b_ms'\].*'single'"):
        tissue.replace(t2b_ms=10.0)


def test_crlb_rejects_bad_inputs() -> None:
    s, jac = _mono_model()
    with pytest.raises(ValueError, match=r"jacobian must be a tensor \[\.\.\., n_readouts, n_params\]"):
        epgx.crlb(jac[:, 0], SIGMA, s)
    with pytest.raises(ValueError, match=r"signal must have the jacobian's shape.*\(32,\); got \(31,\)"):
        epgx.crlb(jac, SIGMA, s[1:])
    with pytest.raises(ValueError, match="signal is needed"):
        epgx.crlb(jac, SIGMA)
    with pytest.raises(ValueError, match="unknown nuisance parameter 'b1'"):
        epgx.crlb(jac, SIGMA, s, nuisance=("m0", "b1"))
    for bad in (0.0, -1.0, float("nan"), torch.tensor([0.01, 0.0])):
        with pytest.raises(ValueError, match="noise_sd must be finite and > 0"):
            epgx.crlb(jac, bad, s)
    with pytest.raises(ValueError, match="does not broadcast"):
        epgx.crlb(jac, torch.tensor([0.01, 0.02]), s)
