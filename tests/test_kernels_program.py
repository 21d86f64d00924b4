"""The fused block-sequence kernel (epgx.kernels.epg_program) in Triton's CPU interpreter.

Runs only with TRITON_INTERPRET=1 in the environment (the CI lane), so that the kernel
module is interpreted from its first import; one test checks the error outside it.
Shapes stay within the interpreter rules (≤ 4 programs, ≤ 64 spins, ≤ ~60 events).
Oracle: the pure-torch block engine (:meth:`epgx.blocks._Program.run`), which shares
with the kernel only the host-side propagators of :func:`epgx.ops.relaxation`.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from interp import INTERPRETED, interp
from spins import random_tissue

import epgx
from epgx import blocks, models
from epgx.blocks import (
    Delay,
    FseReadout,
    GreReadout,
    Inversion,
    Saturation,
    Spoiler,
    T2Prep,
    _Program,
    simulate,
)

if INTERPRETED:
    from epgx.kernels import epg_program

# Same float64 arithmetic in another order (closed-form RF, fused relaxation, a fixed K):
# round-off over ≤ ~60 events stays far below this.
FLOAT64_RTOL = 1e-12
# float32 against the float32 torch engine: both use the same float32 propagators and
# steady-state solve, so what differs is the per-event arithmetic, ~6e-8 per operation
# over ≤ ~60 events (measured ≤ 4e-6 on every model).
FLOAT32_RTOL = 1e-5
# float32 kernel against float64 on a train without a steady-state solve: the float32
# propagators and ~60 events of float32 arithmetic (measured ≤ 4e-7 on the readouts,
# ≤ 2.4e-6 on the final state).
FLOAT32_VS_FLOAT64_RTOL = 1e-5

KINDS = ["single", "bm", "mt"]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}

# Every model of epgx.models.MODELS at a tiny protocol: ≤ ~60 events per kernel launch.
TINY: dict[str, dict[str, Any]] = {
    "bssfp": dict(phase_increment_deg=(180.0, 90.0)),
    "bssfp_mrf": dict(n_pulses=8),
    "fisp_mrf": dict(n_pulses=10),
    "fse": dict(etl=6),
    "ir": dict(ti_ms=(100.0, 900.0)),
    "memprage": dict(n_readouts=4, te_ms=(1.5, 3.0), esp_ms=8.0, ti_ms=500.0, tr_ms=1500.0),
    "mese": dict(etl=6),
    "molli": dict(scheme="2(1)1", n_phase_encodes=4, n_ramp=1),
    "mp2rage": dict(n_readouts=4, ti_ms=(400.0, 1200.0), tr_ms=2500.0),
    "mprage": dict(n_readouts=6, ti_ms=500.0, tr_ms=1500.0),
    "spgr": dict(n_pulses=8, te_ms=2.0),
    "t1t2_shuffling": dict(recovery_ms=(500.0, 900.0), etl=4),
    "vfa": dict(flip_deg=(5.0, 15.0)),
}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got − want| / max|want|."""
    scale = want.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return ((got.to(torch.complex128) - want.to(torch.complex128)).abs().max() / scale).item()


def _tissue(kind: str, n: int, dtype: torch.dtype, seed: int = 0) -> epgx.Tissue:
    """Random spins with B1, df and (BM) df_b varying per spin (tests/spins.py)."""
    return random_tissue(kind, n, dtype, seed)


@interp
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_models_match_torch_engine(name: str, kind: str, dtype: str) -> None:
    """Every model (steady states included) through backend='triton' vs backend='torch'."""
    tissue = _tissue(kind, 5, DTYPES[dtype], seed=len(name))
    fn = models.MODELS[name]
    got = fn(tissue, backend="triton", **TINY[name])
    want = fn(tissue, backend="torch", **TINY[name])
    assert got.shape == want.shape and got.dtype == want.dtype
    err = _rel_err(got, want)
    assert err <= (FLOAT64_RTOL if dtype == "fp64" else FLOAT32_RTOL), f"{name}/{kind}: {err:.2e}"


def _every_block() -> list[blocks.Block]:
    """One period using every block type and spoiling mode (≤ ~60 events)."""
    return [
        T2Prep(te_ms=40.0, n_refocusing=2, b1sq_tau_ut2ms=2.0),
        Delay(30.0),
        GreReadout(flip_deg=[10.0, 30.0, 20.0], tr_ms=[6.0, 7.0, 6.5], te_ms=(1.5, 3.0), spoiling="rf"),
        Saturation(70.0, b1sq_tau_ut2ms=1.0),
        GreReadout(
            flip_deg=25.0, tr_ms=5.0, n_pulses=3, te_ms=2.5, spoiling="balanced", phase_increment_deg=90.0
        ),
        FseReadout([150.0, 120.0, 160.0], esp_ms=8.0, b1sq_tau_ut2ms=3.0),
        Spoiler(),
        GreReadout(flip_deg=40.0, tr_ms=8.0, n_pulses=2, te_ms=3.0, spoiling="ideal", b1sq_tau_ut2ms=1.5),
        Inversion(0.9, b1sq_tau_ut2ms=4.0),
        Delay(200.0),
        GreReadout(flip_deg=[8.0, 12.0], tr_ms=[9.0, 11.0], te_ms=4.0, spoiling="fisp"),
    ]


