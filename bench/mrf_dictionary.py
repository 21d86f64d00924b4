"""FISP-MRF dictionary generation: atoms/s of epgx vs torchsim, measured in one run.

Schedule: ``epgx.models.fisp_mrf_schedule(1000)`` (Jiang et al., MRM 2015-like: half-sine
flip-angle lobes peaking at 70/40/60/25°, 1000 pulses). Inversion, TI 40 ms, then FISP
(one dephasing order per TR), readout at TE 0. Grids of T1 × T2 (log-spaced, single
pool): 10 000 and 100 000 atoms (1 000 000 only where a CUDA device runs the Triton kernel).

Codes:

* ``epgx-dict``: ``epgx.dictionary.generate`` of ``epgx.gre`` with a constant TR of
  13 ms and the states truncated at ``--states`` orders (``kmax = states − 1``), the whole
  dictionary path (chunking under the memory budget, host collection) timed; pure-torch
  engine on the CPU, the fused Triton kernel on CUDA.
* ``torchsim``: torchsim 0.0.8's ``MRFSimulator.simulate`` on the grid's T1/T2 arrays
  (its batched dictionary path), same flips, TR, TI and ``states``.
* ``epgx-fisp_mrf-kmax``: ``epgx.dictionary.generate`` of the registry model ``fisp_mrf``
  (variable TR 11.5–14.5 ms, TE 0) with ``kmax = states − 1`` in its protocol: the block
  engine with the same truncation, timed like ``epgx-dict``.
* ``epgx-fisp_mrf``: the registry model ``fisp_mrf`` as it is (variable TR 11.5–14.5 ms,
  TE 0, every order that can still refocus: exact, no truncation), timed on a subset.

Each code is validated against an epgx float64 run without truncation before it is
timed. torchsim's ``states = K`` keeps the same orders as epgx's ``kmax = K − 1`` (checked:
the two agree to float32 rounding). Run::

    OMP_NUM_THREADS=1 python bench/mrf_dictionary.py
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

import epgx
from epgx import dictionary as D
from epgx.benchmark import cpu_model, git_rev

N_PULSES = 1000
TI_MS = 40.0
TR_MS = 13.0  # the schedule's mean TR, for the constant-TR codes
# Truncation at 40 orders moves the echoes of this schedule by <= ~5e-5 (M0 = 1; measured
# by the validation); 1e-4 passes that and catches any convention slip (~1e-2).
TRUNC_ATOL = 1e-4
# The two truncated float32 codes keep the same orders: they agree to float32 rounding.
FLOAT32_ATOL = 1e-5
# The exact float32 model against float64: rounding only.
EXACT_ATOL = 1e-5


def grid_of(n_atoms: int) -> D.Grid:
    """A T1 × T2 grid of exactly ``n_atoms`` atoms (n_t1 × n_t2 log-spaced values)."""
    n_t2 = {10_000: 100, 100_000: 250, 1_000_000: 1000}.get(n_atoms) or int(math.sqrt(n_atoms))
    n_t1 = n_atoms // n_t2
    return D.grid(t1_ms=D.span(100.0, 5000.0, n_t1, "log"), t2_ms=D.span(10.0, 2000.0, n_t2, "log"))


def validation_grid() -> D.Grid:
    return D.grid(t1_ms=D.span(200.0, 3000.0, 8, "log"), t2_ms=D.span(20.0, 300.0, 8, "log"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="atoms (default 10000 100000; +1e6 on CUDA)"
    )
    p.add_argument("--states", type=int, default=40, help="EPG orders kept by the truncated codes")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per size up to --big-n")
    p.add_argument("--big-n", type=int, default=20000, help="sizes above this are timed once")
    p.add_argument("--exact-subset", type=int, default=1000, help="atoms of the exact fisp_mrf timing")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    backend = "triton" if cuda else "torch"
    sizes = args.sizes or ([10_000, 100_000, 1_000_000] if cuda else [10_000, 100_000])
    flips, tr_var = epgx.models.fisp_mrf_schedule(N_PULSES)
    flip_list = flips.tolist()
    kmax = args.states - 1
    has_ts = importlib.util.find_spec("torchsim") is not None

    def out(line: str = "") -> None:
        print(line, flush=True)

    def note(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def fisp_trunc(tissue: epgx.Tissue, backend: str = "auto") -> torch.Tensor:
        prep = epgx.Prep(180.0, TI_MS)
        sig = epgx.gre(tissue, flip_list, TR_MS, prep=prep, kmax=kmax, backend=backend)
        assert isinstance(sig, torch.Tensor)
        return sig

    def epgx_dict(g: D.Grid) -> torch.Tensor:
        d = D.generate(fisp_trunc, g, device=device, backend=backend, progress=False)
        return d.atoms

    def torchsim_dict(g: D.Grid) -> torch.Tensor:
        from torchsim.simulators import MRFSimulator

        sim = MRFSimulator(flip=flips.float(), TR=TR_MS, TI=TI_MS, states=args.states)
        t1 = torch.from_numpy(g.values["t1_ms"]).float()
        t2 = torch.from_numpy(g.values["t2_ms"]).float()
        return sim.simulate(T1=t1, T2=t2)

    exact_protocol = {"te_ms": 0.0, "ti_ms": TI_MS, "n_pulses": N_PULSES}

    def epgx_exact(g: D.Grid) -> torch.Tensor:
        return D.generate("fisp_mrf", g, exact_protocol, progress=False).atoms

    def epgx_model_kmax(g: D.Grid) -> torch.Tensor:
        protocol = exact_protocol | {"kmax": kmax}
        return D.generate("fisp_mrf", g, protocol, device=device, backend=backend, progress=False).atoms

    out("# FISP-MRF dictionary generation: epgx vs torchsim\n")
    omp = os.environ.get("OMP_NUM_THREADS")
    out(
        f"Command: `{'OMP_NUM_THREADS=' + omp + ' ' if omp else ''}python bench/mrf_dictionary.py "
        f"{' '.join(sys.argv[1:])}`\n"
    )
    out(f"- python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")
    ts_version = importlib.metadata.version("torchsim") if has_ts else "not installed"
    out(f"- epgx {epgx.__version__} (git {git_rev()}), torchsim {ts_version}")
    out(f"- CPU: {cpu_model()}; GPU: {torch.cuda.get_device_name() if cuda else 'none'}")
    out(
        f"- torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={omp or 'unset'}; epgx backend {backend}"
    )
    out(
        f"- {N_PULSES} pulses, TI {TI_MS:g} ms, states {args.states} (epgx kmax {kmax}), "
        f"constant TR {TR_MS:g} ms\n"
    )

    # ---- validation: every code against an untruncated float64 epgx run
    vg = validation_grid()
    t64 = vg.tissue(dtype=torch.float64)
    ref = epgx.gre(t64, flip_list, TR_MS, prep=epgx.Prep(180.0, TI_MS), backend="torch")
    ref_var = epgx.models.fisp_mrf(t64, **exact_protocol)
    assert isinstance(ref, torch.Tensor)
    err_e = float((epgx_dict(vg).cpu().to(torch.complex128) - ref).abs().max())
    err_x = float((epgx_exact(vg).to(torch.complex128) - ref_var).abs().max())
    err_k = float((epgx_model_kmax(vg).cpu().to(torch.complex128) - ref_var).abs().max())
    ok = err_e < TRUNC_ATOL and err_x < EXACT_ATOL and err_k < TRUNC_ATOL
    out(f"## Validation ({vg.n_atoms} atoms, T1 200–3000 ms × T2 20–300 ms, vs epgx float64 untruncated)\n")
    out(f"- epgx-dict (float32, {args.states} states): max|Δ| = {err_e:.2e} (tolerance {TRUNC_ATOL:g})")
    out(
        f"- epgx-fisp_mrf-kmax (float32, {args.states} states, variable TR): max|Δ| = {err_k:.2e} "
        f"vs the exact model (tolerance {TRUNC_ATOL:g})"
    )
    out(f"- epgx-fisp_mrf (float32, exact, variable TR): max|Δ| = {err_x:.2e} (tolerance {EXACT_ATOL:g})")
    if has_ts:
        ts = torchsim_dict(vg).to(torch.complex128)
        err_t = float((ts - ref).abs().max())
        err_te = float((ts - epgx_dict(vg).cpu().to(torch.complex128)).abs().max())
        ok &= err_t < TRUNC_ATOL and err_te < FLOAT32_ATOL
        out(f"- torchsim (float32, states={args.states}): max|Δ| = {err_t:.2e}; vs epgx-dict {err_te:.2e}")
    if not ok:
        out("\n**Validation failed: nothing timed.**")
        return 1

    def timed(fn: Callable[[D.Grid], torch.Tensor], g: D.Grid, reps: int) -> tuple[float, float, float, int]:
        fn(g.select(slice(0, min(g.n_atoms, 1000))))  # warm-up
        sync()
        times = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            atoms = fn(g)
            sync()
            times.append(time.perf_counter() - t0)
            if tuple(atoms.shape) != (g.n_atoms, N_PULSES):
                raise RuntimeError(f"shape {tuple(atoms.shape)} for {g.n_atoms} atoms")
            del atoms
        return statistics.median(times), min(times), max(times), reps

    out("\n## Timings\n")
    out("| code | atoms | runs | median | min–max | atoms/s |")
    out("|---|---:|---:|---:|---:|---:|")
    t_start = time.perf_counter()
    codes: list[tuple[str, Callable[[D.Grid], torch.Tensor], bool]] = [
        ("epgx-dict", epgx_dict, True),
        ("epgx-fisp_mrf-kmax", epgx_model_kmax, True),
    ]
    if has_ts:
        codes.append(("torchsim", torchsim_dict, not cuda))  # torchsim: its CPU path only
    rates: dict[tuple[str, int], float] = {}
    for n in sizes:
        g = grid_of(n)
        for name, fn, runs_here in codes:
            if not runs_here or (n > 100_000 and name == "torchsim"):
                continue
            reps = args.repeats if n <= args.big_n else 1
            med, lo, hi, r = timed(fn, g, reps)
            rates[(name, n)] = n / med
            out(f"| {name} | {n} | {r} | {med:.2f} s | {lo:.2f}–{hi:.2f} s | {n / med:.3g} |")
            note(f"{name} {n}: {med:.2f} s [{time.perf_counter() - t_start:.0f} s]")
    g0 = grid_of(sizes[0])
    sub = g0.select(np.linspace(0, g0.n_atoms - 1, min(args.exact_subset, g0.n_atoms)).round().astype(int))
    med, lo, hi, r = timed(epgx_exact, sub, args.repeats)
    out(
        f"| epgx-fisp_mrf (exact, variable TR) | {sub.n_atoms} (subset) | {r} | {med:.2f} s "
        f"| {lo:.2f}–{hi:.2f} s | {sub.n_atoms / med:.3g} |"
    )
    out(f"\nTotal timing wall time: {time.perf_counter() - t_start:.0f} s.")
    for n in sizes:
        for name in ("epgx-dict", "epgx-fisp_mrf-kmax"):
            if ("torchsim", n) in rates and (name, n) in rates:
                ratio = rates[("torchsim", n)] / rates[(name, n)]
                out(f"- {n} atoms: torchsim / {name} atoms/s = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
