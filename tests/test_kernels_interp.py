"""The fused whole-train kernel (epgx.kernels.epg_train) in Triton's CPU interpreter.

Runs only with TRITON_INTERPRET=1 in the environment (the CI lane), so that the kernel
module is interpreted from its first import. Shapes stay within the interpreter rules
(≤ 4 programs, B ≤ 256 spins, ≤ 50 intervals). Oracles: the pure-torch engine in
float64 and the EPG-X reference outputs in tests/data.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from interp import INTERPRETED, interp
from spins import random_tissue, random_train

import epgx
from epgx import engine, ops

pytestmark = interp

if INTERPRETED:
    from epgx.kernels.epg_train import epg_train

# Same float64 arithmetic in another order (the kernel's closed-form RF and fused
# relaxation): round-off over ~50 operators stays far below this.
FLOAT64_RTOL = 1e-12
# float32 carries ~6e-8 relative precision per operation; a few dozen operators
# accumulate to ~1e-6 against the float64 engine (measured ≤ 3e-7).
FLOAT32_RTOL = 1e-5
# EPG-X and epgx agree to float64 rounding (as tests/test_reference.py REF_RTOL).
REF_RTOL = 1e-10

KINDS = ["single", "bm", "mt"]
N_PULSES = 12
DT_MS = 7.0


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got − want| / max|want| (an all-zero reference, e.g. FSE at kmax=0, must be met exactly)."""
    scale = want.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return ((got.to(torch.complex128) - want).abs().max() / scale).item()


def _tissue(kind: str, n: int, dtype: torch.dtype, seed: int = 0) -> epgx.Tissue:
    """Random spins with B1, df and (BM) df_b varying per spin (tests/spins.py)."""
    return random_tissue(kind, n, dtype, seed)


def _sequence() -> dict[str, torch.Tensor]:
    return random_train(N_PULSES)


def _torch_reference(tissue: epgx.Tissue, gre: bool, seq: dict[str, torch.Tensor], **kw: Any) -> torch.Tensor:
    """The pure-torch engine in float64 on the same (possibly float32) values."""
    t64 = tissue.to(torch.float64)
    b1sq = seq["b1sq_tau_ut2ms"] if tissue.kind == "mt" else None
    run = epgx.gre if gre else epgx.fse
    return run(t64, seq["flip_deg"], DT_MS, seq["phase_deg"], b1sq, backend="torch", **kw)


