"""Operator-level checks of epgx.ops against independent math (numpy, scipy, torch.linalg)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from epgx import ops

# Float64 round-off of a handful of operations on O(1) numbers.
OP_TOL = 1e-13
# expm2 vs scipy's Padé expm: both are accurate to a few ulps of the largest entry.
EXPM_RTOL = 1e-12
# Isochromat oracle over ~10 pulses of O(1) rotations: round-off only.
ORACLE_TOL = 1e-12

F64 = torch.float64


def _rotation(alpha: float, phi: float) -> np.ndarray:
    """Right-handed rotation by alpha about (cos phi, sin phi, 0) (Rodrigues)."""
    n = np.array([math.cos(phi), math.sin(phi), 0.0])
    nx = np.array([[0.0, -n[2], n[1]], [n[2], 0.0, -n[0]], [-n[1], n[0], 0.0]])
    return math.cos(alpha) * np.eye(3) + math.sin(alpha) * nx + (1 - math.cos(alpha)) * np.outer(n, n)


def _complex3(m6: torch.Tensor) -> np.ndarray:
    """The 3×3 complex matrix on (F+, F-, Z) behind the real 6×6 one (rows/cols re, im)."""
    m = m6.numpy()
    return m[0::2, 0::2] + 1j * m[1::2, 0::2]


def _state(fp: complex, z: float, k: int = 1) -> torch.Tensor:
    """Order-0 state with F-₀ = conj(F+₀) and real Z₀, K = k orders, one spin."""
    s = ops.empty_state(1, k, 1, dtype=F64, device=torch.device("cpu"))
    s[0, :, 0, 0] = torch.tensor([fp.real, fp.imag, fp.real, -fp.imag, z, 0.0], dtype=F64)
    return s


ANGLES = [(0.3, 0.0), (1.2, 0.7), (math.pi, -2.0), (2.5, 3.0), (math.pi / 2, math.pi / 2)]


# ---------------------------------------------------------------- RF


@pytest.mark.parametrize(("alpha", "phi"), ANGLES)
def test_rf_matrix_real_form_is_a_complex_linear_map_with_unit_det(alpha, phi):
    m6 = ops.rf_matrix(torch.tensor(alpha, dtype=F64), torch.tensor(phi, dtype=F64))
    m = m6.numpy()
    # real form of a complex matrix: blocks [[Tr, -Ti], [Ti, Tr]]
    np.testing.assert_allclose(m[0::2, 1::2], -m[1::2, 0::2], atol=OP_TOL)
    np.testing.assert_allclose(m[1::2, 1::2], m[0::2, 0::2], atol=OP_TOL)
    assert abs(abs(np.linalg.det(_complex3(m6))) - 1) < OP_TOL


@pytest.mark.parametrize(("alpha", "phi"), ANGLES)
def test_rf_matches_isochromat_rotation(alpha, phi):
    """With F+ = Mx + iMy and Z = Mz, Weigel's matrix is the rotation about (cos φ, sin φ, 0)."""
    rng = np.random.default_rng(0)
    mvec = rng.normal(size=3)
    out = ops.rf(
        _state(complex(mvec[0], mvec[1]), mvec[2]),
        ops.rf_matrix(torch.tensor(alpha, dtype=F64), torch.tensor(phi, dtype=F64)),
    )
    expected = _rotation(alpha, phi) @ mvec
    fp = complex(out[0, 0, 0, 0], out[0, 1, 0, 0])
    fm = complex(out[0, 2, 0, 0], out[0, 3, 0, 0])
    assert abs(fp - complex(expected[0], expected[1])) < OP_TOL
    assert abs(fm - fp.conjugate()) < OP_TOL  # F-₀ = conj(F+₀) is kept
    assert abs(float(out[0, 4, 0, 0]) - expected[2]) < OP_TOL and abs(float(out[0, 5, 0, 0])) < OP_TOL


@pytest.mark.parametrize("phi", [0.0, 0.4, -2.2])
def test_rf_zero_flip_is_identity(phi):
    m = ops.rf_matrix(torch.tensor(0.0, dtype=F64), torch.tensor(phi, dtype=F64))
    torch.testing.assert_close(m, torch.eye(6, dtype=F64), rtol=0, atol=OP_TOL)


