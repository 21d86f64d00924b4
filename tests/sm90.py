"""sm_90 (H100) compile checks without a GPU, shared by the kernel compile tests.

The Triton interpreter never lowers a kernel, so GPU-only compile errors (layouts,
``tl.gather`` lowering, float64 math, register allocation) would go unseen in the CPU
lanes. A compile test compiles each kernel variant through Triton's real pipeline (TTIR →
TTGIR → LLVM → PTX → ptxas cubin) for ``GPUTarget("cuda", 90, 32)`` and reads ptxas's
register and spill report. Kernel modules must be imported without ``TRITON_INTERPRET``
(the interpreter replaces jit functions) and CI exports it for the whole run, so each test
runs its own file as a script in a subprocess with the variable removed
(:func:`run_compile_script`); the script's ``__main__`` calls :func:`main`, which prints one
JSON record per variant.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import pytest

# Exit code of "cannot check": no CUDA-capable triton build, or no bundled ptxas.
SKIP_RC = 3


def compile_report(
    fn: Any, dtype: str, constexprs: dict[str, Any], num_warps: int, pointers: dict[str, str] | None = None
) -> dict[str, Any]:
    """Compile one specialisation of the jit function ``fn`` for sm_90; ptxas's report.

    Args:
        fn: a ``@triton.jit`` kernel.
        dtype: Triton type of its ``p_*`` pointers (``"fp32"``/``"fp64"``), unless named
            in ``pointers`` (e.g. ``{"p_code": "*i32"}``); other arguments are ``i32``.
        constexprs: compile-time constants, including integer arguments that Triton
            specialises (those equal to 1).
        num_warps: warps per program, as the launcher picks them.

    Returns:
        registers, spill_store_bytes, spill_load_bytes, shared_bytes, cubin_bytes.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    pointers = pointers or {}
    signature = {
        p.name: "constexpr"
        if p.is_constexpr or p.name in constexprs
        else pointers.get(p.name, f"*{dtype}")
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
        flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a"]
        log = subprocess.run(
            [get_ptxas(90).path, *flags, ptx, "-o", f"{ptx}.o"], capture_output=True, text=True, check=True
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


def run_compile_script(script: str, timeout_s: float) -> list[dict[str, Any]]:
    """Run a compile-test file as a script without ``TRITON_INTERPRET``; its records.

    Skips the calling test when this triton build cannot compile for CUDA.
    """
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout_s)
    if run.returncode == SKIP_RC:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, f"sm_90 compilation failed:\n{run.stderr[-6000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(compile_variants: Callable[[], list[dict[str, Any]]]) -> int:
    """The ``__main__`` of a compile-test file: print its records as JSON, or exit SKIP_RC."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: the interpreter cannot compile for a GPU")
        return SKIP_RC
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except Exception as exc:  # any failure here means this triton build cannot target CUDA
        print(f"this triton build cannot compile for CUDA without a GPU: {exc!r}")
        return SKIP_RC
    if not ptxas or not os.path.exists(ptxas):
        print(f"triton's ptxas is missing (looked for {ptxas!r})")
        return SKIP_RC
    print(json.dumps(compile_variants()))
    return 0
