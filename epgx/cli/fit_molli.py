"""``epgx fit-molli``: MOLLI T1 maps from a DICOM folder or a NIfTI file.

Reads the series (:mod:`epgx.fit.io`), fits every slice with :func:`epgx.fit.molli`
(a progress line per slice), prints a summary and writes the T1, T1*, SD(T1), R² and ok
maps as NIfTI plus a PNG of the T1 map. Needs the ``io`` extra (``pip install "epgx[io]"``).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PNG_CHOICES = ("montage", "slices", "none")


def _ti_values(tokens: list[str] | None) -> list[float] | None:
    """``--ti-ms`` tokens, space or comma separated, as floats (ValueError names a bad token)."""
    if tokens is None:
        return None
    values = []
    for part in ",".join(tokens).split(","):
        if part.strip():
            try:
                values.append(float(part))
            except ValueError:
                raise ValueError(f"--ti-ms takes numbers in ms; got {part.strip()!r}") from None
    return values


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    src = Path(args.input)
    if not src.exists():
        parser.error(f"fit-molli: INPUT {args.input!r} does not exist")
    if src.is_dir():
        if args.ti_ms is not None:
            parser.error("fit-molli: --ti-ms is for NIfTI input; a DICOM folder's TIs come from its headers")
    elif _is_nifti(src):
        if args.ti_ms is None:
            parser.error("fit-molli: NIfTI input needs --ti-ms (the TIs in ms, in the order of the volumes)")
        if args.series is not None:
            parser.error("fit-molli: --series selects a DICOM series; INPUT is a NIfTI file")
    else:
        parser.error(f"fit-molli: INPUT must be a DICOM folder or a .nii/.nii.gz file; got {args.input!r}")
    try:
        args.ti_ms = _ti_values(args.ti_ms)
    except ValueError as exc:
        parser.error(f"fit-molli: {exc}")
    if args.noise_sd is not None and not args.noise_sd > 0:
        parser.error(f"fit-molli: --noise-sd must be > 0 (image units); got {args.noise_sd}")
    look_locker = args.correction == "look-locker"
    if look_locker and (args.flip_deg is None or args.tr_ms is None):
        parser.error("fit-molli: --correction look-locker needs --flip-deg and --tr-ms of the readout")
    if not look_locker and (args.flip_deg is not None or args.tr_ms is not None):
        parser.error("fit-molli: --flip-deg and --tr-ms are used by --correction look-locker only")


def _stats(t1: torch.Tensor) -> str:
    """'median T1 … ms, IQR …–… ms' of the finite values, or a note that there are none."""
    valid = t1[torch.isfinite(t1)].double()
    if valid.numel() == 0:
        return "no valid fits"
    q = torch.quantile(valid, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return f"median T1 {q[1]:.0f} ms, IQR {q[0]:.0f}-{q[2]:.0f} ms"


def _run(args: argparse.Namespace) -> int:
    from epgx.fit import io

    t_start = time.perf_counter()
    src = Path(args.input)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if src.is_dir():
            series = io.read_dicom(src, series=args.series)
        else:
            series = io.read_nifti(src, args.ti_ms)
        mask = io.read_mask(args.mask, series) if args.mask else None
    for w in caught:
        print(f"epgx fit-molli: warning: {w.message}", file=sys.stderr)
    n_slices, ny, nx, n_ti = series.images.shape
    print(
        f"read {n_slices} slice(s) of {ny}x{nx} voxels x {n_ti} TIs from {args.input} "
        f"(TIs from {series.ti_source}"
        + (f"; {len(series.skipped)} files skipped)" if series.skipped else ")")
    )
    if mask is None:
        mask = torch.ones(n_slices, ny, nx, dtype=torch.bool)
    positions = series.slice_positions_mm.tolist()
    t_fit = time.perf_counter()
    last = [t_fit]

    def progress(k: int, res: Any) -> None:
        now = time.perf_counter()
        fitted = int(mask[k].sum())
        n_ok = int(res.ok.sum())
        frac = f"{n_ok / fitted:.1%}" if fitted else "-"
        print(
            f"slice {k + 1}/{n_slices} at {positions[k]:.1f} mm: {fitted} voxels, {frac} ok, "
            f"{_stats(res.t1_ms)} ({now - last[0]:.2f} s)",
            flush=True,
        )
        last[0] = now

    res = io.fit_series(
        series,
        mask,
        progress=progress,
        method=args.method,
        noise_sd=args.noise_sd,
        correction=args.correction,
        flip_deg=args.flip_deg,
        tr_ms=args.tr_ms,
    )
    t_done = time.perf_counter()
    written = io.write_maps(
        res,
        args.out,
        series.affine,
        prefix=args.prefix,
        png=None if args.png == "none" else args.png,
        slice_positions_mm=series.slice_positions_mm,
    )
    fitted = int(mask.sum())
    n_ok = int(res.ok.sum())
    print(
        f"summary: {fitted} voxels fitted, {n_ok} ok ({n_ok / max(fitted, 1):.1%}), "
        f"{_stats(res.t1_ms[mask])} in the mask; method {res.method}, correction {res.correction}; "
        f"fit {t_done - t_fit:.2f} s, total {time.perf_counter() - t_start:.2f} s"
    )
    print(f"wrote {len(written)} files to {args.out}: " + ", ".join(p.name for p in written.values()))
    return 0


def add_parser(sub: Any) -> None:
    """Register ``epgx fit-molli`` on the subparsers of the ``epgx`` command."""
    from epgx.fit.molli import CORRECTIONS, METHODS

    p = sub.add_parser(
        "fit-molli",
        help="fit MOLLI T1 maps from a DICOM folder or a NIfTI file",
        description=(
            "Fit the 3-parameter MOLLI model to every voxel, slice by slice, and write T1, T1*, "
            'SD(T1), R^2 and ok maps (NIfTI) and a T1 PNG. Needs pip install "epgx[io]".'
        ),
    )
    p.add_argument(
        "input", metavar="INPUT", help="a DICOM folder, or a NIfTI file (.nii/.nii.gz; needs --ti-ms)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the maps (created if missing)")
    p.add_argument(
        "--ti-ms",
        nargs="+",
        metavar="TI",
        help="NIfTI input: the TIs in ms, in the order of the volumes (space or comma separated)",
    )
    p.add_argument("--mask", metavar="MASK", help="NIfTI mask [x, y, z]: fit the non-zero voxels only")
    p.add_argument("--method", choices=METHODS, default="lm", help="fitting method; default %(default)s")
    p.add_argument(
        "--noise-sd",
        type=float,
        help="noise SD per channel in image units, for the SD map; default: each voxel's residuals",
    )
    p.add_argument(
        "--correction", choices=CORRECTIONS, default=CORRECTIONS[0], help="T1 from T1*; default %(default)s"
    )
    p.add_argument("--flip-deg", type=float, help="readout flip angle, degrees (--correction look-locker)")
    p.add_argument("--tr-ms", type=float, help="readout pulse spacing, ms (--correction look-locker)")
    p.add_argument("--series", help="DICOM: SeriesInstanceUID or SeriesNumber, if the folder holds several")
    p.add_argument("--png", choices=PNG_CHOICES, default="montage", help="T1 PNG layout; default %(default)s")
    p.add_argument("--prefix", default="molli", help="file-name prefix; default %(default)s")
    p.set_defaults(func=_run, check=_check)
