"""MOLLI series in, T1 maps out: DICOM folders (pydicom), NIfTI files (nibabel), PNG (matplotlib).

These need the optional ``io`` extra (``pip install "epgx[io]"``); each is imported when
a function needs it, and a missing one raises an ``ImportError`` that says so.

Layout. A series is ``images [n_slices, ny, nx, n_ti]``: slices ascending along the slice
normal, rows (DICOM Rows, ``ny``) and columns (``nx``) as stored, the TIs ascending on the
last axis, per slice (``ti_ms [n_slices, n_ti]``: every breath-hold has its own heart
rate). Maps are ``[n_slices, ny, nx]``, the shape :func:`epgx.fit.molli` returns for them.

Geometry. NIfTI files hold a volume as ``[x, y, z]`` = ``[column, row, slice]``, the usual
DICOM-to-NIfTI order, so ``images[k, j, i]`` is NIfTI voxel (i, j, k). ``affine`` maps
(i, j, k, 1) to RAS+ millimetres, as nibabel expects: from the DICOM image plane module
(PS3.3 C.7.6.2.1.1) the patient (LPS) position of voxel (i, j, k) is

    P = S₀ + i·Δc·X + j·Δr·Y + k·D,

X, Y the row and column direction cosines of ImageOrientationPatient, (Δr, Δc) =
PixelSpacing, S₀ the ImagePositionPatient of the first slice and D the step from one
slice to the next (from the positions; one slice: the normal X × Y times
SpacingBetweenSlices, else SliceThickness); RAS negates the first two coordinates.
"""

from __future__ import annotations

import importlib
import math
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from epgx.fit.molli import MolliFit, molli

__all__ = [
    "MAP_NAMES",
    "MolliSeries",
    "fit_series",
    "read_dicom",
    "read_mask",
    "read_nifti",
    "write_maps",
]

IO_EXTRA = 'pip install "epgx[io]"'

# DICOM positions are decimal strings good to ~1e-5 mm and slices are >= ~1 mm apart:
# images whose positions along the slice normal differ by less than this are one slice.
SLICE_POSITION_TOL_MM = 0.01
# Direction cosines of one stack agree to the decimal-string precision (~1e-6).
ORIENTATION_TOL = 1e-4
# Pixel spacings of one stack agree to the decimal-string precision.
PIXEL_SPACING_TOL_MM = 1e-4
# One affine holds one slice step: steps differing by more than 1 % are reported.
SLICE_STEP_RTOL = 0.01
# A mask's affine is compared with the image's; NIfTI stores it in float32 (~1e-5 mm at 300 mm).
AFFINE_TOL_MM = 1e-3

# ImageComments holding the TI, e.g. "TI=180ms", "TI 180", "MOCO_TI: 180.5 ms".
_TI_COMMENT = re.compile(r"(?<![A-Za-z])TI\s*[=:]?\s*([0-9]+(?:\.[0-9]*)?)\s*(?:ms)?", re.IGNORECASE)

# Maps written by write_maps: MolliFit attribute -> (file stem, description).
MAP_NAMES = {
    "t1_ms": ("t1_ms", "T1 (ms)"),
    "t1_star_ms": ("t1_star_ms", "apparent T1* (ms)"),
    "t1_sd_ms": ("t1_sd_ms", "SD of T1 (ms)"),
    "r2": ("r2", "R^2 of the fit"),
    "ok": ("ok", "1 where the fit is valid"),
}


