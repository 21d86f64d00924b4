"""The one-step kernels (epgx.kernels.epg_step) compile for sm_90 (H100), without a GPU.

Compiles ``_fwd``, ``_bwd`` and ``_jvp`` of every kind, in float32 and float64, at the
default launch configuration, through Triton's real pipeline for ``GPUTarget("cuda", 90,
32)`` and reads ptxas's register and spill report, in a subprocess without
``TRITON_INTERPRET`` (the machinery is in tests/sm90.py).
"""

from __future__ import annotations

import sys
from typing import Any

from sm90 import compile_report, main, run_compile_script

# At the default launch configuration a variant may spill a few bytes at ptxas's
# discretion; more means launch_config's block sizes are too large for the registers.
SPILL_BUDGET_BYTES = 64
# Each variant compiles in ~1-3 s uncached; the whole set well within this.
COMPILE_TIMEOUT_S = 600
# A long GRE train's state count: the orders loop in blocks, so the register use does not
# depend on it.
N_STATES = 200
N_SPINS = 100_000

# (kernel, kind, dtype, rf, relax): every kernel and kind in both dtypes with the full step
# (pulse and interval), and the forward's two halves alone.
VARIANTS = [
    (kernel, kind, dtype, True, True)
    for kernel in ("_fwd", "_bwd", "_jvp")
    for kind in ("single", "bm", "mt")
    for dtype in ("fp32", "fp64")
] + [("_fwd", "bm", "fp32", True, False), ("_fwd", "bm", "fp32", False, True)]
# Reported, not held to the spill budget: float64 BM derivatives, whose 24 live state
# planes (state, cotangent or tangent, two pools) and 20 per-spin coefficients fill 255
# registers at two values per thread (a few hundred bytes spill; measured).
SPILLING = [("_bwd", "bm", "fp64", True, True), ("_jvp", "bm", "fp64", True, True)]


def _compile_variants() -> list[dict[str, Any]]:
    """Compile every variant for sm_90; runs in the subprocess (no TRITON_INTERPRET)."""
    import torch
    from epgx.kernels import epg_step

    records = []
    for kernel, kind, dtype, rf, relax in VARIANTS:
        torch_dtype = torch.float32 if dtype == "fp32" else torch.float64
        mode = kernel.removeprefix("_")
        block_k, block_spins, num_warps = epg_step.launch_config(kind, torch_dtype, N_STATES, N_SPINS, mode)
        constexprs = dict(
            TWO_POOL=kind != "single",
            MT=kind == "mt",
            RF=rf,
            RELAX=relax,
            BLOCK_K=block_k,
            BLOCK_SPINS=block_spins,
        )
        record = dict(kernel=kernel, kind=kind, dtype=dtype, rf=rf, relax=relax, block_k=block_k)
        record.update(block_spins=block_spins, num_warps=num_warps)
        records.append(record | compile_report(getattr(epg_step, kernel), dtype, constexprs, num_warps))
    return records


def test_step_kernels_compile_for_sm90(record_property):
    records = run_compile_script(__file__, COMPILE_TIMEOUT_S)
    assert len(records) == len(VARIANTS)
    for variant, rec in zip(VARIANTS, records, strict=True):
        halves = ("rf+" if rec["rf"] else "") + ("relax" if rec["relax"] else "")
        record_property(f"{rec['kernel']}-{rec['kind']}-{rec['dtype']}-{halves}", rec)
        assert rec["cubin_bytes"] > 0 and rec["registers"] is not None, rec
        if variant not in SPILLING:
            assert rec["spill_store_bytes"] <= SPILL_BUDGET_BYTES, f"register spills: {rec}"


if __name__ == "__main__":
    sys.exit(main(_compile_variants))
