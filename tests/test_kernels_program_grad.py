"""Derivative rules of the block-sequence kernel (epgx.kernels.epg_program) in Triton's interpreter.

Runs only with TRITON_INTERPRET=1 in the environment (the CI lane). Oracles that share no
derivative code with the kernel: the pure-torch block engine differentiated by torch's
own AD (``epgx.jacobian``'s vmapped jvp and autograd through epgx.ops) in float64, finite
differences (``torch.autograd.gradcheck``), and the kernel's two modes against each other
(tangents written vs contracted with a cotangent). Shapes stay within the interpreter
rules: ≤ 4 spins, ≤ ~60 events per launch.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from interp import INTERPRETED, interp
from spins import random_tissue

import epgx
from epgx import models
from epgx.blocks import _Program

pytestmark = interp

if INTERPRETED:
    from epgx.kernels import epg_program as kernel

F64 = torch.float64
# The kernel's tangents and torch's AD through epgx.ops are the same float64 arithmetic in
# another order (closed-form dT, fused relaxation tangents, the same host steady-state
# solve): measured ≤ 2e-14 for jacobians and ≤ 2e-11 for gradients, where a few entries
# sum contributions of opposite sign.
FLOAT64_RTOL = 1e-10

# (model, kind, protocol): every tissue kind; a spoiled GRE (first run, TE > 0: the block
# engine), a phase-cycled bSSFP (balanced steady state, frame rotations), MP2RAGE
# (inversion-prepared steady state, MT saturation by the inversion), T1-T2 shuffling
# (FSE readouts, steady state) and a short FISP-MRF (first run, a TR per pulse).
JACOBIAN_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("spgr", "single", dict(n_pulses=4, te_ms=2.0)),
    ("bssfp", "bm", dict(phase_increment_deg=(90.0,))),
    ("mp2rage", "mt", dict(n_readouts=2, ti_ms=(400.0, 1200.0), tr_ms=2500.0)),
    ("t1t2_shuffling", "mt", dict(recovery_ms=(600.0,), etl=4)),
    ("fisp_mrf", "bm", dict(n_pulses=4)),
]


def _tissue(kind: str, n: int, seed: int = 0) -> epgx.Tissue:
    """Random float64 spins with B1, df and (BM) df_b varying per spin (tests/spins.py)."""
    return random_tissue(kind, n, F64, seed, t2b_min_ms=10.0)


def _assert_columns(got: torch.Tensor, want: torch.Tensor, floor: torch.Tensor) -> None:
    """Per column (last axis): max error relative to the column's largest value, or to
    ``floor`` where larger (a column that is zero analytically holds rounding noise)."""
    scale = torch.maximum(want.abs().reshape(-1, want.shape[-1]).amax(0), floor)
    err = (got - want).abs().reshape(-1, want.shape[-1]).amax(0) / scale
    assert bool((err <= FLOAT64_RTOL).all()), f"relative error per column: {err.tolist()}"


@pytest.mark.parametrize(("name", "kind", "protocol"), JACOBIAN_CASES, ids=[c[0] for c in JACOBIAN_CASES])
def test_tissue_jacobian_matches_torch_engine(name: str, kind: str, protocol: dict[str, Any]) -> None:
    """epgx.jacobian w.r.t. every tissue field: the tangent kernel vs torch's AD of the block engine."""
    tissue = _tissue(kind, 3, seed=len(name))
    names = tuple(tissue.fields())
    fn = models.MODELS[name]
    got_signal, got = epgx.jacobian(
        lambda t: fn(t, backend="triton", **protocol), tissue, names, return_signal=True
    )
    signal, want = epgx.jacobian(
        lambda t: fn(t, backend="torch", **protocol), tissue, names, return_signal=True
    )
    assert got.shape == want.shape == (*signal.shape, len(names))
    _assert_columns(got_signal.unsqueeze(-1), signal.unsqueeze(-1), torch.zeros(1, dtype=F64))
    params = torch.stack([tissue.fields()[n].abs().max().clamp_min(1.0) for n in names])
    _assert_columns(got, want, signal.abs().max() / params)


# (model, kind, protocol with a flip tensor that requires grad): the flip angles' and every
# tissue field's gradients of a real loss by .backward().
def _backward_cases(flips: torch.Tensor) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        ("fisp_mrf", "single", dict(flip_deg=flips, tr_ms=8.0, ti_ms=20.0)),
        ("bssfp", "bm", dict(flip_deg=flips[0], phase_increment_deg=(180.0,))),
        ("mprage", "mt", dict(flip_deg=flips[1], n_readouts=2, ti_ms=400.0, tr_ms=1200.0)),
    ]


