"""The one-step kernel (epgx.kernels.epg_step) in Triton's interpreter, against epgx.ops.

Runs only with TRITON_INTERPRET=1 in the environment (the CI lane). Oracles that share no
code with the kernel: the pure-torch operators ``ops.rf`` → ``ops.relax`` → ``ops.shift``
and torch's own autograd and forward-mode AD through them (float64), finite differences
(``torch.autograd.gradcheck``), and the adjoint identity ⟨J v, w⟩ = ⟨v, Jᵀ w⟩ between
the tangent and adjoint kernels. Shapes stay within the interpreter rules.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch
from interp import INTERPRETED, interp
from spins import random_tissue
from torch.func import jacfwd, jvp, vmap

from epgx import engine, ops

pytestmark = interp

if INTERPRETED:
    from epgx.kernels import epg_step as kernel

F64 = torch.float64
# Same float64 arithmetic as epgx.ops in another order (fused rotation, relaxation and
# shift; the adjoint's transposed operators): measured ≤ 2e-15 relative.
FLOAT64_RTOL = 1e-12
# float32 inputs and arithmetic against the float64 reference: ~6e-8 per operation over
# a dozen operations per value (measured ≤ 4e-7 relative to max|x'|).
FLOAT32_RTOL = 1e-5

KINDS = ["single", "bm", "mt"]
DT_MS = 7.0
FLIP_RAD = 1.1
PHASE_RAD = 0.4
ENERGY_UT2MS = 1.3
# (relaxation, pulse) of a step: both (a pulse and its interval), pulse only (before a GRE
# readout), interval only (FSE's second half-echo)
MODES = [(True, True), (False, True), (True, False)]
MODE_IDS = ["rf+relax", "rf", "relax"]


def _fields(kind: str, n: int, dtype: torch.dtype = F64, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.reshape(-1) for k, v in random_tissue(kind, n, dtype, seed).fields().items()}


def _state(kind: str, n_states: int, n: int, dtype: torch.dtype = F64, seed: int = 1) -> torch.Tensor:
    """An arbitrary state: every plane of every order random (not one a train would reach)."""
    g = torch.Generator().manual_seed(seed)
    p = 1 if kind == "single" else 2
    return torch.randn(p, 6, n_states, n, generator=g, dtype=F64).to(dtype)


def _reference(x, op, b1, flip, phase, kind, lineshape, energy):
    """ops.rf → ops.relax (with recovery) → ops.shift: the pure-torch twin."""
    if flip is not None:
        sat = ops.mt_saturation(energy, lineshape, b1) if kind == "mt" else None
        x = ops.rf(x, ops.rf_matrix(flip * b1, phase), bound_only_z=kind == "mt", saturation=sat)
    if op is not None:
        x = ops.shift(ops.relax(x, op, with_recovery=True), 1)
    return x


def _params(kind: str, p: dict[str, torch.Tensor], dtype: torch.dtype = F64) -> dict[str, torch.Tensor]:
    """The differentiable inputs of a step: tissue fields and the pulse."""
    names = ["t1_ms", "t2_ms", "df_hz", "b1"]
    if kind != "single":
        names += ["f", "k_ab_per_s", "t1b_ms"]
    if kind == "bm":
        names += ["t2b_ms", "df_b_hz"]
    out = {n: p[n] for n in names}
    out |= {k: torch.tensor(v, dtype=dtype) for k, v in (("flip", FLIP_RAD), ("phase", PHASE_RAD))}
    if kind == "mt":
        out["energy"] = torch.tensor(ENERGY_UT2MS, dtype=dtype)
    return out


def _step_fn(kind: str, p: dict[str, torch.Tensor], names: list[str], relax: bool, rf: bool, backend: str):
    """(state, *params named ``names``) -> new state, through the kernel or the reference."""

    def f(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        q = p | _params(kind, p) | dict(zip(names, values, strict=True))
        op = ops.relaxation(DT_MS, **engine._relax_kwargs(kind, q)) if relax else None
        flip = q["flip"] if rf else None
        energy, lineshape = q.get("energy"), q.get("mt_lineshape_us")
        if backend == "torch":
            return _reference(x, op, q["b1"], flip, q["phase"], kind, lineshape, energy)
        mt = dict(mt_lineshape_us=lineshape, b1sq_tau_ut2ms=energy) if kind == "mt" and rf else {}
        return kernel.epg_step(x, op, q["b1"], flip, q["phase"], kind=kind, **mt)

    return f


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.to(want.dtype) - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


# (n_spins, n_states, block_spins): one spin and order; a partial tile; several tiles with
# a partial one (4 programs); orders in two blocks of the interpreter's 64
SHAPES = [(1, 1, None), (5, 3, None), (200, 6, 64), (2, 70, None)]


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-K{s[1]}")
def test_forward_matches_reference(kind, dtype, shape):
    """x' of every mode into a NaN-poisoned out= buffer, against the float64 twin."""
    n, n_states, block_spins = shape
    p64 = _fields(kind, n)
    x64 = _state(kind, n_states, n)
    p, x = {k: v.to(dtype) for k, v in p64.items()}, x64.to(dtype)
    tol = FLOAT64_RTOL if dtype == F64 else FLOAT32_RTOL
    for relax, rf in MODES:
        names = list(_params(kind, p64))
        want = _step_fn(kind, p64, names, relax, rf, "torch")(x64, *_params(kind, p64).values())
        op = ops.relaxation(DT_MS, **engine._relax_kwargs(kind, p)) if relax else None
        mt = (
            dict(mt_lineshape_us=p["mt_lineshape_us"], b1sq_tau_ut2ms=ENERGY_UT2MS)
            if kind == "mt" and rf
            else {}
        )
        out = torch.full_like(x, float("nan"))
        got = kernel.epg_step(
            x,
            op,
            p["b1"],
            FLIP_RAD if rf else None,
            PHASE_RAD,
            kind=kind,
            out=out,
            block_spins=block_spins,
            **mt,
        )
        assert got is out and not out.isnan().any()
        assert _rel_err(got, want) <= tol, (relax, rf, _rel_err(got, want))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_backward_and_jvp_match_torch_ad(kind, mode):
    """Gradients w.r.t. the state, every tissue parameter and the pulse, and the jvp along
    random tangents of all of them, against torch's AD of the twin (float64)."""
    relax, rf = mode
    n, n_states = 5, 4
    p = _fields(kind, n)
    params = _params(kind, p)
    names = list(params)
    args = (_state(kind, n_states, n), *params.values())
    g = torch.Generator().manual_seed(3)
    cot = torch.randn(args[0].shape, generator=g, dtype=F64)
    tangents = tuple(torch.randn(a.shape, generator=g, dtype=F64) for a in args)
    grads, tans = {}, {}
    for backend in ("torch", "triton"):
        f = _step_fn(kind, p, names, relax, rf, backend)
        leaves = [a.clone().requires_grad_() for a in args]
        grads[backend] = torch.autograd.grad(
            (f(*leaves) * cot).sum(), leaves, allow_unused=True, materialize_grads=True
        )
        tans[backend] = jvp(f, args, tangents)[1]
    for name, got, want in zip(["state", *names], grads["triton"], grads["torch"], strict=True):
        err = (got - want).abs().max() / want.abs().max().clamp_min(1e-300)
        assert err <= FLOAT64_RTOL or (got.abs().max() == 0 and want.abs().max() == 0), (name, err.item())
    assert _rel_err(tans["triton"], tans["torch"]) <= FLOAT64_RTOL


