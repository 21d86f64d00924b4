"""Pure-torch EPG / EPG-X operators: the reference twin of the fused kernels.

State layout
------------
An EPG state is a real tensor ``[P, 6, K, B]``: P pools (1 single, 2 for BM and MT),
six planes per pool ``(F+ re, F+ im, F- re, F- im, Z re, Z im)``, configuration orders
n = 0..K-1, and B spins (the flattened tissue batch, last so per-spin parameters
broadcast along contiguous memory). As in EPG-X, F-ₙ is stored as conj(F₋ₙ), so
F+₀ = conj(F-₀). For MT tissue the bound pool b has longitudinal states only; its
transverse planes stay zero.

Every operator is a pure function ``state -> new state`` and differentiable with
torch autograd. Angles are radians and times ms here (the public engines convert
degrees and s⁻¹ at their edge).

References
----------
- Weigel M. Extended phase graphs: dephasing, RF pulses, and echoes - pure and simple.
  JMRI 2015;41:266-295.
- Weigel M, Schwenk S, Kiselev VG, Scheffler K, Hennig J. Extended phase graphs with
  anisotropic diffusion. JMR 2010;205:276-285.
- Malik SJ, Teixeira RPAG, Hajnal JV. Extended phase graph formalism for systems with
  magnetization transfer and exchange. MRM 2018;80:767-779 (EPG-X).
- Gloor M, Scheffler K, Bieri O. Quantitative magnetization transfer imaging using
  balanced SSFP. MRM 2008;60:691-700.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.autograd.forward_ad as fwAD

# Gyromagnetic ratios exactly as EPG-X uses them (MT saturation and diffusion differ in
# their last digits there; matching EPG-X to rounding needs both).
GAMMA_RAD_PER_MS_PER_UT = 267.5221e-3
GAMMA_RAD_PER_S_PER_MT = 42.58e6 * 1e-3 * 2 * math.pi

FP_RE, FP_IM, FM_RE, FM_IM, Z_RE, Z_IM = range(6)

# |x t²| below which cosh(t√x) and sinh(t√x)/√x use their series (error < 1e-16).
_SERIES_LIMIT = 1e-3


def is_transformed(t: torch.Tensor | None) -> bool:
    """True for a tensor that a ``torch.func`` transform (vmap, jvp, jacfwd, grad) wraps.

    Such tensors must not steer Python control flow by their values: the engines take
    their data-independent paths for them instead of the value-dependent fast paths.
    """
    return t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t)


def differentiated(t: torch.Tensor | None) -> bool:
    """True if ``t`` may carry derivatives or a ``vmap`` batch, so values must not steer.

    Value-dependent simplifications (a zero off-resonance, one B1 for every spin) would
    drop derivatives, and under ``vmap`` cannot be evaluated at all. Inside ``torch.func``
    every tensor is wrapped, even constants; one level of ``jvp``/``grad`` wrapping is
    resolved exactly (tangent or requires_grad at that level, or autograd on the plain
    tensor beneath), deeper nesting or any ``vmap`` batch counts as differentiated.
    """
    if t is None:
        return False
    if t.requires_grad:
        return True
    if not is_transformed(t):
        return fwAD.unpack_dual(t).tangent is not None
    base, depth = t, 0
    while is_transformed(base):
        if torch._C._functorch.is_batchedtensor(base):
            return True
        base, depth = torch._C._functorch.get_unwrapped(base), depth + 1
    return depth > 1 or base.requires_grad or fwAD.unpack_dual(t).tangent is not None


def primal(t: torch.Tensor) -> torch.Tensor:
    """The plain values under any ``torch.func`` wrappers, detached: for validation only.

    Under ``vmap`` this is the whole batch, so a check on it covers every sample.
    """
    while is_transformed(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t.detach()


def empty_state(
    n_pools: int, n_states: int, n_spins: int, *, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """An all-zero state ``[n_pools, 6, n_states, n_spins]``."""
    return torch.zeros(n_pools, 6, n_states, n_spins, dtype=dtype, device=device)


def equilibrium(m0: torch.Tensor, n_states: int) -> torch.Tensor:
    """State at thermal equilibrium: Z₀ = M0 of each pool, everything else zero.

    Args:
        m0: ``[P, B]`` equilibrium magnetisation per pool and spin.
        n_states: number of configuration orders K to allocate.
    """
    p, b = m0.shape
    zeros = m0.new_zeros(p, 4, 1, b)
    z0 = torch.cat([zeros, m0.reshape(p, 1, 1, b), m0.new_zeros(p, 1, 1, b)], dim=1)
    return resize(z0, n_states)


def resize(state: torch.Tensor, n_states: int) -> torch.Tensor:
    """Keep orders 0..n_states-1: truncate, or pad the new orders with zeros."""
    k = state.shape[2]
    if n_states <= k:
        return state[:, :, :n_states]
    pad = state.new_zeros(state.shape[0], 6, n_states - k, state.shape[3])
    return torch.cat([state, pad], dim=2)


def rf_matrix(flip_rad: torch.Tensor, phase_rad: torch.Tensor) -> torch.Tensor:
    """Weigel's RF rotation as a real 6×6 matrix acting on (F+, F-, Z) re/im planes.

    The complex 3×3 matrix on (F+ₙ, conj F₋ₙ, Zₙ) for flip α and phase φ is (Weigel
    2015, eq. 15)::

        [[cos²(α/2),           e^{2iφ} sin²(α/2),  -i e^{iφ} sin α],
         [e^{-2iφ} sin²(α/2),  cos²(α/2),           i e^{-iφ} sin α],
         [-i/2 e^{-iφ} sin α,  i/2 e^{iφ} sin α,    cos α]]

    Args:
        flip_rad: flip angle(s), radians, any shape ``S``.
        phase_rad: RF phase(s), radians, broadcastable with ``flip_rad``.

    Returns:
        ``[*S, 6, 6]`` real matrix, rows/columns in plane order
        (F+ re, F+ im, F- re, F- im, Z re, Z im).
    """
    a, p = torch.broadcast_tensors(flip_rad, phase_rad)
    c2 = torch.cos(a / 2) ** 2
    s2 = torch.sin(a / 2) ** 2
    sa = torch.sin(a)
    ca = torch.cos(a)
    cp, sp = torch.cos(p), torch.sin(p)
    c2p, s2p = torch.cos(2 * p), torch.sin(2 * p)
    zero = torch.zeros_like(a)
    # complex entries (re, im) of the 3×3 matrix, row-major
    t = [
        [(c2, zero), (c2p * s2, s2p * s2), (sp * sa, -cp * sa)],
        [(c2p * s2, -s2p * s2), (c2, zero), (sp * sa, cp * sa)],
        [(-0.5 * sp * sa, -0.5 * cp * sa), (-0.5 * sp * sa, 0.5 * cp * sa), (ca, zero)],
    ]
    rows = []
    for i in range(3):
        re_row, im_row = [], []
        for j in range(3):
            tr, ti = t[i][j]
            re_row += [tr, -ti]  # Re(T x) = Tr xr - Ti xi
            im_row += [ti, tr]  # Im(T x) = Ti xr + Tr xi
        rows += [torch.stack(re_row, -1), torch.stack(im_row, -1)]
    return torch.stack(rows, -2)


def mt_saturation(b1sq_tau_ut2ms: torch.Tensor, lineshape_us: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """Bound-pool saturation factor exp(−W·T) of one pulse (Gloor 2008; EPG-X).

    W·T = π γ² (b1² ∫B1² dt) G, with G the absorption lineshape in ms.

    Args:
        b1sq_tau_ut2ms: nominal ∫B1² dt of the pulse, µT²·ms.
        lineshape_us: bound-pool lineshape G at the pulse offset, µs (per spin).
        b1: transmit scale per spin (the energy scales with b1²).
    """
    wt = math.pi * GAMMA_RAD_PER_MS_PER_UT**2 * (b1 * b1) * b1sq_tau_ut2ms * lineshape_us * 1e-3
    return torch.exp(-wt)


def rf(
    state: torch.Tensor,
    matrix: torch.Tensor,
    *,
    bound_only_z: bool = False,
    saturation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply an RF pulse to every order of every pool (identically, as in EPG-X BM).

    Args:
        state: ``[P, 6, K, B]``.
        matrix: ``[6, 6]`` shared by all spins, or ``[B, 6, 6]`` per spin (B1 maps),
            from :func:`rf_matrix`.
        bound_only_z: MT tissue: pool 1 has no transverse states and is not rotated;
            its Z is multiplied by ``saturation`` instead.
        saturation: ``[B]`` exp(−W·T) for the bound pool (MT only).
    """
    p, _, k, b = state.shape
    rotate = state[:1] if bound_only_z else state
    if matrix.ndim == 2:
        out = torch.matmul(matrix, rotate.reshape(rotate.shape[0], 6, k * b))
        out = out.reshape(rotate.shape)
    else:
        out = torch.einsum("bij,pjkb->pikb", matrix, rotate)
    if not bound_only_z:
        return out
    bound = state[1:]
    if saturation is not None:
        bound = bound * saturation
    return torch.cat([out, bound], dim=0)