@pytest.mark.parametrize("case", range(3), ids=["fisp_mrf-single", "bssfp-bm-steady", "mprage-mt-steady"])
def test_backward_matches_torch_engine(case: int) -> None:
    """.backward() through first runs and steady states: tissue fields and flip angles."""
    grads, leaves, loss = {}, [], torch.zeros(())
    for backend in ("torch", "triton"):
        flips = torch.tensor([20.0, 35.0, 25.0, 40.0], dtype=F64, requires_grad=True)
        name, kind, protocol = _backward_cases(flips)[case]
        fields = {
            k: v.detach().clone().requires_grad_() for k, v in _tissue(kind, 3, seed=case).fields().items()
        }
        signal = models.MODELS[name](
            _tissue(kind, 3, seed=case).replace(**fields), backend=backend, **protocol
        )
        weights = torch.randn(signal.shape, dtype=signal.dtype, generator=torch.Generator().manual_seed(2))
        loss = (weights * signal).real.sum() + signal.abs().square().sum()
        leaves = [*fields.values(), flips]
        grads[backend] = torch.autograd.grad(loss, leaves, allow_unused=True)
    for i, (g, w) in enumerate(zip(grads["triton"], grads["torch"], strict=True)):
        if w is None:  # a flip the protocol does not use
            assert g is None or not g.any()
            continue
        assert g is not None
        # or, where larger, what the loss moves by when a leaf doubles
        scale = torch.maximum(
            w.abs().max(), loss.detach().abs() / leaves[i].detach().abs().max().clamp_min(1.0)
        )
        err = ((g - w).abs().max() / scale).item()
        assert err <= FLOAT64_RTOL, f"gradient {i}: relative error {err:.2e}"


# A tiny event table with every event kind: inversion (MT saturation), relaxation without
# and with a shift, pulses with phase and ∫B1², readouts with demodulation, a frame
# rotation, a spoiler.
EVENTS: list[tuple[Any, ...]] = [
    ("invert", 0.9, 3.0),
    ("relax", 30.0, 0),
    ("rf", 40.0, 30.0, 1.0),
    ("relax", 2.0, 0),
    ("echo", 30.0),
    ("relax", 4.0, 1),
    ("rotate", 90.0),
    ("rf", 30.0, 0.0, 1.5),
    ("echo", 0.0),
    ("relax", 4.0, 1),
    ("spoil",),
]


def _raw(kind: str, n_spins: int) -> tuple[list[torch.Tensor], tuple[Any, ...]]:
    """The ten kernel inputs (``epg_program._INPUTS``) of EVENTS on random spins from a
    random order-0 start state, and the rest of the ops' arguments."""
    tissue = _tissue(kind, n_spins, seed=4)
    program = _Program(EVENTS, tissue, True)
    p = {k: v.reshape(-1) for k, v in tissue.fields().items()}
    t = kernel.tables(program, p, EVENTS, False, (0, 0))
    g = torch.Generator().manual_seed(5)
    start = torch.rand(program.n_pools, 6, n_spins, generator=g, dtype=F64) - 0.5
    wt = p["mt_lineshape_us"] * 0.07 if kind == "mt" else torch.zeros(n_spins, dtype=F64)
    inputs = [t.xt_re, t.xt_im, t.xl, t.recovery, start, p["b1"], wt, t.flip, t.phase, t.energy]
    rest = (t.code, t.echoes, t.inversions, t.rotations, kind, t.n_states, None)
    return [x.detach().contiguous() for x in inputs], rest