@interp
@pytest.mark.parametrize("steady_state", [False, True], ids=["first-run", "steady"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_block_type(kind: str, steady_state: bool) -> None:
    """Preparations, every spoiling mode, multi-echo and FSE readouts in one sequence."""
    tissue = _tissue(kind, 6, torch.float64, seed=3)
    seq = _every_block()
    got = simulate(tissue, seq, steady_state=steady_state, backend="triton")
    want = simulate(tissue, seq, steady_state=steady_state, backend="torch")
    assert got.shape == want.shape == (6, blocks.n_readouts(seq))
    assert _rel_err(got, want) <= FLOAT64_RTOL


def _direct(
    kind: str, dtype: torch.dtype, n_spins: int, block_spins: int | None, start: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, _Program, dict[str, torch.Tensor]]:
    """run_program on NaN-poisoned buffers: (echoes, out, final, start state, program, fields)."""
    tissue = _tissue(kind, n_spins, dtype, seed=5)
    seq = [
        Inversion(0.95, b1sq_tau_ut2ms=2.0),
        Delay(40.0),
        GreReadout(
            flip_deg=[20.0, 50.0, 35.0, 60.0, 15.0],
            tr_ms=[9.0, 11.0, 10.0, 12.0, 9.5],
            te_ms=3.0,
            spoiling="fisp",
        ),
        GreReadout(flip_deg=30.0, tr_ms=6.0, n_pulses=3, te_ms=3.0, spoiling="balanced", b1sq_tau_ut2ms=1.0),
    ]
    events = [e for b in seq for e in b.events()]
    program = _Program(events, tissue)
    p = {k: v.reshape(-1) for k, v in tissue.fields().items()}
    n_pools = tissue.n_pools
    if start == "equilibrium":
        state = None
    else:  # a full order-0 state, as a balanced steady-state probe
        g = torch.Generator().manual_seed(7)
        state = torch.rand(n_pools, 6, 1, n_spins, generator=g, dtype=torch.float64).to(dtype) - 0.5
        if kind == "mt":
            state[1, :4] = 0  # the bound pool has no transverse states
    n_echo = blocks.n_readouts(seq)
    out = torch.full((2, n_echo, n_spins), float("nan"), dtype=dtype)
    final = torch.full((n_pools, 6, n_spins), float("nan"), dtype=dtype)
    echoes, last = epg_program.run_program(program, p, state, out=out, final=final, block_spins=block_spins)
    assert last.shape == (n_pools, 6, 1, n_spins)
    return echoes, out, final, state, program, p


# (spins, spins per program): one spin; two full tiles and a partial one (3 programs)
TILINGS = [(1, 1), (11, 4)]


@interp
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n_spins", "block_spins"), TILINGS, ids=[f"B{b}-bs{s}" for b, s in TILINGS])
def test_tiles_poisoned_buffers_and_final_state(
    kind: str, dtype: str, n_spins: int, block_spins: int
) -> None:
    """Every readout and final-state element written, for partial and several tiles;
    readouts and the final order-0 state against the torch engine in float64."""
    start = "equilibrium" if n_spins != 11 else "order0"
    echoes, out, final, state, program, p = _direct(kind, DTYPES[dtype], n_spins, block_spins, start)
    assert torch.isfinite(out).all(), "the kernel left readout elements unwritten"
    assert torch.isfinite(final).all(), "the kernel left final-state elements unwritten"
    p64 = {k: v.to(torch.float64) for k, v in p.items()}
    ref = _Program(program.events, _tissue(kind, n_spins, torch.float64, seed=5))
    want, want_state = ref.run(p64, None if state is None else state.to(torch.float64))
    tol = FLOAT64_RTOL if dtype == "fp64" else FLOAT32_VS_FLOAT64_RTOL
    assert _rel_err(echoes, want) <= tol
    # the sequence ends in a balanced block (no shift after its last readout), so the
    # pruned torch state keeps the exact order 0
    z_err = (final.to(torch.float64) - want_state[:, :, 0]).abs().max().item()
    assert z_err <= tol * want_state[:, :, 0].abs().max().item()


@interp
def test_batch_shape_and_split_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-D tissue batch, and spins split over launches when the propagator tables
    exceed the budget (steady state: the probes ride along)."""
    t1 = torch.tensor([[800.0, 1000.0, 1200.0], [900.0, 1100.0, 1300.0]], dtype=torch.float64)
    tissue = epgx.Tissue.bm((t1, 400.0), (80.0, 20.0), 0.15, 12.0, 40.0, df_hz=5.0, b1=0.9)
    seq = [
        Inversion(),
        Delay(100.0),
        GreReadout(flip_deg=10.0, tr_ms=6.0, n_pulses=4, te_ms=2.0),
        Delay(300.0),
    ]
    want = simulate(tissue, seq, steady_state=True, backend="torch")
    program = _Program([e for b in seq for e in b.events()], tissue)
    assert epg_program.spins_per_launch(program, 6, 13) == 6
    # 4 intervals (100, 2, 4, 300 ms) x 14 float64 values per BM spin x 13 probes: two spins
    monkeypatch.setattr(epg_program, "TABLE_BUDGET_BYTES", 2 * 4 * 14 * 8 * 13)
    assert epg_program.spins_per_launch(program, 6, 13) == 2
    got = simulate(tissue, seq, steady_state=True, backend="triton")
    assert got.shape == want.shape == (2, 3, 4)
    assert _rel_err(got, want) <= FLOAT64_RTOL


@interp
def test_triton_refuses_second_order_and_auto_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    """First-order derivatives run the kernel (values: tests/test_kernels_program_grad.py);
    second order and out= buffers with derivatives raise; auto takes torch on CPU tensors."""
    seq = [Inversion(), Delay(50.0), GreReadout(flip_deg=10.0, tr_ms=6.0, n_pulses=3)]
    t1 = torch.tensor([900.0, 1200.0], dtype=torch.float64, requires_grad=True)
    simulate(epgx.Tissue(t1, 80.0), seq, backend="triton").abs().sum().backward()
    assert t1.grad is not None and torch.isfinite(t1.grad).all()
    flips = torch.tensor([10.0, 20.0, 15.0], dtype=torch.float64, requires_grad=True)
    msg = r"backend='triton' does not support second-order derivatives.*backend='torch'"
    with pytest.raises(ValueError, match=msg):  # a jvp taken while the flip angles require grad
        epgx.jacobian(
            lambda t: simulate(t, [GreReadout(flip_deg=flips, tr_ms=6.0)], backend="triton"),
            epgx.Tissue(t1.detach(), 80.0),
            "t1_ms",
        )
    # auto: torch on CPU tensors (the kernel runs on CUDA ones), gradients flow
    t1.grad = None
    with caplog.at_level(logging.DEBUG, logger="epgx"):
        simulate(epgx.Tissue(t1, 80.0), seq, backend="auto").abs().sum().backward()
    assert t1.grad is not None and torch.isfinite(t1.grad).all()
    assert "block sequence on the pure-torch engine" in caplog.text
    # the kernel's out= buffer is for the forward pass only
    tissue = _tissue("single", 2, torch.float64)
    p = {k: v.reshape(-1) for k, v in tissue.fields().items()}
    program = _Program(GreReadout(flip_deg=flips, tr_ms=6.0).events(), tissue)
    with pytest.raises(ValueError, match=r"forward pass only"):
        epg_program.run_program(program, p, None, out=torch.empty(2, 3, 2, dtype=torch.float64))


@pytest.mark.skipif(INTERPRETED, reason="checks the error outside the interpreter lane")
def test_triton_needs_cuda_or_the_interpreter() -> None:
    seq = [GreReadout(flip_deg=10.0, tr_ms=6.0, n_pulses=3)]
    with pytest.raises(
        ValueError, match=r"backend='triton' needs the tissue on a CUDA device.*TRITON_INTERPRET"
    ):
        simulate(epgx.Tissue(1000.0, 80.0), seq, backend="triton")


# Full-size protocols on a GPU: up to ~1000 events of float64 rounding in another order.
GPU_FLOAT64_RTOL = 1e-10
GPU_PROTOCOLS: dict[str, dict[str, Any]] = {
    "fisp_mrf": dict(n_pulses=300),
    "bssfp_mrf": dict(n_pulses=300),
    "mprage": {},
    "molli": {},
    "t1t2_shuffling": dict(etl=32),
}


@pytest.mark.gpu
@pytest.mark.skipif(
    INTERPRETED or not torch.cuda.is_available(), reason="GPU lane: needs CUDA and the compiled kernel"
)
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_models_match_torch_engine(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """Full-size block models on CUDA: backend='auto' takes the kernel; torch on the same device."""
    tissue = _tissue(kind, 3000, torch.float64, seed=9).to("cuda")
    for name, kw in GPU_PROTOCOLS.items():
        fn = models.MODELS[name]
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="epgx"):
            got = fn(tissue, backend="auto", **kw)
        assert "block sequence on the fused Triton engine" in caplog.text, name
        want = fn(tissue, backend="torch", **kw)
        assert got.device.type == "cuda"
        err = _rel_err(got, want)
        assert err <= GPU_FLOAT64_RTOL, f"{name}/{kind}: {err:.2e}"
