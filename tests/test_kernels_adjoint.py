"""Reverse mode of the fused train (epgx.kernels.epg_train_adjoint) in Triton's interpreter.

Runs only with TRITON_INTERPRET=1 in the environment (the CI lane). Oracles that share no
code with the adjoint kernel: the pure-torch engine differentiated by torch's autograd in
float64, the forward-mode tangent kernel (adjoint dot-product test ⟨J v, w⟩ = ⟨v, Jᵀ w⟩),
finite differences (``gradcheck``), and the kernel against itself under other checkpoint
segments, tilings and chunkings. Shapes stay within the interpreter rules.
"""

from __future__ import annotations

import pytest
import torch
from interp import INTERPRETED, interp
from spins import random_tissue, random_train
from torch.func import vmap

import epgx
from epgx import engine, ops

pytestmark = interp

if INTERPRETED:
    from epgx.kernels import epg_train as kernel
    from epgx.kernels import epg_train_adjoint as adjoint

F64 = torch.float64
# The adjoint and torch's autograd through epgx.ops are the same float64 arithmetic in
# another order (transposed closed forms, fused relaxation): measured ≤ 3e-14 (BM; single
# pool and MT ≤ 3e-15) of each gradient's largest entry.
FLOAT64_RTOL = 1e-12
KINDS = ["single", "bm", "mt"]
N_PULSES = 5
DT_MS = 7.0
N_SPINS = 3


def _sequence(n_pulses: int = N_PULSES) -> dict[str, torch.Tensor]:
    return random_train(n_pulses)


def _inputs(kind: str, n_spins: int, n_pulses: int) -> list[torch.Tensor]:
    """The ten kernel inputs (``epg_train._INPUTS``) of random spins and a random train."""
    tissue = random_tissue(kind, n_spins, F64, seed=4, t2b_min_ms=10.0)
    flat = {k: v.reshape(-1) for k, v in tissue.fields().items()}
    kw = engine._relax_kwargs(kind, flat)
    op = ops.relaxation(torch.tensor(DT_MS, dtype=F64), **kw)
    z0 = engine._start_state(kind, flat, kw, None, None)[:, ops.Z_RE, 0]
    wt = flat["mt_lineshape_us"] * 0.07 if kind == "mt" else torch.zeros(n_spins, dtype=F64)
    g = torch.Generator().manual_seed(5)
    r = lambda lo, hi: lo + (hi - lo) * torch.rand(n_pulses, generator=g, dtype=F64)  # noqa: E731
    xt_im = torch.zeros_like(op.xt_re) if op.xt_im is None else op.xt_im
    inputs = [op.xt_re, xt_im, op.xl, op.recovery, z0, flat["b1"], wt, r(0.3, 3.0), r(-3, 3), r(0.5, 2)]
    return [t.detach().contiguous() for t in inputs]


def _cotangent(gre: bool, n_pulses: int, n_spins: int, seed: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n_pulses - (not gre), n_spins, dtype=F64, generator=g)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("gre", [False, True], ids=["fse", "gre"])
@pytest.mark.parametrize("kind", KINDS)
def test_backward_matches_torch_engine(kind, gre):
    """.backward() of a real loss through backend='triton' vs torch's autograd through the
    pure-torch engine: every tissue field, flip angles, phases, ESP/TR and (MT) ∫B1²."""
    seq = _sequence()
    base = random_tissue(kind, N_SPINS, F64, seed=0, t2b_min_ms=10.0)
    weights = torch.randn(
        N_SPINS, N_PULSES - (not gre), dtype=torch.complex128, generator=torch.Generator().manual_seed(2)
    )
    grads = {}
    for backend in ("torch", "triton"):
        fields = {k: v.detach().clone().requires_grad_() for k, v in base.fields().items()}
        flip, phase, b1sq = (
            seq[k].clone().requires_grad_() for k in ("flip_deg", "phase_deg", "b1sq_tau_ut2ms")
        )
        dt = torch.tensor(DT_MS, dtype=F64, requires_grad=True)
        run = epgx.gre if gre else epgx.fse
        echoes = run(base.replace(**fields), flip, dt, phase, b1sq if kind == "mt" else None, backend=backend)
        loss = (weights * echoes).real.sum() + echoes.abs().square().sum()
        leaves = [*fields.values(), flip, phase, dt] + ([b1sq] if kind == "mt" else [])
        grads[backend] = torch.autograd.grad(loss, leaves)
    names = [*base.fields(), "flip_deg", "phase_deg", "dt_ms", "b1sq_tau_ut2ms"]
    # relative to the largest entry or, where larger, to what the loss moves by when every
    # echo changes by 100 % per unit of the leaf: df_hz's gradient is zero analytically
    # here, and what is left is rounding noise of the accumulated phase (~1e-18)
    loss_scale = ((weights.abs() + 2 * echoes.abs()) * echoes.abs()).sum().detach()
    for name, got, want, x in zip(names, grads["triton"], grads["torch"], leaves, strict=False):
        scale = torch.maximum(want.abs().max(), loss_scale / x.detach().abs().max().clamp_min(1.0))
        err = ((got - want).abs().max() / scale).item()
        assert err <= FLOAT64_RTOL, f"{name}: relative error {err:.2e}"


