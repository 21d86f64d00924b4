"""The Torch-EPG-X seed benchmark: FSE, 32 echoes, 1 … 100 000 spins, every backend and peer.

Sequence: CPMG FSE, 32 echoes, ESP 10 ms, 90° excitation, refocusing 180° or 120°.
Tissue: two-pool Bloch–McConnell, T1 1000/500 ms, T2 100/20 ms, f = 0.2 (pool b),
k_ab = 10 s⁻¹ (forward rate a → b); and the single pool T1 1000 ms, T2 100 ms. float32.
Sizes: the abstract's 21 log-spaced batch sizes from 1 to 100 000 spins.

Codes timed (each only where it can run):

* ``epgx-torch``: the pure-torch engine on the CPU (``backend="torch"``).
* ``epgx-triton``: the fused whole-train Triton kernel on a CUDA device.
* ``torchsim``: torchsim's ``FSESimulator`` (CPU C++ extension), when installed.
* ``sycomore``: Sycomore's regular EPG, one spin at a time, single-pool cases only
  (it has no exchange), when installed.

Before anything is timed, every code is checked against an epgx float64 run of every
case; a code that disagrees by more than :data:`FLOAT32_ATOL` is reported and not timed.

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

Run it as ``epgx bench`` (quick) / ``epgx bench --full``, or
``OMP_NUM_THREADS=1 python bench/compare_peers.py`` (all cases, 21 sizes).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
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
SEED_CASES = ("bm-180",)
FULL_SIZES = [int(n) for n in np.unique(np.logspace(0, 5, 21).round().astype(int))]
QUICK_SIZES = [1, 10, 100, 1000, 10000]
# peers that have no runner here, and why (reported, never timed)
UNSUPPORTED_PEERS = {"mri-sim-py": "not on PyPI and not importable as a package; no runner"}


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "bm" | "single"
    refocus_deg: float


def case(name: str) -> Case:
    kind, angle = name.split("-")
    return Case(name, kind, float(angle))


# ---------------------------------------------------------------------------- codes


def epgx_run(case: Case, t1a: torch.Tensor, t2a: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """epgx.fse from raw tensors (Tissue construction and checks are timed too)."""
    flips = [EXC_DEG] + [case.refocus_deg] * ETL
    if case.kind == "bm":
        tissue = epgx.Tissue.bm(
            t1_ms=(t1a, T1B_MS), t2_ms=(t2a, T2B_MS), f=F_B, k_ab_per_s=K_AB_PER_S, dtype=t2a.dtype
        )
    else:
        tissue = epgx.Tissue(t1_ms=t1a, t2_ms=t2a, dtype=t2a.dtype)
    out = epgx.fse(tissue, flips, ESP_MS, backend=backend)
    assert isinstance(out, torch.Tensor)
    return out


def torchsim_run(
    sim: object,
    case: Case,
    t1a: torch.Tensor,
    t2a: torch.Tensor,
    states: int | None,
    k_hz: float = K_TORCHSIM_HZ,
) -> torch.Tensor:
    """torchsim FSESimulator.simulate (its CPU C++ extension)."""
    kwargs: dict[str, object] = dict(
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
    return sim.simulate(**kwargs)  # type: ignore[attr-defined]


def sycomore_run(case: Case, t1a: torch.Tensor, t2a: torch.Tensor) -> torch.Tensor:
    """Sycomore regular EPG, one spin after another (single pool only), as its docs show."""
    import sycomore
    from sycomore.units import deg, ms

    n = t2a.numel()
    t1 = t1a.expand(n) if t1a.numel() == 1 else t1a
    out = np.empty((n, ETL), dtype=np.complex128)
    half = ESP_MS / 2
    for i in range(n):
        model = sycomore.epg.Regular(sycomore.Species(float(t1[i]) * ms, float(t2a[i]) * ms))
        model.apply_pulse(EXC_DEG * deg, 90 * deg)
        for j in range(ETL):
            model.apply_time_interval(half * ms)
            model.apply_pulse(case.refocus_deg * deg, 0 * deg)
            model.apply_time_interval(half * ms)
            out[i, j] = complex(model.echo)
    return torch.from_numpy(out)
    return out


@dataclass
class Code:
    """One thing to time: how to run a case on tensors made on ``device``, and sync."""

    name: str
    run: Callable[[Case, torch.Tensor, torch.Tensor], torch.Tensor]
    device: str = "cpu"
    kinds: tuple[str, ...] = ("bm", "single")
    # complex echoes are compared (True), or only their magnitude (a peer's phase convention)
    complex_match: bool = True

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def available_codes(peers: bool, torchsim_states: int | None) -> tuple[list[Code], list[str]]:
    """Every code that can run here, and a line for each that cannot (reported, not timed)."""
    codes = [Code("epgx-torch", epgx_run)]
    skipped = []
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        codes.append(Code("epgx-triton", lambda c, a, b: epgx_run(c, a, b, "triton"), device="cuda"))
    else:
        skipped.append("epgx-triton: needs a CUDA device (none here)")
    if not peers:
        return codes, skipped + ["peers: not run (--no-peers)"]
    if importlib.util.find_spec("torchsim") is not None:
        from torchsim.simulators import FSESimulator

        sims: dict[str, object] = {}

        def run_ts(c: Case, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            sim = sims.setdefault(c.name, FSESimulator())  # one simulator object per case
            return torchsim_run(sim, c, a, b, torchsim_states)

        codes.append(Code("torchsim", run_ts))
    else:
        skipped.append("torchsim: not installed (pip install 'epgx[bench]')")
    if importlib.util.find_spec("sycomore") is not None:
        codes.append(Code("sycomore", sycomore_run, kinds=("single",), complex_match=False))
    else:
        skipped.append("sycomore: not installed (sdist only, needs a C++ build: pip install sycomore)")
    skipped += [f"{k}: {v}" for k, v in UNSUPPORTED_PEERS.items()]
    return codes, skipped


# ---------------------------------------------------------------------------- validation


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu().to(torch.complex128) - b.cpu().to(torch.complex128)).abs().max())


def _max_mag(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu().abs().double() - b.cpu().abs().double()).abs().max())


def validate(
    cases: list[Case], codes: list[Code], torchsim_states: int | None, log: Callable[[str], None]
) -> dict[str, set[str]]:
    """Every code vs an epgx float64 reference, 8 spins per case; returns the passing cases per code."""
    n = 8
    t1 = torch.linspace(800.0, 1200.0, n, dtype=torch.float64)
    t2 = torch.linspace(50.0, 150.0, n, dtype=torch.float64)
    bench_t2 = T2A_MS + JITTER_MS * torch.rand(n, dtype=torch.float64)
    passed: dict[str, set[str]] = {c.name: set() for c in codes}
    log("## Validation (before timing)\n")
    log(
        f"Reference: epgx float64 (pure torch, CPU). 8 spins per case, T1a 800…1200 ms and T2a "
        f"50…150 ms (other fields as in the benchmark), and 8 benchmark spins (T2a = {T2A_MS:g} ms + "
        f"< {JITTER_MS:g} ms jitter). Codes run in float32; max|Δ| of the complex echo (of |echo| "
        f"for a code marked |·|). Tolerance {FLOAT32_ATOL:g}.\n"
    )
    log(
        "| case | spins | "
        + " | ".join(c.name + ("" if c.complex_match else " \\|·\\|") for c in codes)
        + " |"
    )
    log("|---|---|" + "---:|" * len(codes))
    for cs in cases:
        ok = {c.name: True for c in codes}
        for label, t1a, t2a in (("spread", t1, t2), ("bench", torch.full_like(bench_t2, T1A_MS), bench_t2)):
            ref = epgx_run(cs, t1a, t2a)
            cells = []
            for code in codes:
                if cs.kind not in code.kinds:
                    cells.append("n/a")
                    ok[code.name] = False
                    continue
                out = code.run(cs, t1a.float().to(code.device), t2a.float().to(code.device))
                code.sync()
                err = _max_abs(out, ref) if code.complex_match else _max_mag(out, ref)
                good = err < FLOAT32_ATOL and tuple(out.shape) == tuple(ref.shape)
                ok[code.name] &= good
                cells.append(f"{err:.2e}" + ("" if good else " **FAIL**"))
            log(f"| {cs.name} ({label}) | {n} | " + " | ".join(cells) + " |")
        for name, good in ok.items():
            if good:
                passed[name].add(cs.name)
    log("")
    if any(c.name == "torchsim" for c in codes):
        log("Convention checks (torchsim):\n")
        from torchsim.simulators import FSESimulator

        for cs in cases:
            bench_t1 = torch.full_like(bench_t2, T1A_MS)
            if cs.kind == "bm":
                ref = epgx_run(cs, bench_t1, bench_t2)
                for k_hz, what in (
                    (K_AB_PER_S, "k_ab passed as torchsim's k"),
                    (K_AB_PER_S / (1 - F_B), "k = k_ab/(1-f)"),
                ):
                    wrong = torchsim_run(FSESimulator(), cs, bench_t1, bench_t2, torchsim_states, k_hz=k_hz)
                    log(
                        f"- {cs.name}: torchsim with poolB_exchange = {k_hz:g} s⁻¹ ({what}) differs by "
                        f"max\\|Δ\\| = {_max_mag(wrong, ref):.3e} "
                        f"(vs {K_TORCHSIM_HZ:g} s⁻¹ = k_ab/f: agrees)."
                    )
            if torchsim_states is None:
                ref = epgx_run(cs, t1, t2)
                trunc = torchsim_run(FSESimulator(), cs, t1.float(), t2.float(), 10)
                log(
                    f"- {cs.name}: torchsim with its default states=10 (truncated) differs by "
                    f"max\\|Δ\\| = {_max_mag(trunc, ref):.3e}."
                )
        log("")
    return passed


# ---------------------------------------------------------------------------- timing


@dataclass
class Timing:
    median: float
    lo: float
    hi: float
    runs: int


def time_call(
    fn: Callable[[torch.Tensor], torch.Tensor],
    make: Callable[[int], torch.Tensor],
    n: int,
    warm_n: int,
    repeats: int,
    sync: Callable[[], None],
) -> Timing:
    """Median/min/max wall time of ``fn(make(n))`` after one warm-up at ``warm_n`` spins."""
    fn(make(warm_n))
    sync()
    times = []
    for _ in range(repeats):
        t2 = make(n)  # fresh jitter every run: nothing can be cached by value
        gc.collect()
        sync()
        t0 = time.perf_counter()
        out = fn(t2)
        sync()
        times.append(time.perf_counter() - t0)
        if out.shape[-1] != ETL or out.shape[0] != n:
            raise RuntimeError(f"unexpected output shape {tuple(out.shape)} for N={n}")
        del out
    return Timing(statistics.median(times), min(times), max(times), len(times))


def fmt_s(t: float) -> str:
    return f"{t * 1e3:.2f} ms" if t < 1e-2 else f"{t:.3f} s"


def fmt_rate(r: float) -> str:
    exp = int(math.floor(math.log10(r))) if r > 0 else 0
    return f"{r / 10**exp:.2f}e{exp}"


# ---------------------------------------------------------------------------- versions


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_rev() -> str:
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


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions(args: argparse.Namespace, codes: list[Code]) -> list[str]:
    names = {c.name for c in codes}
    lines = [
        f"- python {platform.python_version()} ({platform.platform()})",
        f"- torch {torch.__version__}, numpy {np.__version__}, triton {_version('triton')}",
        f"- epgx {epgx.__version__} (git {git_rev()}), torch-engine chunk {epgx.engine.DEFAULT_CHUNK}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs visible)",
        f"- GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
        f"- threads: torch.get_num_threads() = {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS = {os.environ.get('OMP_NUM_THREADS', 'unset')}",
        f"- flush denormals: {'on' if args.flush_denormal else 'off (torch default)'}",
    ]
    if "torchsim" in names:
        states = "auto (None, exact)" if args.torchsim_states is None else args.torchsim_states
        lines.append(f"- torchsim {_version('torchsim')} (CPU C++ extension), states {states}")
    if "sycomore" in names:
        lines.append(f"- sycomore {_version('sycomore')}")
    return lines


# ---------------------------------------------------------------------------- plot


def plot(path: str, results: dict[str, dict[str, list[tuple[int, Timing]]]], title: str) -> None:
    """Log–log time vs batch size, one panel per tissue kind; results[case][code] = rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("bm", "single") if any(c.startswith(k) for c in results)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.6), squeeze=False)
    colors = {"180": "tab:blue", "120": "tab:orange"}
    styles = {"epgx-torch": "-o", "epgx-triton": "-^", "torchsim": "--s", "sycomore": ":d"}
    for ax, kind in zip(axes[0], kinds, strict=True):
        for name, per_code in results.items():
            if not name.startswith(kind):
                continue
            angle = name.split("-")[1]
            for code, rows in per_code.items():
                ns = [r[0] for r in rows]
                med = np.array([r[1].median for r in rows])
                lo = np.array([r[1].lo for r in rows])
                hi = np.array([r[1].hi for r in rows])
                ax.errorbar(
                    ns,
                    med,
                    yerr=[med - lo, hi - med],
                    fmt=styles.get(code, "-x"),
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
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---------------------------------------------------------------------------- entry points


def add_arguments(p: argparse.ArgumentParser, *, cases: tuple[str, ...], sizes: str) -> None:
    """The benchmark's options; ``cases`` and ``sizes`` ("full" | "quick") set the defaults."""
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes N (default: "
        + ("the 21 log-spaced sizes 1 … 100000)" if sizes == "full" else f"{QUICK_SIZES})"),
    )
    if sizes == "full":
        p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}")
    else:
        p.add_argument("--full", action="store_true", help="the 21 log-spaced sizes 1 … 100000")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(cases), help="which cases to run")
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
        help="the warm-up run before each timing uses min(N, this) spins",
    )
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (torchsim follows it)")
    p.add_argument(
        "--torchsim-states",
        type=lambda s: None if s == "auto" else int(s),
        default=None,
        help="torchsim EPG orders: 'auto' (None: sized from the winding, exact) or an int "
        "(its FSESimulator default is 10, approximate at 120°)",
    )
    p.add_argument("--no-peers", action="store_true", help="time epgx only")
    p.add_argument(
        "--flush-denormal",
        action="store_true",
        help="torch.set_flush_denormal(True) (FTZ/DAZ; speeds up 180° trains)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the T2 jitter")
    p.add_argument("--plot", metavar="PATH", default=None, help="write a log-log PNG of time vs N")