def test_gradcheck_backward_and_forward_ad() -> None:
    """Finite differences against backward and jvp of the autograd Function: one MT spin
    through every event kind, readouts and final state.

    Inputs differentiated here: the longitudinal propagators (exchange with the bound
    pool), MT W·T and ∫B1² (which no block model differentiates); the others are checked
    against torch's AD above (each gradcheck input costs interpreter launches: ~3 s).
    """
    inputs, rest = _raw("mt", 1)
    checked = {"xl", "wt", "energy"}
    inputs = [x.requires_grad_(name in checked) for x, name in zip(inputs, kernel._INPUTS, strict=True)]

    def f(*x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return kernel._ProgramFn.apply(*x, *rest)

    assert torch.autograd.gradcheck(
        f, inputs, fast_mode=True, check_forward_ad=True, check_undefined_grad=False
    )


def test_tangent_kernel_writes_every_output_and_contracts() -> None:
    """NaN-poisoned buffers, a partial tile, a masked direction; the contraction equals
    Σ g·d(outputs) of the written tangents."""
    n_spins, n_tan = 3, 3
    inputs, rest = _raw("bm", n_spins)
    code, echoes, inversions, rotations = rest[:4]
    g = torch.Generator().manual_seed(6)
    tangents = [torch.randn(n_tan, *x.shape, dtype=F64, generator=g) for x in inputs]
    tabs = (code, kernel._pulses(*inputs[7:]), echoes, inversions, rotations)
    dpulses = kernel._dpulses(*tangents[7:])
    kw: dict[str, Any] = dict(kind="bm", n_states=rest[5], block_spins=2)
    n_e = echoes.shape[1]

    def nan(*shape: int) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=F64)

    out, final = nan(2, n_e, n_spins), nan(2, 6, n_spins)
    dout, dfinal = nan(n_tan + 1, 2, n_e, n_spins), nan(n_tan + 1, 2, 6, n_spins)  # one row beyond
    outs = (out, final, dout[:n_tan], dfinal[:n_tan])
    kernel._launch_tan(tabs, inputs[:7], tangents[:7], dpulses, None, outs, **kw)
    assert all(torch.isfinite(x).all() for x in outs), "unwritten outputs"
    assert torch.isnan(dout[n_tan]).all() and torch.isnan(dfinal[n_tan]).all(), (
        "a masked direction was written"
    )
    want_out, want_final = kernel._program_op(*inputs, *rest)
    assert torch.equal(out, want_out) and torch.equal(final, want_final)
    cot = (
        torch.randn(2, n_e, n_spins, dtype=F64, generator=g),
        torch.randn(2, 6, n_spins, dtype=F64, generator=g),
    )
    want = torch.einsum("cej,tcej->tj", cot[0], dout[:n_tan])
    want += torch.einsum("pcj,tpcj->tj", cot[1], dfinal[:n_tan])
    acc = nan(n_tan + 1, n_spins)
    kernel._launch_tan(tabs, inputs[:7], tangents[:7], dpulses, cot, (acc[:n_tan],), **kw)
    assert torch.isnan(acc[n_tan]).all(), "a masked direction was written"
    assert ((acc[:n_tan] - want).abs().max() / want.abs().max()).item() <= FLOAT64_RTOL


@pytest.mark.parametrize("name", ["epg_program", "epg_program_tangent", "epg_program_vjp"])
def test_opcheck(name: str) -> None:
    """Schema, fake (meta) kernel, dispatch and autograd registration of each op."""
    inputs, rest = _raw("single", 2)
    g = torch.Generator().manual_seed(8)
    tangents = [torch.randn(2, *x.shape, dtype=F64, generator=g) for x in inputs]
    if name == "epg_program":  # a per-spin and a per-pulse input differentiated: few launches
        inputs[5].requires_grad_()
        inputs[7].requires_grad_()
        args: tuple[Any, ...] = (*inputs, *rest)
    elif name == "epg_program_tangent":
        args = (*inputs, *tangents, *rest)
    else:
        n_e = rest[1].shape[1]
        cot = (torch.randn(2, n_e, 2, dtype=F64, generator=g), torch.randn(1, 6, 2, dtype=F64, generator=g))
        args = (*inputs, *tangents, *cot, *rest)
    torch.library.opcheck(getattr(torch.ops.epgx, name).default, args)


def test_second_order_through_the_kernel_is_a_clear_error() -> None:
    """The tangent op refuses to be differentiated again (blocks.simulate refuses earlier)."""
    inputs, rest = _raw("single", 2)
    flip = inputs[7].clone().requires_grad_()

    def f(b1: torch.Tensor) -> torch.Tensor:
        return kernel._ProgramFn.apply(*inputs[:5], b1, inputs[6], flip, *inputs[8:], *rest)[0]

    _, tangent = torch.func.jvp(f, (inputs[5],), (torch.ones_like(inputs[5]),))
    with pytest.raises(NotImplementedError, match=r"second-order derivatives.*backend='torch'"):
        tangent.sum().backward()
