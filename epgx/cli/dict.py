"""``epgx dict``: generate a signal dictionary over a parameter grid and save it (HDF5/Zarr)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from epgx import dictionary as D

_EXAMPLE = """\
examples:
  epgx dict fisp_mrf --t1-ms 100:5000:50:log --t2-ms 10:500:40:log --constraint 't2_ms < t1_ms' \\
      --svd-energy 0.9999 --out fisp.h5
  epgx dict epgx:fse --kind bm --t1-ms 1000 --t1b-ms 500 --t2-ms 40:150:12 --t2b-ms 20 \\
      --f 0.05:0.3:6 --k-ab-per-s 10 --protocol fse.toml --set esp_ms=10 --out fse_bm.h5

A grid axis is a number, a comma list 'a,b,c', or 'start:stop:n[:lin|log]' (n points,
both ends included). Protocol values are TOML: --set flip_deg='[90, 180, 180]'; a bare
word is taken as a string. MODEL is a name in epgx.models.MODELS or 'module:function'.
"""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_protocol(path: str | None, sets: list[str]) -> dict[str, Any]:
    """Model keyword arguments from a TOML file and ``KEY=VALUE`` pairs (the pairs win).

    Raises:
        ValueError: an unreadable TOML file or a pair without ``=``.
        ImportError: TOML on Python 3.10 without tomli.
    """
    toml = _toml()
    protocol: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                protocol.update(toml.load(fh))
        except toml.TOMLDecodeError as exc:
            raise ValueError(f"protocol file {path!r} is not valid TOML: {exc}") from None
    for item in sets:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE (e.g. tr_ms=12 or flip_deg='[10, 20]'), got {item!r}.")
        try:
            protocol[key] = toml.loads(f"v = {value}")["v"]
        except toml.TOMLDecodeError:
            protocol[key] = value  # a bare word: a string
    return protocol


def _toml() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ImportError:
        raise ImportError("reading TOML on Python 3.10 needs tomli: pip install tomli") from None
    return tomli


def _run(args: argparse.Namespace) -> int:
    params = {k: getattr(args, k) for k in D.UNITS if getattr(args, k) is not None}
    grid = D.grid(args.kind, product=not args.zip, constraints=args.constraint, **params)
    protocol = parse_protocol(args.protocol, args.set)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    t0 = time.perf_counter()
    d = D.generate(
        args.model,
        grid,
        protocol,
        memory_budget_mb=args.memory_mb,
        dtype=dtype,
        device=args.device,
        backend=args.backend,
        svd_energy=args.svd_energy,
        progress=not args.no_progress,
    )
    dt = time.perf_counter() - t0
    path = d.save(args.out)
    comp = (
        f", compressed to rank {d.rank} keeping {d.svd_energy:.6f} of the energy"
        if d.svd_energy is not None
        else ""
    )
    dropped = f" ({grid.n_dropped} dropped by constraints)" if grid.n_dropped else ""
    print(
        f"wrote {path}: {d.n_atoms} atoms{dropped} x {d.n_readouts} readouts of {d.model!r} "
        f"({d.atoms.dtype}){comp}; generated in {dt:.2f} s ({d.n_atoms / dt:.3g} atoms/s)"
    )
    return 0


def add_parser(sub: Any) -> None:
    """Register ``epgx dict`` on the subparsers of the ``epgx`` command."""
    p = sub.add_parser(
        "dict",
        help="generate a signal dictionary over a parameter grid (HDF5/Zarr)",
        description="Evaluate a model at every atom of a parameter grid, in chunks that fit a "
        "memory budget, optionally SVD-compress it, and save atoms, grid and metadata.",
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    names = ", ".join(sorted(D.available_models())) or "none registered"
    p.add_argument("model", metavar="MODEL", help=f"model name ({names}) or 'module:function'")
    p.add_argument("--kind", choices=tuple(D.KIND_PARAMETERS), default="single", help="tissue kind")
    grid = p.add_argument_group("grid (one option per parameter; unit in the name)")
    for name, unit in D.UNITS.items():
        kinds = [k for k, (req, opt) in D.KIND_PARAMETERS.items() if name in req + opt]
        grid.add_argument(_flag(name), dest=name, metavar="AXIS", help=f"{unit}; kinds {', '.join(kinds)}")
    grid.add_argument(
        "--constraint",
        action="append",
        default=[],
        metavar="EXPR",
        help="keep atoms with EXPR true, e.g. 't2_ms < t1_ms' (repeatable)",
    )
    grid.add_argument(
        "--zip", action="store_true", help="atoms are the axes zipped (equal lengths), not their product"
    )
    proto = p.add_argument_group("protocol (the model's keyword arguments)")
    proto.add_argument("--protocol", metavar="TOML", help="TOML file of keyword arguments")
    proto.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="one argument (repeatable)"
    )
    p.add_argument("--out", required=True, help="output file: .h5, .hdf5 or .zarr")
    p.add_argument(
        "--svd-energy", type=float, default=None, metavar="E", help="SVD-compress keeping E of the energy"
    )
    p.add_argument(
        "--memory-mb", type=float, default=D.DEFAULT_MEMORY_BUDGET_MB, help="memory budget per chunk, MB"
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="simulation precision")
    p.add_argument("--device", default=None, help="torch device of the simulation (e.g. cuda); default cpu")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto", help="engine backend")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run, check=_check)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.memory_mb > 0:
        parser.error(f"--memory-mb must be > 0 (MB), got {args.memory_mb}")
    if args.svd_energy is not None and not 0 < args.svd_energy <= 1:
        parser.error(f"--svd-energy must be in (0, 1], got {args.svd_energy}")
    if Path(args.out).suffix.lower() not in D.STORE_SUFFIXES:
        parser.error(f"--out {args.out!r}: the suffix must be one of {', '.join(D.STORE_SUFFIXES)}")
