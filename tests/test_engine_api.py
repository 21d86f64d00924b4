"""The engines' public contract: argument validation, batching, chunking, shapes, dtypes, kmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import epgx

# Float64 round-off; batched and per-spin runs do the same arithmetic in a different layout.
BATCH_TOL = 1e-12
# float32 has ~6e-8 relative precision; errors accumulate over a few dozen operators.
FLOAT32_TOL = 1e-5
# The exact engine needs no order above the number of shifts left: kmax >= n is exact.
KMAX_EXACT_TOL = 1e-12

ENGINES = ["fse", "gre"]


def _tis(**kw) -> epgx.Tissue:
    return epgx.Tissue(1000.0, 80.0, dtype=torch.float64, **kw)


def _mt() -> epgx.Tissue:
    return epgx.Tissue.mt((1000.0, 1000.0), 80.0, 0.1, 4.3, 14.9, dtype=torch.float64)


def _run(engine: str, tissue, flips, dt=8.0, **kw):
    return getattr(epgx, engine)(tissue, flips, dt, **kw)


# ---------------------------------------------------------------- validation

BAD_CALLS = [
    ("flip 2-D", "fse", dict(flip_deg=[[90.0, 180.0]]), r"flip_deg must be a 1-D sequence.*\(1, 2\)"),
    ("fse needs excitation + refocusing", "fse", dict(flip_deg=[90.0]), r"flip_deg.*at least 2.*\(1,\)"),
    ("gre flip scalar", "gre", dict(flip_deg=10.0), r"flip_deg must be a 1-D sequence.*\(\)"),
    ("gre no pulses", "gre", dict(flip_deg=[]), r"flip_deg.*at least 1.*\(0,\)"),
    ("flip inf", "fse", dict(flip_deg=[90.0, float("inf")]), r"flip_deg must be finite; got inf"),
    ("flip complex", "fse", dict(flip_deg=torch.tensor([90.0, 180j])), r"flip_deg must be real"),
    ("flip text", "gre", dict(flip_deg="abc"), r"flip_deg must be a number"),
    ("esp 0", "fse", dict(esp_ms=0.0), r"esp_ms must be > 0 ms; got 0\.0"),
    ("esp negative", "fse", dict(esp_ms=-1.0), r"esp_ms must be > 0 ms; got -1\.0"),
    ("esp nan", "fse", dict(esp_ms=float("nan")), r"esp_ms must be finite; got nan"),
    ("esp vector", "fse", dict(esp_ms=[1.0, 2.0]), r"esp_ms must be a single number"),
    ("tr 0", "gre", dict(tr_ms=0.0), r"tr_ms must be > 0 ms; got 0\.0"),
    ("tr inf", "gre", dict(tr_ms=float("inf")), r"tr_ms must be finite; got inf"),
    (
        "phase length",
        "fse",
        dict(phase_deg=[0.0, 0.0]),
        r"phase_deg must be a scalar or have one value per pulse \(3\)",
    ),
    ("phase length gre", "gre", dict(phase_deg=[0.0, 0.0]), r"phase_deg.*one value per pulse \(3\)"),
    ("phase nan", "gre", dict(phase_deg=[0.0, float("nan"), 0.0]), r"phase_deg must be finite; got nan"),
    ("kmax negative", "fse", dict(kmax=-1), r"kmax must be None \(exact\) or an int >= 0; got -1"),
    ("kmax bool", "gre", dict(kmax=True), r"kmax.*got True"),
    ("kmax float", "gre", dict(kmax=2.0), r"kmax.*got 2\.0"),
    ("chunk 0", "fse", dict(chunk_size=0), r"chunk_size must be a positive int; got 0"),
    ("chunk float", "gre", dict(chunk_size=2.5), r"chunk_size must be a positive int; got 2\.5"),
    (
        "unknown backend",
        "fse",
        dict(backend="cuda"),
        r"backend must be one of \('auto', 'torch', 'triton'\), got 'cuda'",
    ),
    ("z_init per pool", "fse", dict(z_init=[1.0, 1.0]), r"z_init needs 1 value"),
    (
        "prep delay",
        "gre",
        dict(prep=epgx.Prep(180.0, -1.0)),
        r"prep.delay_ms must be finite and >= 0; got -1\.0",
    ),
    (
        "diffusion lengths",
        "fse",
        dict(diffusion=epgx.Diffusion([1.0, 2.0], [1.0], 1.0)),
        r"grad_mt_per_m and tau_ms of the same non-zero length",
    ),
    ("diffusion tau", "gre", dict(diffusion=epgx.Diffusion([1.0], [0.0], 1.0)), r"tau_ms > 0"),
    (
        "diffusion D",
        "fse",
        dict(diffusion=epgx.Diffusion([1.0], [1.0], -1.0)),
        r"d_um2_per_ms must be >= 0; got -1\.0",
    ),
    (
        "diffusion mode",
        "fse",
        dict(diffusion=epgx.Diffusion([1.0], [1.0], 1.0, negative_orders="x")),
        r"negative_orders must be 'physical' or 'epgx', got 'x'",
    ),
]


@pytest.mark.parametrize(
    ("engine", "kwargs", "match"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
def test_bad_arguments_raise_value_error(engine, kwargs, match):
    args = dict(flip_deg=[90.0, 180.0, 180.0])
    args.update(kwargs)
    flip = args.pop("flip_deg")
    dt_name = "esp_ms" if engine == "fse" else "tr_ms"
    dt = args.pop(dt_name, 8.0)
    with pytest.raises(ValueError, match=match):
        _run(engine, _tis(), flip, dt, **args)


def test_diffusion_d_must_broadcast_with_the_batch():
    tis = epgx.Tissue(torch.full((3,), 1000.0), 80.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"d_um2_per_ms of shape \(2,\) does not broadcast.*\(3,\)"):
        epgx.fse(tis, [90.0, 180.0], 10.0, diffusion=epgx.Diffusion([10.0], [5.0], torch.ones(2)))


@pytest.mark.parametrize("engine", ENGINES)
def test_mt_tissue_needs_pulse_energy(engine):
    with pytest.raises(ValueError, match=r"MT tissue needs b1sq_tau_ut2ms.*pass 0"):
        _run(engine, _mt(), [90.0, 180.0])
    with pytest.raises(ValueError, match=r"b1sq_tau_ut2ms must be >= 0; got -1\.0"):
        _run(engine, _mt(), [90.0, 180.0], b1sq_tau_ut2ms=-1.0)
    with pytest.raises(ValueError, match=r"b1sq_tau_ut2ms.*one value per pulse \(2\)"):
        _run(engine, _mt(), [90.0, 180.0], b1sq_tau_ut2ms=[1.0, 1.0, 1.0])


@pytest.mark.parametrize("engine", ENGINES)
def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(engine, monkeypatch):
    """CPU tensors run Triton only in its interpreter; without TRITON_INTERPRET=1 it is an error."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' needs the tissue on a CUDA device.*'torch'"):
        _run(engine, _tis(), [90.0, 180.0], backend="triton")