def test_adjoint_dot_product_against_the_tangent_kernel():
    """⟨J v, w⟩ = ⟨v, Jᵀ w⟩ with J v from the forward-mode kernel (epgx::epg_train_tangent),
    Jᵀ w from the adjoint, v moving all ten kernel inputs at once: every kind and schedule."""
    g = torch.Generator().manual_seed(7)
    for kind in KINDS:
        for gre in (False, True):
            inputs = _inputs(kind, 2, 4)
            config = (kind, gre, 6, None)
            v = [torch.randn(t.shape, dtype=F64, generator=g) for t in inputs]
            if kind != "mt":  # no MT saturation outside MT: W·T and ∫B1² reach nothing
                v[6], v[9] = torch.zeros_like(v[6]), torch.zeros_like(v[9])
            w = _cotangent(gre, 4, 2)
            _, jv = torch.ops.epgx.epg_train_tangent.default(*inputs, *(t.unsqueeze(0) for t in v), *config)
            jtw = torch.ops.epgx.epg_train_adjoint.default(*inputs, w, *config)
            lhs = (jv[0] * w).sum()
            terms = torch.stack([(a * b).sum() for a, b in zip(v, jtw, strict=True)])
            scale = (jv[0] * w).abs().sum() + terms.abs().sum()
            assert ((lhs - terms.sum()).abs() / scale).item() <= FLOAT64_RTOL, (kind, gre)


def test_checkpoint_segments_give_identical_gradients():
    """T = 5 steps in segments of C = 1 (a checkpoint per step), 2 (T not a multiple of C),
    5 (one checkpoint), 8 (T < C), and the default ⌈√T⌉: bit-identical recomputation."""
    kind = "bm"
    for gre in (False, True):
        inputs = _inputs(kind, 2, 5)
        w = _cotangent(gre, 5, 2)
        results = [adjoint._adjoint(inputs, w, kind, gre, 6, None, segment=c) for c in (None, 1, 2, 5, 8)]
        for other in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True)), gre


