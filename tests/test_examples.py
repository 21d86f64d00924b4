"""examples/optimize_shuffling_crlb.py: a short optimisation on a tiny protocol."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

SHUFFLING = Path(__file__).resolve().parents[1] / "examples" / "optimize_shuffling_crlb.py"


def load_example(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shuffling_crlb_optimisation_runs_and_plots(tmp_path: Path) -> None:
    ex = load_example(SHUFFLING)
    protocol = dict(etl=4, recovery_ms=(400.0, 800.0), esp_ms=5.6)
    initial, final, tissue, history = ex.optimise(2, log_every=0, **protocol)
    assert len(history) == 2
    assert all(math.isfinite(loss) and math.isfinite(c) for loss, c in history)
    assert final.shape == initial.shape == (4,)
    assert bool(((final >= 20.0) & (final <= 180.0)).all())
    assert not bool((final == initial).all())  # the gradient moved the flips
    out = tmp_path / "shuffling.png"
    flips = {"start": initial, "optimised": final}
    ex.plot(out, history, flips, tissue, protocol["recovery_ms"], protocol["esp_ms"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
