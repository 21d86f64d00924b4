"""``epgx fit-molli`` on tiny synthetic DICOM and NIfTI inputs, and its one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from molli_files import M0, write_molli_dicom

from epgx import fit
from epgx.cli import main

# Stored 16-bit values quantise M0 = 1000 by 0.5 (SNR ~7000, T1 errors ~0.03 %): 0.5 %
# is far outside that and far inside any real failure (as in test_molli_io).
QUANTISED_T1_RTOL = 5e-3
MAP_FILES = (
    "molli_t1_ms.nii.gz",
    "molli_t1_star_ms.nii.gz",
    "molli_t1_sd_ms.nii.gz",
    "molli_r2.nii.gz",
    "molli_ok.nii.gz",
)


def _summary_numbers(text: str) -> tuple[int, int, float]:
    m = re.search(r"summary: (\d+) voxels fitted, (\d+) ok \([\d.]+%\), median T1 (\d+) ms, IQR", text)
    assert m, text
    return int(m.group(1)), int(m.group(2)), float(m.group(3))


def test_fit_molli_dicom_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w = write_molli_dicom(tmp_path / "dicom")
    out = tmp_path / "maps"
    assert main(["fit-molli", str(tmp_path / "dicom"), "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert (
        "read 2 slice(s) of 8x10 voxels x 8 TIs" in cap.out
        and "TIs from InversionTime; 1 files skipped" in cap.out
    )
    assert (
        len(re.findall(r"^slice \d/2 at -?[\d.]+ mm: 80 voxels, [\d.]+% ok, median T1 \d+ ms", cap.out, re.M))
        == 2
    )
    fitted, n_ok, _ = _summary_numbers(cap.out)
    inside = w.labels > 0
    assert fitted == 160 and n_ok >= inside.sum()  # the background is noise-free zeros: not fitted as T1
    assert "warning: read_dicom: skipped 1 of 17 files" in cap.err
    assert sorted(p.name for p in out.iterdir()) == sorted((*MAP_FILES, "molli_t1.png"))
    t1 = np.asanyarray(nib.load(str(out / "molli_t1_ms.nii.gz")).dataobj).transpose(2, 1, 0)  # [z, y, x]
    np.testing.assert_allclose(t1[inside], w.t1_ms[inside], rtol=QUANTISED_T1_RTOL)


def test_fit_molli_nifti_with_mask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ph = fit.molli_phantom("5(3)3", shape=(6, 9), m0=M0)
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    perm = [4, 0, 1, 2, 3, 5, 7, 6]
    src = tmp_path / "molli.nii.gz"
    nib.save(nib.Nifti1Image(ph.images.numpy()[:, :, None, perm].transpose(1, 0, 2, 3), affine), str(src))
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image((ph.labels.numpy() == 3).astype(np.uint8).T[:, :, None], affine), str(mask))
    ti = [f"{t:g}" for t in ph.ti_ms[perm].tolist()]
    args = ["fit-molli", str(src), "--out", str(tmp_path / "o"), "--mask", str(mask), "--png", "slices"]
    assert main([*args, "--ti-ms", ",".join(ti[:3]), *ti[3:]]) == 0
    fitted, n_ok, median = _summary_numbers(capsys.readouterr().out)
    assert fitted == n_ok == int((ph.labels == 3).sum())
    assert median == pytest.approx(fit.TISSUE_T1_MS["myocardium"], rel=QUANTISED_T1_RTOL)
    assert (tmp_path / "o" / "molli_t1_slice000.png").exists()
    ok = np.asanyarray(nib.load(str(tmp_path / "o" / "molli_ok.nii.gz")).dataobj)[:, :, 0].T
    np.testing.assert_array_equal(ok, (ph.labels.numpy() == 3).astype(np.uint8))


def test_fit_molli_look_locker_correction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_molli_dicom(tmp_path / "d", n_slices=1, junk=False)
    args = ["fit-molli", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--png", "none"]
    assert main([*args, "--correction", "look-locker", "--flip-deg", "5", "--tr-ms", "10"]) == 0
    out = capsys.readouterr().out
    assert "correction look-locker" in out and not list((tmp_path / "o").glob("*.png"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{nii}", "--out", "{o}"], "NIfTI input needs --ti-ms"),
        (["{dcm}", "--out", "{o}", "--ti-ms", "100", "200"], "--ti-ms is for NIfTI input"),
        (["{missing}", "--out", "{o}"], "does not exist"),
        (["{txt}", "--out", "{o}"], "INPUT must be a DICOM folder or a .nii/.nii.gz file"),
        (["{nii}", "--out", "{o}", "--ti-ms", "100", "abc"], "--ti-ms takes numbers in ms; got 'abc'"),
        (["{dcm}", "--out", "{o}", "--correction", "look-locker"], "needs --flip-deg and --tr-ms"),
        (["{dcm}", "--out", "{o}", "--flip-deg", "5"], "used by --correction look-locker only"),
        (["{dcm}", "--out", "{o}", "--noise-sd", "0"], "--noise-sd must be > 0"),
        (["{nii}", "--out", "{o}", "--ti-ms", "1", "2", "--series", "3"], "--series selects a DICOM series"),
    ],
)
def test_fit_molli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv, message) -> None:
    (tmp_path / "dcm").mkdir()
    (tmp_path / "m.nii").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    paths = {"nii": tmp_path / "m.nii", "dcm": tmp_path / "dcm", "o": tmp_path / "o"}
    paths |= {"missing": tmp_path / "nope", "txt": tmp_path / "notes.txt"}
    with pytest.raises(SystemExit) as exc:
        main(["fit-molli", *(a.format(**paths) for a in argv)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_fit_molli_bad_data_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["fit-molli", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("epgx fit-molli: error: empty folder") and err.count("\n") == 1
    src = tmp_path / "m.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 1, 5)), np.eye(4)), str(src))
    assert main(["fit-molli", str(src), "--out", str(tmp_path / "o"), "--ti-ms", "100,200,300,400"]) == 2
    assert "epgx fit-molli: error: TI list of wrong length: 4 TIs given" in capsys.readouterr().err


def test_fit_molli_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "fit-molli" in capsys.readouterr().out