# (kind, inputs): the state, a relaxation time, B1 and the pulse of a single pool; the
# exchange rate and the flip for BM (the interpreter's ~0.1 s per launch keeps the set
# small: test_backward_and_jvp_match_torch_ad covers every input of every kind)
GRADCHECK = [("single", ["t2_ms", "b1", "flip", "phase"]), ("bm", ["k_ab_per_s", "flip"])]


@pytest.mark.parametrize("kind, names", GRADCHECK, ids=[g[0] for g in GRADCHECK])
def test_gradcheck_backward_and_forward_ad(kind, names):
    """Finite differences against the backward and the jvp, through ops.relaxation (float64)."""
    p = _fields(kind, 2)
    params = _params(kind, p)
    f = _step_fn(kind, p, names, True, True, "triton")
    state = _state(kind, 3, 2)
    if kind == "single":
        inputs = tuple(t.clone().requires_grad_() for t in (state, *(params[n] for n in names)))
    else:
        f = partial(f, state)
        inputs = tuple(params[n].clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True, check_forward_ad=True)


def _raw_inputs(kind: str, n_states: int, n: int, seed: int = 5) -> list[torch.Tensor]:
    """The eight kernel inputs (``kernel._INPUTS``) for ``n`` spins, from ops.relaxation."""
    p = _fields(kind, n, seed=seed)
    op = ops.relaxation(DT_MS, **engine._relax_kwargs(kind, p))
    xt_im = torch.zeros_like(op.xt_re) if op.xt_im is None else op.xt_im
    alpha = p["b1"] * FLIP_RAD
    phase = torch.full((n,), PHASE_RAD, dtype=F64)
    sat = (
        ops.mt_saturation(torch.tensor(ENERGY_UT2MS, dtype=F64), p["mt_lineshape_us"], p["b1"])
        if kind == "mt"
        else torch.ones(n, dtype=F64)
    )
    return [
        t.contiguous()
        for t in (_state(kind, n_states, n), op.xt_re, xt_im, op.xl, op.recovery, alpha, phase, sat)
    ]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_adjoint_dot_product(kind, mode):
    """⟨J v, w⟩ = ⟨v, Jᵀ w⟩ over all eight inputs: the tangent kernel against the adjoint kernel."""
    relax, rf = mode
    inputs = _raw_inputs(kind, 4, 3)
    g = torch.Generator().manual_seed(6)
    v = [torch.randn(t.shape, generator=g, dtype=F64) for t in inputs]
    w = torch.randn(inputs[0].shape, generator=g, dtype=F64)
    config = (kind, rf, relax, None)
    jv = torch.ops.epgx.epg_step_jvp.default(*inputs, *v, *config)[1]
    jtw = torch.ops.epgx.epg_step_bwd.default(*inputs, w, *config)
    lhs = (jv * w).sum()
    rhs = sum((a * b).sum() for a, b in zip(v, jtw, strict=True))
    assert abs(lhs - rhs) <= FLOAT64_RTOL * max(abs(lhs), abs(rhs)), (lhs.item(), rhs.item())


