"""Look-Locker corrections of epgx.fit.molli (``correction=``), against closed forms.

Data: the 3-parameter signal S(t) = A − B·e^{−t/T1*} of a continuous Look-Locker readout
(flip α every τ ms: 1/T1* = 1/T1 − ln(cos α)/τ, A = M0·T1*/T1) with an inversion of
efficiency η (S(0) = A − B = −η·M0). In closed form the three corrections then give

    "look-locker":      T1 (exact, whatever η),
    "deichmann-haase":  T1*·(B/A − 1) = η·T1,
    "none":             T1*.

The SD oracle is the Fisher matrix of that model, computed here in numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from epgx import fit

# Noiseless float64 data are fitted to rounding; 1e-4 is issue 8's acceptance bound.
EXACT_RTOL = 1e-4
# The SD maps are closed-form functions of the same JᵀJ: they agree to float64 rounding
# amplified by the 3×3 solve of a moderately conditioned matrix.
SD_RTOL = 1e-6

FLIP_DEG, TR_MS = 5.0, 10.0  # a FLASH Look-Locker readout: T1_readout = τ/−ln(cos α) ≈ 2.6 s
RATE_PER_MS = -math.log(math.cos(math.radians(FLIP_DEG))) / TR_MS
T1_MS = (343.0, 600.0, 1000.0, 1550.0)
ETA = 0.92  # inversion efficiency


def _look_locker_data(eta: float = ETA, m0: float = 100.0):
    ti = fit.molli_ti_ms("5(3)3")
    t1 = torch.tensor(T1_MS, dtype=torch.float64)
    ts = 1.0 / (1.0 / t1 + RATE_PER_MS)
    a = m0 * ts / t1
    b = a + eta * m0
    signal = a[:, None] - b[:, None] * torch.exp(-ti / ts[:, None])
    return signal.abs(), ti, t1, ts, a, b


def test_corrections_closed_forms_with_imperfect_inversion():
    images, ti, t1, ts, _, _ = _look_locker_data()
    ll = fit.molli(images, ti, correction="look-locker", flip_deg=FLIP_DEG, tr_ms=TR_MS)
    dh = fit.molli(images, ti)
    none = fit.molli(images, ti, correction="none")
    for res in (ll, dh, none):
        assert res.ok.all()
        torch.testing.assert_close(res.t1_star_ms, ts, rtol=EXACT_RTOL, atol=0)
    torch.testing.assert_close(ll.t1_ms, t1, rtol=EXACT_RTOL, atol=0)
    torch.testing.assert_close(dh.t1_ms, ETA * t1, rtol=EXACT_RTOL, atol=0)
    torch.testing.assert_close(none.t1_ms, ts, rtol=EXACT_RTOL, atol=0)
    assert (ll.correction, dh.correction, none.correction) == ("look-locker", "deichmann-haase", "none")


def test_ideal_inversion_corrections_agree():
    # η = 1 and a Look-Locker readout: both corrections are exact, "none" is biased low.
    images, ti, t1, ts, _, _ = _look_locker_data(eta=1.0)
    ll = fit.molli(images, ti, correction="look-locker", flip_deg=FLIP_DEG, tr_ms=TR_MS)
    dh = fit.molli(images, ti, correction="deichmann-haase")
    torch.testing.assert_close(ll.t1_ms, t1, rtol=EXACT_RTOL, atol=0)
    torch.testing.assert_close(dh.t1_ms, t1, rtol=EXACT_RTOL, atol=0)


def _sd_t1_star(ti_ms: np.ndarray, a: float, b: float, ts: float, sigma: float) -> float:
    """SD of T1* from the Fisher matrix of f = A − B e^{−t/T1*} (noise SD σ per sample)."""
    e = np.exp(-ti_ms / ts)
    jac = np.stack([np.ones_like(e), -e, -b * e * ti_ms / ts**2], axis=1)  # [n, 3]
    return float(np.sqrt(sigma**2 * np.linalg.inv(jac.T @ jac)[2, 2]))


def test_sd_maps_follow_the_correction():
    images, ti, t1, ts, a, b = _look_locker_data()
    sigma = 0.5
    ll = fit.molli(images, ti, noise_sd=sigma, correction="look-locker", flip_deg=FLIP_DEG, tr_ms=TR_MS)
    none = fit.molli(images, ti, noise_sd=sigma, correction="none")
    expect = torch.tensor(
        [_sd_t1_star(ti.numpy(), a[i].item(), b[i].item(), ts[i].item(), sigma) for i in range(len(T1_MS))],
        dtype=torch.float64,
    )
    # noiseless data: the fit sits at the truth, so the SD is the CRLB at the truth
    torch.testing.assert_close(none.t1_sd_ms, expect, rtol=EXACT_RTOL, atol=0)
    # 1/T1 = 1/T1* − rate: dT1/dT1* = (T1/T1*)²
    torch.testing.assert_close(ll.t1_sd_ms, (t1 / ts) ** 2 * expect, rtol=EXACT_RTOL, atol=0)
    torch.testing.assert_close(
        ll.t1_sd_ms, (ll.t1_ms / ll.t1_star_ms) ** 2 * none.t1_sd_ms, rtol=SD_RTOL, atol=0
    )


def test_look_locker_beyond_its_range_is_not_ok():
    # rate·T1* >= 1: the relation gives no positive T1, so the voxel is flagged, not mapped.
    images, ti, _, _, _, _ = _look_locker_data()
    res = fit.molli(images, ti, correction="look-locker", flip_deg=30.0, tr_ms=2.0)
    assert not res.ok.any() and torch.isnan(res.t1_ms).all()


def test_corrections_apply_to_other_methods():
    images, ti, _, _, _, _ = _look_locker_data()
    res = fit.molli(
        images[:2], ti, method="nelder-mead", correction="look-locker", flip_deg=FLIP_DEG, tr_ms=TR_MS
    )
    torch.testing.assert_close(
        res.t1_ms, res.t1_star_ms / (1.0 - RATE_PER_MS * res.t1_star_ms), rtol=1e-12, atol=0
    )
    assert res.correction == "look-locker"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"correction": "kaptein"}, "correction must be one of"),
        ({"correction": "look-locker"}, "needs the readout's flip_deg and tr_ms"),
        ({"correction": "look-locker", "flip_deg": 5.0}, "needs the readout's flip_deg and tr_ms"),
        (
            {"correction": "look-locker", "flip_deg": 90.0, "tr_ms": 5.0},
            r"flip_deg must be a number in \(0, 90\)",
        ),
        (
            {"correction": "look-locker", "flip_deg": 0.0, "tr_ms": 5.0},
            r"flip_deg must be a number in \(0, 90\)",
        ),
        ({"correction": "look-locker", "flip_deg": math.nan, "tr_ms": 5.0}, "got nan"),
        ({"correction": "look-locker", "flip_deg": 5.0, "tr_ms": 0.0}, "tr_ms must be a finite number > 0"),
        (
            {"correction": "look-locker", "flip_deg": 5.0, "tr_ms": math.inf},
            "tr_ms must be a finite number > 0",
        ),
        ({"flip_deg": 5.0}, "used by correction='look-locker' only"),
        ({"correction": "none", "tr_ms": 5.0}, "used by correction='look-locker' only"),
    ],
)
def test_bad_correction_arguments(kwargs, message):
    images, ti, _, _, _, _ = _look_locker_data()
    with pytest.raises(ValueError, match=message):
        fit.molli(images, ti, **kwargs)
