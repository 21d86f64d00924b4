"""``torch.func`` reverse mode through the fused kernels in Triton's interpreter.

``grad``, ``vjp``, ``jacrev`` and ``vmap(jacrev)`` run the kernels' backward at a transform
level, where each derivative launch must itself be a node the transforms accept. Runs only
with TRITON_INTERPRET=1 in the environment (the CI lane). Oracle: the same transforms of
``backend="torch"`` (pure torch, float64) for the whole-train kernel (``epgx.fse``,
``epgx.gre``), the block-sequence kernel (``epgx.models.spgr`` with TE > 0) and the one-step
kernel against ``ops.rf`` → ``ops.relax`` → ``ops.shift``; second order must still raise.
Shapes stay tiny: 2 spins, 3 pulses.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from interp import INTERPRETED, interp
from torch.func import grad, jacfwd, jacrev, vjp, vmap

import epgx
from epgx import models, ops

pytestmark = interp

if INTERPRETED:
    from epgx.kernels import epg_step as step_kernel

F64 = torch.float64
# The kernels' derivatives and torch's AD of the twin are the same float64 arithmetic in
# another order (measured ≤ 1e-14 relative to each result's largest entry).
FLOAT64_RTOL = 1e-12
T1_MS = torch.tensor([1000.0, 900.0], dtype=F64)
T2_MS = torch.tensor([80.0, 60.0], dtype=F64)
TISSUE = epgx.Tissue(T1_MS, T2_MS, dtype=F64)
FLIP_DEG = torch.tensor([90.0, 150.0, 120.0], dtype=F64)
# two flip trains for vmap(jacrev): the first and a perturbed one
FLIP_BATCH_DEG = torch.stack([FLIP_DEG, FLIP_DEG + torch.tensor([5.0, -10.0, 7.0], dtype=F64)])
STEP_DT_MS = 7.0
# Jacobians are taken of this many random combinations of the outputs: in the interpreter
# each row is an adjoint launch per vmap element (vmap(jacrev) over pulses loops over both).
JAC_ROWS = 3
STEP_PHASE_RAD = 0.4

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _fse(backend: str) -> Model:
    """Echoes (re, im) of a 3-pulse FSE train w.r.t. the flips (°) and T2 (ms): epg_train."""
    return lambda flip, t2: torch.view_as_real(
        epgx.fse(TISSUE.replace(t2_ms=t2), flip, 10.0, backend=backend)
    )


def _gre(backend: str) -> Model:
    """An RF-spoiled 3-pulse GRE train w.r.t. the flips (°) and T1 (ms): epg_train."""
    return lambda flip, t1: torch.view_as_real(
        epgx.gre(TISSUE.replace(t1_ms=t1), flip, 8.0, (0.0, 117.0, 351.0), backend=backend)
    )


def _spgr(backend: str) -> Model:
    """SPGR with TE > 0 (the block engine) w.r.t. the flips (°) and T2 (ms): epg_program."""
    return lambda flip, t2: torch.view_as_real(
        models.spgr(TISSUE.replace(t2_ms=t2), flip_deg=flip, tr_ms=8.0, te_ms=2.0, backend=backend)
    )


def _step(backend: str) -> Model:
    """One step (pulse, relaxation, shift) of a fixed state w.r.t. the flip (rad) and B1."""
    g = torch.Generator().manual_seed(0)
    state = torch.randn(1, 6, 3, 2, generator=g, dtype=F64)  # [P, 6, K, B]
    relaxation = ops.relaxation(STEP_DT_MS, t1_ms=TISSUE.t1_ms, t2_ms=TISSUE.t2_ms)

    def f(flip: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
        if backend == "triton":
            return step_kernel.epg_step(state, relaxation, b1, flip, STEP_PHASE_RAD, kind="single")
        x = ops.rf(state, ops.rf_matrix(flip * b1, torch.tensor(STEP_PHASE_RAD, dtype=F64)))
        return ops.shift(ops.relax(x, relaxation, with_recovery=True), 1)

    return f


# (model, flips, the tissue field's value, which argument vmap batches, its batch). SPGR's
# vmap runs over T2: epgx.models checks flip angles by value, which vmap cannot batch.
CASES = {
    "fse": (_fse, FLIP_DEG, T2_MS, 0, FLIP_BATCH_DEG),
    "gre": (_gre, FLIP_DEG, T1_MS, 0, FLIP_BATCH_DEG),
    "spgr": (_spgr, FLIP_DEG, T2_MS, 1, torch.stack([T2_MS, T2_MS * 1.5])),
    "step": (
        _step,
        torch.tensor(1.1, dtype=F64),
        torch.tensor([0.9, 1.05], dtype=F64),
        0,
        torch.tensor([1.1, 0.3]),
    ),
}


def _projected(f: Model, n_out: int) -> Model:
    """``f`` followed by a fixed random [JAC_ROWS, n_out] map of its flattened outputs."""
    mix = torch.randn(JAC_ROWS, n_out, generator=torch.Generator().manual_seed(2), dtype=F64)
    return lambda a, b: mix @ f(a, b).reshape(-1)


def _assert_close(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, (what, i, g.shape, w.shape)
        err = ((g - w).abs().max() / w.abs().max().clamp_min(1e-300)).item()
        assert err <= FLOAT64_RTOL, f"{what}, argument {i}: relative error {err:.2e}"


@pytest.mark.parametrize("name", list(CASES))
def test_reverse_transforms_match_torch(name: str) -> None:
    """grad, vjp, jacrev and vmap(jacrev) w.r.t. the flips and a tissue field, both arguments."""
    make, flip, field, batched, batch = CASES[name]
    in_dims = (0, None) if batched == 0 else (None, 0)
    args = (batch.to(F64), field) if batched == 0 else (flip, batch)
    results = {}
    for backend in ("torch", "triton"):
        f = make(backend)
        weights = torch.randn(f(flip, field).shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        out, pullback = vjp(f, flip, field)
        f_rows = _projected(f, out.numel())
        results[backend] = {
            "grad": grad(lambda a, b: (weights * f(a, b)).sum(), argnums=(0, 1))(flip, field),  # noqa: B023
            "vjp": (out, *pullback(weights)),
            "jacrev": jacrev(f_rows, argnums=(0, 1))(flip, field),
            "vmap(jacrev)": vmap(jacrev(f_rows, argnums=(0, 1)), in_dims=in_dims)(*args),
        }
    for what, want in results["torch"].items():
        _assert_close(results["triton"][what], want, f"{name} {what}")


@pytest.mark.parametrize("name", list(CASES))
def test_second_order_raises(name: str) -> None:
    """grad of grad, jacfwd of jacrev and a backward through a backward name the missing
    second order (the public wrappers refuse nested transforms up front: ValueError; the
    kernels' derivative launches refuse to be differentiated: NotImplementedError)."""
    make, flip, field, _, _ = CASES[name]
    f = make("triton")

    def loss(a: torch.Tensor) -> torch.Tensor:
        return f(a, field).square().sum()

    second_order = pytest.raises((NotImplementedError, ValueError), match="second-order derivatives")
    with second_order:
        grad(lambda a: grad(loss)(a).sum())(flip)
    with second_order:
        jacfwd(jacrev(loss))(flip)
    leaf = flip.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(leaf), leaf, create_graph=True)
    with pytest.raises(NotImplementedError, match="second-order derivatives"):
        g.sum().backward()