@pytest.mark.parametrize("name", ["epg_step", "epg_step_bwd", "epg_step_jvp"])
def test_opcheck(name):
    """Schema, fake kernel, dispatch and autograd registration of each op."""
    inputs = _raw_inputs("single", 3, 2)
    config = ("single", True, True, None)
    g = torch.Generator().manual_seed(8)
    if name == "epg_step":
        args: tuple[Any, ...] = (*[t.requires_grad_() for t in inputs], *config)
    elif name == "epg_step_bwd":
        args = (*inputs, torch.randn(inputs[0].shape, generator=g, dtype=F64), *config)
    else:
        args = (*inputs, *[torch.randn(t.shape, generator=g, dtype=F64) for t in inputs], *config)
    torch.library.opcheck(getattr(torch.ops.epgx, name).default, args)


def test_torch_func_jvp_jacfwd_and_vmap():
    """jacfwd over tissue parameters and vmap over a batch of states and pulses go through
    the ops' vmap rules (the batch joins the spins) and match the twin."""
    kind, n = "bm", 3
    p = _fields(kind, n)
    params = _params(kind, p)
    names = ["t1_ms", "b1", "flip"]
    x = _state(kind, 3, n)
    args = (x, *(params[k] for k in names))
    want = jacfwd(_step_fn(kind, p, names, True, True, "torch"), argnums=(1, 2, 3))(*args)
    got = jacfwd(_step_fn(kind, p, names, True, True, "triton"), argnums=(1, 2, 3))(*args)
    for a, b in zip(got, want, strict=True):
        assert _rel_err(a, b) <= FLOAT64_RTOL
    xs = torch.stack([x, 2 * x])
    flips = torch.tensor([0.3, 1.2], dtype=F64)
    for backend in ("torch", "triton"):
        f = _step_fn(kind, p, ["flip"], True, True, backend)
        if backend == "torch":
            want_v = vmap(f)(xs, flips)
        else:
            got_v = vmap(f)(xs, flips)
    assert _rel_err(got_v, want_v) <= FLOAT64_RTOL
    # jacrev-style: vmap over cotangents of the backward
    f = _step_fn(kind, p, ["flip"], True, True, "triton")
    _, vjp_fn = torch.func.vjp(f, x, params["flip"])
    cots = torch.randn(2, *x.shape, dtype=F64)
    got_rows = vmap(vjp_fn)(cots)
    ref = _step_fn(kind, p, ["flip"], True, True, "torch")
    _, vjp_ref = torch.func.vjp(ref, x, params["flip"])
    for a, b in zip(got_rows, vmap(vjp_ref)(cots), strict=True):
        assert _rel_err(a, b) <= FLOAT64_RTOL