@pytest.mark.parametrize(("n_spins", "block_spins"), [(1, 4), (9, 4)], ids=["one", "tiles"])
def test_tiles_write_every_output(n_spins, block_spins):
    """B = 1, and several tiles with a partial one: NaN-poisoned outputs all written; the same
    gradients as one program over all spins (per-pulse sums in another order)."""
    kind, gre = "bm", True
    inputs = _inputs(kind, n_spins, 4)
    w = _cotangent(gre, 4, n_spins)
    n_prog = -(-n_spins // block_spins)
    gspin = torch.full((18, n_spins), float("nan"), dtype=F64)
    gpulse = torch.full((3, 4, n_prog), float("nan"), dtype=F64)
    table = kernel._pulse_table(*inputs[7:])
    cfg = dict(kind=kind, gre=gre, n_states=5, block_spins=block_spins)
    adjoint._launch_adj(inputs[:7], table, w, gspin, gpulse, **cfg)
    assert torch.isfinite(gspin).all() and torch.isfinite(gpulse).all(), "unwritten outputs"
    tiled = adjoint._adjoint(inputs, w, kind, gre, 5, block_spins)
    whole = adjoint._adjoint(inputs, w, kind, gre, 5, None)
    for a, b in zip(tiled, whole, strict=True):
        assert _rel(a, b) <= FLOAT64_RTOL
    # chunks of one program each (a tiny buffer budget): the same launches' arithmetic
    chunked = torch.full_like(gspin, float("nan")), torch.full_like(gpulse, float("nan"))
    adjoint._launch_adj(inputs[:7], table, w, *chunked, **cfg, buffer_bytes=1)
    assert torch.equal(chunked[0], gspin) and torch.equal(chunked[1], gpulse)


def test_gradcheck_backward():
    """Finite differences against the backward of the autograd Function (float64, BM FSE)."""
    inputs = [t.requires_grad_() for t in _inputs("bm", 2, 3)]

    def f(*x):
        return kernel._Train.apply(*x, "bm", False, 4, None)

    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


def test_opcheck():
    """Schema, fake kernel, dispatch and autograd registration of epgx::epg_train_adjoint."""
    inputs = _inputs("mt", 2, 3)
    args = (*inputs, _cotangent(True, 3, 2), "mt", True, 4, None)
    torch.library.opcheck(torch.ops.epgx.epg_train_adjoint.default, args)


def test_vmap_rule():
    """The adjoint op under vmap against a Python loop: batched spins and cotangents (folded
    into the spins, per-pulse gradients kept per batch element) and batched flips (a loop)."""
    inputs = _inputs("bm", 2, 4)
    config = ("bm", True, 5, None)
    g = torch.Generator().manual_seed(8)
    w = torch.randn(3, 2, 4, 2, dtype=F64, generator=g)
    b1 = inputs[5] * torch.tensor([[1.0], [0.9], [1.1]], dtype=F64)
    flips = inputs[7] * torch.tensor([[1.0], [0.8], [1.2]], dtype=F64)
    op = torch.ops.epgx.epg_train_adjoint.default

    def f(b1, flip, w):
        return op(*inputs[:5], b1, inputs[6], flip, *inputs[8:], w, *config)

    cases = [((0, None, 0), (b1, inputs[7], w)), ((None, 0, None), (inputs[5], flips, w[0]))]
    for in_dims, args in cases:
        got = vmap(f, in_dims=in_dims)(*args)
        loop = [f(*(a if d is None else a[i] for a, d in zip(args, in_dims, strict=True))) for i in range(3)]
        for a, b in zip(got, zip(*loop, strict=True), strict=True):
            assert _rel(a, torch.stack(b)) <= FLOAT64_RTOL, in_dims


def test_second_order_is_a_clear_error():
    """A backward through the adjoint (a gradient of a gradient) raises."""
    inputs = _inputs("single", 2, 3)
    flip = inputs[7].clone().requires_grad_()
    out = kernel._Train.apply(*inputs[:7], flip, *inputs[8:], "single", True, 4, None)
    (g,) = torch.autograd.grad(out.square().sum(), flip, create_graph=True)
    with pytest.raises(NotImplementedError, match=r"second-order derivatives.*backend='torch'"):
        g.sum().backward()


def test_flip_gradient_is_one_adjoint_launch(monkeypatch):
    """The flip-angle gradient of a GRE train: one adjoint launch whatever the number of
    pulses (the one-hot tangent contraction it replaces took one direction per pulse)."""
    launches = []

    class Counting:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            launches.append(self.fn.__name__)
            return self.fn[grid]

    for module, fn in ((kernel, kernel._fwd), (kernel, kernel._tan), (adjoint, adjoint._adj)):
        monkeypatch.setattr(module, fn.__name__, Counting(fn))
    tissue = random_tissue("single", 2, F64, seed=9)
    flip = _sequence(12)["flip_deg"].requires_grad_()
    epgx.gre(tissue, flip, DT_MS, backend="triton").abs().sum().backward()
    assert launches == ["_fwd", "_adj"]
    assert flip.grad is not None and flip.grad.abs().min() > 0
