"""The synthetic MOLLI phantom (epgx.fit.phantom): TI schemes, signal model, layout, noise."""

from __future__ import annotations

import math

import pytest
import torch

from epgx import fit


def test_ti_schemes_at_60_bpm():
    assert fit.molli_ti_ms("5(3)3").tolist() == [100, 180, 1100, 1180, 2100, 2180, 3100, 4100]
    assert fit.molli_ti_ms("4(1)3(1)2").tolist() == [100, 180, 260, 1100, 1180, 1260, 2100, 2180, 3100]
    assert fit.molli_ti_ms("3(3)3(3)5").tolist() == [
        100, 180, 260, 1100, 1180, 1260, 2100, 2180, 2260, 3260, 4260
    ]  # fmt: skip
    # 75 bpm: RR = 800 ms
    assert fit.molli_ti_ms("5(3)3", heart_rate_bpm=75.0).tolist() == [
        100, 180, 900, 980, 1700, 1780, 2500, 3300
    ]  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scheme="5-3-3"), r"scheme must look like '5\(3\)3'.*'5-3-3'"),
        (dict(scheme="0(3)3"), r"at least one image"),
        (dict(heart_rate_bpm=0.0), r"heart_rate_bpm must be .* > 0; got 0\.0"),
        (dict(ti0_ms=-1.0), r"ti0_ms must be .* >= 0; got -1\.0"),
        (dict(heart_rate_bpm=750.0), r"duplicate TIs"),  # RR 80 ms = delta_ti_ms
    ],
)
def test_ti_scheme_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit.molli_ti_ms(**kwargs)


def test_signal_model_identities():
    t1 = torch.tensor([300.0, 1000.0, 1550.0], dtype=torch.float64)
    signal, a, b, ts = fit.molli_signal(t1, [0.0, 1e6], m0=2.0, t1_readout_ms=3000.0)
    torch.testing.assert_close(ts * (b / a - 1.0), t1)  # Look-Locker correction is exact
    torch.testing.assert_close(signal[:, 0], torch.full_like(t1, -2.0))  # ideal inversion of M0
    torch.testing.assert_close(signal[:, 1], a)  # apparent steady state
    assert bool((ts < t1).all())


def test_phantom_layout_noise_and_seed():
    ph = fit.molli_phantom("5(3)3", shape=(48, 40), tissues=("fat", "myocardium", "blood"), snr=20.0, seed=3)
    assert ph.images.shape == (48, 40, 8) and ph.labels.shape == (48, 40)
    assert set(ph.labels.unique().tolist()) == {0, 1, 2, 3}
    assert ph.labels[24, 20] == 3 and ph.labels[0, 0] == 0  # blood pool in the centre
    assert torch.isnan(ph.t1_ms[ph.labels == 0]).all()
    assert (ph.t1_ms[ph.labels == 2] == fit.TISSUE_T1_MS["myocardium"]).all()
    # background is pure Rician noise: mean = σ·sqrt(π/2)
    bg = ph.images[ph.labels == 0]
    assert abs(bg.mean().item() / (ph.noise_sd * math.sqrt(math.pi / 2)) - 1.0) < 0.05
    again = fit.molli_phantom(
        "5(3)3", shape=(48, 40), tissues=("fat", "myocardium", "blood"), snr=20.0, seed=3
    )
    assert torch.equal(ph.images, again.images)
    with pytest.raises(ValueError, match=r"unknown tissues \['bone'\]"):
        fit.molli_phantom(tissues=("bone",))
    with pytest.raises(ValueError, match=r"snr must be .* > 0"):
        fit.molli_phantom(snr=0.0)
