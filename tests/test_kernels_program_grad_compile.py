"""The block-sequence tangent kernel (epg_program._tan) compiles for sm_90 (H100), no GPU needed.

As tests/test_kernels_program_compile.py does for the forward kernel: each variant of
``epg_program._tan`` goes through Triton's real pipeline (TTIR → TTGIR → LLVM → PTX →
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
# Each variant compiles in ~10 s uncached (six event branches, tangent blocks); the set well within.
COMPILE_TIMEOUT_S = 600

# (kind, dtype, n_states, n_tangents, contract): every kind in float32 at the state count
# of an ETL-32 FSE (33 orders, K_PAD 64) with four directions (a jacobian over four
# tissue fields), held to the spill budget (measured 0, 0 and 28 bytes).
VARIANTS = [(kind, "fp32", 33, 4, False) for kind in ("single", "bm", "mt")]
# Reported only: float64 BM with one direction (one spin's state and tangent planes fill
# a warp's registers, as in epg_train's _tan: a few spilled bytes) and the backward's
# contraction at eight directions. Few variants: each compiles in ~10 s uncached.
OTHER_VARIANTS = [("bm", "fp64", 33, 1, False), ("bm", "fp32", 33, 8, True)]
# Integer arguments of a typical launch (MPRAGE-like: one inversion, no rotation); those
# equal to 1 Triton turns into compile-time constants, as at run time.
INTS = dict(n_spins=100_000, n_events=700, n_pulses=176, n_echoes=176, n_inv=1, n_rot=1, n_int=4)


def _compile_variants() -> list[dict[str, Any]]:
    """Compile every variant for sm_90; runs in the subprocess (no TRITON_INTERPRET)."""
    import torch
    from epgx.kernels import epg_program

    records = []
    for kind, dtype, n_states, n_tan, contract in VARIANTS + OTHER_VARIANTS:
        torch_dtype = torch.float32 if dtype == "fp32" else torch.float64
        ints = dict(INTS, n_states=n_states, n_tan=n_tan, n_tan_spins=1 if contract else INTS["n_spins"])
        k_pad, block_spins, num_warps = epg_program.launch_config(
            kind, torch_dtype, n_states, ints["n_spins"], n_tan
        )
        constexprs: dict[str, Any] = dict(
            TWO_POOL=kind != "single",
            MT=kind == "mt",
            CONTRACT=contract,
            K_PAD=k_pad,
            BLOCK_SPINS=block_spins,
            NT=n_tan,
        )
        constexprs.update({k: 1 for k, v in ints.items() if v == 1})  # Triton's specialisation
        report = compile_report(epg_program._tan, dtype, constexprs, num_warps, pointers={"p_code": "*i32"})
        record = dict(kind=kind, dtype=dtype, n_states=n_states, n_tangents=n_tan, contract=contract)
        records.append(record | dict(k_pad=k_pad, block_spins=block_spins, num_warps=num_warps) | report)
    return records


def test_program_tangent_kernel_compiles_for_sm90(record_property):
    records = run_compile_script(__file__, COMPILE_TIMEOUT_S)
    assert len(records) == len(VARIANTS) + len(OTHER_VARIANTS)
    for i, rec in enumerate(records):
        name = f"program-tan-{rec['kind']}-{rec['dtype']}-K{rec['n_states']}-NT{rec['n_tangents']}"
        record_property(name + ("-contract" if rec["contract"] else ""), rec)
        assert rec["cubin_bytes"] > 0 and rec["registers"] is not None, rec
        if i < len(VARIANTS):
            assert rec["spill_store_bytes"] <= SPILL_BUDGET_BYTES, f"register spills: {rec}"


if __name__ == "__main__":
    sys.exit(main(_compile_variants))
