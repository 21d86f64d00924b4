"""MOLLI I/O (epgx.fit.io): DICOM folders, NIfTI in and out, PNG, on tiny synthetic files.

Oracles: the phantom written to disk (stored integers × slope + intercept, exact), the
DICOM image plane equations written out in ``molli_files`` (not epgx's code), the
phantom's true T1, and nibabel reading back what was written.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from epgx.fit import io
from molli_files import (
    M0,
    PIXEL_SPACING_MM,
    SLICE_GAP_MM,
    dicom_image,
    dicom_lps_mm,
    write_molli_dicom,
)
from pydicom.uid import generate_uid

from epgx import fit

# Stored 16-bit values quantise M0 = 1000 by 0.5 (SD 0.14, SNR ~7000): the T1 errors are
# ~0.03 % (CRLB); 0.5 % is far outside that and far inside any real fitting failure.
QUANTISED_T1_RTOL = 5e-3
# Affine entries are products of 8-decimal direction cosines and spacings: float64 rounding.
AFFINE_ATOL_MM = 1e-9
# DICOM positions are written with 4 decimals.
POSITION_ATOL_MM = 1e-3

TI_TAGS = ("InversionTime", "ImageComments", "TriggerTime")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read(folder: Path, **kwargs) -> io.MolliSeries:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return io.read_dicom(folder, **kwargs)


# ---------------------------------------------------------------- DICOM


@pytest.mark.parametrize("ti_tag", TI_TAGS)
def test_read_dicom_sorts_groups_and_rescales(tmp_path: Path, ti_tag: str) -> None:
    w = write_molli_dicom(tmp_path, ti_tag=ti_tag)
    with pytest.warns(UserWarning, match=r"skipped 1 of 17 files.*not a DICOM file"):
        s = io.read_dicom(tmp_path)
    assert s.images.shape == (2, 8, 10, 8) and s.images.dtype == torch.float64
    np.testing.assert_array_equal(s.images.numpy(), w.images)  # grouping, TI order, rescale: exact
    np.testing.assert_array_equal(s.ti_ms.numpy(), w.ti_ms)
    assert not np.array_equal(w.ti_ms[0], w.ti_ms[1])  # per-slice TIs (two heart rates)
    np.testing.assert_allclose(s.slice_positions_mm.numpy(), w.positions_mm, atol=POSITION_ATOL_MM)
    assert s.ti_source == ti_tag
    assert s.skipped == ((str(tmp_path / "README.txt"), "not a DICOM file"),)
    assert [len(f) for f in s.files] == [8, 8] and len({p for f in s.files for p in f}) == 16


def test_read_dicom_affine_matches_the_image_plane_equations(tmp_path: Path) -> None:
    w = write_molli_dicom(tmp_path, n_slices=3)
    s = _read(tmp_path)
    ny, nx = s.images.shape[1:3]
    for k in range(3):
        for i, j in ((0, 0), (nx - 1, 0), (0, ny - 1), (nx - 1, ny - 1)):
            lps = dicom_lps_mm(w.ipp[k], i, j)
            ras = s.affine @ np.array([i, j, k, 1.0])
            np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=POSITION_ATOL_MM)
    assert np.linalg.norm(s.affine[:3, 2]) == pytest.approx(SLICE_GAP_MM, abs=POSITION_ATOL_MM)
    np.testing.assert_allclose(
        np.linalg.norm(s.affine[:3, :2], axis=0), PIXEL_SPACING_MM[::-1], atol=AFFINE_ATOL_MM
    )


def test_dicom_fit_recovers_the_phantom(tmp_path: Path) -> None:
    w = write_molli_dicom(tmp_path, ti_tag="ImageComments")
    s = _read(tmp_path)
    seen = []
    res = io.fit_series(
        s, torch.from_numpy(w.labels > 0), progress=lambda k, r: seen.append((k, r.t1_ms.shape))
    )
    assert seen == [(0, (8, 10)), (1, (8, 10))]
    inside = w.labels > 0
    assert res.t1_ms.shape == (2, 8, 10) and bool(res.ok[torch.from_numpy(inside)].all())
    np.testing.assert_allclose(res.t1_ms.numpy()[inside], w.t1_ms[inside], rtol=QUANTISED_T1_RTOL)
    assert torch.isnan(res.t1_ms[torch.from_numpy(~inside)]).all()


def test_read_dicom_reports_files_without_ti_or_pixels(tmp_path: Path) -> None:
    write_molli_dicom(tmp_path, n_slices=1, junk=False)
    pix = np.zeros((8, 10))
    no_ti = dicom_image(pix, 0.0, np.zeros(3), "none", generate_uid(), 99)
    no_ti.save_as(tmp_path / "no_ti.dcm", enforce_file_format=True)
    no_pixels = dicom_image(pix, 300.0, np.zeros(3), "InversionTime", generate_uid(), 98)
    del no_pixels.PixelData
    no_pixels.save_as(tmp_path / "no_pixels.dcm", enforce_file_format=True)
    with pytest.warns(UserWarning, match="skipped 2 of 10 files"):
        s = io.read_dicom(tmp_path)
    reasons = dict((Path(p).name, why) for p, why in s.skipped)
    assert reasons["no_pixels.dcm"] == "no pixel data"
    assert reasons["no_ti.dcm"].startswith("no TI")
    assert s.images.shape == (1, 8, 10, 8)


def test_read_dicom_picks_a_series(tmp_path: Path) -> None:
    write_molli_dicom(tmp_path / "a", n_slices=1, junk=False, series_uid="1.2.3.4", seed=1)
    write_molli_dicom(tmp_path / "b", n_slices=1, junk=False, series_uid="1.2.3.5", seed=2)
    with pytest.raises(ValueError, match=r"holds 2 series with TIs: UID 1\.2\.3\.4 .*series="):
        _read(tmp_path)
    assert _read(tmp_path, series="1.2.3.5").images.shape == (1, 8, 10, 8)
    assert all("/b/" in p for p in _read(tmp_path, series="1.2.3.5").files[0])
    with pytest.raises(ValueError, match=r"no images of series \['9'\]"):
        _read(tmp_path, series=9)


def test_read_dicom_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty folder"):
        io.read_dicom(tmp_path)
    with pytest.raises(ValueError, match="must be a folder"):
        io.read_dicom(tmp_path / "missing")
    (tmp_path / "a.txt").write_text("junk")
    with pytest.raises(ValueError, match=r"no usable MOLLI images .*a\.txt: not a DICOM file"):
        _read(tmp_path)


def test_read_dicom_mismatched_image_sizes(tmp_path: Path) -> None:
    write_molli_dicom(tmp_path, n_slices=1, junk=False)
    small = dicom_image(np.zeros((4, 4)), 5000.0, np.zeros(3), "InversionTime", generate_uid(), 50)
    small.SeriesInstanceUID = _series_uid(tmp_path)
    small.save_as(tmp_path / "small.dcm", enforce_file_format=True)
    with pytest.raises(
        ValueError,
        match=r"mismatched image sizes \(rows x columns\): 8x10 \(8 files.*4x4 \(1 files, e.g. small\.dcm\)",
    ):
        _read(tmp_path)


def _series_uid(folder: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(next(folder.rglob("*.dcm"))).SeriesInstanceUID)


def test_read_dicom_duplicate_tis(tmp_path: Path) -> None:
    write_molli_dicom(tmp_path, n_slices=1, junk=False)
    first = next(tmp_path.rglob("*.dcm"))
    (tmp_path / "copy.dcm").write_bytes(first.read_bytes())
    with pytest.raises(ValueError, match=r"duplicate TI \d+ ms in the slice at .* mm: .*series="):
        _read(tmp_path)


def test_read_dicom_unequal_ti_counts(tmp_path: Path) -> None:
    write_molli_dicom(tmp_path, n_slices=2, junk=False)
    next((tmp_path / "sub").glob("*.dcm")).unlink()
    with pytest.raises(ValueError, match=r"slices have different numbers of TIs: 7 at .* mm, 8 at"):
        _read(tmp_path)


def test_missing_optional_package_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pydicom", None)
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(ImportError, match=r'reading DICOM needs pydicom.*pip install "epgx\[io\]"'):
        io.read_dicom(tmp_path)
    with pytest.raises(ImportError, match=r'reading NIfTI needs nibabel.*pip install "epgx\[io\]"'):
        io.read_nifti(tmp_path / "x.nii", [1, 2, 3, 4])


# ---------------------------------------------------------------- NIfTI


def _phantom_volume(n_slices: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """[S, Y, X, N] images, [N] TIs, [S, Y, X] T1 and labels of a noiseless phantom stack."""
    ph = fit.molli_phantom("5(3)3", shape=(6, 9), m0=M0)
    images = np.stack([ph.images.numpy() * (1 + 0.1 * k) for k in range(n_slices)])
    return (
        images,
        ph.ti_ms.numpy(),
        np.stack([ph.t1_ms.numpy()] * n_slices),
        np.stack([ph.labels.numpy()] * n_slices),
    )


AFFINE = np.array(
    [[0.0, -1.5, 0.0, 40.0], [1.25, 0.0, 0.0, -20.0], [0.0, 0.0, 8.0, 5.0], [0.0, 0.0, 0.0, 1.0]]
)


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_nifti_round_trip(tmp_path: Path) -> None:
    images, ti, t1, labels = _phantom_volume()
    perm = np.array([3, 0, 7, 1, 6, 2, 5, 4])  # TIs given in any order, with their volumes
    src = _save(tmp_path / "molli.nii.gz", images[..., perm].transpose(2, 1, 0, 3))
    mask = _save(tmp_path / "mask.nii.gz", (labels > 0).astype(np.uint8).transpose(2, 1, 0))
    s = io.read_nifti(src, ti[perm], mask=mask)
    np.testing.assert_array_equal(s.images.numpy(), images)
    np.testing.assert_array_equal(s.ti_ms.numpy(), np.tile(ti, (2, 1)))
    np.testing.assert_array_equal(s.affine, AFFINE)
    np.testing.assert_allclose(s.slice_positions_mm.numpy(), [5.0, 13.0])
    assert s.mask is not None and torch.equal(s.mask, torch.from_numpy(labels > 0))

    res = io.fit_series(s)
    inside = labels > 0
    np.testing.assert_allclose(res.t1_ms.numpy()[inside], t1[inside], rtol=QUANTISED_T1_RTOL)
    written = io.write_maps(
        res, tmp_path / "out", s.affine, png="slices", slice_positions_mm=s.slice_positions_mm
    )
    for name in io.MAP_NAMES:
        img = nib.load(str(written[name]))
        np.testing.assert_array_equal(img.affine, AFFINE)
        data = np.asanyarray(img.dataobj)
        assert data.shape == (9, 6, 2)
        expect = getattr(res, name).numpy().transpose(2, 1, 0)
        if name == "ok":
            assert data.dtype == np.uint8
            np.testing.assert_array_equal(data, expect.astype(np.uint8))
        else:
            np.testing.assert_array_equal(data, expect.astype(np.float32))  # NaN where not ok
    assert [written[f"png_{k}"].read_bytes()[:8] for k in range(2)] == [PNG_MAGIC] * 2


def test_nifti_single_slice_and_file_list(tmp_path: Path) -> None:
    images, ti, _, _ = _phantom_volume(n_slices=1)
    one = io.read_nifti(_save(tmp_path / "one.nii", images[0].transpose(1, 0, 2)), ti)
    np.testing.assert_array_equal(one.images.numpy(), images)
    paths = [_save(tmp_path / f"ti{i}.nii", images[0, ..., i].T) for i in range(len(ti))]
    listed = io.read_nifti(paths[::-1], ti[::-1])
    np.testing.assert_array_equal(listed.images.numpy(), images)
    assert listed.files[0] == tuple(str(p) for p in paths)


def test_write_maps_montage_png(tmp_path: Path) -> None:
    images, ti, _, labels = _phantom_volume(n_slices=3)
    res = fit.molli(torch.from_numpy(images), torch.from_numpy(ti), mask=torch.from_numpy(labels > 0))
    written = io.write_maps(res, tmp_path, prefix="case1")
    assert written["png"] == tmp_path / "case1_t1.png" and written["png"].read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"case1_{stem}.nii.gz" for stem, _ in io.MAP_NAMES.values()] + ["case1_t1.png"]
    )
    with pytest.raises(ValueError, match="png must be 'montage', 'slices' or None; got 'gif'"):
        io.write_maps(res, tmp_path, png="gif")
    with pytest.raises(ValueError, match="t1_range_ms must be"):
        io.write_maps(res, tmp_path, t1_range_ms=(2000.0, 0.0))


def test_nifti_bad_inputs(tmp_path: Path) -> None:
    images, ti, _, _ = _phantom_volume()
    src = _save(tmp_path / "m.nii", images.transpose(2, 1, 0, 3))
    with pytest.raises(ValueError, match=r"TI list of wrong length: 7 TIs given .* has 8 images"):
        io.read_nifti(src, ti[:7])
    dup = ti.copy()
    dup[3] = dup[2]
    with pytest.raises(ValueError, match=r"duplicate TIs \[1100\.0\] ms"):
        io.read_nifti(src, dup)
    with pytest.raises(ValueError, match="TIs must be finite and >= 0 ms"):
        io.read_nifti(src, -ti)
    with pytest.raises(ValueError, match=r"has shape \(9, 6\): expected 4-D"):
        io.read_nifti(_save(tmp_path / "flat.nii", images[0, ..., 0].T), ti)
    a = _save(tmp_path / "a.nii", images[0, ..., 0].T)
    b = _save(tmp_path / "b.nii", images[0, :4, :4, 1].T)
    with pytest.raises(ValueError, match=r"mismatched image sizes \(x, y, z\)"):
        io.read_nifti([a, b], ti[:2])
    bad_mask = _save(tmp_path / "mask.nii", np.ones((9, 6, 3), dtype=np.uint8))
    with pytest.raises(
        ValueError, match=r"mask .* has shape \(9, 6, 3\) but the images are \[x, y, z\] = \(9, 6, 2\)"
    ):
        io.read_nifti(src, ti, mask=bad_mask)
    s = io.read_nifti(src, ti)
    with pytest.raises(ValueError, match=r"mask has shape \(6, 9\); the series needs"):
        io.fit_series(s, torch.ones(6, 9, dtype=torch.bool))