@pytest.mark.parametrize(("alpha", "phi"), ANGLES)
def test_two_rf_pulses_add_flip_angles(alpha, phi):
    a, p = torch.tensor(alpha, dtype=F64), torch.tensor(phi, dtype=F64)
    m = ops.rf_matrix(a, p)
    torch.testing.assert_close(m @ m, ops.rf_matrix(2 * a, p), rtol=0, atol=OP_TOL)


def test_rf_matrix_batches_over_flip_and_phase():
    a = torch.tensor([0.1, 0.5, 1.0], dtype=F64)
    p = torch.tensor([[0.0], [1.0]], dtype=F64)
    m = ops.rf_matrix(a, p)
    assert m.shape == (2, 3, 6, 6)
    torch.testing.assert_close(m[1, 2], ops.rf_matrix(a[2], p[1, 0]), rtol=0, atol=0)


def test_per_spin_rf_equals_shared_rf():
    g = torch.Generator().manual_seed(0)
    state = torch.randn(2, 6, 4, 3, generator=g, dtype=F64)
    flips = torch.tensor([0.3, 0.9, 2.0], dtype=F64)
    per_spin = ops.rf(state, ops.rf_matrix(flips, torch.tensor(0.5, dtype=F64)))
    for b in range(3):
        shared = ops.rf(state[..., b : b + 1], ops.rf_matrix(flips[b], torch.tensor(0.5, dtype=F64)))
        torch.testing.assert_close(per_spin[..., b : b + 1], shared, rtol=0, atol=OP_TOL)


# ---------------------------------------------------------------- shift


