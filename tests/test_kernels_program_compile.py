"""The block-sequence kernel (epgx.kernels.epg_program) compiles for sm_90 (H100), no GPU needed.

As tests/test_kernels_compile.py does for the whole-train kernel: every variant of
``epg_program._fwd`` goes through Triton's real pipeline (TTIR → TTGIR → LLVM → PTX →
ptxas cubin) for ``GPUTarget("cuda", 90, 32)``, and ptxas's register and spill report is
read, in a subprocess without ``TRITON_INTERPRET`` (tests/sm90.py).
"""

from __future__ import annotations

import sys
from typing import Any

from sm90 import compile_report, main, run_compile_script

# At the default launch configuration ptxas may spill a few bytes at its discretion, not
# the state: kilobytes mean launch_config's register budget does not fit this kernel.
SPILL_BUDGET_BYTES = 64
# Each variant compiles in ~4 s uncached (the event loop's six branches); the set well within.
COMPILE_TIMEOUT_S = 600

# (kind, dtype, n_states): every kind in both dtypes at the state count of an ETL-32 FSE
# (33 orders, K_PAD 64), held to the spill budget.
VARIANTS = [(kind, dtype, 33) for kind in ("single", "bm", "mt") for dtype in ("fp32", "fp64")]
# Reported only: a long unbalanced train (FISP-MRF, K_PAD 512: one spin's orders fill a
# warp's registers, as in epg_train, so it may spill), and the one-order state of a
# balanced steady-state solve (K_PAD 1).
OTHER_VARIANTS = [("bm", "fp32", 500), ("single", "fp64", 1)]
# Integer arguments of a typical launch (MPRAGE-like: one inversion, no rotation); those
# equal to 1 Triton turns into compile-time constants, as at run time.
INTS = dict(n_spins=100_000, n_events=700, n_pulses=176, n_echoes=176, n_inv=1, n_rot=1)


def _compile_variants() -> list[dict[str, Any]]:
    """Compile every variant for sm_90; runs in the subprocess (no TRITON_INTERPRET)."""
    import torch
    from epgx.kernels import epg_program

    fn = epg_program._fwd
    records = []
    for kind, dtype, n_states in VARIANTS + OTHER_VARIANTS:
        torch_dtype = torch.float32 if dtype == "fp32" else torch.float64
        ints = dict(INTS, n_states=n_states)
        k_pad, block_spins, num_warps = epg_program.launch_config(
            kind, torch_dtype, n_states, ints["n_spins"]
        )
        constexprs: dict[str, Any] = dict(
            TWO_POOL=kind != "single", MT=kind == "mt", K_PAD=k_pad, BLOCK_SPINS=block_spins
        )
        constexprs.update({k: 1 for k, v in ints.items() if v == 1})  # Triton's specialisation
        report = compile_report(fn, dtype, constexprs, num_warps, pointers={"p_code": "*i32"})
        records.append(
            dict(
                kind=kind,
                dtype=dtype,
                n_states=n_states,
                k_pad=k_pad,
                block_spins=block_spins,
                num_warps=num_warps,
            )
            | report
        )
    return records


def test_program_kernel_compiles_for_sm90(record_property):
    records = run_compile_script(__file__, COMPILE_TIMEOUT_S)
    assert len(records) == len(VARIANTS) + len(OTHER_VARIANTS)
    for i, rec in enumerate(records):
        record_property(f"program-{rec['kind']}-{rec['dtype']}-K{rec['n_states']}", rec)
        assert rec["cubin_bytes"] > 0 and rec["registers"] is not None, rec
        if i < len(VARIANTS):
            assert rec["spill_store_bytes"] <= SPILL_BUDGET_BYTES, f"register spills: {rec}"


if __name__ == "__main__":
    sys.exit(main(_compile_variants))
