"""The ``epgx`` command line.

Each subcommand lives in its own module of this package and exposes
``add_parser(subparsers)``, which adds its parser and sets ``func`` (run with the parsed
arguments, returns the exit code) and optionally ``check`` (validate the arguments,
calling ``parser.error``). Add a new subcommand by adding its module to ``SUBCOMMANDS``.

Errors a user can fix (bad values, missing files, missing optional packages) are
printed as one line, ``epgx: error: ...``, with exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import epgx

# Modules of epgx.cli that define a subcommand, in the order --help lists them.
SUBCOMMANDS = ("demo", "fit_molli", "dict", "match", "bench")


def build_parser() -> argparse.ArgumentParser:
    """The ``epgx`` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="epgx", description="Differentiable EPG-X simulation and qMRI fitting."
    )
    parser.add_argument("--version", action="version", version=f"epgx {epgx.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"epgx.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``epgx`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    check = getattr(args, "check", None)
    if check is not None:
        check(parser, args)
    try:
        return int(args.func(args))
    except (ValueError, OSError, ImportError) as exc:
        print(f"epgx {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
