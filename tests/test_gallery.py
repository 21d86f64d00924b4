"""examples/gallery.py: every model of epgx.models is drawn into one PNG."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from epgx.models import MODELS

pytest.importorskip("matplotlib")

GALLERY = Path(__file__).resolve().parents[1] / "examples" / "gallery.py"


def load_gallery():
    spec = importlib.util.spec_from_file_location("gallery", GALLERY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gallery_draws_every_model_into_one_png(tmp_path: Path) -> None:
    out = tmp_path / "gallery.png"
    signals = load_gallery().render(out, mrf_pulses=60, sweep_points=5, dpi=30)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(signals) == set(MODELS)
    for name, s in signals.items():
        assert s.shape[0] == 3, name  # WM, GM, CSF
        assert s.is_complex() and bool(s.isfinite().all()), name