@pytest.mark.parametrize("engine", ENGINES)
def test_triton_backend_refuses_what_the_kernel_cannot_do(engine):
    """No silent fallback: second-order derivatives and diffusion need backend='torch'."""
    t2 = torch.tensor(80.0, dtype=torch.float64, requires_grad=True)
    one = torch.tensor(1.0, dtype=torch.float64)
    second_order = lambda t1: _run(engine, epgx.Tissue(t1, t2), [90.0, 180.0], backend="triton")  # noqa: E731
    with pytest.raises(ValueError, match=r"backend='triton'.*second-order derivatives.*backend='torch'"):
        torch.func.jvp(second_order, (1000 * one,), (one,))  # forward mode over autograd
    with pytest.raises(ValueError, match=r"backend='triton'.*diffusion.*backend='torch'"):
        _run(engine, _tis(), [90.0, 180.0], backend="triton", diffusion=epgx.Diffusion([1.0], [1.0], 1.0))


def test_auto_backend_resolution():
    """auto: Triton exactly for CUDA tensors whose call the fused kernel covers."""
    import importlib.util

    from epgx.engine import _use_triton

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _use_triton("auto", cuda, None) == (importlib.util.find_spec("triton") is not None)
    assert not _use_triton("auto", cuda, "diffusion")
    assert not _use_triton("auto", cpu, None)
    assert not _use_triton("torch", cuda, None)


