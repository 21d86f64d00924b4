"""The no-derivative torch path (:mod:`epgx.inplace`) against the functional reference.

Oracle: the same engines with ``epgx.inplace.ENABLED = False``, i.e. the functional
operators of :mod:`epgx.ops` (relax → shift → recover as separate tensors), which the
rest of the suite checks against EPG-X and closed forms. The two share the propagators
and RF matrices, not the event arithmetic (fused relax-shift into fixed buffers, the
three-plane real subspace).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from spins import random_tissue

import epgx
from epgx import inplace, models
from epgx.blocks import Delay, GreReadout, Inversion, Saturation, Spoiler, T2Prep, simulate

# Same float64 operators, summed in another order (fused relax-shift, 3×3 instead of
# 6×6 RF products): measured ≤ 8e-16 on every case here (M0 = 1).
ATOL = 1e-13

# Every model at a tiny protocol (a few dozen events).
TINY: dict[str, dict[str, Any]] = {
    "bssfp": dict(phase_increment_deg=(180.0, 90.0)),
    "bssfp_mrf": dict(n_pulses=12),
    "fisp_mrf": dict(n_pulses=40),
    "fse": dict(etl=6),
    "ir": dict(ti_ms=(100.0, 900.0)),
    "memprage": dict(n_readouts=4, te_ms=(1.5, 3.0), esp_ms=8.0, ti_ms=500.0, tr_ms=1500.0),
    "mese": dict(etl=6),
    "molli": dict(scheme="2(1)1", n_phase_encodes=4, n_ramp=1),
    "mp2rage": dict(n_readouts=4, ti_ms=(400.0, 1200.0), tr_ms=2500.0),
    "mprage": dict(n_readouts=6, ti_ms=500.0, tr_ms=1500.0),
    "spgr": dict(n_pulses=20, te_ms=2.0),
    "t1t2_shuffling": dict(recovery_ms=(500.0, 900.0), etl=4),
    "vfa": dict(flip_deg=(5.0, 15.0)),
}


def _on_resonance(kind: str, n: int = 5) -> epgx.Tissue:
    """Spins with one B1 and no off-resonance: the real-plane subspace applies."""
    t = random_tissue(kind, n, torch.float64, seed=7)
    zero = torch.zeros(n, dtype=torch.float64)
    if kind == "single":
        return epgx.Tissue(t.t1_ms, t.t2_ms)
    if kind == "bm":
        return epgx.Tissue.bm((t.t1_ms, t.t1b_ms), (t.t2_ms, t.t2b_ms), t.f, t.k_ab_per_s, zero)
    return epgx.Tissue.mt((t.t1_ms, t.t1b_ms), t.t2_ms, t.f, t.k_ab_per_s, t.mt_lineshape_us)


def _both(
    fn: Callable[[], torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """(no-derivative path, functional reference) of the same call."""
    fast = fn()
    with monkeypatch.context() as m:
        m.setattr(inplace, "ENABLED", False)
        ref = fn()
    return fast, ref


def _real_flags(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record the plane mode of every run of the no-derivative path."""
    flags: list[bool] = []
    init = inplace._Runner.__init__

    def spy(self: Any, *args: Any, **kw: Any) -> None:
        flags.append(kw["real"])
        init(self, *args, **kw)

    monkeypatch.setattr(inplace._Runner, "__init__", spy)
    return flags


def _close(fast: torch.Tensor, ref: torch.Tensor) -> None:
    assert fast.shape == ref.shape and fast.dtype == ref.dtype
    err = float((fast - ref).abs().max())
    assert err <= ATOL, err