def _kernel_direct(
    tissue: epgx.Tissue, gre: bool, seq: dict[str, torch.Tensor], block_spins: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """epg_train called directly with a NaN-poisoned output buffer: (echoes, buffer)."""
    dtype, kind = tissue.dtype, tissue.kind
    flat = {k: v.reshape(-1) for k, v in tissue.fields().items()}
    n_spins = flat["b1"].shape[0]
    interval_ms = DT_MS if gre else DT_MS / 2  # FSE: ESP/2 between pulse and echo
    op = ops.relaxation(torch.tensor(interval_ms, dtype=dtype), **engine._relax_kwargs(kind, flat))
    z0 = torch.ones(1, n_spins, dtype=dtype) if kind == "single" else torch.stack([1 - flat["f"], flat["f"]])
    phase = seq["phase_deg"].clone()
    if not gre:
        phase[1:] += 90.0  # CPMG: refocusing pulses at 90° to the excitation
    n_echoes = N_PULSES if gre else N_PULSES - 1
    out = torch.full((2, n_echoes, n_spins), float("nan"), dtype=dtype)
    echoes = epg_train(
        op,
        z0,
        flat["b1"],
        (seq["flip_deg"] * math.pi / 180).to(dtype),
        (phase * math.pi / 180).to(dtype),
        kind=kind,
        gre=gre,
        n_states=2 * N_PULSES,  # more orders than there are shifts: no truncation at all
        mt_lineshape_us=flat.get("mt_lineshape_us"),
        b1sq_tau_ut2ms=seq["b1sq_tau_ut2ms"].to(dtype) if kind == "mt" else None,
        out=out,
        block_spins=block_spins,
    )
    return echoes, out


# (spins, spins per program): one spin, a partial tile, several tiles, the default pick
TILINGS = [(1, 1), (5, 4), (64, 16), (200, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("gre", [False, True], ids=["fse", "gre"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n_spins", "block_spins"), TILINGS, ids=[f"B{b}-bs{s}" for b, s in TILINGS])
def test_kernel_matches_torch_engine(kind, gre, dtype, n_spins, block_spins):
    tissue = _tissue(kind, n_spins, dtype)
    seq = _sequence()
    echoes, out = _kernel_direct(tissue, gre, seq, block_spins)
    assert torch.isfinite(out).all(), "the kernel left output elements unwritten"
    assert echoes.shape == (n_spins, N_PULSES if gre else N_PULSES - 1)
    assert echoes.dtype == (torch.complex64 if dtype == torch.float32 else torch.complex128)
    want = _torch_reference(tissue, gre, seq)
    err = _rel_err(echoes, want)
    assert err <= (FLOAT32_RTOL if dtype == torch.float32 else FLOAT64_RTOL), f"relative error {err:.2e}"


@pytest.mark.parametrize("gre", [False, True], ids=["fse", "gre"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kmax", [None, 0, 3])
def test_backend_triton_matches_torch(kind, gre, kmax):
    """Through the public engines: batch shape, pruned state count and kmax truncation."""
    tissue = _tissue(kind, 6, torch.float64, seed=2)
    tissue = tissue.to(torch.float64)
    seq = _sequence()
    b1sq = seq["b1sq_tau_ut2ms"] if kind == "mt" else None
    run = epgx.gre if gre else epgx.fse
    args = (seq["flip_deg"], DT_MS, seq["phase_deg"], b1sq)
    want = run(tissue, *args, kmax=kmax, backend="torch")
    got = run(tissue, *args, kmax=kmax, backend="triton")
    assert got.shape == want.shape
    assert _rel_err(got, want) <= FLOAT64_RTOL


def test_backend_triton_batch_shape_prep_and_z_init():
    t1 = torch.tensor([[800.0, 1000.0, 1200.0], [900.0, 1100.0, 1300.0]], dtype=torch.float64)
    tissue = epgx.Tissue.bm((t1, 400.0), (80.0, 20.0), 0.15, 12.0, 40.0, df_hz=5.0)
    seq = _sequence()
    prep = epgx.Prep(flip_deg=180.0, delay_ms=20.0)
    for backend_out in [
        lambda b: epgx.gre(tissue, seq["flip_deg"], 5.0, seq["phase_deg"], prep=prep, backend=b),
        lambda b: epgx.fse(tissue, seq["flip_deg"], 9.0, z_init=(-0.5, 0.1), backend=b),
    ]:
        want, got = backend_out("torch"), backend_out("triton")
        assert got.shape == want.shape == (2, 3, want.shape[-1])
        assert _rel_err(got, want) <= FLOAT64_RTOL


def test_kernel_out_buffer_is_for_the_forward_pass_only():
    """Derivatives go through the differentiable path (tests/test_kernels_grad.py), not out=."""
    tissue = _tissue("single", 3, torch.float64)
    flat = {k: v.reshape(-1) for k, v in tissue.fields().items()}
    op = ops.relaxation(5.0, **engine._relax_kwargs("single", flat))
    flips = torch.full((4,), 0.5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"out= is for the forward pass only.*out=None"):
        epg_train(
            op,
            torch.ones(1, 3, dtype=torch.float64),
            flat["b1"],
            flips,
            flips.detach(),
            kind="single",
            gre=True,
            n_states=4,
            out=torch.empty(2, 4, 3, dtype=torch.float64),
        )


# A handful of EPG-X reference cases, first pulses only (echo n depends on pulses ≤ n).
REFERENCE_CASES = [
    ("tse_validation.json", "cpmg120_etl32_esp10_BM_A_ka_10Hz", 13),
    ("tse_vfa.json", "complexphase_MT_WM", 13),
    ("tse_vfa.json", "test4_train180_MT_WM_zinit", 13),
    ("gre.json", "spgr_test1_phi117_BM_delta1ppm", 25),
    ("gre.json", "spgr_test1_phi117_MT_invprep20ms", 25),
    ("gre.json", "spgr_test1_phi117_EPG_kmax10", 25),
]


def _reference_case(name: str, case_id: str) -> dict[str, Any]:
    from test_reference import _load

    return next(c for c in _load(name)["cases"] if c["id"] == case_id)


@pytest.mark.parametrize(
    ("name", "case_id", "n_pulses"), REFERENCE_CASES, ids=[c[1] for c in REFERENCE_CASES]
)
def test_epgx_reference_through_triton(name, case_id, n_pulses):
    from test_reference import _cplx, _kmax, _tissue

    case = _reference_case(name, case_id)
    full = case["inputs"]
    inp = {
        k: v[:n_pulses] if isinstance(v, list) and len(v) == full["n_pulses"] else v for k, v in full.items()
    }
    tissue = _tissue(inp, case["model"])
    b1sq = inp.get("B1SqrdTau_uT2ms") if case["model"] == "MT" else None
    if "ESP_ms" in inp:
        got = epgx.fse(
            tissue,
            inp["flip_deg"],
            inp["ESP_ms"],
            inp.get("rf_phase_deg_user", 0.0),
            b1sq,
            kmax=_kmax(inp, tse=True),
            z_init=inp.get("zinit"),
            backend="triton",
        )
    else:
        prep = None
        if "prep" in inp:
            p = inp["prep"]
            b1sq_prep = p.get("B1SqrdTau", 0.0) if case["model"] == "MT" else 0.0
            prep = epgx.Prep(math.degrees(p["flip"]), p["t_delay"], b1sq_prep)
        phase = [math.degrees(x) for x in inp["phi_rad"]]
        kmax = _kmax(inp, tse=False)
        got = epgx.gre(
            tissue, inp["flip_deg"], inp["TR_ms"], phase, b1sq, prep=prep, kmax=kmax, backend="triton"
        )
    want = _cplx(case["outputs"]["F0"])[: got.shape[-1]]
    err = _rel_err(got, want)
    assert err <= REF_RTOL, f"{case_id}: {err:.2e} of max|ref|"