@pytest.mark.parametrize("engine", ENGINES)
def test_wrong_object_types(engine):
    with pytest.raises(TypeError, match=r"diffusion must be an epgx.Diffusion"):
        _run(engine, _tis(), [90.0, 180.0], diffusion={"grad": 1})
    if engine == "gre":
        with pytest.raises(TypeError, match=r"prep must be an epgx.Prep or None, got int"):
            _run(engine, _tis(), [90.0, 180.0], prep=3)


@pytest.mark.parametrize("engine", ENGINES)
def test_non_tissue_is_a_type_error(engine):
    with pytest.raises(TypeError, match=r"tissue must be an epgx.Tissue"):
        _run(engine, {"t1_ms": 1000.0}, [90.0, 180.0])


@pytest.mark.parametrize("engine", ENGINES)
def test_backends_auto_and_torch_agree(engine):
    flips = [90.0, 120.0, 150.0, 130.0]
    torch.testing.assert_close(
        _run(engine, _tis(), flips, backend="auto"),
        _run(engine, _tis(), flips, backend="torch"),
        rtol=0,
        atol=0,
    )


# ---------------------------------------------------------------- batching and chunking


def _random_bm_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)

    return dict(
        t1a=u(600, 1500),
        t1b=u(200, 600),
        t2a=u(50, 120),
        t2b=u(5, 40),
        f=u(0.05, 0.4),
        k=u(0, 50),
        df_b=u(-100, 100),
        b1=u(0.7, 1.2),
        df=u(-20, 20),
    )


