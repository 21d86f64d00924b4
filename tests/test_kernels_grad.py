"""Derivative rules of the fused train kernel (epgx.kernels.epg_train) in Triton's interpreter.

Runs only with TRITON_INTERPRET=1 in the environment (the CI lane). Oracles that share no
derivative code with the kernel: the pure-torch engine differentiated by torch's own AD
(torch.func jvp/jacfwd and autograd through epgx.ops) in float64, finite differences
(``torch.autograd.gradcheck``), and the kernel's two modes against each other (tangents
written vs contracted with a cotangent). Shapes stay within the interpreter rules.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from interp import INTERPRETED, interp
from spins import random_tissue, random_train
from torch.func import jacfwd, jacrev, jvp, vmap

import epgx
from epgx import engine, ops

pytestmark = interp

if INTERPRETED:
    from epgx.kernels import epg_train as kernel

F64 = torch.float64
# The kernel's tangents and torch's AD through epgx.ops are the same float64 arithmetic
# in another order (closed-form dT, fused relaxation tangents): measured ≤ 1e-15.
FLOAT64_RTOL = 1e-10
# float32 tangents carry ~6e-8 relative rounding per operation; a few dozen operators
# accumulate to ~1e-6 against the float64 engine (measured ≤ 8e-7).
FLOAT32_RTOL = 1e-5

KINDS = ["single", "bm", "mt"]
N_PULSES = 6
DT_MS = 7.0
N_SPINS = 3


def _tissue(kind: str, n: int, dtype: torch.dtype, seed: int = 0) -> epgx.Tissue:
    """Random spins with B1, df and (BM) df_b varying per spin (tests/spins.py)."""
    return random_tissue(kind, n, dtype, seed, t2b_min_ms=10.0)


def _sequence(dtype: torch.dtype = F64) -> dict[str, torch.Tensor]:
    return random_train(N_PULSES, dtype)


def _engine(kind: str, gre: bool, backend: str, **fixed: Any):
    """(tissue, flip_deg, phase_deg, dt_ms, b1sq) -> echoes through one backend."""
    run = epgx.gre if gre else epgx.fse

    def f(tissue, flip, phase, dt, b1sq):
        return run(tissue, flip, dt, phase, b1sq if kind == "mt" else None, backend=backend, **fixed)

    return f


def _assert_columns(got: torch.Tensor, want: torch.Tensor, signal: torch.Tensor, params, rtol: float) -> None:
    """Per column (last axis): max error relative to the column's largest value.

    Or, where larger, to |signal| / |parameter|: the df_hz column of echoes that refocus
    off-resonance is zero analytically, and what is left is rounding noise of the phase
    the tangents accumulate (~1e-9 in float32), not a derivative.
    """
    floor = signal.abs().max() / params.abs().clamp_min(1.0)
    scale = torch.maximum(want.abs().reshape(-1, want.shape[-1]).amax(0), floor)
    err = (got.to(want.dtype) - want).abs().reshape(-1, want.shape[-1]).amax(0) / scale
    assert bool((err <= rtol).all()), f"relative error per column: {err.tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("gre", [False, True], ids=["fse", "gre"])
@pytest.mark.parametrize("kind", KINDS)
def test_tissue_jacobian_matches_torch_engine(kind, gre, dtype):
    """Every tissue field at once: epgx.jacobian through the kernel (one tangent pass)."""
    tissue = _tissue(kind, N_SPINS, dtype)
    seq = _sequence(dtype)
    args = (seq["flip_deg"], seq["phase_deg"], DT_MS, seq["b1sq_tau_ut2ms"])
    names = tuple(tissue.fields())
    triton = _engine(kind, gre, "triton")
    signal, jac = epgx.jacobian(lambda t: triton(t, *args), tissue, names, return_signal=True)
    assert jac.shape == (N_SPINS, N_PULSES - (not gre), len(names))
    assert jac.dtype == (torch.complex64 if dtype == torch.float32 else torch.complex128)
    torch_engine = _engine(kind, gre, "torch")
    args64 = tuple(a.to(F64) if isinstance(a, torch.Tensor) else a for a in args)
    want_signal, want = epgx.jacobian(
        lambda t: torch_engine(t, *args64), tissue.to(F64), names, return_signal=True
    )
    params = torch.stack([tissue.fields()[n].to(F64).abs().max() for n in names])
    rtol = FLOAT32_RTOL if dtype == torch.float32 else FLOAT64_RTOL
    _assert_columns(signal.unsqueeze(-1), want_signal.unsqueeze(-1), want_signal, torch.ones(1), rtol)
    _assert_columns(jac, want, want_signal, params, rtol)


@pytest.mark.parametrize("gre", [False, True], ids=["fse", "gre"])
@pytest.mark.parametrize("kind", KINDS)
def test_sequence_jacobian_matches_torch_engine(kind, gre):
    """jacfwd w.r.t. every flip angle and phase, the timing and (MT) ∫B1² of each pulse."""
    tissue = _tissue(kind, 2, F64, seed=3)
    seq = _sequence()
    dt = torch.tensor(DT_MS, dtype=F64)
    x = (seq["flip_deg"], seq["phase_deg"], dt, seq["b1sq_tau_ut2ms"])
    argnums = (0, 1, 2, 3) if kind == "mt" else (0, 1, 2)
    real = lambda backend: lambda *a: torch.view_as_real(_engine(kind, gre, backend)(tissue, *a))  # noqa: E731
    got = jacfwd(real("triton"), argnums=argnums)(*x)
    want = jacfwd(real("torch"), argnums=argnums)(*x)
    signal = real("torch")(*x)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        g, w = g.reshape(*signal.shape, -1), w.reshape(*signal.shape, -1)
        _assert_columns(g, w, signal, x[i].abs().max(), FLOAT64_RTOL)


@pytest.mark.parametrize("gre", [False, True], ids=["fse", "gre"])
@pytest.mark.parametrize("kind", KINDS)
def test_jvp_along_every_input_at_once(kind, gre):
    """One torch.func.jvp (one tangent direction, NT = 1) moving every tissue field and the sequence."""
    base = _tissue(kind, N_SPINS, F64, seed=10)
    seq = _sequence()
    names = tuple(base.fields())
    x = (*(base.fields()[n].contiguous() for n in names), seq["flip_deg"], seq["phase_deg"])
    x = (*x, torch.tensor(DT_MS, dtype=F64), seq["b1sq_tau_ut2ms"])
    g = torch.Generator().manual_seed(11)
    v = tuple(torch.randn(t.shape, dtype=F64, generator=g) * 0.01 * t.abs().clamp_min(1.0) for t in x)
    out = {}
    for backend in ("torch", "triton"):

        def f(*a: torch.Tensor, backend: str = backend) -> torch.Tensor:
            tissue = base.replace(**dict(zip(names, a[: len(names)], strict=True)))
            return _engine(kind, gre, backend)(tissue, *a[len(names) :])

        out[backend] = jvp(f, x, v)
    for got, want in zip(out["triton"], out["torch"], strict=True):
        assert ((got - want).abs().max() / want.abs().max()).item() <= FLOAT64_RTOL


@pytest.mark.parametrize("gre", [False, True], ids=["fse", "gre"])
@pytest.mark.parametrize("kind", KINDS)
def test_backward_matches_torch_engine(kind, gre):
    """.backward() of a real loss: gradients of every tissue field and sequence input."""
    seq = _sequence()
    fields = {k: v.detach().clone().requires_grad_() for k, v in _tissue(kind, N_SPINS, F64).fields().items()}
    dt = torch.tensor(DT_MS, dtype=F64, requires_grad=True)
    sequence = [seq["flip_deg"].requires_grad_(), seq["phase_deg"].requires_grad_(), dt]
    sequence.append(seq["b1sq_tau_ut2ms"].requires_grad_())
    weights = torch.randn(
        N_SPINS, N_PULSES - (not gre), dtype=torch.complex128, generator=torch.Generator().manual_seed(2)
    )
    leaves = [*fields.values(), *sequence]
    grads = {}
    for backend in ("torch", "triton"):
        tissue = _tissue(kind, N_SPINS, F64).replace(**fields)
        echoes = _engine(kind, gre, backend)(tissue, *sequence)
        loss = (weights * echoes).real.sum() + echoes.abs().square().sum()
        grads[backend] = torch.autograd.grad(loss, leaves, allow_unused=True)
    names = [*fields, "flip_deg", "phase_deg", "dt_ms", "b1sq_tau_ut2ms"]
    # what the loss moves by when every echo changes by 100 %
    loss_scale = ((weights.abs() + 2 * echoes.abs()) * echoes.abs()).sum().detach()
    _assert_grads(names, grads["triton"], grads["torch"], leaves, loss_scale)


def _assert_grads(names, got, want, leaves, loss_scale: torch.Tensor) -> None:
    """Each gradient relative to its largest entry, or (where larger, as ``_assert_columns``)
    to loss_scale / |leaf|; an input the loss does not reach has no gradient at all."""
    for name, g, w, x in zip(names, got, want, leaves, strict=True):
        if w is None:  # ∫B1² reaches MT tissue only
            assert g is None or not g.any(), name
            continue
        assert g is not None, name
        scale = torch.maximum(w.abs().max(), loss_scale / x.detach().abs().max().clamp_min(1.0))
        err = ((g - w).abs().max() / scale).item()
        assert err <= FLOAT64_RTOL, f"{name}: relative error {err:.2e}"


def _raw_inputs(kind: str, n_spins: int, n_pulses: int, dtype: torch.dtype = F64) -> list[torch.Tensor]:
    """The ten kernel inputs (``epg_train._INPUTS``) of a random tissue and train."""
    tissue = _tissue(kind, n_spins, dtype, seed=4)
    flat = {k: v.reshape(-1) for k, v in tissue.fields().items()}
    op = ops.relaxation(torch.tensor(DT_MS, dtype=dtype), **engine._relax_kwargs(kind, flat))
    z0 = engine._start_state(kind, flat, engine._relax_kwargs(kind, flat), None, None)[:, ops.Z_RE, 0]
    wt = flat["mt_lineshape_us"] * 0.07 if kind == "mt" else torch.zeros(n_spins, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    r = lambda lo, hi: (lo + (hi - lo) * torch.rand(n_pulses, generator=g, dtype=F64)).to(dtype)  # noqa: E731
    xt_im = torch.zeros_like(op.xt_re) if op.xt_im is None else op.xt_im
    inputs = [op.xt_re, xt_im, op.xl, op.recovery, z0, flat["b1"], wt, r(0.3, 3.0), r(-3, 3), r(0.5, 2)]
    return [t.detach().contiguous() for t in inputs]


def test_gradcheck_backward_and_forward_ad():
    """Finite differences against backward and jvp of the autograd Function, float64.

    One tiny MT GRE train (two pools, saturation, demodulation; ~120 launches, ~7 s); the
    other kinds are checked against the torch engine's AD above.
    """
    inputs = [t.requires_grad_() for t in _raw_inputs("mt", 2, 3)]

    def f(*x):
        return kernel._Train.apply(*x, "mt", True, 4, None)

    assert torch.autograd.gradcheck(f, inputs, fast_mode=True, check_forward_ad=True)


def test_tangent_kernel_writes_every_output_and_nothing_else():
    """NaN-poisoned buffers, a partial tile, masked directions; the contraction equals
    Σ g·dout; tangents shared by every spin read as if spread over the spins."""
    n_spins, n_pulses, n_tan = 5, 5, 3
    inputs = _raw_inputs("bm", n_spins, n_pulses)
    g = torch.Generator().manual_seed(6)
    tangents = [torch.randn(n_tan, *t.shape, dtype=F64, generator=g) for t in inputs]
    primals, pulses = inputs[:7], kernel._pulse_table(*inputs[7:])
    dpulses = torch.stack(tangents[7:], dim=1).contiguous()
    n_e = n_pulses - 1
    out = torch.full((2, n_e, n_spins), float("nan"), dtype=F64)
    dout = torch.full((n_tan + 1, 2, n_e, n_spins), float("nan"), dtype=F64)  # one row beyond
    kw = dict(kind="bm", gre=False, n_states=n_pulses + 2, block_spins=4)
    kernel._launch_tan(primals, pulses, tangents[:7], dpulses, None, out, dout[:n_tan], **kw)
    assert torch.isfinite(out).all() and torch.isfinite(dout[:n_tan]).all(), "unwritten outputs"
    assert torch.isnan(dout[n_tan]).all(), "a masked direction was written"
    want = kernel._train_op(*inputs, "bm", False, n_pulses + 2, None)
    assert torch.equal(out, want)
    cot = torch.randn(2, n_e, n_spins, dtype=F64, generator=g)
    results: list[torch.Tensor] = []
    acc = torch.full((n_tan + 1, n_spins), float("nan"), dtype=F64)
    kernel._launch_tan(primals, pulses, tangents[:7], dpulses, cot, acc, acc[:n_tan], **kw)
    assert torch.isnan(acc[n_tan]).all(), "a masked direction was written"
    want_acc = torch.einsum("cej,tcej->tj", cot, dout[:n_tan])
    assert ((acc[:n_tan] - want_acc).abs().max() / want_acc.abs().max()).item() <= FLOAT64_RTOL
    # per-spin tangents given once for every spin (last axis 1) read as if spread out
    shared = [t[..., :1].contiguous() for t in tangents[:7]]
    spread = [t.expand_as(full).contiguous() for t, full in zip(shared, tangents[:7], strict=True)]
    for per_spin in (shared, spread):
        kernel._launch_tan(primals, pulses, per_spin, dpulses, cot, acc, acc[:n_tan], **kw)
        results.append(acc[:n_tan].clone())
    assert torch.equal(results[0], results[1])


def test_vmap_jacrev_and_the_batched_call():
    """vmap over tissues (joined to the spins), over flip trains (a loop), and jacrev."""
    tissue = _tissue("bm", 2, F64, seed=7)
    seq = _sequence()
    t2s = torch.tensor([[60.0, 90.0], [70.0, 110.0]], dtype=F64)
    flips = torch.stack([seq["flip_deg"], seq["flip_deg"].flip(0)])
    results = {}
    for backend in ("torch", "triton"):

        def f(t2: torch.Tensor, flip: torch.Tensor, backend: str = backend) -> torch.Tensor:
            t = tissue.replace(t2_ms=t2)
            return _engine("bm", False, backend)(t, flip, seq["phase_deg"], DT_MS, None)

        by_tissue = vmap(f, in_dims=(0, None))(t2s, seq["flip_deg"])
        by_flips = vmap(f, in_dims=(None, 0))(t2s[0], flips)
        rev = jacrev(lambda flip, f=f: torch.view_as_real(f(t2s[0], flip)))(seq["flip_deg"])
        loop = torch.stack([f(t2, seq["flip_deg"]) for t2 in t2s])
        results[backend] = (by_tissue, by_flips, rev, loop)
    for got, want in zip(results["triton"], results["torch"], strict=True):
        assert got.shape == want.shape
        assert ((got - want).abs().max() / want.abs().max()).item() <= FLOAT64_RTOL
    by_tissue, loop = results["triton"][0], results["triton"][3]
    assert ((by_tissue - loop).abs().max() / loop.abs().max()).item() <= FLOAT64_RTOL


def test_jacobian_is_one_tangent_launch(monkeypatch):
    """epgx.jacobian over ≤ NT_MAX fields runs the tangent kernel once, whatever the count."""
    launches = []

    class Counting:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            launches.append(self.fn)
            return self.fn[grid]

    for fn in (kernel._fwd, kernel._tan):
        monkeypatch.setattr(kernel, fn.__name__, Counting(fn))
    tissue = _tissue("bm", 2, F64)
    seq = _sequence()
    model = lambda t: epgx.fse(t, seq["flip_deg"], DT_MS, seq["phase_deg"], backend="triton")  # noqa: E731
    epgx.jacobian(model, tissue, ("t1_ms", "t2_ms", "f", "k_ab_per_s", "b1"))
    assert [fn.__name__ for fn in launches].count("_tan") == 1
    assert [fn.__name__ for fn in launches].count("_fwd") <= 1


@pytest.mark.parametrize("name", ["epg_train", "epg_train_tangent", "epg_train_vjp"])
def test_opcheck(name):
    """Schema, fake (meta) kernel, vmap-free dispatch and autograd registration of each op."""
    inputs = _raw_inputs("mt", 2, 3)
    config = ("mt", True, 4, None)
    g = torch.Generator().manual_seed(8)
    tangents = [torch.randn(2, *t.shape, dtype=F64, generator=g) for t in inputs]
    if name == "epg_train":
        args = (*[t.requires_grad_() for t in inputs], *config)
    elif name == "epg_train_tangent":
        args = (*inputs, *tangents, *config)
    else:
        args = (*inputs, *tangents, torch.randn(2, 3, 2, dtype=F64, generator=g), *config)
    torch.library.opcheck(getattr(torch.ops.epgx, name).default, args)


def test_second_order_through_the_kernel_is_a_clear_error():
    """The tangent op refuses to be differentiated again (the engines refuse earlier)."""
    inputs = _raw_inputs("single", 2, 3)
    flip = inputs[7].clone().requires_grad_()
    f = lambda b1: kernel._Train.apply(
        *inputs[:5], b1, *inputs[6:7], flip, *inputs[8:], "single", True, 4, None
    )  # noqa: E731
    _, tangent = jvp(f, (inputs[5],), (torch.ones_like(inputs[5]),))
    with pytest.raises(NotImplementedError, match=r"second-order derivatives.*backend='torch'"):
        tangent.sum().backward()


def test_start_state_derivatives_z_init_and_prep():
    """Gradients through the start state: z_init (FSE) and a preparation (GRE, MT saturation)."""
    seq = _sequence()
    fields = {
        k: v.detach().clone().requires_grad_() for k, v in _tissue("mt", 2, F64, seed=9).fields().items()
    }
    z = torch.tensor([-0.5, 0.1], dtype=F64, requires_grad=True)
    prep = epgx.Prep(flip_deg=150.0, delay_ms=30.0, b1sq_tau_ut2ms=3.0)
    args = (seq["flip_deg"], DT_MS, seq["phase_deg"], seq["b1sq_tau_ut2ms"])
    grads = {}
    for backend in ("torch", "triton"):
        tissue = _tissue("mt", 2, F64, seed=9).replace(**fields)
        fse = epgx.fse(tissue, *args, z_init=z, backend=backend)
        gre = epgx.gre(tissue, *args, prep=prep, backend=backend)
        loss = fse.abs().sum() + gre.abs().sum()
        grads[backend] = torch.autograd.grad(loss, [z, *fields.values()])
    leaves = [z, *fields.values()]
    _assert_grads(["z_init", *fields], grads["triton"], grads["torch"], leaves, loss.detach())


def test_no_spins():
    """An empty batch: no launch, empty echoes, zero gradients."""
    inputs = [t[..., :0].contiguous() if i < 7 else t for i, t in enumerate(_raw_inputs("bm", 1, 3))]
    inputs = [t.requires_grad_() for t in inputs]
    out = kernel._Train.apply(*inputs, "bm", False, 4, None)
    assert out.shape == (2, 2, 0)
    grads = torch.autograd.grad(out.sum(), inputs)
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, inputs, strict=True))