@pytest.mark.parametrize("kind", ["single", "bm", "mt"])
@pytest.mark.parametrize("on_res", [False, True], ids=["offres_b1map", "onres"])
def test_engines_match_reference(kind: str, on_res: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    tissue = _on_resonance(kind) if on_res else random_tissue(kind, 5, torch.float64, seed=1)
    flips = torch.linspace(5.0, 60.0, 30, dtype=torch.float64)
    flags = _real_flags(monkeypatch)
    calls: list[Callable[[], Any]] = [
        lambda: epgx.gre(tissue, flips, 7.0, epgx.rf_spoiling_phases_deg(30), 1.5, backend="torch"),
        lambda: epgx.gre(tissue, flips, 7.0, 0.0, 1.5, prep=epgx.Prep(180.0, 20.0), kmax=5, backend="torch"),
        lambda: epgx.gre(tissue, flips, 7.0, epgx.balanced_phases_deg(30), 1.5, backend="torch"),
        lambda: epgx.fse(tissue, [90.0] + [150.0] * 12, 10.0, b1sq_tau_ut2ms=2.0, backend="torch"),
    ]
    for call in calls:
        _close(*_both(call, monkeypatch))
    # RF-spoiled and CPMG trains need all six planes; 0°/180° trains on resonance three
    assert flags == [False, on_res, on_res, False]


@pytest.mark.parametrize("kind", ["single", "bm", "mt"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_models_match_reference(name: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tissue = random_tissue(kind, 4, torch.float64, seed=len(name))
    fn = models.MODELS[name]
    _close(*_both(lambda: fn(tissue, backend="torch", **TINY[name]), monkeypatch))


@pytest.mark.parametrize("kind", ["single", "bm", "mt"])
def test_blocks_real_planes_match_reference(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inversion, saturation, spoilers, varying TR and TE, a steady state and kmax in
    the three-plane mode; a T2 preparation in the six-plane mode."""
    tissue = _on_resonance(kind)
    flags = _real_flags(monkeypatch)
    trs = torch.linspace(9.0, 12.0, 25, dtype=torch.float64)
    seq = [
        Inversion(0.95, 3.0),
        Delay(30.0),
        GreReadout(
            flip_deg=torch.linspace(5, 50, 25), tr_ms=trs, te_ms=2.0, spoiling="fisp", b1sq_tau_ut2ms=1.0
        ),
        Saturation(),
        GreReadout(flip_deg=10.0, tr_ms=6.0, n_pulses=10, te_ms=(1.0, 3.0), spoiling="fisp"),
        Spoiler(),
        Delay(200.0),
    ]
    for kw in (dict(), dict(kmax=4), dict(steady_state=True)):
        _close(*_both(lambda kw=kw: simulate(tissue, seq, backend="torch", **kw), monkeypatch))  # type: ignore[misc]
    assert flags == [True, True, True]
    # a T2 preparation refocuses at 90°: all six planes
    prep = [T2Prep(40.0, 2), *seq[2:4]]
    _close(*_both(lambda: simulate(tissue, prep, backend="torch"), monkeypatch))
    assert flags[-1] is False


def test_float32_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    # float32 rounding over 200 pulses, in another summation order: measured 6e-8
    float32_atol = 1e-6
    t = epgx.Tissue(torch.tensor([300.0, 900.0, 2000.0]), torch.tensor([20.0, 60.0, 200.0]))
    fast, ref = _both(lambda: models.fisp_mrf(t, n_pulses=200, kmax=20, backend="torch"), monkeypatch)
    assert fast.dtype == torch.complex64
    assert float((fast - ref).abs().max()) <= float32_atol


def test_plain() -> None:
    x = torch.ones(3)
    y = torch.ones(3, requires_grad=True)
    assert inplace.plain(x, None)
    assert not inplace.plain(x, y)
    with torch.no_grad():
        assert inplace.plain(x, y)
    seen: list[bool] = []

    def probe(v: torch.Tensor) -> torch.Tensor:
        seen.append(inplace.plain(v))
        return v

    torch.func.vmap(probe)(torch.ones(2, 3))
    torch.func.jvp(probe, (x,), (x,))
    assert seen == [False, False]


def test_derivatives_take_the_reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A differentiated call runs the functional path and still agrees with the fast one."""
    flags = _real_flags(monkeypatch)
    t1 = torch.tensor([800.0, 1200.0], dtype=torch.float64, requires_grad=True)
    tissue = epgx.Tissue(t1, torch.tensor([50.0, 80.0], dtype=torch.float64))
    sig = models.fisp_mrf(tissue, n_pulses=30, backend="torch")
    assert not flags and sig.requires_grad
    sig.abs().sum().backward()
    assert t1.grad is not None and bool(torch.isfinite(t1.grad).all())
    with torch.no_grad():
        fast = models.fisp_mrf(tissue, n_pulses=30, backend="torch")
    assert flags == [True]
    _close(fast, sig.detach())


def test_denormal_mode_restored() -> None:
    """The loop flushes subnormals while it runs and leaves the caller's mode as it was."""

    def flushing() -> bool:
        return bool((torch.tensor([1e-39], dtype=torch.float32) * 1.0 == 0).item())

    tissue = epgx.Tissue(torch.tensor([800.0]), torch.tensor([50.0]))
    try:
        for mode in (False, True):
            torch.set_flush_denormal(mode)
            models.fisp_mrf(tissue, n_pulses=10, backend="torch")
            epgx.gre(tissue, [10.0] * 5, 5.0, backend="torch")
            assert flushing() is mode
    finally:
        torch.set_flush_denormal(False)