def _optional(module: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{purpose} needs {module}, which is not installed ({exc}); {IO_EXTRA}") from None


@dataclass(frozen=True)
class MolliSeries:
    """A MOLLI series read from disk (see the module docstring for layout and geometry).

    Attributes:
        images: ``[n_slices, ny, nx, n_ti]`` float64, in image units (DICOM: rescaled).
        ti_ms: ``[n_slices, n_ti]`` float64 inversion times, ms, ascending per slice.
        slice_positions_mm: ``[n_slices]`` float64 positions along the slice normal, mm,
            ascending (DICOM: ImagePositionPatient · normal, or SliceLocation; NIfTI:
            the affine's slice offsets along its third axis).
        affine: ``[4, 4]`` float64 numpy array mapping NIfTI voxel (column, row, slice) to
            RAS+ mm.
        files: ``[n_slices][n_ti]`` the file each image came from, in TI order.
        skipped: ``(path, reason)`` of every file not used.
        ti_source: where the TIs came from: ``"InversionTime"``, ``"ImageComments"``,
            ``"TriggerTime"``, ``"mixed (...)"`` or ``"given"`` (NIfTI).
        mask: optional bool ``[n_slices, ny, nx]`` (``read_nifti(mask=...)``).
    """

    images: torch.Tensor
    ti_ms: torch.Tensor
    slice_positions_mm: torch.Tensor
    affine: np.ndarray
    files: tuple[tuple[str, ...], ...]
    skipped: tuple[tuple[str, str], ...] = ()
    ti_source: str = "given"
    mask: torch.Tensor | None = field(default=None)


# ---------------------------------------------------------------- DICOM


@dataclass
class _Record:
    path: str
    ds: Any
    ti_ms: float
    ti_source: str


def _float(value: Any) -> float | None:
    """A DICOM numeric value (DS/IS/FD or its string) as float; None when absent or empty."""
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _ti_of(ds: Any) -> tuple[float, str] | None:
    """(TI in ms, its source): InversionTime, else a "TI" in ImageComments, else TriggerTime."""
    ti = _float(ds.get("InversionTime"))
    if ti is not None:
        return ti, "InversionTime"
    comments = ds.get("ImageComments")
    if comments:
        match = _TI_COMMENT.search(str(comments))
        if match:
            return float(match.group(1)), "ImageComments"
    ti = _float(ds.get("TriggerTime"))
    if ti is not None:
        return ti, "TriggerTime"
    return None


def _series_key(ds: Any) -> tuple[str, str, str]:
    return (
        str(ds.get("SeriesInstanceUID", "")),
        str(ds.get("SeriesNumber", "")),
        str(ds.get("SeriesDescription", "")),
    )


def _select_series(records: list[_Record], series: Any) -> list[_Record]:
    groups: dict[tuple[str, str, str], list[_Record]] = {}
    for r in records:
        groups.setdefault(_series_key(r.ds), []).append(r)
    listing = "; ".join(
        f"UID {uid or '?'} (number {num or '?'}, '{desc}', {len(rs)} images)"
        for (uid, num, desc), rs in groups.items()
    )
    if series is None:
        if len(groups) > 1:
            raise ValueError(
                f"the folder holds {len(groups)} series with TIs: {listing}. Choose one with "
                f"series=<SeriesInstanceUID or SeriesNumber> (epgx fit-molli --series)."
            )
        return records
    wanted = {str(s) for s in (series if isinstance(series, (list, tuple, set)) else [series])}
    chosen = [r for key, rs in groups.items() if key[0] in wanted or key[1] in wanted for r in rs]
    if not chosen:
        raise ValueError(f"no images of series {sorted(wanted)} in the folder; series found: {listing}.")
    return chosen


def _cluster(values: np.ndarray, tol: float) -> np.ndarray:
    """Group labels 0, 1, ... of ``values`` (ascending groups; gaps > ``tol`` separate them)."""
    order = np.argsort(values, kind="stable")
    labels = np.empty(len(values), dtype=np.int64)
    group = 0
    for n, i in enumerate(order):
        if n and values[i] - values[order[n - 1]] > tol:
            group += 1
        labels[i] = group
    return labels


def _describe(counter: Counter, examples: dict) -> str:
    """'value (n files, e.g. name); ...' for an error message, the commonest value first."""
    return "; ".join(f"{key} ({n} files, e.g. {examples[key]})" for key, n in counter.most_common())


def read_dicom(folder: str | Path, *, series: Any = None) -> MolliSeries:
    """Read a MOLLI series from a folder of single-frame DICOM files (searched recursively).

    Each image's TI comes from InversionTime (0018,0082), else from a "TI" number in
    ImageComments (0020,4000) ("TI=180ms", "TI 180"), else from TriggerTime (0018,1060),
    where some vendors put it. Images are grouped into slices by their position along
    the slice normal (ImagePositionPatient · (row × column cosines); SliceLocation when
    ImagePositionPatient or ImageOrientationPatient is missing) and sorted by TI;
    pixel values are rescaled by RescaleSlope/RescaleIntercept. Files that are not
    readable DICOM, have no pixel data, no TI, several frames or pixel data that cannot
    be decoded are skipped, listed in ``skipped`` and reported by a warning.

    Args:
        folder: the folder.
        series: which series to read when the folder holds several with TIs: a
            SeriesInstanceUID or SeriesNumber (str or int), or a list of them.

    Returns:
        A :class:`MolliSeries` (``affine``: see the module docstring).

    Raises:
        ValueError: not a folder, an empty folder, no usable images, several series and
            no ``series``, images of different sizes, pixel spacings or orientations,
            slices with different numbers of TIs, duplicate TIs within a slice.
        ImportError: pydicom is not installed.
    """
    pydicom = _optional("pydicom", "reading DICOM")
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"DICOM input must be a folder; {str(root)!r} is not one.")
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    if not paths:
        raise ValueError(f"empty folder: no files in {str(root)!r}.")

    skipped: list[tuple[str, str]] = []
    records: list[_Record] = []
    for p in paths:
        try:
            ds = pydicom.dcmread(str(p))
        except pydicom.errors.InvalidDicomError:
            skipped.append((str(p), "not a DICOM file"))
            continue
        except Exception as exc:  # a damaged file must not stop the rest: record why
            skipped.append((str(p), f"unreadable DICOM ({type(exc).__name__}: {exc})"))
            continue
        if "PixelData" not in ds:
            skipped.append((str(p), "no pixel data"))
            continue
        frames = int(_float(ds.get("NumberOfFrames")) or 1)
        if frames > 1:
            skipped.append((str(p), f"multi-frame DICOM ({frames} frames) is not supported"))
            continue
        ti = _ti_of(ds)
        if ti is None:
            skipped.append((str(p), "no TI (no InversionTime, no 'TI' in ImageComments, no TriggerTime)"))
            continue
        records.append(_Record(str(p), ds, ti[0], ti[1]))
    records = _select_series(records, series) if records else records

    # pixel data, rescaled; a file whose pixels cannot be decoded is skipped
    pixels: list[np.ndarray] = []
    kept: list[_Record] = []
    for r in records:
        try:
            arr = np.asarray(r.ds.pixel_array, dtype=np.float64)
        except Exception as exc:  # missing decoder plug-in, truncated data, ...
            ts = getattr(getattr(r.ds, "file_meta", None), "TransferSyntaxUID", "?")
            skipped.append((r.path, f"cannot decode pixel data (transfer syntax {ts}): {exc}"))
            continue
        if arr.ndim != 2:
            skipped.append((r.path, f"not a single-channel 2-D image (pixel array shape {arr.shape})"))
            continue
        slope = _float(r.ds.get("RescaleSlope"))
        intercept = _float(r.ds.get("RescaleIntercept"))
        pixels.append(arr * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept))
        kept.append(r)
    if skipped:
        reasons = Counter(reason for _, reason in skipped)
        warnings.warn(
            f"read_dicom: skipped {len(skipped)} of {len(paths)} files in {str(root)!r}: "
            + "; ".join(f"{n}× {reason}" for reason, n in reasons.most_common()),
            UserWarning,
            stacklevel=2,
        )
    if not kept:
        first = "; ".join(f"{Path(p).name}: {why}" for p, why in skipped[:3])
        raise ValueError(f"no usable MOLLI images in {str(root)!r} ({len(paths)} files; {first}).")

    size = [f"{a.shape[0]}x{a.shape[1]}" for a in pixels]
    sizes = Counter(size)
    if len(sizes) > 1:
        examples = {sz: Path(r.path).name for sz, r in zip(size, kept, strict=True)}
        raise ValueError(f"mismatched image sizes (rows x columns): {_describe(sizes, examples)}.")
    positions, affine = _geometry(kept)
    labels = _cluster(positions, SLICE_POSITION_TOL_MM)
    n_slices = int(labels.max()) + 1

    slices: list[list[int]] = [
        sorted(np.flatnonzero(labels == s).tolist(), key=lambda i: kept[i].ti_ms) for s in range(n_slices)
    ]
    counts = [len(s) for s in slices]
    slice_pos = np.array([positions[s].mean() for s in slices])
    if len(set(counts)) > 1:
        per = ", ".join(f"{n} at {z:.2f} mm" for n, z in zip(counts, slice_pos, strict=True))
        raise ValueError(
            f"slices have different numbers of TIs: {per}; every slice needs the same TIs count."
        )
    for s, idx in enumerate(slices):
        tis = [kept[i].ti_ms for i in idx]
        for a, b in zip(idx[:-1], idx[1:], strict=True):
            if kept[a].ti_ms == kept[b].ti_ms:
                raise ValueError(
                    f"duplicate TI {kept[a].ti_ms:g} ms in the slice at {slice_pos[s]:.2f} mm: "
                    f"{Path(kept[a].path).name} and {Path(kept[b].path).name} (TIs {tis}); a folder "
                    f"with two series of the same slices (e.g. raw and motion-corrected) needs series=..."
                )
    if n_slices > 1:
        affine[:3, 2] = _slice_step(kept, slices, slice_pos, affine)

    images = np.stack([np.stack([pixels[i] for i in idx], axis=-1) for idx in slices])  # [S, Y, X, N]
    sources = Counter(r.ti_source for r in kept)
    ti_source = (
        next(iter(sources))
        if len(sources) == 1
        else f"mixed ({', '.join(f'{k}: {n}' for k, n in sources.items())})"
    )
    if len(sources) > 1:
        warnings.warn(f"read_dicom: TIs come from different tags: {ti_source}.", UserWarning, stacklevel=2)
    return MolliSeries(
        images=torch.from_numpy(images),
        ti_ms=torch.tensor([[kept[i].ti_ms for i in idx] for idx in slices], dtype=torch.float64),
        slice_positions_mm=torch.from_numpy(slice_pos),
        affine=affine,
        files=tuple(tuple(kept[i].path for i in idx) for idx in slices),
        skipped=tuple(skipped),
        ti_source=ti_source,
    )