def test_second_order_is_a_clear_error():
    inputs = _raw_inputs("single", 2, 2)
    alpha = inputs[5].clone().requires_grad_()
    out = kernel._Step.apply(*inputs[:5], alpha, *inputs[6:], "single", True, True, None)
    (g,) = torch.autograd.grad(out.sum(), alpha, create_graph=True)
    with pytest.raises(NotImplementedError, match="second-order"):
        g.sum().backward()


def test_bad_inputs_raise_naming_the_value():
    p = _fields("single", 3)
    x = _state("single", 2, 3)
    op = ops.relaxation(DT_MS, **engine._relax_kwargs("single", p))
    b1 = p["b1"]
    with pytest.raises(ValueError, match="'two'"):
        kernel.epg_step(x, op, b1, FLIP_RAD, kind="two")
    with pytest.raises(ValueError, match="neither"):
        kernel.epg_step(x, None, b1, None, kind="single")
    with pytest.raises(ValueError, match=r"\(2, 6, 2, 3\)"):
        kernel.epg_step(x.expand(2, -1, -1, -1), op, b1, FLIP_RAD, kind="single")
    with pytest.raises(ValueError, match=r"\(1, 6, 2, 3\) and \(2,\)"):
        kernel.epg_step(x, op, b1[:2], FLIP_RAD, kind="single")
    with pytest.raises(ValueError, match=r"flip_rad must be a number or have shape \[3\]; got \(2,\)"):
        kernel.epg_step(x, op, b1, torch.ones(2, dtype=F64), kind="single")
    with pytest.raises(ValueError, match="torch.float16"):
        kernel.epg_step(x.half(), None, b1.half(), FLIP_RAD, kind="single")
    with pytest.raises(ValueError, match="mt_lineshape_us None"):
        kernel.epg_step(_state("mt", 2, 3), None, b1, FLIP_RAD, kind="mt")
    with pytest.raises(ValueError, match="block_spins must be a power of two; got 3"):
        kernel.epg_step(x, op, b1, FLIP_RAD, kind="single", block_spins=3)
    with pytest.raises(ValueError, match="out= is for the forward pass only"):
        kernel.epg_step(x.requires_grad_(), op, b1, FLIP_RAD, kind="single", out=torch.empty_like(x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("train", ["fse", "gre"])
def test_engine_return_states_runs_the_step_kernel(kind: str, train: str) -> None:
    """``return_states=True`` on backend='triton' (one step launch per pulse + interval):
    echoes and every recorded state equal the pure-torch engine's, and gradients flow."""
    import epgx

    tissue = random_tissue(kind, 3, F64, seed=5)
    flips = [90.0, 150.0, 120.0] if train == "fse" else [30.0, 45.0, 60.0]
    extra: dict[str, Any] = {"b1sq_tau_ut2ms": 2.0} if kind == "mt" else {}

    def run(flip: Any, backend: str) -> Any:
        return getattr(epgx, train)(tissue, flip, DT_MS, return_states=True, backend=backend, **extra)

    echoes, states = run(flips, "triton")
    ref_echoes, ref_states = run(flips, "torch")
    scale = ref_echoes.abs().max()
    assert float((echoes - ref_echoes).abs().max() / scale) < FLOAT64_RTOL
    for name in ("fp", "fm", "z"):
        got, ref = getattr(states, name), getattr(ref_states, name)
        assert got.shape == ref.shape
        assert float((got - ref).abs().max()) < FLOAT64_RTOL * float(ref.abs().max())

    flip = torch.tensor(flips, dtype=F64, requires_grad=True)
    grads = [torch.autograd.grad(run(flip, b)[1].z.abs().sum(), flip)[0] for b in ("triton", "torch")]
    assert float((grads[0] - grads[1]).abs().max()) < FLOAT64_RTOL * float(grads[1].abs().max())
