"""CPU comparison of epgx vs torchsim 0.0.8 on the Torch-EPG-X benchmark FSE.

Sequence: CPMG FSE, 32 echoes, ESP 10 ms, 90° excitation, refocusing 180° or 120°.
Tissue: two-pool Bloch–McConnell, T1 1000/500 ms, T2 100/20 ms, f = 0.2 (pool b),
k_ab = 10 s⁻¹ (forward rate a → b); and the single pool T1 1000 ms, T2 100 ms.
float32, one thread. Run it as (``OMP_NUM_THREADS=1`` too, so no library spins up a
thread pool of its own)::

    OMP_NUM_THREADS=1 python bench/compare_peers.py --plot bench/fse_cpu_vs_torchsim.png

Before anything is timed, both codes are checked against an epgx float64 run for
every case; the script stops if they disagree by more than the stated tolerance.

Conventions (each checked numerically in the validation step):

* Exchange. epgx takes ``k_ab_per_s``, the forward rate a → b, with k_ba = k_ab (1 − f)/f
  (EPG-X's ``ka``). torchsim's ``poolB_exchange`` is a *total* rate k with
  a → b = k·f_b and b → a = k·f_a (``torchsim/sequence/_pools.py::generators``:
  ``outward = rate * share``, ``inward = rate * free``), so k = k_ab / f = 50 s⁻¹ here.
* Phases. torchsim's ``FSESimulator`` excites at 90° phase and refocuses at
  ``phases`` (default 0°): that is CPMG, the same train as ``epgx.fse`` with
  ``phase_deg=0``; both return i·F₀-like echoes that are real and positive here.
* Timing. Both put the excitation at t = 0, refocusing pulse n at (n − ½)·ESP and
  echo n at n·ESP (two ESP/2 intervals per echo).
* States. torchsim's ``FSESimulator`` keeps 10 EPG orders by default, which is
  approximate at 120°; ``states=None`` sizes them from the winding (exact), which is
  what is timed unless ``--torchsim-states`` says otherwise. epgx keeps every order
  that can still refocus (exact).
* Precision. torchsim's CPU extension computes in float32 even for float64 inputs.

One spin-step is one RF pulse or one ESP/2 relaxation(+exchange)+shift interval of one
spin: 33 pulses + 64 intervals = 97 steps per spin per train.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model

import epgx

ETL = 32
ESP_MS = 10.0
EXC_DEG = 90.0
T1A_MS, T1B_MS = 1000.0, 500.0
T2A_MS, T2B_MS = 100.0, 20.0
F_B = 0.2
K_AB_PER_S = 10.0
# torchsim's total exchange rate: a -> b is k * f_b, so k = k_ab / f_b.
K_TORCHSIM_HZ = K_AB_PER_S / F_B
# per spin: 1 excitation + ETL refocusing pulses + 2 ESP/2 intervals per echo
STEPS = (ETL + 1) + 2 * ETL
# T2a jitter (ms) that makes every spin distinct without changing the physics
JITTER_MS = 1e-3

# |echo| agreement with the epgx float64 reference (echoes are <= 1 in size):
# float32 rounding over 97 steps stays near 1e-6; 1e-5 leaves margin and still
# catches any convention slip (a wrong exchange convention is off by ~5e-2).
FLOAT32_ATOL = 1e-5

CASES = ("bm-180", "bm-120", "single-180", "single-120")
DEFAULT_SIZES = [int(n) for n in np.unique(np.logspace(0, 5, 21).round().astype(int))]
QUICK_SIZES = [1, 100, 10000]


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "bm" | "single"
    refocus_deg: float


def _case(name: str) -> Case:
    kind, angle = name.split("-")
    return Case(name, kind, float(angle))


# ---------------------------------------------------------------------------- runners


def _epgx_run(case: Case, t1a: torch.Tensor, t2a: torch.Tensor) -> torch.Tensor:
    """epgx.fse from raw tensors (Tissue construction and checks are timed too)."""
    flips = [EXC_DEG] + [case.refocus_deg] * ETL
    if case.kind == "bm":
        tissue = epgx.Tissue.bm(
            t1_ms=(t1a, T1B_MS), t2_ms=(t2a, T2B_MS), f=F_B, k_ab_per_s=K_AB_PER_S, dtype=t2a.dtype
        )
    else:
        tissue = epgx.Tissue(t1_ms=t1a, t2_ms=t2a, dtype=t2a.dtype)
    return epgx.fse(tissue, flips, ESP_MS, backend="torch")


def _torchsim_run(
    sim, case: Case, t1a: torch.Tensor, t2a: torch.Tensor, states: int | None, k_hz: float = K_TORCHSIM_HZ
) -> torch.Tensor:
    """torchsim FSESimulator.simulate (its CPU C++ extension)."""
    kwargs = dict(
        T1=t1a,
        T2=t2a,
        flip=torch.full((ETL,), case.refocus_deg, dtype=t2a.dtype),
        ESP=ESP_MS,
        phases=0.0,
        exc_flip=EXC_DEG,
        exc_phase=90.0,
        states=states,
    )
    if case.kind == "bm":
        kwargs.update(poolB_fraction=F_B, poolB_exchange=k_hz, poolB_T1=T1B_MS, poolB_T2=T2B_MS)
    return sim.simulate(**kwargs)


# ---------------------------------------------------------------------------- validation


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.complex128) - b.to(torch.complex128)).abs().max())


def _max_mag(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.abs().double() - b.abs().double()).abs().max())


def validate(cases: list[Case], states: int | None, log: Callable[[str], None]) -> bool:
    """Both codes vs an epgx float64 reference, 8 spins per case; prints a table."""
    from torchsim.simulators import FSESimulator

    n = 8
    t1 = torch.linspace(800.0, 1200.0, n, dtype=torch.float64)
    t2 = torch.linspace(50.0, 150.0, n, dtype=torch.float64)
    bench_t2 = T2A_MS + JITTER_MS * torch.rand(n, dtype=torch.float64)
    ok = True
    log("## Validation (before timing)\n")
    log(
        f"Reference: epgx float64. 8 spins per case, T1a 800…1200 ms and T2a 50…150 ms "
        f"(other fields as in the benchmark), and 8 benchmark spins (T2a = {T2A_MS:g} ms + "
        f"< {JITTER_MS:g} ms jitter). Tolerance on |echo| and on the complex echo: "
        f"{FLOAT32_ATOL:g}.\n"
    )
    log(
        "| case | spins | epgx fp32 max\\|Δ\\| | torchsim fp32 max\\|Δ\\| (\\|echo\\|) "
        "| torchsim max\\|Δ\\| (complex) | torchsim fp64 in max\\|Δ\\| | pass |"
    )
    log("|---|---|---|---|---|---|---|")
    extra: list[str] = []
    for case in cases:
        for label, t1a, t2a in (("spread", t1, t2), ("bench", torch.full_like(bench_t2, T1A_MS), bench_t2)):
            ref = _epgx_run(case, t1a, t2a)
            e32 = _epgx_run(case, t1a.float(), t2a.float())
            s32 = _torchsim_run(FSESimulator(), case, t1a.float(), t2a.float(), states)
            s64 = _torchsim_run(FSESimulator(), case, t1a, t2a, states)
            d_e = _max_abs(e32, ref)
            d_sm = _max_mag(s32, ref)
            d_sc = _max_abs(s32, ref)
            d_s64 = _max_abs(s64, ref)
            good = max(d_e, d_sm, d_sc, d_s64) < FLOAT32_ATOL and s32.shape == ref.shape
            ok &= good
            log(
                f"| {case.name} ({label}) | {n} | {d_e:.2e} | {d_sm:.2e} | {d_sc:.2e} | {d_s64:.2e} "
                f"| {'yes' if good else '**NO**'} |"
            )
        if case.kind == "bm":
            # What the other exchange conventions would give: documents the conversion.
            bench_t1 = torch.full_like(bench_t2, T1A_MS)
            ref = _epgx_run(case, bench_t1, bench_t2)
            for k_hz, what in (
                (K_AB_PER_S, "k_ab passed as torchsim's k"),
                (K_AB_PER_S / (1 - F_B), "k = k_ab/(1-f)"),
            ):
                wrong = _torchsim_run(FSESimulator(), case, bench_t1, bench_t2, states, k_hz=k_hz)
                extra.append(
                    f"- {case.name}: torchsim with poolB_exchange = {k_hz:g} s⁻¹ ({what}) "
                    f"differs by max\\|Δ\\| = {_max_mag(wrong, ref):.3e} "
                    f"(vs {K_TORCHSIM_HZ:g} s⁻¹ = k_ab/f: agrees)."
                )
        if states is None:
            ref = _epgx_run(case, t1, t2)
            trunc = _torchsim_run(FSESimulator(), case, t1.float(), t2.float(), 10)
            extra.append(
                f"- {case.name}: torchsim with its default states=10 (truncated) differs by "
                f"max\\|Δ\\| = {_max_mag(trunc, ref):.3e}."
            )
    log("")
    log("Convention checks:\n")
    for line in extra:
        log(line)
    log("")
    return ok


# ---------------------------------------------------------------------------- timing


@dataclass
class Timing:
    median: float
    lo: float
    hi: float
    runs: int


def _time(
    fn: Callable[[torch.Tensor], torch.Tensor],
    make: Callable[[int], torch.Tensor],
    n: int,
    warm_n: int,
    repeats: int,
) -> Timing:
    fn(make(warm_n))  # one warm-up (at min(N, --warmup-max-n) spins)
    times = []
    for _ in range(repeats):
        t2 = make(n)  # fresh jitter every run: nothing can be cached by value
        gc.collect()
        t0 = time.perf_counter()
        out = fn(t2)
        times.append(time.perf_counter() - t0)
        if out.shape[-1] != ETL or out.shape[0] != n:
            raise RuntimeError(f"unexpected output shape {tuple(out.shape)} for N={n}")
        del out
    return Timing(statistics.median(times), min(times), max(times), len(times))


def _fmt_s(t: float) -> str:
    if t < 1e-2:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.3f} s"


def _fmt_rate(r: float) -> str:
    exp = int(math.floor(math.log10(r))) if r > 0 else 0
    return f"{r / 10**exp:.2f}e{exp}"


# ---------------------------------------------------------------------------- versions


def _git_rev() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions(args: argparse.Namespace, torchsim_threads: int) -> list[str]:
    return [
        f"- python {platform.python_version()} ({platform.platform()})",
        f"- torch {torch.__version__}, numpy {np.__version__}",
        f"- torchsim {importlib.metadata.version('torchsim')} (CPU C++ extension `torchsim._epg_cpu`)",
        f"- epgx {epgx.__version__} (git {_git_rev()}), backend torch, chunk {epgx.engine.DEFAULT_CHUNK}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs visible)",
        f"- threads: torch.get_num_threads() = {torch.get_num_threads()}, torchsim worker threads = "
        f"{torchsim_threads}, OMP_NUM_THREADS = {os.environ.get('OMP_NUM_THREADS', 'unset')}",
        f"- flush denormals: {'on' if args.flush_denormal else 'off (torch default)'}",
        f"- torchsim states: "
        f"{'auto (None, exact)' if args.torchsim_states is None else args.torchsim_states}",
    ]


# ---------------------------------------------------------------------------- plot


def plot(path: str, results: dict[str, list[tuple[int, Timing, Timing]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("bm", "single") if any(c.startswith(k) for c in results)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.6), squeeze=False)
    colors = {"180": "tab:blue", "120": "tab:orange"}
    for ax, kind in zip(axes[0], kinds, strict=True):
        for name, rows in results.items():
            if not name.startswith(kind):
                continue
            angle = name.split("-")[1]
            ns = [r[0] for r in rows]
            for idx, (code, style) in enumerate((("epgx", "-o"), ("torchsim", "--s"))):
                med = np.array([r[1 + idx].median for r in rows])
                lo = np.array([r[1 + idx].lo for r in rows])
                hi = np.array([r[1 + idx].hi for r in rows])
                ax.errorbar(
                    ns,
                    med,
                    yerr=[med - lo, hi - med],
                    fmt=style,
                    ms=3.5,
                    lw=1.2,
                    capsize=2,
                    color=colors.get(angle),
                    label=f"{code}, {angle}°",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch size N (spins)")
        ax.set_ylabel("time per call (s), median, bars = min–max")
        ax.set_title("two-pool BM, k_ab 10 s⁻¹" if kind == "bm" else "single pool")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Validate, then time epgx.fse vs torchsim 0.0.8 FSESimulator on the CPU (float32, one "
            "thread) for the Torch-EPG-X benchmark FSE (32 echoes, ESP 10 ms, CPMG 180°/120°; "
            "two-pool BM T1 1000/500 ms, T2 100/20 ms, f 0.2, k_ab 10 s^-1; and single pool). "
            "Prints a markdown report. Run with OMP_NUM_THREADS=1."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes N (default: the 21 log-spaced sizes 1 … 100000)",
    )
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which cases to run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per (case, code, N); median reported")
    p.add_argument(
        "--big-n",
        type=int,
        default=40000,
        help="sizes above this use --big-repeats timed runs (keeps the full grid near 10 min)",
    )
    p.add_argument("--big-repeats", type=int, default=1, help="timed runs for N > --big-n")
    p.add_argument(
        "--warmup-max-n",
        type=int,
        default=10000,
        help="the one warm-up run before each timing uses min(N, this) spins",
    )
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (torchsim follows it)")
    p.add_argument(
        "--torchsim-states",
        type=lambda s: None if s == "auto" else int(s),
        default=None,
        help="torchsim EPG orders: 'auto' (None: sized from the winding, exact) or an int "
        "(its FSESimulator default is 10, approximate at 120°)",
    )
    p.add_argument(
        "--flush-denormal",
        action="store_true",
        help="torch.set_flush_denormal(True) (FTZ/DAZ; speeds up both codes at 180°)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the T2 jitter")
    p.add_argument("--plot", metavar="PATH", default=None, help="write a log-log PNG of time vs N")
    args = p.parse_args(argv)
    if args.quick and args.sizes is None:
        args.sizes = QUICK_SIZES
    if args.sizes is None:
        args.sizes = DEFAULT_SIZES
    if min(args.sizes) < 1 or args.repeats < 1 or args.big_repeats < 1:
        p.error("sizes and repeats must be >= 1")
    args.sizes = sorted(set(args.sizes))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    import torchsim  # noqa: F401  (import after the thread count is set)
    from torchsim.simulators import FSESimulator

    ts_threads = int(os.environ.get("TORCHSIM_NUM_THREADS", str(torch.get_num_threads())))

    def out(line: str = "") -> None:
        print(line, flush=True)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if os.environ.get("OMP_NUM_THREADS") is None:
        progress("warning: OMP_NUM_THREADS is unset; run with OMP_NUM_THREADS=1 for one-thread timings")
    if ts_threads != args.threads:
        progress(
            f"warning: TORCHSIM_NUM_THREADS={ts_threads} overrides --threads {args.threads} for torchsim"
        )

    cases = [_case(c) for c in args.cases]
    out("# FSE on the CPU: epgx vs torchsim 0.0.8\n")
    omp = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={omp} " if omp is not None else ""
    out(f"Command: `{prefix}python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`\n")
    out(
        f"CPMG FSE, {ETL} echoes, ESP {ESP_MS:g} ms, excitation {EXC_DEG:g}°, refocusing per case; "
        f"BM tissue T1 {T1A_MS:g}/{T1B_MS:g} ms, T2 {T2A_MS:g}/{T2B_MS:g} ms, f {F_B:g}, "
        f"k_ab {K_AB_PER_S:g} s⁻¹ (torchsim poolB_exchange = k_ab/f = {K_TORCHSIM_HZ:g} s⁻¹); "
        f"single pool T1 {T1A_MS:g} ms, T2 {T2A_MS:g} ms. float32. Each spin has T2a = {T2A_MS:g} ms + "
        f"U(0, {JITTER_MS:g}) ms, drawn afresh for every run. One spin-step = one RF pulse or one "
        f"ESP/2 relax+shift interval: {STEPS} steps per spin. Times are per call, from tissue tensors to "
        f"echoes (epgx: Tissue construction + fse; torchsim: FSESimulator.simulate on one simulator "
        f"object per case).\n"
    )
    out("## Versions\n")
    for line in versions(args, ts_threads):
        out(line)
    out("")

    progress("validating …")
    if not validate(cases, args.torchsim_states, out):
        out("**Validation failed: nothing timed.**")
        return 1

    gen = torch.Generator().manual_seed(args.seed)

    def make(n: int) -> torch.Tensor:
        return T2A_MS + JITTER_MS * torch.rand(n, generator=gen, dtype=torch.float32)

    results: dict[str, list[tuple[int, Timing, Timing]]] = {}
    t_start = time.perf_counter()
    for case in cases:
        sim = FSESimulator()
        rows = []
        for n in args.sizes:
            reps = args.repeats if n <= args.big_n else args.big_repeats
            warm = min(n, args.warmup_max_n)
            t1a = torch.tensor(T1A_MS, dtype=torch.float32)
            te = _time(lambda t2, case=case, t1a=t1a: _epgx_run(case, t1a, t2), make, n, warm, reps)
            tt = _time(
                lambda t2, case=case, sim=sim, t1a=t1a: _torchsim_run(
                    sim, case, t1a, t2, args.torchsim_states
                ),
                make,
                n,
                warm,
                reps,
            )
            rows.append((n, te, tt))
            progress(
                f"{case.name:>10} N={n:>6}: epgx {_fmt_s(te.median)}, torchsim {_fmt_s(tt.median)}, "
                f"ratio {tt.median / te.median:.2f}  [{time.perf_counter() - t_start:.0f} s]"
            )
        results[case.name] = rows

    out("## Timings (CPU, float32)\n")
    out(
        f"Median of the timed runs after one warm-up (runs: {args.repeats} for N ≤ {args.big_n}, "
        f"{args.big_repeats} above); spread = min–max; throughput = N·{STEPS} / median (spin-steps/s); "
        f"ratio = torchsim / epgx median (> 1: epgx faster).\n"
    )
    out(
        "| case | N | runs | epgx median | epgx min–max | epgx spin-steps/s | torchsim median "
        "| torchsim min–max | torchsim spin-steps/s | torchsim/epgx |"
    )
    out("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, rows in results.items():
        for n, te, tt in rows:
            out(
                f"| {name} | {n} | {te.runs} | {_fmt_s(te.median)} | {_fmt_s(te.lo)}–{_fmt_s(te.hi)} "
                f"| {_fmt_rate(n * STEPS / te.median)} | {_fmt_s(tt.median)} "
                f"| {_fmt_s(tt.lo)}–{_fmt_s(tt.hi)} "
                f"| {_fmt_rate(n * STEPS / tt.median)} | {tt.median / te.median:.2f} |"
            )
    out("")
    out(f"Total timing wall time: {time.perf_counter() - t_start:.0f} s.")
    if args.plot:
        plot(
            args.plot,
            results,
            f"FSE {ETL} echoes, CPU float32, {args.threads} thread(s): epgx {epgx.__version__} vs "
            f"torchsim {importlib.metadata.version('torchsim')} — {cpu_model()}",
        )
        out(f"\nPlot: `{args.plot}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