def _bm(p: dict[str, torch.Tensor]) -> epgx.Tissue:
    return epgx.Tissue.bm(
        (p["t1a"], p["t1b"]), (p["t2a"], p["t2b"]), p["f"], p["k"], p["df_b"], b1=p["b1"], df_hz=p["df"]
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_batched_bm_equals_loop_over_spins(engine):
    p = _random_bm_batch(7)
    rng = np.random.default_rng(0)
    flips, phases = torch.tensor(rng.uniform(20, 170, 15)), torch.tensor(rng.uniform(-180, 180, 15))
    batched = _run(engine, _bm(p), flips, phase_deg=phases)
    assert batched.shape == (7, 15 if engine == "gre" else 14)
    for i in range(7):
        one = _run(engine, _bm({k: v[i] for k, v in p.items()}), flips, phase_deg=phases)
        torch.testing.assert_close(batched[i], one, rtol=0, atol=BATCH_TOL)


@pytest.mark.parametrize("engine", ENGINES)
def test_batched_mt_equals_loop_over_spins(engine):
    g = torch.Generator().manual_seed(1)
    b1 = 0.8 + 0.4 * torch.rand(5, generator=g, dtype=torch.float64)
    k = 10 * torch.rand(5, generator=g, dtype=torch.float64)
    energy = torch.linspace(0.5, 2.0, 12, dtype=torch.float64)
    flips = torch.linspace(30, 150, 12, dtype=torch.float64)

    def mt(i=slice(None)):
        return epgx.Tissue.mt((900.0, 1100.0), 60.0, 0.12, k[i], 14.9, b1=b1[i])

    batched = _run(engine, mt(), flips, b1sq_tau_ut2ms=energy)
    for i in range(5):
        torch.testing.assert_close(
            batched[i], _run(engine, mt(i), flips, b1sq_tau_ut2ms=energy), rtol=0, atol=BATCH_TOL
        )


@pytest.mark.parametrize("engine", ENGINES)
def test_chunked_equals_unchunked(engine):
    tis = _bm(_random_bm_batch(10, seed=2))
    flips = torch.linspace(40, 170, 12, dtype=torch.float64)
    whole = _run(engine, tis, flips)
    for chunk in (1, 3, 7):
        torch.testing.assert_close(_run(engine, tis, flips, chunk_size=chunk), whole, rtol=0, atol=BATCH_TOL)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", [(), (3,), (2, 3)])
def test_output_shape_is_batch_then_time(engine, shape):
    tis = epgx.Tissue(torch.full(shape, 1000.0, dtype=torch.float64), 80.0)
    n_pulses = 6
    out = _run(engine, tis, [90.0] * n_pulses)
    assert out.shape == (*shape, n_pulses if engine == "gre" else n_pulses - 1)
    assert out.dtype == torch.complex128
    sig, st = _run(engine, tis, [90.0] * n_pulses, return_states=True)
    assert sig.shape == out.shape
    assert st.fp.shape[:-2] == (*shape, 1) and st.fp.shape[-1] == out.shape[-1]
    assert st.fp.shape == st.fm.shape == st.z.shape


@pytest.mark.parametrize("engine", ENGINES)
def test_float32_agrees_with_float64(engine):
    p = _random_bm_batch(4, seed=3)
    flips = torch.linspace(40, 170, 20, dtype=torch.float64)
    s64 = _run(engine, _bm(p), flips)
    s32 = _run(engine, _bm({k: v.float() for k, v in p.items()}), flips.float())
    assert s32.dtype == torch.complex64
    torch.testing.assert_close(s32.to(torch.complex128), s64, rtol=0, atol=FLOAT32_TOL)


@pytest.mark.parametrize("engine", ENGINES)
def test_kmax_truncation_converges_to_exact(engine):
    rng = np.random.default_rng(0)
    n = 30
    flips = torch.tensor(rng.uniform(20, 170, n))
    tis = epgx.Tissue.bm((1000.0, 500.0), (100.0, 20.0), 0.2, 10.0, dtype=torch.float64)
    exact = _run(engine, tis, flips, 6.0)
    err = [float((_run(engine, tis, flips, 6.0, kmax=k) - exact).abs().max()) for k in (0, 10, 20, n)]
    assert err[0] > 1e-2  # truncation to order 0 (= ideal spoiling) is far off
    assert err[0] > err[1] > err[2] or err[2] < KMAX_EXACT_TOL
    assert err[3] < KMAX_EXACT_TOL


@pytest.mark.parametrize("engine", ENGINES)
def test_kmax_zero_is_ideal_spoiling(engine):
    """Only order 0 kept: transverse magnetisation is lost at every shift."""
    out = _run(engine, _tis(), [90.0, 90.0, 90.0], 10.0, kmax=0)
    if engine == "fse":
        assert torch.all(out.abs() < BATCH_TOL)
    else:
        torch.testing.assert_close(
            out.real,
            torch.tensor([1.0, 1 - np.exp(-0.01), 1 - np.exp(-0.01)], dtype=torch.float64),
            rtol=0,
            atol=BATCH_TOL,
        )


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kmax", [None, 5])
def test_return_states_gives_same_signal(engine, kmax):
    tis = _bm(_random_bm_batch(3, seed=4))
    flips = torch.linspace(40, 170, 16, dtype=torch.float64)
    plain = _run(engine, tis, flips, kmax=kmax)
    sig, st = _run(engine, tis, flips, kmax=kmax, return_states=True)
    torch.testing.assert_close(sig, plain, rtol=0, atol=BATCH_TOL)
    # the recorded F+₀ is the signal before i·(demodulation) and the sum over pools
    f0 = st.fp[..., 0, :].sum(-2)
    if engine == "fse":
        torch.testing.assert_close(1j * f0, sig, rtol=0, atol=BATCH_TOL)
    else:
        assert torch.allclose((1j * f0).abs(), sig.abs(), rtol=0, atol=BATCH_TOL)
    if kmax is not None:
        assert st.fp.shape[-2] == kmax + 1


def test_gradient_flows_to_sequence_and_tissue():
    flips = torch.tensor([90.0, 150.0, 140.0, 130.0], dtype=torch.float64, requires_grad=True)
    t2 = torch.tensor(80.0, dtype=torch.float64, requires_grad=True)
    b1 = torch.tensor([0.9, 1.1], dtype=torch.float64, requires_grad=True)
    tis = epgx.Tissue.bm((1000.0, 500.0), (t2, 20.0), 0.2, 10.0, 30.0, b1=b1)
    loss = epgx.fse(tis, flips, 10.0).abs().pow(2).sum()
    g_flip, g_t2, g_b1 = torch.autograd.grad(loss, (flips, t2, b1))
    for g in (g_flip, g_t2, g_b1):
        assert torch.all(torch.isfinite(g)) and torch.any(g != 0)


def test_gradient_finite_for_uncoupled_identical_pools_float32():
    t2 = torch.tensor(80.0, requires_grad=True)
    tis = epgx.Tissue.bm((1000.0, 1000.0), (t2, 80.0), 0.2, 0.0)
    (g,) = torch.autograd.grad(epgx.gre(tis, [30.0] * 3, 100.0).abs().sum(), t2)
    assert torch.isfinite(g)
