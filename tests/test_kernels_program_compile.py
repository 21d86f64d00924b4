"""The block-sequence kernel (epgx.kernels.epg_program) compiles for sm_90 (H100), no GPU needed.

As tests/test_kernels_compile.py does for the whole-train kernel: every variant of
``epg_program._fwd`` goes through Triton's real pipeline (TTIR → TTGIR → LLVM → PTX →
ptxas cubin) for ``GPUTarget("cuda", 90, 32)``, and ptxas's register and spill report is
read. The kernel module must be imported without ``TRITON_INTERPRET`` (which CI exports
for the whole run), so the compilation runs in a subprocess with the variable removed:
this file run as a script prints one JSON record per variant.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

import pytest

# A compile that needs no GPU, only triton's bundled ptxas: exit code of "cannot check".
_SKIP_RC = 3
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
    import triton
    from epgx.kernels import epg_program
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
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
        signature = {
            p.name: "constexpr"
            if p.is_constexpr or p.name in constexprs
            else "*i32"
            if p.name == "p_code"
            else f"*{dtype}"
            if p.name.startswith("p_")
            else "i32"
            for p in fn.params
        }
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
        # ptxas -v on the PTX Triton produced, with Triton's own flags, for the report
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            log = subprocess.run(
                [
                    ptxas,
                    "-lineinfo",
                    "-v",
                    "--regAllocOptLevel=2",
                    "--gpu-name=sm_90a",
                    ptx,
                    "-o",
                    f"{ptx}.o",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stderr
        entry = log[log.index("Compiling entry function '_fwd'") :]
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", entry)
        regs = re.search(r"Used (\d+) registers", entry)
        records.append(
            dict(
                kind=kind,
                dtype=dtype,
                n_states=n_states,
                k_pad=k_pad,
                block_spins=block_spins,
                num_warps=num_warps,
                registers=int(regs.group(1)) if regs else None,
                spill_store_bytes=int(spills.group(1)) if spills else None,
                spill_load_bytes=int(spills.group(2)) if spills else None,
                shared_bytes=compiled.metadata.shared,
                cubin_bytes=len(compiled.asm["cubin"]),
            )
        )
    return records


def test_program_kernel_compiles_for_sm90(record_property):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S
    )
    if run.returncode == _SKIP_RC:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, f"sm_90 compilation failed:\n{run.stderr[-6000:]}"
    records = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(records) == len(VARIANTS) + len(OTHER_VARIANTS)
    for i, rec in enumerate(records):
        record_property(f"program-{rec['kind']}-{rec['dtype']}-K{rec['n_states']}", rec)
        assert rec["cubin_bytes"] > 0 and rec["registers"] is not None, rec
        if i < len(VARIANTS):
            assert rec["spill_store_bytes"] <= SPILL_BUDGET_BYTES, f"register spills: {rec}"


def _main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: the interpreter cannot compile for a GPU")
        return _SKIP_RC
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except Exception as exc:  # any failure here means this triton build cannot target CUDA
        print(f"this triton build cannot compile for CUDA without a GPU: {exc!r}")
        return _SKIP_RC
    if not ptxas or not os.path.exists(ptxas):
        print(f"triton's ptxas is missing (looked for {ptxas!r})")
        return _SKIP_RC
    print(json.dumps(_compile_variants()))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