@dataclass(frozen=True)
class Relaxation:
    """Relaxation/exchange over one interval, per spin (see :func:`relaxation`).

    Attributes:
        xt_re, xt_im: ``[P, P, B]`` transverse propagator for F+ (F- uses its
            conjugate); ``xt_im`` is None where it is identically zero.
        xl: ``[P, P, B]`` longitudinal propagator.
        recovery: ``[P, B]`` recovery added to Z₀ (M0 − xl·M0).
    """

    xt_re: torch.Tensor
    xt_im: torch.Tensor | None
    xl: torch.Tensor
    recovery: torch.Tensor

    @cached_property
    def planes(self) -> torch.Tensor:
        """``[P, P, 6, 1, B]`` per-plane propagator (transverse on planes 0-3, Z on 4-5).

        Built once per interval type and reused every step of a train.
        """
        p, _, b = self.xl.shape
        x = torch.cat(
            [self.xt_re.unsqueeze(2).expand(p, p, 4, b), self.xl.unsqueeze(2).expand(p, p, 2, b)], 2
        )
        return x.unsqueeze(3)


def expm2(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, t: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form exp(t·[[a, b], [c, d]]) for real or complex entries.

    With μ = (a+d)/2 and q² = ((a−d)/2)² + bc (Cayley–Hamilton),
    exp(tM) = e^{μt}[cosh(qt) I + sinh(qt)/q (M − μI)]. The equal-eigenvalue limit
    q → 0 uses the series of cosh and sinh(x)/x, so values and gradients stay finite.
    Eigenvalue exponentials are formed directly, so large t·|q| does not overflow.

    Returns:
        the four entries (x00, x01, x10, x11).
    """
    mu = (a + d) / 2
    h = (a - d) / 2
    q2 = h * h + b * c
    y = q2 * (t * t)
    small = y.abs() < _SERIES_LIMIT
    # series branch: e^{μt}·cosh(qt) and e^{μt}·sinh(qt)/q
    emu = torch.exp(mu * t)
    c_ser = emu * (1 + y / 2 + y * y / 24 + y * y * y / 720)
    s_ser = emu * t * (1 + y / 6 + y * y / 120 + y * y * y / 5040)
    # eigenvalue branch on a stand-in where unused: q·t = 1 cannot overflow, so its
    # (discarded) gradient stays finite
    tt = torch.as_tensor(t * t, dtype=y.real.dtype, device=y.device).clamp_min(1e-30)
    q2_safe = torch.where(small, (1 / tt).to(q2.dtype), q2)
    q = torch.sqrt(q2_safe if q2_safe.is_complex() else q2_safe.to(_complex(q2_safe.dtype)))
    ep = torch.exp((mu + q) * t)
    em = torch.exp((mu - q) * t)
    c_eig = (ep + em) / 2
    s_eig = (ep - em) / (2 * q)
    if not q2.is_complex():
        c_eig, s_eig = c_eig.real, s_eig.real
    cc = torch.where(small, c_ser, c_eig)
    ss = torch.where(small, s_ser, s_eig)
    return cc + ss * h, ss * b, ss * c, cc - ss * h


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def relaxation(
    dt_ms: torch.Tensor | float,
    *,
    t1_ms: torch.Tensor,
    t2_ms: torch.Tensor,
    df_hz: torch.Tensor | None = None,
    t1b_ms: torch.Tensor | None = None,
    t2b_ms: torch.Tensor | None = None,
    f: torch.Tensor | None = None,
    k_ab_per_ms: torch.Tensor | None = None,
    df_b_hz: torch.Tensor | None = None,
    transverse_b: bool = True,
) -> Relaxation:
    """Relaxation, exchange and off-resonance over ``dt_ms`` as closed-form propagators.

    Single pool: E2 = exp(−t/T2)·e^{−i2π·df·t}, E1 = exp(−t/T1), recovery 1 − E1.
    Two pools (Bloch–McConnell, EPG-X): with k_ba = k_ab (1−f)/f,

        Λ_T = [[−R2a − k_ab, k_ba], [k_ab, −R2b − k_ba − i2π·df_b]]  (F+; F- conjugate)
        Λ_L = [[−R1a − k_ab, k_ba], [k_ab, −R1b − k_ba]]

    propagators exp(tΛ) in closed form (:func:`expm2`), off-resonance df as a common
    phase, and recovery M0 − exp(tΛ_L)·M0 on Z₀ (equal to EPG-X's (Ξ_L − I)Λ_L⁻¹C_L by
    detailed balance). MT (``transverse_b=False``): pool b has no transverse states.

    Args:
        dt_ms: interval, ms (number or scalar tensor).
        t1_ms, t2_ms: pool-a relaxation times, ``[B]``, ms.
        df_hz: off-resonance, ``[B]``, Hz (None: on resonance).
        t1b_ms, t2b_ms, f, k_ab_per_ms, df_b_hz: pool-b parameters ``[B]`` (rates in
            ms⁻¹ here); None for a single pool.
        transverse_b: False for MT (bound pool without transverse states).
    """
    two_pool = t1b_ms is not None
    phase = None
    if df_hz is not None and (differentiated(df_hz) or bool((df_hz != 0).any())):
        theta = -2 * math.pi * 1e-3 * df_hz * dt_ms
        phase = (torch.cos(theta), torch.sin(theta))
    if not two_pool:
        e2 = torch.exp(-dt_ms / t2_ms)
        e1 = torch.exp(-dt_ms / t1_ms)
        xt_re = e2 if phase is None else e2 * phase[0]
        xt_im = None if phase is None else e2 * phase[1]
        one = lambda x: x.reshape(1, 1, -1)  # noqa: E731
        return Relaxation(one(xt_re), None if xt_im is None else one(xt_im), one(e1), (1 - e1).reshape(1, -1))
    assert f is not None and k_ab_per_ms is not None and t1b_ms is not None
    ka = k_ab_per_ms
    kb = ka * (1 - f) / f
    m0 = torch.stack([1 - f, f])
    xl = expm2(-1 / t1_ms - ka, kb, ka, -1 / t1b_ms - kb, dt_ms)
    xl_m = torch.stack([torch.stack(xl[:2]), torch.stack(xl[2:])])  # [2, 2, B]
    recovery = m0 - torch.einsum("ijb,jb->ib", xl_m, m0)
    if transverse_b:
        assert t2b_ms is not None
        d = -1 / t2b_ms - kb
        if df_b_hz is not None and (differentiated(df_b_hz) or bool((df_b_hz != 0).any())):
            d = torch.complex(d, -2 * math.pi * 1e-3 * df_b_hz)
            a, b_, c = (x.to(d.dtype) for x in (-1 / t2_ms - ka, kb, ka))
        else:
            a, b_, c = -1 / t2_ms - ka, kb, ka
        xt = expm2(a, b_, c, d, dt_ms)
        xt_c = torch.stack([torch.stack(xt[:2]), torch.stack(xt[2:])])
    else:
        e2 = torch.exp(-dt_ms / t2_ms)
        z = torch.zeros_like(e2)
        xt_c = torch.stack([torch.stack([e2, z]), torch.stack([z, z])])
    if xt_c.is_complex():
        xt_re, xt_im = xt_c.real, xt_c.imag
    else:
        xt_re, xt_im = xt_c, None
    if phase is not None:
        c, s = phase
        im = torch.zeros_like(xt_re) if xt_im is None else xt_im
        xt_re, xt_im = xt_re * c - im * s, xt_re * s + im * c
    return Relaxation(xt_re, xt_im, xl_m, recovery)


def relax(
    state: torch.Tensor,
    op: Relaxation,
    weights: tuple[torch.Tensor, ...] | None = None,
    *,
    with_recovery: bool = False,
) -> torch.Tensor:
    """Apply relaxation/exchange (optional per-order diffusion weights and recovery).

    F+ is multiplied by the complex propagator X, the stored F- (= conj F₋ₙ) by
    conj(X), and Z by the real longitudinal propagator; pools mix through X. Recovery
    only touches Z₀ and commutes with :func:`shift`, so adding it here equals EPG-X's
    relax → shift → recover.

    Args:
        state: ``[P, 6, K, B]``.
        op: from :func:`relaxation`.
        weights: optional ``(w_fp, w_fm, w_z)``, each ``[K, B]`` or ``[K, 1]``,
            multiplying F+, stored F- and Z of each order (diffusion); recovery is
            not weighted.
        with_recovery: also add ``op.recovery`` to Re Z₀ (see :func:`recover`).
    """
    p, _, k, b = state.shape
    x = op.planes
    if weights is not None:
        w_fp, w_fm, w_z = weights
        w = torch.stack([w_fp, w_fp, w_fm, w_fm, w_z, w_z])  # [6, K, B or 1]
    rot = None
    if op.xt_im is not None:
        # i·F+ = (−Im, Re); conj(X)·F- adds −i·Im(X)·F-, i.e. (+Im, −Re) per unit Im(X)
        rot = torch.stack([-state[:, 1], state[:, 0], state[:, 3], -state[:, 2]], dim=1)
        xi = op.xt_im.reshape(p, p, 1, 1, b)
    outs = []
    for o in range(p):
        acc = state[0] * x[o, 0]
        for i in range(1, p):
            acc = torch.addcmul(acc, state[i], x[o, i])
        if rot is not None:
            tr = acc[:4]
            for i in range(p):
                tr = torch.addcmul(tr, rot[i], xi[o, i])
            acc = torch.cat([tr, acc[4:]])
        outs.append(acc)
    out = torch.stack(outs)
    if weights is not None:
        out = out * w
    if with_recovery:
        out = recover(out, op)
    return out


def recover(state: torch.Tensor, op: Relaxation) -> torch.Tensor:
    """Add the longitudinal recovery of :func:`relaxation` to Re Z₀ only."""
    p, _, k, b = state.shape
    onehot = state.new_zeros(1, 6, k, 1)
    onehot[0, Z_RE, 0] = 1
    return torch.addcmul(state, onehot, op.recovery.reshape(p, 1, 1, b))


def shift(state: torch.Tensor, n: int = 1) -> torch.Tensor:
    """Dephase by n orders (a gradient moment of n·Δk): F̃ₖ → F̃ₖ₊ₙ, Z unchanged.

    On the two-sided series F̃ₖ (F̃ₖ = F+ₖ for k ≥ 0, conj(F-₋ₖ) for k < 0) a shift
    moves the origin: for n > 0, F+ₖ ← F+ₖ₋ₙ (k ≥ n) or conj(F-ₙ₋ₖ) (k < n), and
    F-ₖ ← F-ₖ₊ₙ. Orders pushed past K−1 are dropped; orders entering from beyond are
    zero (EPG-X's truncation). n may be negative (rewinding).
    """
    if n == 0:
        return state
    k = state.shape[2]
    m = abs(n)
    if m >= k:  # orders beyond K-1 are zero: pad, shift, cut
        return resize(shift(resize(state, m + 1), n), k)
    up, down = (slice(0, 2), slice(2, 4)) if n > 0 else (slice(2, 4), slice(0, 2))
    grow, fall = state[:, up], state[:, down]
    # conj of the orders that cross zero, in reversed order: F̃ₖ₋ₙ for k < n
    crossing = fall[:, :, 1 : m + 1].flip(2) * state.new_tensor([1.0, -1.0]).reshape(1, 2, 1, 1)
    new_grow = torch.cat([crossing, grow[:, :, : k - m]], dim=2)
    new_fall = torch.cat([fall[:, :, m:], fall.new_zeros(fall.shape[0], 2, m, fall.shape[3])], dim=2)
    tr = [new_grow, new_fall] if n > 0 else [new_fall, new_grow]
    return torch.cat([*tr, state[:, 4:]], dim=1)


def precess(state: torch.Tensor, df_hz: torch.Tensor, dt_ms: torch.Tensor | float) -> torch.Tensor:
    """Off-resonance precession over dt: F+ₙ → F+ₙ·e^{−i2π·df·t} (F- conjugately), Z fixed.

    Args:
        df_hz: ``[B]`` off-resonance per spin, Hz.
    """
    theta = -2 * math.pi * 1e-3 * df_hz * dt_ms
    c, s = torch.cos(theta), torch.sin(theta)
    fp_re, fp_im, fm_re, fm_im = (state[:, i] for i in range(4))
    planes = [fp_re * c - fp_im * s, fp_re * s + fp_im * c, fm_re * c + fm_im * s, fm_im * c - fm_re * s]
    return torch.cat([torch.stack(planes, dim=1), state[:, 4:]], dim=1)


def readout(
    f0_re: torch.Tensor,
    f0_im: torch.Tensor,
    cos_phase: torch.Tensor | None = None,
    sin_phase: torch.Tensor | None = None,
) -> torch.Tensor:
    """The recorded echo i·F₀ from the real and imaginary parts of F+₀ (summed over the
    pools that contribute), demodulated by the pulse phase, i·F₀·e^{−iφ}, when cos φ and
    sin φ are given (GRE readouts, Weigel 2015); complex, shape of ``f0_re``."""
    if cos_phase is not None:
        assert sin_phase is not None
        f0_re, f0_im = f0_re * cos_phase + f0_im * sin_phase, f0_im * cos_phase - f0_re * sin_phase
    return torch.complex(-f0_im, f0_re)


def spoil(state: torch.Tensor) -> torch.Tensor:
    """Ideal spoiling: every transverse state set to zero, Z kept."""
    return torch.cat([torch.zeros_like(state[:, :4]), state[:, 4:]], dim=1)


def diffusion_weights(
    grad_mt_per_m: torch.Tensor,
    tau_ms: torch.Tensor,
    d_um2_per_ms: torch.Tensor,
    n_states: int,
    *,
    negative_orders: str = "physical",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-order diffusion attenuation over one shift interval (Weigel 2010).

    The interval's gradient waveform is piecewise constant: amplitudes G_j (mT/m) for
    durations τ_j (ms); Δk = γ Σ G_j τ_j is one order. A state that starts the interval
    at k₀ = nΔk follows k_{j+1} = k_j + γG_jτ_j and is attenuated by exp(−b·D) with
    b = Σ_j τ_j/3 (k_j² + k_j k_{j+1} + k_{j+1}²) (transverse) and b = (nΔk)² Σ τ_j
    (longitudinal, k fixed).

    ``negative_orders="physical"`` attenuates the stored F-ₙ (= conj F₋ₙ) by the
    b-value of its own path k₀ = −nΔk. ``"epgx"`` reproduces EPG-X, which applies the
    +n value to F-ₙ too (quirks.json); use it only to match EPG-X outputs.

    Args:
        grad_mt_per_m: ``[J]`` gradient amplitudes, mT/m.
        tau_ms: ``[J]`` durations, ms.
        d_um2_per_ms: ``[B]`` diffusion coefficient per spin, µm²/ms (= 1e-9 m²/s).
        n_states: orders n = 0..n_states−1.

    Returns:
        ``(w_fp, w_fm, w_z)``, each ``[n_states, B]``.
    """
    if negative_orders not in ("physical", "epgx"):
        raise ValueError(f"negative_orders must be 'physical' or 'epgx', got {negative_orders!r}.")
    dtype = d_um2_per_ms.dtype
    g = grad_mt_per_m.to(torch.float64)
    tau_s = tau_ms.to(torch.float64) * 1e-3
    steps = GAMMA_RAD_PER_S_PER_MT * g * tau_s  # rad/m per segment
    dk = steps.sum()
    n = torch.arange(n_states, dtype=torch.float64, device=g.device)

    def b_trans(k0: torch.Tensor) -> torch.Tensor:
        ki = k0
        total = torch.zeros_like(k0)
        for j in range(g.shape[0]):
            kf = ki + steps[j]
            total = total + tau_s[j] / 3 * (ki * ki + kf * kf + ki * kf)
            ki = kf
        return total

    d_si = d_um2_per_ms.reshape(1, -1) * 1e-9  # m²/s
    b_long = (n * dk) ** 2 * tau_s.sum()
    b_fp = b_trans(n * dk)
    b_fm = b_fp if negative_orders == "epgx" else b_trans(-n * dk)
    w = [torch.exp(-b.to(dtype).reshape(-1, 1) * d_si) for b in (b_fp, b_fm, b_long)]
    return w[0], w[1], w[2]


def flow(state: torch.Tensor, phase_per_order_rad: torch.Tensor) -> torch.Tensor:
    """Velocity-dependent phase of one shift interval, applied before the shift.

    For spins moving at constant velocity v along a gradient whose moment over the
    interval is one order Δk, a state starting at k₀ = nΔk gains the phase
    θ·(n + 1/2) (transverse, k sweeps k₀ → k₀+Δk) and Zₙ gains θ·n, with
    θ = v·τ·Δk (Weigel 2010, section on flow). Stored F-ₙ (= conj F₋ₙ) gets
    −θ·(−n + 1/2).

    Args:
        state: ``[P, 6, K, B]``.
        phase_per_order_rad: ``[B]`` θ = v τ Δk per spin, radians.
    """
    k = state.shape[2]
    n = torch.arange(k, dtype=state.dtype, device=state.device).reshape(-1, 1)
    theta = phase_per_order_rad.reshape(1, -1)
    out = []
    for plane, ph in ((0, theta * (n + 0.5)), (2, theta * (n - 0.5)), (4, theta * n)):
        c, s = torch.cos(ph), torch.sin(ph)
        re, im = state[:, plane], state[:, plane + 1]
        out += [re * c - im * s, re * s + im * c]
    return torch.stack(out, dim=1)