def _random_consistent_state(k: int, n_spins: int = 2, seed: int = 0) -> torch.Tensor:
    """Random state with F-₀ = conj(F+₀) (the same order-0 state stored twice)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 6, k, n_spins, generator=g, dtype=F64)
    s[:, 2, 0], s[:, 3, 0] = s[:, 0, 0], -s[:, 1, 0]
    return s


@pytest.mark.parametrize("n", [1, 2, 3])
def test_shift_then_unshift_restores_state(n):
    k = 6
    s = _random_consistent_state(k)
    s[:, :2, k - n :] = 0  # F+ orders that shift(+n) would drop
    torch.testing.assert_close(ops.shift(ops.shift(s, n), -n), s, rtol=0, atol=0)
    s = _random_consistent_state(k, seed=1)
    s[:, 2:4, k - n :] = 0  # F- orders that shift(-n) would drop
    torch.testing.assert_close(ops.shift(ops.shift(s, -n), n), s, rtol=0, atol=0)


def test_shift_moves_orders_up_by_one():
    k = 5
    s = _random_consistent_state(k)
    out = ops.shift(s, 1)
    fp = torch.complex(s[:, 0], s[:, 1])
    fm = torch.complex(s[:, 2], s[:, 3])
    new_fp = torch.complex(out[:, 0], out[:, 1])
    new_fm = torch.complex(out[:, 2], out[:, 3])
    torch.testing.assert_close(new_fp[:, 1:], fp[:, :-1], rtol=0, atol=0)
    torch.testing.assert_close(new_fp[:, 0], fm[:, 1].conj(), rtol=0, atol=0)  # F₋₁ → F₀
    torch.testing.assert_close(new_fm[:, :-1], fm[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(new_fm[:, 0], new_fp[:, 0].conj(), rtol=0, atol=0)
    assert torch.all(new_fm[:, -1] == 0)
    torch.testing.assert_close(out[:, 4:], s[:, 4:], rtol=0, atol=0)
    assert ops.shift(s, 0) is s


# ---------------------------------------------------------------- expm2


def _expm2(m: np.ndarray, t: float) -> np.ndarray:
    a, b, c, d = (torch.tensor(x) for x in (m[0, 0], m[0, 1], m[1, 0], m[1, 1]))
    out = ops.expm2(a, b, c, d, t)
    return np.array([[out[0].item(), out[1].item()], [out[2].item(), out[3].item()]])


EXPM_CASES = {
    "real distinct": np.array([[-0.011, 0.04], [0.01, -0.05]]),
    "real complex-eigs": np.array([[-0.1, -2.0], [1.5, -0.3]]),
    "complex BM": np.array([[-0.011, 0.04], [0.01, -0.05 - 0.7j]]),
    "complex random": np.array([[0.3 - 0.2j, -1.1 + 0.5j], [0.4 + 0.9j, -0.6 + 0.1j]]),
    "equal diag, b*c = 0 (Jordan)": np.array([[-0.02, 0.3], [0.0, -0.02]]),
    "equal diag, diagonal": np.array([[-0.02, 0.0], [0.0, -0.02]]),
    "complex Jordan": np.array([[-0.02 + 0.1j, 0.0], [0.5, -0.02 + 0.1j]]),
    "q² at series threshold": np.array([[-0.01, 1e-4], [3.2e-4, -0.01]]),
    "q² just past threshold": np.array([[-0.01, 1e-4], [3.1e-4 * 1.1, -0.01]]),
}


@pytest.mark.parametrize("t", [0.5, 10.0, 100.0])
@pytest.mark.parametrize("name", list(EXPM_CASES))
def test_expm2_matches_scipy(name, t):
    m = EXPM_CASES[name]
    ref = scipy.linalg.expm(t * m)
    np.testing.assert_allclose(_expm2(m, t), ref, rtol=EXPM_RTOL, atol=EXPM_RTOL * np.abs(ref).max())


def test_expm2_random_matrices():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.normal(size=(2, 2)) * 0.3
        mc = m + 1j * rng.normal(size=(2, 2)) * 0.3
        for x in (m, mc):
            t = float(rng.uniform(0.1, 20))
            ref = scipy.linalg.expm(t * x)
            np.testing.assert_allclose(_expm2(x, t), ref, rtol=EXPM_RTOL, atol=EXPM_RTOL * np.abs(ref).max())


@pytest.mark.parametrize("t", [1e4, 1e6, 1e100])
@pytest.mark.parametrize(
    "name", ["real distinct", "complex BM", "equal diag, b*c = 0 (Jordan)", "complex Jordan"]
)
def test_expm2_huge_t_decays_without_overflow(name, t):
    with np.errstate(all="ignore"):
        out = _expm2(EXPM_CASES[name], t)
    assert np.all(np.isfinite(out))
    # scipy's scaling-and-squaring needs log2(t‖M‖) squarings: fine up to 1e6, not 1e300
    ref = scipy.linalg.expm(t * EXPM_CASES[name]) if t < 1e7 else np.zeros((2, 2))
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-300)


def test_expm2_stiff_rates_do_not_overflow():
    """A fast and a slow eigenvalue: the slow mode must survive, nothing may be inf/NaN.

    The slow eigenvalue is formed as μ + q, which cancels: its error is ~eps·|μ|, so the
    slow mode carries a relative error ~eps·|μ|·t = 2e-16 · 500 · 1e4 ≈ 1e-9 here."""
    m = np.array([[-1000.0, 0.0], [0.0, -1e-3]])
    out = _expm2(m, 1e4)
    np.testing.assert_allclose(out, np.diag([0.0, math.exp(-10.0)]), rtol=5e-9, atol=0)


def _expm2_grad_vs_matrix_exp(entries, t):
    a, b, c, d = (
        torch.tensor(x, dtype=torch.complex128 if isinstance(x, complex) else F64, requires_grad=True)
        for x in entries
    )
    out = ops.expm2(a, b, c, d, t)
    w = [0.3, -1.1, 0.7, 0.2]
    loss = sum(wi * (o.real if o.is_complex() else o) for wi, o in zip(w, out, strict=True))
    grads = torch.autograd.grad(loss, (a, b, c, d))
    mat = torch.stack([torch.stack([a, b]), torch.stack([c, d])])
    ref_out = torch.linalg.matrix_exp(t * mat).reshape(-1)
    ref_loss = sum(wi * (o.real if o.is_complex() else o) for wi, o in zip(w, ref_out, strict=True))
    ref = torch.autograd.grad(ref_loss, (a, b, c, d))
    return grads, ref


@pytest.mark.parametrize(
    "entries",
    [
        (-0.02, 0.3, 0.0, -0.02),
        (-0.02, 0.0, 0.0, -0.02),
        (0.0, 0.0, 0.0, 0.0),
        (-0.02 + 0.1j, 0.0j, 0.5 + 0j, -0.02 + 0.1j),
    ],
)
def test_expm2_gradient_is_finite_and_right_at_degenerate_point(entries):
    grads, ref = _expm2_grad_vs_matrix_exp(entries, 10.0)
    for g, r in zip(grads, ref, strict=True):
        assert torch.isfinite(torch.as_tensor(g)).all()
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_expm2_gradient_finite_at_degenerate_point_long_interval():
    grads, _ = _expm2_grad_vs_matrix_exp((-1e-3, 0.0, 0.0, -1e-3), 1000.0)
    assert all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- relaxation


def test_single_pool_relaxation_and_recovery():
    t1, t2 = torch.tensor([800.0], dtype=F64), torch.tensor([60.0], dtype=F64)
    op = ops.relaxation(7.0, t1_ms=t1, t2_ms=t2, df_hz=torch.tensor([25.0], dtype=F64))
    s = _state(complex(0.3, -0.4), 0.5)
    out = ops.recover(ops.relax(s, op), op)
    fp = complex(out[0, 0, 0, 0], out[0, 1, 0, 0])
    expected = complex(0.3, -0.4) * math.exp(-7 / 60) * np.exp(-2j * math.pi * 25.0 * 7e-3)
    assert abs(fp - expected) < OP_TOL
    assert abs(complex(out[0, 2, 0, 0], out[0, 3, 0, 0]) - expected.conjugate()) < OP_TOL
    e1 = math.exp(-7 / 800)
    assert abs(float(out[0, 4, 0, 0]) - (0.5 * e1 + 1 - e1)) < OP_TOL


def test_precess_matches_relaxation_phase():
    s = _random_consistent_state(3)[:1]
    df = torch.tensor([17.0, -3.0], dtype=F64)
    op = ops.relaxation(
        4.0, t1_ms=torch.full((2,), 1e30, dtype=F64), t2_ms=torch.full((2,), 1e30, dtype=F64), df_hz=df
    )
    torch.testing.assert_close(ops.precess(s, df, 4.0), ops.relax(s, op), rtol=0, atol=OP_TOL)


def test_spoil_keeps_only_z():
    s = _random_consistent_state(3)
    out = ops.spoil(s)
    assert torch.all(out[:, :4] == 0)
    torch.testing.assert_close(out[:, 4:], s[:, 4:], rtol=0, atol=0)


# ---------------------------------------------------------------- diffusion

GAMMA_RAD_PER_S_PER_T = 2 * math.pi * 42.58e6  # the value EPG-X's diffusion code uses


def test_diffusion_weights_single_lobe_closed_form_and_mirror():
    g, tau, d, k = 30.0, 4.0, 2.0, 8
    w_fp, w_fm, w_z = ops.diffusion_weights(
        torch.tensor([g]), torch.tensor([tau]), torch.tensor([d], dtype=F64), k
    )
    dk = GAMMA_RAD_PER_S_PER_T * g * 1e-3 * tau * 1e-3
    n = np.arange(k)
    tau_s, d_si = tau * 1e-3, d * 1e-9
    b_fp = tau_s / 3 * dk**2 * (n**2 + n * (n + 1) + (n + 1) ** 2)
    np.testing.assert_allclose(w_fp[:, 0].numpy(), np.exp(-b_fp * d_si), rtol=1e-13)
    np.testing.assert_allclose(w_z[:, 0].numpy(), np.exp(-((n * dk) ** 2) * tau_s * d_si), rtol=1e-13)
    # F-ₙ stores F₋ₙ, whose path −nΔk → −(n−1)Δk mirrors F+ₙ₋₁'s (n−1)Δk → nΔk
    torch.testing.assert_close(w_fm[1:], w_fp[:-1], rtol=1e-14, atol=0)
    assert float(w_fm[0]) == float(w_fp[0])
    _, w_fm_epgx, _ = ops.diffusion_weights(
        torch.tensor([g]), torch.tensor([tau]), torch.tensor([d], dtype=F64), k, negative_orders="epgx"
    )
    torch.testing.assert_close(w_fm_epgx, w_fp, rtol=0, atol=0)


def test_diffusion_weights_piecewise_waveform():
    """Two lobes (G, −G/2): b is the integral of k(t)² along the path, done by quadrature here."""
    g = torch.tensor([40.0, -20.0], dtype=F64)
    tau = torch.tensor([2.0, 3.0], dtype=F64)
    k = 4
    w_fp, w_fm, _ = ops.diffusion_weights(g, tau, torch.tensor([1.0], dtype=F64), k)
    rates = GAMMA_RAD_PER_S_PER_T * g.numpy() * 1e-3  # rad/m/s
    dk = float((rates * tau.numpy() * 1e-3).sum())
    for n in range(k):
        for sign, w in ((1, w_fp), (-1, w_fm)):
            kk, b = sign * n * dk, 0.0
            for r, ts in zip(rates, tau.numpy() * 1e-3, strict=True):
                x = np.linspace(0, ts, 2001)
                kt = kk + r * x
                b += np.trapezoid(kt**2, x)
                kk = kt[-1]
            assert abs(float(w[n, 0]) - math.exp(-b * 1e-9)) < 1e-9


# ---------------------------------------------------------------- flow


def test_flow_matches_moving_isochromats():
    """N isochromats over one dephasing period λ = 2π/Δk, all moving at velocity v.

    Over an interval of length τ with a constant gradient of moment Δk, an isochromat at
    x(t) = x₀ + v t gains the phase −(Δk/τ)∫x dt = −Δk (x₀ + vτ/2) (same sign as off-resonance:
    e^{−iωt}). The mean Mxy is F₀ exactly while N exceeds the highest order reached.
    """
    n_iso, n_pulses = 64, 10
    t1, t2, tau = 500.0, 80.0, 5.0
    lam = 1.0
    dk = 2 * math.pi / lam
    v = 0.013 * lam / tau  # θ = vτΔk = 0.0817 rad per interval
    theta = v * tau * dk
    rng = np.random.default_rng(0)
    flips, phases = rng.uniform(0.3, 2.8, n_pulses), rng.uniform(-math.pi, math.pi, n_pulses)

    x = np.arange(n_iso) / n_iso * lam
    m = np.zeros((3, n_iso))
    m[2] = 1.0
    e1, e2 = math.exp(-tau / t1), math.exp(-tau / t2)
    oracle = []
    for j in range(n_pulses):
        m = _rotation(flips[j], phases[j]) @ m
        oracle.append(np.mean(m[0] + 1j * m[1]))
        mxy = (m[0] + 1j * m[1]) * e2 * np.exp(-1j * dk * (x + v * tau / 2))
        m = np.stack([mxy.real, mxy.imag, m[2] * e1 + 1 - e1])
        x = x + v * tau

    state = ops.equilibrium(torch.ones(1, 1, dtype=F64), n_pulses + 1)
    op = ops.relaxation(tau, t1_ms=torch.tensor([t1], dtype=F64), t2_ms=torch.tensor([t2], dtype=F64))
    epg = []
    for j in range(n_pulses):
        state = ops.rf(
            state, ops.rf_matrix(torch.tensor(flips[j], dtype=F64), torch.tensor(phases[j], dtype=F64))
        )
        epg.append(complex(state[0, 0, 0, 0], state[0, 1, 0, 0]))
        state = ops.relax(state, op)
        state = ops.flow(state, torch.tensor([theta], dtype=F64))
        state = ops.recover(ops.shift(state, 1), op)
    static = _static_f0(flips, phases, t1, t2, tau, n_pulses)
    assert np.max(np.abs(np.array(oracle) - static)) > 1e-3  # the flow is visible
    np.testing.assert_allclose(np.array(epg), np.array(oracle), rtol=0, atol=ORACLE_TOL)


def _static_f0(flips, phases, t1, t2, tau, n_pulses) -> np.ndarray:
    state = ops.equilibrium(torch.ones(1, 1, dtype=F64), n_pulses + 1)
    op = ops.relaxation(tau, t1_ms=torch.tensor([t1], dtype=F64), t2_ms=torch.tensor([t2], dtype=F64))
    out = []
    for j in range(n_pulses):
        state = ops.rf(
            state, ops.rf_matrix(torch.tensor(flips[j], dtype=F64), torch.tensor(phases[j], dtype=F64))
        )
        out.append(complex(state[0, 0, 0, 0], state[0, 1, 0, 0]))
        state = ops.recover(ops.shift(ops.relax(state, op), 1), op)
    return np.array(out)
