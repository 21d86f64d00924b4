"""``epgx dict``, ``epgx match`` and ``epgx bench`` on tiny cases, and their one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import nibabel
import numpy as np
import pytest

from epgx import dictionary as D
from epgx.cli import main

GRID_ARGS = ["--t1-ms", "200:2000:8:log", "--t2-ms", "20:300:6:log", "--constraint", "t2_ms < t1_ms"]
# fisp_mrf with a 60-pulse train: fast, and still encodes T1 and T2
MODEL_ARGS = ["fisp_mrf", "--set", "n_pulses=60"]


@pytest.fixture(scope="module")
def dict_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dict") / "fisp.h5"
    assert main(["dict", *MODEL_ARGS, *GRID_ARGS, "--out", str(out), "--no-progress"]) == 0
    return out


def test_dict_writes_a_loadable_dictionary(dict_file: Path) -> None:
    d = D.load(dict_file)
    assert d.model == "fisp_mrf" and d.protocol == {"n_pulses": 60} and d.n_readouts == 60
    assert d.grid.constraints == ("t2_ms < t1_ms",) and d.n_atoms == 8 * 6 - d.grid.n_dropped
    assert (d.grid.values["t2_ms"] < d.grid.values["t1_ms"]).all()


def test_dict_with_toml_protocol_two_pool_and_svd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = tmp_path / "fse.toml"
    toml.write_text("flip_deg = [90.0, 150.0, 150.0, 150.0, 150.0, 150.0, 150.0, 150.0]\nesp_ms = 5.0\n")
    out = tmp_path / "fse.zarr"
    argv = ["dict", "epgx:fse", "--kind", "bm", "--t1-ms", "1000", "--t1b-ms", "500", "--t2-ms", "40:150:5"]
    argv += ["--t2b-ms", "20", "--f", "0.1,0.2", "--k-ab-per-s", "10", "--protocol", str(toml)]
    argv += [
        "--set",
        "esp_ms=10",
        "--svd-energy",
        "0.999",
        "--dtype",
        "float64",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    d = D.load(out)
    assert d.grid.kind == "bm" and d.n_atoms == 10 and d.compressed and d.svd_energy >= 0.999
    assert d.protocol["esp_ms"] == 10 and len(d.protocol["flip_deg"]) == 8  # --set wins over the file


@pytest.mark.parametrize("fmt", [".npy", ".h5", ".nii.gz"])
def test_match_recovers_maps(dict_file: Path, tmp_path: Path, fmt: str) -> None:
    d = D.load(dict_file)
    idx = np.array([[1, 5], [17, 30]])
    y = d.signals()[idx.reshape(-1)].numpy().reshape(2, 2, -1) * (1.5 * np.exp(0.4j))
    sig = tmp_path / f"signals{fmt}"
    out = tmp_path / "maps.h5"
    extra: list[str] = []
    if fmt == ".npy":
        np.save(sig, y)
        out = tmp_path / "maps.npz"
    elif fmt == ".h5":
        with h5py.File(sig, "w") as fh:
            fh["echoes"] = y
            fh["mask"] = np.ones((2, 2))
        extra = ["--dataset", "echoes"]
    else:  # NIfTI: magnitude images [x, y, readouts]
        nibabel.save(nibabel.Nifti1Image(np.abs(y).astype(np.float32), np.eye(4)), str(sig))
    assert main(["match", str(sig), str(dict_file), "--out", str(out), *extra]) == 0
    if out.suffix == ".npz":
        with np.load(out) as z:
            maps = {k: z[k] for k in z}
        meta = json.loads(str(maps.pop("metadata")))
    else:
        with h5py.File(out, "r") as fh:
            maps = {k: fh[k][...] for k in fh}
            meta = json.loads(fh.attrs["metadata"])
    np.testing.assert_array_equal(maps["index"], idx)
    np.testing.assert_array_equal(maps["t1_ms"], d.grid.values["t1_ms"][idx])
    np.testing.assert_allclose(np.abs(maps["pd"]), 1.5, rtol=1e-5)  # float32 dictionary
    assert meta["units"]["t1_ms"] == "ms" and meta["model"] == "fisp_mrf"
    if fmt == ".nii.gz":
        np.testing.assert_array_equal(maps["affine"], np.eye(4))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["dict", "no_such_model", "--t1-ms", "1000", "--t2-ms", "80", "--out", "{tmp}/x.h5"],
            "unknown model",
        ),
        (
            [
                "dict",
                *MODEL_ARGS,
                "--t1-ms",
                "10,20",
                "--t2-ms",
                "80",
                "--constraint",
                "t2_ms < t1_ms",
                "--out",
                "{tmp}/x.h5",
            ],
            "the grid is empty",
        ),  # fmt: skip
        (
            ["dict", *MODEL_ARGS, "--t1-ms", "1:2", "--t2-ms", "80", "--out", "{tmp}/x.h5"],
            "cannot read grid axis",
        ),
        (["dict", *MODEL_ARGS, "--t2-ms", "80", "--out", "{tmp}/x.h5"], r"needs \['t1_ms'\]"),
        (
            ["dict", *MODEL_ARGS, "--t1-ms", "900", "--t2-ms", "80", "--set", "oops", "--out", "{tmp}/x.h5"],
            "KEY=VALUE",
        ),
        (["match", "{tmp}/short.npy", "{dict}", "--out", "{tmp}/m.npz"], "signals have 59 readouts"),
        (["match", "{tmp}/missing.npy", "{dict}", "--out", "{tmp}/m.npz"], "no signals file"),
        (["match", "{tmp}/short.npy", "{tmp}/missing.h5", "--out", "{tmp}/m.npz"], "no dictionary at"),
    ],
)
def test_bad_input_is_one_clear_line(
    argv: list[str], message: str, dict_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "short.npy", np.ones((3, 59), dtype=np.complex64))
    argv = [a.format(tmp=tmp_path, dict=dict_file) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"epgx {argv[0]}: error:")
    assert re.search(message, err), err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["dict", "fisp_mrf", "--t1-ms", "1", "--t2-ms", "1", "--out", "x.h5", "--memory-mb", "0"],
            "--memory-mb must be > 0",
        ),
        (["dict", "fisp_mrf", "--t1-ms", "1", "--t2-ms", "1", "--out", "x.txt"], "suffix must be one of"),
        (["dict", "fisp_mrf", "--out", "x.h5", "--svd-energy", "2"], r"--svd-energy must be in \(0, 1\]"),
        (["match", "s.npy", "d.h5", "--out", "m.csv"], "suffix must be one of"),
        (["match", "s.npy", "d.h5", "--out", "m.npz", "--memory-mb", "-1"], "--memory-mb must be > 0"),
    ],
)
def test_argument_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("command", ["dict", "match", "bench"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: epgx " + command in capsys.readouterr().out


def test_bench_tiny_quick_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "bench.png"
    argv = ["bench", "--sizes", "1", "3", "--repeats", "1", "--warmup-max-n", "1", "--plot", str(png)]
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert "| bm-180 (spread) | 8 |" in report and "FAIL" not in report  # validated before timing
    rows = [ln for ln in report.splitlines() if ln.startswith("| bm-180 | ")]
    assert [r.split("|")[2:4] for r in rows] == [
        [" epgx-torch ", " 1 "],
        [" epgx-torch ", " 3 "],
        [" torchsim ", " 1 "],
        [" torchsim ", " 3 "],
    ]
    assert "not timed: epgx-triton" in report or "epgx-triton" in rows[0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--sizes", "0", "10"])
    assert exc.value.code == 2
    assert "sizes and repeats must be >= 1" in capsys.readouterr().err
