"""Closed-form and isochromat oracles for the engines (CPU reference lane, float64).

Nothing here shares code with :mod:`epgx`: closed forms are written out with numpy and
``math``, and the strongest oracle is an ensemble of Bloch isochromats simulated in numpy.

Isochromat ↔ EPG convention (checked against the first echo/pulse of every train):

- An RF pulse of flip α and phase φ is a right-handed rotation by α about the axis
  (cos φ, sin φ, 0); then Mxy = Mx + i·My equals EPG's F+ (Weigel's matrix sends Z = 1 to
  F+ = −i e^{iφ} sin α, and R_x(α) sends +z to −y sin α).
- Free precession multiplies Mxy by e^{−iω t} (EPG-X: F+ precesses as e^{−i2π·df·t}).
- A unit EPG shift is a dephasing angle θ_m per interval. With θ_m = 2π m / M on a
  uniform grid, the mean of Mxy over the M isochromats is exactly EPG's F₀ as long as no
  configuration order |k| >= M is reachable (M > number of shifts); the grid is symmetric
  under θ → −θ, so the sign of the dephasing does not matter for F₀.
- Engine outputs: ``fse`` echo = i·F₀; ``gre`` signal = i·e^{−iφₙ}·F₀ right after pulse n.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import expm

import epgx

# Float64 round-off of a few hundred operator applications; any physics slip is >> 1e-8.
EXACT_TOL = 1e-10
# Same, for trains of a few thousand operators or closed forms with exp/cos of big arguments.
LONG_TRAIN_TOL = 1e-9
# Ideally spoiled SPGR via quadratic RF spoiling (117°) with T2 = 50 ms and TR = 10 ms
# deviates from Ernst by a few % of the signal (Zur et al. 1991, fig. 3); T2 → 0 removes it.
SPOILING_T2_EFFECT = 0.1

GAMMA_RAD_PER_S_PER_T = 2 * math.pi * 42.58e6  # as EPG-X's diffusion code
GAMMA_RAD_PER_MS_PER_UT = 267.5221e-3  # EPG-X's MT value: 2π·42.5774 MHz/T to 7 digits


def _rotation(alpha: float, phi: float) -> np.ndarray:
    """Right-handed rotation by alpha about (cos phi, sin phi, 0) (Rodrigues)."""
    n = np.array([math.cos(phi), math.sin(phi), 0.0])
    nx = np.array([[0.0, -n[2], n[1]], [n[2], 0.0, -n[0]], [-n[1], n[0], 0.0]])
    return math.cos(alpha) * np.eye(3) + math.sin(alpha) * nx + (1 - math.cos(alpha)) * np.outer(n, n)


class Ensemble:
    """M isochromats (dephasing angles 2π m / M) of one, two (BM) or free + bound (MT) pools.

    Per pool: complex Mxy and real Mz. Free evolution over dt is the matrix exponential
    (scipy) of the Bloch–McConnell rates with k_ba = k_ab (1 − f)/f, followed by the
    common off-resonance and dephasing phases; Z recovers towards M0 = (1 − f, f). MT
    (Gloor 2008, as EPG-X): pool b has no transverse magnetisation, exchange acts on Mz
    only, and each pulse multiplies Mz_b by its saturation factor.
    """

    def __init__(
        self, n_iso, t1, t2, df_hz=0.0, *, t1b=None, t2b=None, f=0.0, k_ab_per_s=0.0, df_b_hz=0.0, mt=False
    ):
        self.theta = 2 * np.pi * np.arange(n_iso) / n_iso
        self.two = t1b is not None
        self.mt = mt
        self.df = df_hz
        ka = k_ab_per_s * 1e-3
        kb = ka * (1 - f) / f if self.two else 0.0
        if self.two:
            self.m0 = np.array([1 - f, f])
            self.lam_l = np.array([[-1 / t1 - ka, kb], [ka, -1 / t1b - kb]])
            if mt:
                self.lam_t = np.array([[-1 / t2]], dtype=complex)
            else:
                self.lam_t = np.array([[-1 / t2 - ka, kb], [ka, -1 / t2b - kb - 2j * np.pi * df_b_hz * 1e-3]])
        else:
            self.m0 = np.array([1.0])
            self.lam_l = np.array([[-1 / t1]])
            self.lam_t = np.array([[-1 / t2]], dtype=complex)
        n_tr = self.lam_t.shape[0]
        self.mxy = np.zeros((n_tr, n_iso), dtype=complex)
        self.mz = np.outer(self.m0, np.ones(n_iso))

    def pulse(self, alpha_deg: float, phi_deg: float, saturation: float = 1.0) -> None:
        r = _rotation(math.radians(alpha_deg), math.radians(phi_deg))
        for p in range(self.mxy.shape[0]):
            m = r @ np.stack([self.mxy[p].real, self.mxy[p].imag, self.mz[p]])
            self.mxy[p], self.mz[p] = m[0] + 1j * m[1], m[2]
        if self.mt:
            self.mz[1] *= saturation

    def evolve(self, dt_ms: float) -> None:
        phase = np.exp(-1j * (2 * np.pi * self.df * dt_ms * 1e-3 + self.theta))
        self.mxy = (expm(dt_ms * self.lam_t) @ self.mxy) * phase
        xl = expm(dt_ms * self.lam_l)
        self.mz = xl @ self.mz + ((np.eye(len(self.m0)) - xl) @ self.m0)[:, None]

    def f0(self) -> complex:
        """EPG F₀ summed over the pools that have transverse magnetisation."""
        return complex(np.mean(self.mxy.sum(0)))

    def coefficients(self, n_states: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """EPG states (F+ₖ, stored F-ₖ = conj F₋ₖ, Zₖ), k = 0..n_states-1, per pool.

        Dephasing multiplies Mxy by e^{−iθ} per shift, so order k carries e^{−ikθ}:
        Fₖ = mean(Mxy e^{ikθ}), Zₖ = mean(Mz e^{ikθ}).
        """
        k = np.arange(n_states)[:, None]
        ph = np.exp(1j * k * self.theta)  # [K, M]
        fp = np.einsum("pm,km->pk", self.mxy, ph) / len(self.theta)
        fm = np.conj(np.einsum("pm,km->pk", self.mxy, np.conj(ph)) / len(self.theta))
        z = np.einsum("pm,km->pk", self.mz, ph) / len(self.theta)
        return fp, fm, z


def gre_oracle(ens: Ensemble, flips, phases, tr, saturation=None) -> np.ndarray:
    """EPG-X GRE: pulse, read i·e^{−iφ}·F₀ (TE = 0), relax + dephase over TR."""
    out = []
    for j in range(len(flips)):
        ens.pulse(flips[j], phases[j], 1.0 if saturation is None else saturation[j])
        out.append(1j * np.exp(-1j * math.radians(phases[j])) * ens.f0())
        ens.evolve(tr)
    return np.array(out)


def fse_oracle(ens: Ensemble, flips, phases, esp, saturation=None) -> np.ndarray:
    """EPG-X TSE: exc, ESP/2, then per refocusing pulse (phase + 90°): ESP/2, echo, ESP/2."""
    sat = np.ones(len(flips)) if saturation is None else saturation
    ens.pulse(flips[0], phases[0], sat[0])
    ens.evolve(esp / 2)
    out = []
    for j in range(1, len(flips)):
        ens.pulse(flips[j], phases[j] + 90.0, sat[j])
        ens.evolve(esp / 2)
        out.append(1j * ens.f0())
        ens.evolve(esp / 2)
    return np.array(out)


def _train(rng: np.random.Generator, n: int, lo: float = 20.0, hi: float = 160.0):
    return rng.uniform(lo, hi, n), rng.uniform(-180, 180, n)


def _single(t1, t2, **kw) -> epgx.Tissue:
    return epgx.Tissue(t1_ms=t1, t2_ms=t2, dtype=torch.float64, **kw)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy()


# ---------------------------------------------------------------- CPMG / spin echoes


@pytest.mark.parametrize(
    ("t1", "t2", "esp"), [(1000.0, 80.0, 10.0), (300.0, 300.0, 4.0), (2500.0, 20.0, 7.5)]
)
def test_cpmg_180_echoes_decay_with_t2_only(t1, t2, esp):
    n = 24
    s = _np(epgx.fse(_single(t1, t2), [90.0] + [180.0] * n, esp))
    expected = np.exp(-np.arange(1, n + 1) * esp / t2) + 0j
    np.testing.assert_allclose(s, expected, rtol=0, atol=EXACT_TOL)


def test_cpmg_single_echo_sign_convention():
    """Excitation along −y, CPMG refocusing about y: the echo is +1 (i·F₀, F₀ = −i)."""
    s = _np(epgx.fse(_single(1e9, 1e9), [90.0, 180.0], 1e-6))
    np.testing.assert_allclose(s, [1.0 + 0j], atol=EXACT_TOL)


# ---------------------------------------------------------------- spoiled GRE (Ernst)


def _ernst(alpha_deg: float, tr: float, t1: float) -> float:
    a, e1 = math.radians(alpha_deg), math.exp(-tr / t1)
    return math.sin(a) * (1 - e1) / (1 - math.cos(a) * e1)


@pytest.mark.parametrize("alpha", [5.0, 15.0, 60.0])
def test_ideally_spoiled_gre_follows_exact_recursion_and_reaches_ernst(alpha):
    """T2 = 1e-3 ms makes E2 = e^{−10⁴} = 0: the train is exactly ideally spoiled.

    The transient decays as (cos α·E1)ⁿ: 2000 pulses leave < 1e-11 of it at α = 5°."""
    t1, tr, n = 1000.0, 10.0, 2000
    s = _np(epgx.gre(_single(t1, 1e-3), [alpha] * n, tr, phase_deg=epgx.rf_spoiling_phases_deg(n, 117)))
    a, e1 = math.radians(alpha), math.exp(-tr / t1)
    mz, expected = 1.0, []
    for _ in range(n):
        expected.append(mz * math.sin(a))
        mz = mz * math.cos(a) * e1 + (1 - e1)
    np.testing.assert_allclose(s, np.array(expected) + 0j, rtol=0, atol=EXACT_TOL)
    assert abs(abs(s[-1]) - _ernst(alpha, tr, t1)) < EXACT_TOL


def test_rf_spoiled_gre_is_close_to_ernst_with_finite_t2():
    t1, t2, tr, alpha, n = 1000.0, 50.0, 10.0, 15.0, 400
    s = _np(epgx.gre(_single(t1, t2), [alpha] * n, tr, phase_deg=epgx.rf_spoiling_phases_deg(n, 117)))
    ernst = _ernst(alpha, tr, t1)
    tail = np.abs(s[-50:])
    assert np.all(np.abs(tail - ernst) < SPOILING_T2_EFFECT * ernst)


# ---------------------------------------------------------------- isochromat ensembles


N_ISO = 400  # isochromats per ensemble: > 2 × the longest train below, so F₀ is exact


def test_gre_matches_isochromat_ensemble_random_train():
    rng = np.random.default_rng(1)
    n = 60
    flips, phases = _train(rng, n, 0.0, 120.0)
    t1, t2, tr = 700.0, 60.0, 8.0
    s = _np(epgx.gre(_single(t1, t2), torch.tensor(flips), tr, phase_deg=torch.tensor(phases)))
    ref = gre_oracle(Ensemble(N_ISO, t1, t2), flips, phases, tr)
    np.testing.assert_allclose(s, ref, rtol=0, atol=EXACT_TOL)


def test_fse_matches_isochromat_ensemble_random_train():
    rng = np.random.default_rng(2)
    n = 30
    flips, phases = _train(rng, n, 30.0, 180.0)
    t1, t2, esp = 900.0, 70.0, 6.0
    s = _np(epgx.fse(_single(t1, t2), torch.tensor(flips), esp, phase_deg=torch.tensor(phases)))
    ref = fse_oracle(Ensemble(N_ISO, t1, t2), flips, phases, esp)
    np.testing.assert_allclose(s, ref, rtol=0, atol=EXACT_TOL)


def test_oracle_is_sensitive_to_the_cpmg_phase():
    """Guard against a vacuous oracle: dropping the +90° CPMG phase changes the echoes."""
    rng = np.random.default_rng(2)
    flips, phases = _train(rng, 12, 30.0, 180.0)
    s = _np(epgx.fse(_single(900.0, 70.0), torch.tensor(flips), 6.0, phase_deg=torch.tensor(phases)))
    wrong = fse_oracle(Ensemble(N_ISO, 900.0, 70.0), flips, phases - 90.0, 6.0)
    assert np.max(np.abs(s - wrong)) > 1e-2


@pytest.mark.parametrize("df_hz", [0.0, 13.0, -41.5])
def test_gre_states_match_isochromat_fourier_coefficients(df_hz):
    """Every state, not just F₀. A uniform θ average absorbs any common precession, so F₀ of a
    train with one shift per equal interval does not depend on df; the phases e^{−ik·2π·df·TR}
    of the higher orders do, and pin the sign of df_hz relative to the shift."""
    rng = np.random.default_rng(3)
    n = 12
    flips, phases = _train(rng, n)
    t1, t2, tr = 800.0, 90.0, 7.0
    tis = _single(t1, t2, df_hz=df_hz)
    _, st = epgx.gre(tis, torch.tensor(flips), tr, phase_deg=torch.tensor(phases), return_states=True)
    ens = Ensemble(N_ISO, t1, t2, df_hz)
    n_states = st.fp.shape[-2]
    for j in range(n):
        ens.pulse(flips[j], phases[j])
        fp, fm, z = ens.coefficients(n_states)
        np.testing.assert_allclose(_np(st.fp[..., j]), fp, rtol=0, atol=EXACT_TOL)
        np.testing.assert_allclose(_np(st.fm[..., j]), fm, rtol=0, atol=EXACT_TOL)
        np.testing.assert_allclose(_np(st.z[..., j]), z, rtol=0, atol=EXACT_TOL)
        ens.evolve(tr)


@pytest.mark.parametrize("df_hz", [13.0, -41.5])
def test_off_resonance_signal_matches_isochromat_ensemble(df_hz):
    rng = np.random.default_rng(3)
    n = 25
    flips, phases = _train(rng, n)
    t1, t2 = 800.0, 90.0
    s = _np(epgx.gre(_single(t1, t2, df_hz=df_hz), torch.tensor(flips), 7.0, phase_deg=torch.tensor(phases)))
    np.testing.assert_allclose(
        s, gre_oracle(Ensemble(N_ISO, t1, t2, df_hz), flips, phases, 7.0), rtol=0, atol=EXACT_TOL
    )
    s = _np(epgx.fse(_single(t1, t2, df_hz=df_hz), torch.tensor(flips), 9.0, phase_deg=torch.tensor(phases)))
    np.testing.assert_allclose(
        s, fse_oracle(Ensemble(N_ISO, t1, t2, df_hz), flips, phases, 9.0), rtol=0, atol=EXACT_TOL
    )


def test_b1_scales_every_flip():
    rng = np.random.default_rng(4)
    n, b1 = 20, 0.83
    flips, phases = _train(rng, n)
    s = _np(epgx.fse(_single(600.0, 50.0, b1=b1), torch.tensor(flips), 5.0, phase_deg=torch.tensor(phases)))
    ref = fse_oracle(Ensemble(N_ISO, 600.0, 50.0), flips * b1, phases, 5.0)
    np.testing.assert_allclose(s, ref, rtol=0, atol=EXACT_TOL)


BM_CASES = [
    # (t1a, t1b), (t2a, t2b), f, k_ab_per_s, df_b_hz, df_hz: the DESIGN benchmark tissue and variants
    ((1000.0, 500.0), (100.0, 20.0), 0.2, 10.0, 0.0, 0.0),
    ((1000.0, 500.0), (100.0, 20.0), 0.2, 10.0, 120.0, -15.0),
    ((1200.0, 300.0), (80.0, 10.0), 0.05, 80.0, -60.0, 0.0),
]


@pytest.mark.parametrize(("t1", "t2", "f", "k", "df_b", "df"), BM_CASES)
@pytest.mark.parametrize("engine", ["fse", "gre"])
def test_bm_exchange_matches_bloch_mcconnell_ensemble(engine, t1, t2, f, k, df_b, df):
    rng = np.random.default_rng(8)
    n = 24
    flips, phases = _train(rng, n)
    tis = epgx.Tissue.bm(t1, t2, f, k, df_b, df_hz=df, dtype=torch.float64)
    ens = Ensemble(N_ISO, t1[0], t2[0], df, t1b=t1[1], t2b=t2[1], f=f, k_ab_per_s=k, df_b_hz=df_b)
    dt = 6.0
    s = _np(getattr(epgx, engine)(tis, torch.tensor(flips), dt, phase_deg=torch.tensor(phases)))
    ref = (fse_oracle if engine == "fse" else gre_oracle)(ens, flips, phases, dt)
    np.testing.assert_allclose(s, ref, rtol=0, atol=EXACT_TOL)


def _mt_saturation(energy_ut2ms: np.ndarray, lineshape_us: float, b1: float = 1.0) -> np.ndarray:
    """exp(−W·T), W·T = π γ² b1² ∫B1² dt · G (Gloor 2008), γ in rad/ms/µT and G in ms."""
    return np.exp(-math.pi * GAMMA_RAD_PER_MS_PER_UT**2 * b1**2 * energy_ut2ms * lineshape_us * 1e-3)


@pytest.mark.parametrize("engine", ["fse", "gre"])
def test_mt_exchange_matches_bloch_mcconnell_ensemble(engine):
    rng = np.random.default_rng(9)
    n, f, k, g_us = 24, 0.117, 4.3, 14.9
    flips, phases = _train(rng, n)
    energy = rng.uniform(0.0, 3.0, n)
    tis = epgx.Tissue.mt((779.0, 779.0), 45.0, f, k, g_us, dtype=torch.float64)
    ens = Ensemble(N_ISO, 779.0, 45.0, t1b=779.0, f=f, k_ab_per_s=k, mt=True)
    dt = 5.0
    s = _np(
        getattr(epgx, engine)(
            tis, torch.tensor(flips), dt, phase_deg=torch.tensor(phases), b1sq_tau_ut2ms=torch.tensor(energy)
        )
    )
    ref = (fse_oracle if engine == "fse" else gre_oracle)(
        ens, flips, phases, dt, _mt_saturation(energy, g_us)
    )
    np.testing.assert_allclose(s, ref, rtol=0, atol=EXACT_TOL)


# ---------------------------------------------------------------- SSFP steady state


def _isochromat_steady_state(alpha_deg: float, tr: float, t1: float, t2: float, theta: float) -> complex:
    """Mxy right after the pulse in the steady state of a phase-0 train with precession θ per TR.

    Solves M⁺ = R (A M⁺ + (1 − E1) ẑ), A = relaxation then rotation by −θ about z.
    """
    e1, e2 = math.exp(-tr / t1), math.exp(-tr / t2)
    c, s = math.cos(theta), math.sin(theta)
    a = np.array([[e2 * c, e2 * s, 0.0], [-e2 * s, e2 * c, 0.0], [0.0, 0.0, e1]])
    r = _rotation(math.radians(alpha_deg), 0.0)
    m = np.linalg.solve(np.eye(3) - r @ a, r @ np.array([0.0, 0.0, 1 - e1]))
    return complex(m[0], m[1])


def test_isochromat_solver_reproduces_freeman_hill_on_resonance_bssfp():
    """Self-check of the oracle: alternating phases on resonance ≡ θ = π per TR (TE = 0)."""
    alpha, tr, t1, t2 = 30.0, 5.0, 1000.0, 100.0
    e1, e2, a = math.exp(-tr / t1), math.exp(-tr / t2), math.radians(alpha)
    freeman_hill = math.sin(a) * (1 - e1) / (1 - (e1 - e2) * math.cos(a) - e1 * e2)
    assert abs(abs(_isochromat_steady_state(alpha, tr, t1, t2, math.pi)) - freeman_hill) < 1e-14


@pytest.mark.parametrize("balanced", [True, False])
def test_unbalanced_ssfp_steady_state_is_isochromat_average(balanced):
    """EPG-X's GRE dephases one order per TR, so its 'bSSFP' is FISP: the uniform average over θ
    of balanced-SSFP isochromats (alternating phases only move θ by π, so |S| is the same).
    The θ-profile is smooth and periodic: the trapezoid average converges exponentially."""
    alpha, tr, t1, t2, n = 30.0, 5.0, 100.0, 50.0, 900  # E1^900 ≈ e^{-45}: transient gone
    phases = epgx.balanced_phases_deg(n) if balanced else torch.zeros(n, dtype=torch.float64)
    s = _np(epgx.gre(_single(t1, t2), [alpha] * n, tr, phase_deg=phases))
    thetas = 2 * np.pi * np.arange(512) / 512
    fisp = np.mean([_isochromat_steady_state(alpha, tr, t1, t2, th) for th in thetas])
    assert abs(abs(s[-1]) - abs(fisp)) < EXACT_TOL
    assert abs(abs(s[-2]) - abs(fisp)) < EXACT_TOL


# ---------------------------------------------------------------- diffusion


def _cpmg_diffusion(esp_ms: float, g_mt_per_m: float, d_um2_per_ms: float, n: np.ndarray) -> np.ndarray:
    """Carr–Purcell: each echo (two half-intervals τ) multiplies by exp(−(2/3)γ²G²Dτ³)."""
    tau = esp_ms / 2 * 1e-3
    g = g_mt_per_m * 1e-3
    d = d_um2_per_ms * 1e-9
    return np.exp(-n * (2 / 3) * GAMMA_RAD_PER_S_PER_T**2 * g**2 * d * tau**3)


@pytest.mark.parametrize(("g", "esp", "d"), [(20.0, 10.0, 3.0), (40.0, 6.0, 1.0)])
def test_cpmg_diffusion_carr_purcell(g, esp, d):
    t2, n = 100.0, 16
    diff = epgx.Diffusion(grad_mt_per_m=[g], tau_ms=[esp / 2], d_um2_per_ms=d)
    s = _np(epgx.fse(_single(1000.0, t2), [90.0] + [180.0] * n, esp, diffusion=diff))
    k = np.arange(1, n + 1)
    expected = np.exp(-k * esp / t2) * _cpmg_diffusion(esp, g, d, k)
    assert np.max(np.abs(1 - expected)) > 1e-2  # the attenuation is visible
    np.testing.assert_allclose(s, expected + 0j, rtol=1e-12, atol=EXACT_TOL)


def test_cpmg_diffusion_epgx_mode_pins_epgx_quirk():
    """EPG-X attenuates F₋ₙ with the +n b-value (quirks.json): the CPMG echoes decay too fast."""
    g, esp, d, t2, n = 20.0, 10.0, 3.0, 100.0, 16
    diff = epgx.Diffusion(grad_mt_per_m=[g], tau_ms=[esp / 2], d_um2_per_ms=d, negative_orders="epgx")
    s = _np(epgx.fse(_single(1000.0, t2), [90.0] + [180.0] * n, esp, diffusion=diff))
    k = np.arange(1, n + 1)
    physical = np.exp(-k * esp / t2) * _cpmg_diffusion(esp, g, d, k)
    assert np.all(np.abs(s[1:]) < physical[1:] - 1e-3)
    # EPG-X: F+_0 → F+_1 costs b₀₁ = τΔk²/3 and F₋₁ → F₀ costs b₁₂ = 7τΔk²/3: 8/2 = 4× per echo
    np.testing.assert_allclose(
        np.abs(s), np.exp(-k * esp / t2) * _cpmg_diffusion(esp, g, d, k) ** 4, rtol=1e-12
    )


# ---------------------------------------------------------------- MT and Bloch–McConnell


def test_mt_zero_flip_pulses_saturate_only_the_bound_pool():
    t1a, t1b, t2, f, g_us, energy, esp, n = 1000.0, 1000.0, 80.0, 0.15, 14.9, 0.5, 10.0, 8
    tis = epgx.Tissue.mt((t1a, t1b), t2, f, 0.0, g_us, dtype=torch.float64)
    s, st = epgx.fse(tis, [0.0] * (n + 1), esp, b1sq_tau_ut2ms=energy, return_states=True)
    assert torch.all(s == 0)
    sat = float(_mt_saturation(np.array(energy), g_us))
    e1b = math.exp(-esp / 2 / t1b)
    zb = f * sat  # excitation pulse, then ESP/2
    zb = zb * e1b + f * (1 - e1b)
    expected = []
    for _ in range(n):
        zb = (zb * sat) * e1b + f * (1 - e1b)
        expected.append(zb)
        zb = zb * e1b + f * (1 - e1b)
    z = _np(st.z)  # [P, K, n]
    np.testing.assert_allclose(z[1, 0], np.array(expected) + 0j, rtol=0, atol=EXACT_TOL)
    np.testing.assert_allclose(z[0, 0], np.full(n, 1 - f) + 0j, rtol=0, atol=EXACT_TOL)


@pytest.mark.parametrize("engine", ["fse", "gre"])
def test_mt_without_exchange_is_scaled_single_pool(engine):
    rng = np.random.default_rng(5)
    n, f = 20, 0.12
    flips = torch.tensor(rng.uniform(20, 170, n))
    mt = epgx.Tissue.mt((900.0, 1100.0), 70.0, f, 0.0, 14.9, dtype=torch.float64)
    one = _single(900.0, 70.0)
    run = getattr(epgx, engine)
    s_mt = _np(run(mt, flips, 6.0, b1sq_tau_ut2ms=torch.tensor(rng.uniform(0, 2, n))))
    s_one = _np(run(one, flips, 6.0))
    np.testing.assert_allclose(s_mt, (1 - f) * s_one, rtol=0, atol=EXACT_TOL)


@pytest.mark.parametrize("engine", ["fse", "gre"])
@pytest.mark.parametrize("df_b", [0.0, 35.0])
def test_bm_without_exchange_is_weighted_sum_of_pools(engine, df_b):
    rng = np.random.default_rng(6)
    n, f = 20, 0.2
    flips, phases = torch.tensor(rng.uniform(20, 170, n)), torch.tensor(rng.uniform(-180, 180, n))
    run = getattr(epgx, engine)
    bm = epgx.Tissue.bm((1000.0, 500.0), (100.0, 20.0), f, 0.0, df_b, dtype=torch.float64)
    s_bm = _np(run(bm, flips, 8.0, phase_deg=phases))
    s_a = _np(run(_single(1000.0, 100.0), flips, 8.0, phase_deg=phases))
    s_b = _np(run(_single(500.0, 20.0, df_hz=df_b), flips, 8.0, phase_deg=phases))
    np.testing.assert_allclose(s_bm, (1 - f) * s_a + f * s_b, rtol=0, atol=EXACT_TOL)


@pytest.mark.parametrize("engine", ["fse", "gre"])
@pytest.mark.parametrize(("f", "k"), [(0.1, 5.0), (0.5, 100.0), (0.9, 1.0)])
def test_bm_identical_pools_is_single_pool(engine, f, k):
    rng = np.random.default_rng(7)
    n = 20
    flips, phases = torch.tensor(rng.uniform(20, 170, n)), torch.tensor(rng.uniform(-180, 180, n))
    run = getattr(epgx, engine)
    bm = epgx.Tissue.bm((800.0, 800.0), (60.0, 60.0), f, k, df_hz=7.0, dtype=torch.float64)
    s_bm = _np(run(bm, flips, 8.0, phase_deg=phases))
    s_one = _np(run(_single(800.0, 60.0, df_hz=7.0), flips, 8.0, phase_deg=phases))
    np.testing.assert_allclose(s_bm, s_one, rtol=0, atol=EXACT_TOL)


# ---------------------------------------------------------------- preparation


@pytest.mark.parametrize("ti", [0.0, 100.0, 700.0, 3000.0])
def test_inversion_prep_first_signal(ti):
    t1 = 900.0
    s = _np(epgx.gre(_single(t1, 1e-3), [90.0, 90.0], 10.0, prep=epgx.Prep(flip_deg=180.0, delay_ms=ti)))
    assert abs(s[0] - (1 - 2 * math.exp(-ti / t1))) < EXACT_TOL
    # the 90° pulse leaves Mz = 0, which recovers to 1 − E1 over one TR
    assert abs(s[1] - (1 - math.exp(-10.0 / t1))) < EXACT_TOL