_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _geometry(records: list[_Record]) -> tuple[np.ndarray, np.ndarray]:
    """Each image's position along the slice normal (mm) and the affine of the first slice.

    The affine's third column is the normal times the slice thickness here; with several
    slices the caller replaces it by the step between slices.
    """
    spacing: Counter[tuple[float, float]] = Counter()
    for r in records:
        ps = r.ds.get("PixelSpacing")
        spacing[(float(ps[0]), float(ps[1])) if ps is not None and len(ps) == 2 else (1.0, 1.0)] += 1
    if (1.0, 1.0) in spacing and not all(r.ds.get("PixelSpacing") is not None for r in records):
        warnings.warn("read_dicom: no PixelSpacing in some files: 1 mm assumed.", UserWarning, stacklevel=3)
    spacings = np.array(list(spacing))
    if np.ptp(spacings, axis=0).max() > PIXEL_SPACING_TOL_MM:
        raise ValueError(f"mismatched pixel spacings (row, column mm): {dict(spacing)}.")
    d_row, d_col = spacings[0]
    thick = (
        _float(records[0].ds.get("SpacingBetweenSlices"))
        or _float(records[0].ds.get("SliceThickness"))
        or 1.0
    )

    has_plane = all(
        r.ds.get("ImagePositionPatient") is not None and r.ds.get("ImageOrientationPatient") is not None
        for r in records
    )
    if has_plane:
        iop = np.array([[float(v) for v in r.ds.ImageOrientationPatient] for r in records])
        if np.abs(iop - iop[0]).max() > ORIENTATION_TOL:
            raise ValueError(
                f"images have different orientations (ImageOrientationPatient {iop[0].tolist()} vs "
                f"{iop[np.abs(iop - iop[0]).max(1).argmax()].tolist()}): not one stack of slices."
            )
        x_dir, y_dir = iop[0, :3], iop[0, 3:]
        normal = np.cross(x_dir, y_dir)
        ipp = np.array([[float(v) for v in r.ds.ImagePositionPatient] for r in records])
        positions = ipp @ normal
        first = ipp[np.argmin(positions)]
        lps = np.eye(4)
        lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = x_dir * d_col, y_dir * d_row, normal * thick, first
        return positions, _LPS_TO_RAS @ lps
    if all(_float(r.ds.get("SliceLocation")) is not None for r in records):
        warnings.warn(
            "read_dicom: no ImagePositionPatient/ImageOrientationPatient: slices are grouped by "
            "SliceLocation and the affine only scales by the voxel size.",
            UserWarning,
            stacklevel=3,
        )
        positions = np.array([_float(r.ds.get("SliceLocation")) for r in records], dtype=np.float64)
        return positions, np.diag([d_col, d_row, thick, 1.0]).astype(np.float64)
    raise ValueError(
        "images lack slice geometry: neither ImagePositionPatient + ImageOrientationPatient nor "
        "SliceLocation is present in every file."
    )