def resolve_sizes(args: argparse.Namespace) -> list[int]:
    """The batch sizes the parsed options ask for, sorted; ValueError for a bad one."""
    if args.sizes is not None:
        sizes = args.sizes
    elif getattr(args, "quick", False):
        sizes = QUICK_SIZES
    elif getattr(args, "full", True):
        sizes = FULL_SIZES
    else:
        sizes = QUICK_SIZES
    if min(sizes) < 1 or args.repeats < 1 or args.big_repeats < 1:
        raise ValueError(f"sizes and repeats must be >= 1; got sizes {sizes}, repeats {args.repeats}.")
    return sorted(set(sizes))


def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """Validate, time and report (markdown on ``out``, progress on stderr); 1 if validation fails."""
    sizes = resolve_sizes(args)
    torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if os.environ.get("OMP_NUM_THREADS") is None:
        progress("warning: OMP_NUM_THREADS is unset; run with OMP_NUM_THREADS=1 for one-thread timings")
    codes, skipped = available_codes(not args.no_peers, args.torchsim_states)
    cases = [case(c) for c in args.cases]
    out("# FSE seed benchmark: epgx backends and peers\n")
    omp = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={omp} " if omp is not None else ""
    prog = Path(sys.argv[0]).name
    prog = "python -m epgx" if prog == "__main__.py" else prog
    out(f"Command: `{prefix}{prog} {' '.join(sys.argv[1:])}`\n")
    out(
        f"CPMG FSE, {ETL} echoes, ESP {ESP_MS:g} ms, excitation {EXC_DEG:g}°, refocusing per case; "
        f"BM tissue T1 {T1A_MS:g}/{T1B_MS:g} ms, T2 {T2A_MS:g}/{T2B_MS:g} ms, f {F_B:g}, "
        f"k_ab {K_AB_PER_S:g} s⁻¹ (torchsim poolB_exchange = k_ab/f = {K_TORCHSIM_HZ:g} s⁻¹); "
        f"single pool T1 {T1A_MS:g} ms, T2 {T2A_MS:g} ms. float32. Each spin has T2a = {T2A_MS:g} ms + "
        f"U(0, {JITTER_MS:g}) ms, drawn afresh for every run. {STEPS} spin-steps per spin. Times are per "
        f"call, from tissue tensors to echoes.\n"
    )
    out("## Versions\n")
    for line in versions(args, codes):
        out(line)
    out("")
    out("Codes: " + ", ".join(c.name for c in codes) + ".")
    for line in skipped:
        out(f"- not timed: {line}")
    out("")
    progress("validating …")
    passed = validate(cases, codes, args.torchsim_states, out)
    if not passed["epgx-torch"] >= {c.name for c in cases}:
        out("**Validation of epgx failed: nothing timed.**")
        return 1
    gen = torch.Generator().manual_seed(args.seed)
    results: dict[str, dict[str, list[tuple[int, Timing]]]] = {}
    t_start = time.perf_counter()
    for cs in cases:
        results[cs.name] = {}
        timed = [code for code in codes if cs.name in passed[code.name]]
        for n in sizes:  # the codes interleaved per size: they see the same machine load
            for code in timed:
                reps = args.repeats if n <= args.big_n else args.big_repeats
                t1a = torch.tensor(T1A_MS, dtype=torch.float32, device=code.device)

                def make(k: int, code: Code = code) -> torch.Tensor:
                    jitter = torch.rand(k, generator=gen, dtype=torch.float32)
                    return (T2A_MS + JITTER_MS * jitter).to(code.device)

                def call(
                    t2: torch.Tensor, cs: Case = cs, code: Code = code, t1a: torch.Tensor = t1a
                ) -> torch.Tensor:
                    return code.run(cs, t1a, t2)

                tm = time_call(call, make, n, min(n, args.warmup_max_n), reps, code.sync)
                results[cs.name].setdefault(code.name, []).append((n, tm))
                progress(
                    f"{cs.name:>10} {code.name:>11} N={n:>6}: {fmt_s(tm.median)}  "
                    f"[{time.perf_counter() - t_start:.0f} s]"
                )

    out("## Timings\n")
    out(
        f"Median of the timed runs after one warm-up (runs: {args.repeats} for N ≤ {args.big_n}, "
        f"{args.big_repeats} above); spread = min–max; throughput = N·{STEPS} / median (spin-steps/s); "
        "× epgx-torch = that code's median / epgx-torch's (> 1: epgx-torch faster).\n"
    )
    out("| case | code | N | runs | median | min–max | spin-steps/s | × epgx-torch |")
    out("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, per_code in results.items():
        base = {n: t for n, t in per_code.get("epgx-torch", [])}
        for code_name, rows in per_code.items():
            for n, t in rows:
                ratio = f"{t.median / base[n].median:.2f}" if n in base else "–"
                out(
                    f"| {name} | {code_name} | {n} | {t.runs} | {fmt_s(t.median)} "
                    f"| {fmt_s(t.lo)}–{fmt_s(t.hi)} | {fmt_rate(n * STEPS / t.median)} | {ratio} |"
                )
    out("")
    out(f"Total timing wall time: {time.perf_counter() - t_start:.0f} s.")
    if args.plot:
        plot(
            args.plot,
            results,
            f"FSE {ETL} echoes, float32, {args.threads} CPU thread(s)\n"
            + ", ".join(c.name for c in codes)
            + f" — {cpu_model()}",
        )
        out(f"\nPlot: `{args.plot}`")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python bench/compare_peers.py``: every case, the 21 sizes by default."""
    p = argparse.ArgumentParser(
        description="Validate, then time the Torch-EPG-X benchmark FSE on every available epgx backend "
        "and peer. Prints a markdown report. Run with OMP_NUM_THREADS=1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(p, cases=CASES, sizes="full")
    args = p.parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:
        p.error(str(exc))
        return 2
