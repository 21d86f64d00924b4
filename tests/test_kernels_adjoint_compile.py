"""The adjoint kernel (epgx.kernels.epg_train_adjoint._adj) compiles for sm_90 (H100).

Checked without a GPU, as tests/test_kernels_compile.py does for the forward and tangent
kernels (the machinery is in tests/sm90.py): Triton's real pipeline and ptxas, in a
subprocess without ``TRITON_INTERPRET``, and ptxas's register and spill report.
"""

from __future__ import annotations

import sys
from typing import Any

from sm90 import compile_report, main, run_compile_script

# As tests/test_kernels_compile.py: a few bytes at ptxas's discretion, not the state.
SPILL_BUDGET_BYTES = 64
# The adjoint compiles in ~5-10 s per variant (a larger kernel than the forward's).
COMPILE_TIMEOUT_S = 600
N_STATES = 33  # an ETL-32 FSE train (K_PAD 64)

# (kind, gre, dtype): held to the spill budget: BM FSE in float32, the benchmark's case
# (two pools, the widest adjoint step), and the single pool's. Not compiled here, to keep
# the lane short (~15 s uncached for these two): float64 BM, which spills (measured 255
# registers, 760 bytes: one spin's four live states fill a warp's registers, as with the
# tangent kernel); add it to OTHER_VARIANTS to see its report.
VARIANTS = [("bm", False, "fp32"), ("single", False, "fp32")]
OTHER_VARIANTS: list[tuple[str, bool, str]] = []


def _compile_variants() -> list[dict[str, Any]]:
    """Compile every variant for sm_90; runs in the subprocess (no TRITON_INTERPRET)."""
    import torch
    from epgx.kernels import epg_train_adjoint

    records = []
    for kind, gre, dtype in VARIANTS + OTHER_VARIANTS:
        torch_dtype = torch.float32 if dtype == "fp32" else torch.float64
        k_pad, block_spins, num_warps = epg_train_adjoint.adjoint_config(kind, torch_dtype, N_STATES, 100_000)
        constexprs = dict(TWO_POOL=kind != "single", MT=kind == "mt", GRE=gre, K_PAD=k_pad)
        constexprs.update(BLOCK_SPINS=block_spins, PULSE_PER_SPIN=False)
        record = dict(kernel="_adj", kind=kind, gre=gre, dtype=dtype, n_states=N_STATES, k_pad=k_pad)
        record.update(block_spins=block_spins, num_warps=num_warps)
        records.append(record | compile_report(epg_train_adjoint._adj, dtype, constexprs, num_warps))
    return records


def test_adjoint_compiles_for_sm90(record_property):
    records = run_compile_script(__file__, COMPILE_TIMEOUT_S)
    assert len(records) == len(VARIANTS) + len(OTHER_VARIANTS)
    for variant, rec in zip(VARIANTS + OTHER_VARIANTS, records, strict=True):
        record_property(f"_adj-{rec['kind']}-{'gre' if rec['gre'] else 'fse'}-{rec['dtype']}", rec)
        assert rec["cubin_bytes"] > 0 and rec["registers"] is not None, rec
        if variant in VARIANTS:
            assert rec["spill_store_bytes"] <= SPILL_BUDGET_BYTES, f"register spills: {rec}"


if __name__ == "__main__":
    sys.exit(main(_compile_variants))