def _slice_step(
    records: list[_Record], slices: list[list[int]], slice_pos: np.ndarray, affine: np.ndarray
) -> np.ndarray:
    """The RAS step between consecutive slices (the affine's third column), with a warning when uneven."""
    gaps = np.diff(slice_pos)
    if np.abs(gaps - gaps.mean()).max() > SLICE_STEP_RTOL * gaps.mean():
        warnings.warn(
            f"read_dicom: uneven slice spacing {np.round(gaps, 3).tolist()} mm; the affine uses the mean "
            f"{gaps.mean():.3f} mm.",
            UserWarning,
            stacklevel=3,
        )
    normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    return normal * gaps.mean()


# ---------------------------------------------------------------- NIfTI


def _ti_list(ti_ms: Any, n: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The given TIs as float64 and the order that sorts them; checks length and values."""
    try:
        ti = np.asarray(ti_ms, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"ti_ms must be numbers in ms; got {ti_ms!r} ({exc}).") from None
    if ti.size != n:
        raise ValueError(
            f"TI list of wrong length: {ti.size} TIs given ({ti.tolist()}) but {what} has {n} images."
        )
    if not np.isfinite(ti).all() or (ti < 0).any():
        raise ValueError(f"TIs must be finite and >= 0 ms; got {ti.tolist()}.")
    order = np.argsort(ti, kind="stable")
    dup = ti[order][1:][np.diff(ti[order]) == 0]
    if dup.size:
        raise ValueError(
            f"duplicate TIs {sorted(set(dup.tolist()))} ms in {ti.tolist()}; every image needs its own TI."
        )
    return ti, order


def _nifti_volumes(path: str | Path | Sequence[str | Path], nib: Any) -> tuple[np.ndarray, np.ndarray, str]:
    """[x, y, z, n] data, affine and a description from one file or a list of files (one per TI)."""
    if isinstance(path, (str, Path)):
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float64))
        if data.ndim == 3:
            data = data[:, :, None, :]  # one slice, TIs on the third axis
        elif data.ndim != 4:
            raise ValueError(
                f"{str(path)!r} has shape {data.shape}: expected 4-D [x, y, z, n_TI] or 3-D [x, y, n_TI] "
                f"(one slice), TIs on the last axis."
            )
        return data, np.asarray(img.affine, dtype=np.float64), f"{str(path)!r} (shape {data.shape})"
    paths = [str(p) for p in path]
    if not paths:
        raise ValueError("no NIfTI files given.")
    vols, affines = [], []
    for p in paths:
        img = nib.load(p)
        vol = np.asarray(img.get_fdata(dtype=np.float64))
        if vol.ndim == 2:
            vol = vol[:, :, None]
        if vol.ndim != 3:
            raise ValueError(f"{p!r} has shape {vol.shape}: each file of a list is one TI, 2-D or 3-D.")
        vols.append(vol)
        affines.append(np.asarray(img.affine, dtype=np.float64))
    shapes = Counter(v.shape for v in vols)
    if len(shapes) > 1:
        examples = {v.shape: Path(p).name for v, p in zip(vols, paths, strict=True)}
        raise ValueError(f"mismatched image sizes (x, y, z): {_describe(shapes, examples)}.")
    for p, aff in zip(paths[1:], affines[1:], strict=True):
        if np.abs(aff - affines[0]).max() > AFFINE_TOL_MM:
            warnings.warn(
                f"read_nifti: {p!r} has another affine than {paths[0]!r}; using the first.",
                UserWarning,
                stacklevel=3,
            )
            break
    data = np.stack(vols, axis=-1)
    return data, affines[0], f"the {len(paths)} files (shape {data.shape})"


def read_nifti(
    path: str | Path | Sequence[str | Path],
    ti_ms: Sequence[float] | np.ndarray | torch.Tensor,
    mask: str | Path | None = None,
) -> MolliSeries:
    """Read a MOLLI series from NIfTI, with the TIs given.

    Args:
        path: one file, 4-D ``[x, y, z, n_TI]`` or 3-D ``[x, y, n_TI]`` (one slice), TIs on
            the last axis; or a list of ``n_TI`` files, one 3-D ``[x, y, z]`` (or 2-D)
            volume per TI, in the order of ``ti_ms``.
        ti_ms: the ``n_TI`` inversion times, ms, in the order of the images (any order:
            images and TIs are sorted together). The same TIs for every slice.
        mask: optional NIfTI mask ``[x, y, z]`` (or ``[x, y]`` for one slice); voxels that
            are non-zero are fitted.

    Returns:
        A :class:`MolliSeries` with ``images [z, y, x, n_TI]``, the file's affine and, with
        ``mask``, ``mask [z, y, x]``.

    Raises:
        ValueError: a TI list of the wrong length, duplicate, negative or non-finite TIs,
            an image of the wrong dimensionality, files of mismatched sizes, a mask of
            another shape.
        ImportError: nibabel is not installed.
        OSError: a file that cannot be read.
    """
    nib = _optional("nibabel", "reading NIfTI")
    data, affine, what = _nifti_volumes(path, nib)
    ti, order = _ti_list(ti_ms, data.shape[-1], what)
    images = np.ascontiguousarray(data[..., order].transpose(2, 1, 0, 3))  # [z, y, x, n]
    n_slices = images.shape[0]
    # slice positions along the affine's third axis, in mm (the k axis's unit vector)
    step = affine[:3, 2]
    unit = step / (np.linalg.norm(step) or 1.0)
    positions = np.array([(affine @ np.array([0.0, 0.0, k, 1.0]))[:3] @ unit for k in range(n_slices)])
    if isinstance(path, (str, Path)):
        per_ti = (str(path),) * len(ti)
    else:
        given = [str(p) for p in path]
        per_ti = tuple(given[i] for i in order)
    series = MolliSeries(
        images=torch.from_numpy(images),
        ti_ms=torch.from_numpy(np.tile(ti[order], (n_slices, 1))),
        slice_positions_mm=torch.from_numpy(positions),
        affine=affine,
        files=(per_ti,) * n_slices,
    )
    return series if mask is None else replace(series, mask=read_mask(mask, series))


def read_mask(path: str | Path, series: MolliSeries) -> torch.Tensor:
    """A NIfTI mask for ``series``: bool ``[n_slices, ny, nx]``, True where non-zero and finite.

    The file holds ``[x, y, z]`` (or ``[x, y]``, or ``[x, y, z, 1]``) in the series' NIfTI
    layout (module docstring). An affine other than the series' is reported by a warning.

    Raises:
        ValueError: a mask whose shape does not match the series.
        ImportError: nibabel is not installed.
    """
    nib = _optional("nibabel", "reading a NIfTI mask")
    img = nib.load(str(path))
    data = np.asarray(img.get_fdata(dtype=np.float64))
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    want = tuple(series.images.shape[2::-1])  # (x, y, z)
    if data.shape != want:
        raise ValueError(
            f"mask {str(path)!r} has shape {data.shape} but the images are [x, y, z] = {want}; the "
            f"mask must cover the same voxels."
        )
    if np.abs(np.asarray(img.affine) - series.affine).max() > AFFINE_TOL_MM:
        warnings.warn(
            f"read_mask: the affine of {str(path)!r} differs from the images'; the mask is used "
            f"voxel by voxel.",
            UserWarning,
            stacklevel=2,
        )
    return torch.from_numpy(np.ascontiguousarray((np.isfinite(data) & (data != 0)).transpose(2, 1, 0)))


# ---------------------------------------------------------------- fit and write


def fit_series(
    series: MolliSeries,
    mask: Any = None,
    *,
    progress: Callable[[int, MolliFit], None] | None = None,
    **kwargs: Any,
) -> MolliFit:
    """Fit every slice of ``series`` with :func:`epgx.fit.molli`, each with its own TIs.

    Args:
        series: a :class:`MolliSeries`.
        mask: bool ``[n_slices, ny, nx]``; default ``series.mask`` (None: every voxel).
        progress: called as ``progress(k, fit_k)`` after slice k is fitted.
        **kwargs: passed to :func:`epgx.fit.molli` (``method``, ``noise_sd``,
            ``correction``, ...).

    Returns:
        A :class:`MolliFit` whose maps are ``[n_slices, ny, nx]``.
    """
    mask = series.mask if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    if mask is not None and tuple(mask.shape) != tuple(series.images.shape[:3]):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}; the series needs [n_slices, ny, nx] = "
            f"{tuple(series.images.shape[:3])}."
        )
    fits = []
    for k in range(series.images.shape[0]):
        res = molli(series.images[k], series.ti_ms[k], mask=None if mask is None else mask[k], **kwargs)
        if progress is not None:
            progress(k, res)
        fits.append(res)
    maps = {
        name: torch.stack([getattr(f, name) for f in fits])
        for name in ("t1_ms", "t1_star_ms", "a", "b", "r2", "t1_sd_ms", "ok", "n_iter", "polarity")
    }
    return MolliFit(**maps, method=fits[0].method, backend=fits[0].backend, correction=fits[0].correction)


def _maps_3d(result: MolliFit) -> dict[str, np.ndarray]:
    out = {}
    for name in MAP_NAMES:
        arr = getattr(result, name).detach().cpu().numpy()
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise ValueError(f"maps must be [n_slices, ny, nx] or [ny, nx]; {name} has shape {arr.shape}.")
        out[name] = arr
    return out


def write_maps(
    result: MolliFit,
    out_dir: str | Path,
    affine: np.ndarray | None = None,
    *,
    prefix: str = "molli",
    png: str | None = "montage",
    t1_range_ms: tuple[float, float] | None = None,
    slice_positions_mm: Sequence[float] | torch.Tensor | None = None,
) -> dict[str, Path]:
    """Write the T1, T1*, SD(T1), R² and ok maps as NIfTI, and the T1 map as PNG.

    NIfTI files are ``{prefix}_{t1_ms,t1_star_ms,t1_sd_ms,r2,ok}.nii.gz`` in ``[x, y, z]``
    layout (module docstring) with ``affine``; floating maps are float32 with NaN where
    the fit is not valid, ``ok`` is uint8 (0/1). The PNG shows T1 (ms) with a colour bar,
    each slice as stored (row 0 at the top), NaN in black: ``png="montage"`` writes all
    slices into ``{prefix}_t1.png``, ``"slices"`` one ``{prefix}_t1_slice{k:03d}.png``
    per slice, None none.

    Args:
        result: a fit whose maps are ``[n_slices, ny, nx]`` (or ``[ny, nx]``).
        out_dir: folder to write to (created if missing).
        affine: ``[4, 4]`` voxel → RAS mm (``MolliSeries.affine``); None: identity.
        prefix: file-name prefix.
        png: ``"montage"``, ``"slices"`` or None.
        t1_range_ms: (min, max) of the colour scale, ms; default 0 to the 99th
            percentile of the valid T1s rounded up to 100 ms.
        slice_positions_mm: shown in the PNG titles when given.

    Returns:
        ``{map name or "png" or "png_<k>": path}`` of every file written.

    Raises:
        ValueError: a bad ``png`` choice, affine, colour range or map shape.
        ImportError: nibabel (or, for PNG, matplotlib) is not installed.
    """
    if png not in ("montage", "slices", None):
        raise ValueError(f"png must be 'montage', 'slices' or None; got {png!r}.")
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.isfinite(aff).all():
        raise ValueError(f"affine must be a finite 4x4 matrix; got shape {aff.shape}.")
    if t1_range_ms is not None and not (
        len(t1_range_ms) == 2
        and all(math.isfinite(v) for v in t1_range_ms)
        and t1_range_ms[0] < t1_range_ms[1]
    ):
        raise ValueError(f"t1_range_ms must be (min, max) with min < max, finite; got {t1_range_ms!r}.")
    nib = _optional("nibabel", "writing NIfTI maps")
    maps = _maps_3d(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, (stem, description) in MAP_NAMES.items():
        arr = maps[name].transpose(2, 1, 0)  # [z, y, x] -> NIfTI [x, y, z]
        arr = arr.astype(np.uint8) if name == "ok" else arr.astype(np.float32)
        img = nib.Nifti1Image(np.ascontiguousarray(arr), aff)
        img.header.set_xyzt_units("mm")
        img.header["descrip"] = f"epgx MOLLI {description}, {result.correction}"[:79].encode()
        path = out / f"{prefix}_{stem}.nii.gz"
        nib.save(img, str(path))
        written[name] = path
    if png is not None:
        written.update(_write_png(maps["t1_ms"], out, prefix, png, t1_range_ms, slice_positions_mm))
    return written


def _write_png(
    t1: np.ndarray,
    out: Path,
    prefix: str,
    mode: str,
    t1_range_ms: tuple[float, float] | None,
    positions: Sequence[float] | torch.Tensor | None,
) -> dict[str, Path]:
    _optional("matplotlib", "writing the T1 PNG")
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg for PNG

    if t1_range_ms is None:
        valid = t1[np.isfinite(t1)]
        hi = math.ceil(float(np.percentile(valid, 99)) / 100.0) * 100.0 if valid.size else 2000.0
        t1_range_ms = (0.0, max(hi, 100.0))
    cmap = colormaps["viridis"].with_extremes(bad="black")
    norm = Normalize(*t1_range_ms)
    pos = None if positions is None else [float(p) for p in positions]

    def title(k: int) -> str:
        return f"slice {k + 1}" + ("" if pos is None else f" ({pos[k]:.1f} mm)")

    n = t1.shape[0]
    written: dict[str, Path] = {}
    groups = [list(range(n))] if mode == "montage" else [[k] for k in range(n)]
    for ks in groups:
        cols = math.ceil(math.sqrt(len(ks)))
        rows = math.ceil(len(ks) / cols)
        fig = Figure(figsize=(3.2 * cols + 1.0, 3.2 * rows), layout="constrained")
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        for ax, k in zip(axes, ks, strict=False):
            ax.imshow(t1[k], cmap=cmap, norm=norm, interpolation="nearest")
            ax.set_title(title(k), fontsize=9)
        for ax in axes:
            ax.set_axis_off()
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), label="T1 (ms)", shrink=0.9)
        if mode == "montage":
            path, key = out / f"{prefix}_t1.png", "png"
        else:
            path, key = out / f"{prefix}_t1_slice{ks[0]:03d}.png", f"png_{ks[0]}"
        fig.savefig(path, dpi=100)
        written[key] = path
    return written
