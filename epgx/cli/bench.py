"""``epgx bench``: the seed FSE benchmark (quick by default), every backend and peer here."""

from __future__ import annotations

import argparse
from typing import Any

from epgx import benchmark


def _run(args: argparse.Namespace) -> int:
    return benchmark.run(args)


def add_parser(sub: Any) -> None:
    """Register ``epgx bench`` on the subparsers of the ``epgx`` command."""
    p = sub.add_parser(
        "bench",
        help="time the seed benchmark (two-pool FSE, 32 echoes) on every backend and installed peer",
        description="Validate, then time the Torch-EPG-X benchmark FSE (two-pool BM T1 1000/500 ms, "
        "T2 100/20 ms, f 0.2, k_ab 10 s^-1, 32 echoes, ESP 10 ms) on every epgx backend that can run "
        f"here and every installed peer (torchsim, sycomore). Quick by default (N = "
        f"{', '.join(map(str, benchmark.QUICK_SIZES))}); --full runs the abstract's 21 sizes 1 ... "
        "100000. Prints a markdown report; run with OMP_NUM_THREADS=1 for one-thread CPU figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    benchmark.add_arguments(p, cases=benchmark.SEED_CASES, sizes="quick")
    p.set_defaults(func=_run, check=_check)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        benchmark.resolve_sizes(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
