"""Synthetic MOLLI files for the I/O and command-line tests: DICOM series written with
pydicom from epgx.fit.molli_phantom, with known geometry, rescaling and TI location.

Geometry follows the DICOM image plane module (PS3.3 C.7.6.2.1.1), written out here
independently of epgx.fit.io: the patient (LPS) position of pixel (column i, row j) of an
image is ImagePositionPatient + i·Δc·X + j·Δr·Y, X and Y the row and column direction
cosines and (Δr, Δc) = PixelSpacing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from epgx import fit

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
M0 = 1000.0  # phantom M0 in image units: the stored integers keep ~1e-4 of it
SLOPE, INTERCEPT = 0.5, -10.0  # physical value = stored·slope + intercept
PIXEL_SPACING_MM = (1.25, 1.5)  # (between rows, between columns)
SLICE_GAP_MM = 8.0
ORIGIN_MM = (-30.0, 20.0, 15.0)
# An oblique plane: X = row direction, Y = column direction, as 8-decimal strings (DS).
ROW_COSINES = ("0.86602540", "0.50000000", "0.00000000")
COL_COSINES = ("-0.35355339", "0.61237244", "-0.70710678")
HEART_RATES_BPM = (60.0, 75.0)  # one per slice: integer TIs (RR 1000 and 800 ms)


@dataclass
class Written:
    """What a DICOM series was written from, in the reader's order (slices ascending)."""

    images: np.ndarray  # [S, Y, X, N] physical values, TIs ascending
    ti_ms: np.ndarray  # [S, N]
    t1_ms: np.ndarray  # [S, Y, X] true T1 (NaN in the background)
    labels: np.ndarray  # [S, Y, X]
    ipp: np.ndarray  # [S, 3] ImagePositionPatient of each slice (LPS, mm)
    positions_mm: np.ndarray  # [S] along the slice normal
    files: list[Path]


def _cosines() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.array([float(v) for v in ROW_COSINES])
    y = np.array([float(v) for v in COL_COSINES])
    return x, y, np.cross(x, y)


def dicom_image(
    pixels: np.ndarray, ti_ms: float, ipp: np.ndarray, ti_tag: str, series_uid: str, instance: int, **extra
) -> pydicom.Dataset:
    """One single-frame MR image (uint16 stored values) with its TI in ``ti_tag``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = extra.pop("series_number", 7)
    ds.SeriesDescription = "MOLLI 5(3)3"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
    ds.ImageOrientationPatient = list(ROW_COSINES + COL_COSINES)
    ds.PixelSpacing = [str(v) for v in PIXEL_SPACING_MM]
    ds.SliceThickness = "6"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = str(SLOPE)
    ds.RescaleIntercept = str(INTERCEPT)
    if ti_tag == "InversionTime":
        ds.InversionTime = f"{ti_ms:g}"
    elif ti_tag == "ImageComments":
        ds.ImageComments = f"TI={ti_ms:g}ms" if instance % 2 else f"MOCO TI {ti_ms:g}"
    elif ti_tag == "TriggerTime":
        ds.TriggerTime = f"{ti_ms:g}"
    elif ti_tag != "none":
        raise ValueError(ti_tag)
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def write_molli_dicom(
    folder: Path,
    ti_tag: str = "InversionTime",
    shape: tuple[int, int] = (8, 10),
    n_slices: int = 2,
    junk: bool = True,
    series_uid: str | None = None,
    seed: int = 0,
) -> Written:
    """Write ``n_slices`` noiseless phantom slices (file names shuffled, slice 2 in a
    sub-folder, slices written in descending position) plus a junk text file."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    x_dir, y_dir, normal = _cosines()
    rng = np.random.default_rng(seed)
    names = rng.permutation(1000)
    out_images, out_ti, out_t1, out_labels, out_ipp, files = [], [], [], [], [], []
    instance = 0
    for k in range(n_slices):
        hr = HEART_RATES_BPM[k % len(HEART_RATES_BPM)]
        ph = fit.molli_phantom("5(3)3", shape=shape, heart_rate_bpm=hr, m0=M0)
        stored = np.round((ph.images.numpy() - INTERCEPT) / SLOPE).astype(np.uint16)  # [Y, X, N]
        ipp = np.array(ORIGIN_MM) + (n_slices - 1 - k) * SLICE_GAP_MM * normal  # descending
        ipp = np.array([float(f"{v:.4f}") for v in ipp])
        sub = folder / ("sub" if k % 2 else "")
        sub.mkdir(exist_ok=True)
        for i in rng.permutation(stored.shape[-1]):
            ds = dicom_image(stored[..., i], float(ph.ti_ms[i]), ipp, ti_tag, series_uid, instance)
            path = sub / f"IM{names[instance]:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
            instance += 1
        out_images.append(stored * SLOPE + INTERCEPT)
        out_ti.append(ph.ti_ms.numpy())
        out_t1.append(ph.t1_ms.numpy())
        out_labels.append(ph.labels.numpy())
        out_ipp.append(ipp)
    if junk:
        (folder / "README.txt").write_text("not an image\n")
    order = np.argsort([p @ normal for p in out_ipp])
    return Written(
        images=np.stack(out_images)[order],
        ti_ms=np.stack(out_ti)[order],
        t1_ms=np.stack(out_t1)[order],
        labels=np.stack(out_labels)[order],
        ipp=np.stack(out_ipp)[order],
        positions_mm=np.array([out_ipp[k] @ normal for k in order]),
        files=files,
    )


def dicom_lps_mm(ipp: np.ndarray, i: float, j: float) -> np.ndarray:
    """Patient (LPS) position of column ``i``, row ``j`` of an image at ``ipp`` (PS3.3 C.7.6.2.1.1)."""
    x_dir, y_dir, _ = _cosines()
    d_row, d_col = PIXEL_SPACING_MM
    return ipp + i * d_col * x_dir + j * d_row * y_dir
