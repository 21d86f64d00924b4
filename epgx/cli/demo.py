"""``epgx demo``: the README's main job, the benchmark two-pool FSE printed and plotted."""

from __future__ import annotations

import argparse
import time
from typing import Any, cast

import torch

import epgx

# The Torch-EPG-X benchmark tissue: two-pool BM exchange (DESIGN.md).
DEMO_TISSUE: dict[str, Any] = dict(t1_ms=(1000.0, 500.0), t2_ms=(100.0, 20.0), f=0.2, k_ab_per_s=10.0)
DEMO_ETL = 32
DEMO_ESP_MS = 10.0


def _demo(args: argparse.Namespace) -> int:
    tissue = epgx.Tissue.bm(**DEMO_TISSUE, dtype=torch.float64)
    single = epgx.Tissue(t1_ms=1000.0, t2_ms=100.0, dtype=torch.float64)
    trains = {}
    for refoc in (180.0, 120.0):
        flips = [90.0] + [refoc] * DEMO_ETL
        trains[refoc] = (
            cast(torch.Tensor, epgx.fse(tissue, flips, DEMO_ESP_MS)),
            cast(torch.Tensor, epgx.fse(single, flips, DEMO_ESP_MS)),
        )
    print(
        "epgx demo: FSE, 32 echoes, ESP 10 ms, two-pool Bloch-McConnell tissue\n"
        "  T1 1000/500 ms, T2 100/20 ms, f 0.2, k_ab 10 s^-1 (pure-torch backend, float64)\n"
    )
    print(f"{'echo':>4} {'t/ms':>6} {'|S| 180':>9} {'|S| 120':>9} {'1-pool 180':>11} {'1-pool 120':>11}")
    for i in range(DEMO_ETL):
        row = [trains[a][k][i].abs().item() for a in (180.0, 120.0) for k in (0,)]
        row += [trains[a][1][i].abs().item() for a in (180.0, 120.0)]
        print(
            f"{i + 1:>4} {(i + 1) * DEMO_ESP_MS:>6.0f} "
            + " ".join(f"{v:>9.5f}" if j < 2 else f"{v:>11.5f}" for j, v in enumerate(row))
        )
    # a batch timing, so the user sees the vectorised engine at work
    n = args.spins
    batch = epgx.Tissue.bm(
        t1_ms=(torch.full((n,), 1000.0), torch.full((n,), 500.0)), t2_ms=(100.0, 20.0), f=0.2, k_ab_per_s=10.0
    )
    t0 = time.perf_counter()
    epgx.fse(batch, [90.0] + [180.0] * DEMO_ETL, DEMO_ESP_MS)
    dt = time.perf_counter() - t0
    print(
        f"\n{n} two-pool spins x {DEMO_ETL} echoes (float32): {dt * 1e3:.1f} ms on "
        f"{torch.get_num_threads()} CPU thread(s)"
    )
    if args.out:
        _plot(trains, args.out)
    return 0


def _plot(trains: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no plot written; pip install 'epgx[plot]' to get {path})")
        return
    t = [(i + 1) * DEMO_ESP_MS for i in range(DEMO_ETL)]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for refoc, style in ((180.0, "-o"), (120.0, "-s")):
        bm, one = trains[refoc]
        ax.plot(t, bm.abs().numpy(), style, ms=3, label=f"two-pool BM, {refoc:.0f}°")
        ax.plot(t, one.abs().numpy(), style.replace("-", ":"), ms=3, label=f"single pool, {refoc:.0f}°")
    ax.set_xlabel("echo time (ms)")
    ax.set_ylabel("|echo| (M0 = 1)")
    ax.set_title("epgx demo: FSE, ESP 10 ms, 32 echoes")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def add_parser(sub: Any) -> None:
    """Register ``epgx demo`` on the subparsers of the ``epgx`` command."""
    demo = sub.add_parser("demo", help="simulate the benchmark two-pool FSE and print/plot its echoes")
    demo.add_argument(
        "--out", default="epgx_demo.png", help="PNG to write ('' for none); default %(default)s"
    )
    demo.add_argument(
        "--spins", type=int, default=10000, help="batch size of the timing run; default %(default)s"
    )
    demo.set_defaults(func=_demo, check=_check)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.spins < 1:
        parser.error(f"--spins must be >= 1, got {args.spins}")
