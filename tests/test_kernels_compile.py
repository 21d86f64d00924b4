"""The fused kernels compile for sm_90 (H100), checked on a machine without a GPU.

The Triton interpreter never lowers a kernel, so GPU-only compile errors (layouts,
``tl.gather`` lowering, libdevice float64 math, register allocation) would go unseen in
the CPU lanes. This test compiles every variant of ``_fwd`` and of the tangent kernel
``_tan`` through Triton's real pipeline (TTIR → TTGIR → LLVM → PTX → ptxas cubin) for
``GPUTarget("cuda", 90, 32)`` and reads ptxas's register and spill report.

The kernel module must be imported without ``TRITON_INTERPRET`` (the interpreter replaces
jit functions), and CI exports it for the whole run, so the compilation runs in a
subprocess with the variable removed: this file run as a script prints one JSON record
per variant.
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
# At the default launch configuration a variant may spill a few bytes at ptxas's
# discretion, not its state: kilobytes (seen with float64 at the float32 block size, or
# more warps than spins) mean launch_config's register budget is wrong.
SPILL_BUDGET_BYTES = 64
# Each variant compiles in ~2 s uncached; the whole set well within this.
COMPILE_TIMEOUT_S = 600

# (kind, gre, dtype, n_states): every kind and schedule in both dtypes at the state
# count of an ETL-32 FSE train (33 orders, K_PAD 64): held to the spill budget.
VARIANTS = [
    (kind, gre, dtype, 33)
    for kind in ("single", "bm", "mt")
    for gre in (False, True)
    for dtype in ("fp32", "fp64")
]
# Reported only, not held to the spill budget: long GRE trains (K_PAD 256-512), where
# one spin's orders fill a warp's registers (tl.gather is warp-local), so they compile
# but may spill; and one-spin, one-order launches, whose integer arguments equal to 1
# Triton turns into compile-time constants (n_spins = n_echoes = n_states = 1).
OTHER_VARIANTS = [("bm", True, "fp32", 500), ("single", True, "fp64", 200), ("bm", True, "fp32", 1)]
ONE_SPIN_STATES = 1
# The tangent kernel (_tan), (kind, gre, dtype, n_states, n_tangents, contract): every
# kind's FSE at 33 orders in float32 with one and four tangent directions, held to the
# spill budget; reported only: float64 BM (one spin's state and tangent planes fill a
# warp's registers: a few spilled bytes) and the backward's contraction at eight.
TANGENT_VARIANTS = [(kind, False, "fp32", 33, nt, False) for kind in ("single", "bm", "mt") for nt in (1, 4)]
OTHER_TANGENT_VARIANTS = [("bm", False, "fp64", 33, 1, False), ("bm", False, "fp32", 33, 8, True)]


def _compile_variants() -> list[dict[str, Any]]:
    """Compile every variant for sm_90; runs in the subprocess (no TRITON_INTERPRET)."""
    import torch
    from epgx.kernels import epg_train

    records = []
    for kind, gre, dtype, n_states in VARIANTS + OTHER_VARIANTS:
        torch_dtype = torch.float32 if dtype == "fp32" else torch.float64
        n_spins = 1 if n_states == ONE_SPIN_STATES else 100_000
        k_pad, block_spins, num_warps = epg_train.launch_config(kind, torch_dtype, n_states, n_spins)
        n_pulses = n_states if gre else n_states + 1
        ints = dict(n_spins=n_spins, n_pulses=n_pulses, n_echoes=n_states, n_states=n_states)
        constexprs: dict[str, Any] = dict(
            TWO_POOL=kind != "single", MT=kind == "mt", GRE=gre, K_PAD=k_pad, BLOCK_SPINS=block_spins
        )
        constexprs.update({k: 1 for k, v in ints.items() if v == 1})  # Triton's specialisation
        record = dict(kernel="_fwd", kind=kind, gre=gre, dtype=dtype, n_states=n_states, k_pad=k_pad)
        record.update(block_spins=block_spins, num_warps=num_warps)
        records.append(record | _compile(epg_train._fwd, dtype, constexprs, num_warps))
    for kind, gre, dtype, n_states, n_tan, contract in TANGENT_VARIANTS + OTHER_TANGENT_VARIANTS:
        torch_dtype = torch.float32 if dtype == "fp32" else torch.float64
        k_pad, block_spins, num_warps = epg_train.launch_config(kind, torch_dtype, n_states, 100_000, n_tan)
        constexprs = dict(TWO_POOL=kind != "single", MT=kind == "mt", GRE=gre, K_PAD=k_pad)
        constexprs.update(CONTRACT=contract, BLOCK_SPINS=block_spins, NT=n_tan)
        if n_tan == 1:
            constexprs["n_tan"] = 1  # Triton's specialisation
        record = dict(kernel="_tan", kind=kind, gre=gre, dtype=dtype, n_states=n_states, k_pad=k_pad)
        record.update(n_tangents=n_tan, contract=contract, block_spins=block_spins, num_warps=num_warps)
        records.append(record | _compile(epg_train._tan, dtype, constexprs, num_warps))
    return records


def _compile(fn: Any, dtype: str, constexprs: dict[str, Any], num_warps: int) -> dict[str, Any]:
    """Compile one specialisation of ``fn`` for sm_90 and read ptxas's register report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    signature = {
        p.name: "constexpr"
        if p.is_constexpr or p.name in constexprs
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
                get_ptxas(90).path,
                "-lineinfo",
                "-v",
                "--regAllocOptLevel=2",
                "--gpu-name=sm_90a",
                ptx,
                "-o",
                ptx + ".o",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    entry = log[log.index(f"Compiling entry function '{fn.__name__}'") :]
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", entry)
    regs = re.search(r"Used (\d+) registers", entry)
    return dict(
        registers=int(regs.group(1)) if regs else None,
        spill_store_bytes=int(spills.group(1)) if spills else None,
        spill_load_bytes=int(spills.group(2)) if spills else None,
        shared_bytes=compiled.metadata.shared,
        cubin_bytes=len(compiled.asm["cubin"]),
    )


def test_kernels_compile_for_sm90(record_property):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S
    )
    if run.returncode == _SKIP_RC:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, f"sm_90 compilation failed:\n{run.stderr[-6000:]}"
    records = json.loads(run.stdout.strip().splitlines()[-1])
    held = [*VARIANTS, *TANGENT_VARIANTS]
    forward = VARIANTS + OTHER_VARIANTS
    assert len(records) == len(forward) + len(TANGENT_VARIANTS) + len(OTHER_TANGENT_VARIANTS)
    for i, rec in enumerate(records):
        seq = "gre" if rec["gre"] else "fse"
        name = f"{rec['kernel']}-{rec['kind']}-{seq}-{rec['dtype']}-K{rec['n_states']}"
        if rec["kernel"] == "_tan":
            name += f"-NT{rec['n_tangents']}" + ("-contract" if rec["contract"] else "")
        record_property(name, rec)
        assert rec["cubin_bytes"] > 0 and rec["registers"] is not None, rec
        variant = (
            forward[i] if i < len(forward) else (TANGENT_VARIANTS + OTHER_TANGENT_VARIANTS)[i - len(forward)]
        )
        if variant in held:
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
