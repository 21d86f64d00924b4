"""The ``epgx`` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from epgx.cli import main


def test_demo_prints_echo_table_and_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--spins", "16"]) == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if len(ln.split()) == 6 and ln.split()[0].isdigit()]
    assert len(lines) == 32  # one row per echo
    first = lines[0].split()
    assert first[:2] == ["1", "10"]
    assert 0 < float(first[2]) <= 1 and 0 < float(first[3]) <= 1
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_rejects_bad_spin_count(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--spins", "0"])
    assert exc.value.code == 2
    assert "--spins must be >= 1, got 0" in capsys.readouterr().err


def test_console_entry_point_help() -> None:
    res = subprocess.run([sys.executable, "-m", "epgx", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in res.stdout
