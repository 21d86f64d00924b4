"""Reverse mode of the whole-train kernel: the adjoint EPG-X recursion with checkpoints.

The backward of :mod:`epgx.kernels.epg_train`. Each step of the train is affine in the
state, x' = A x + c (A = T(b1·α, φ) for a pulse, S Ξ for an interval, c the recovery on
Z₀), and each echo is a linear read of F+₀. For a loss L with upstream gradient g of the
echoes, the adjoint λ = ∂L/∂x runs backwards in time through the transposed operators
(Giles 2008, sec. 2; the adjoint EPG of Wang et al. 2019)::

    λ ← Aᵀ λ + (echo read)ᵀ g,   ∂L/∂θ += ⟨λ', (∂A/∂θ) x + ∂c/∂θ⟩,

with x the forward state entering the step and λ' the adjoint leaving it. The transposes,
on the real/imaginary planes of :mod:`epgx.kernels.epg_train`:

- shift: Sᵀ moves F+ down and F- up one order, and sends λ(F+₀) to F-₁ (conjugated);
- relaxation/exchange: Ξᵀ is the conjugate transpose of the complex pool matrix on F+
  (its transpose on the stored F-) and the transpose of the real one on Z;
- Weigel's rotation: Tᵀ = D T(−α, φ) D⁻¹ with D = diag(1, 1, 1, 1, 2, 2) on
  (F+, F-, Z) (T rotates (Mx, My, Mz) orthogonally; the F± basis weighs Z by two);
- MT saturation exp(−W·T) of the bound pool's Z is its own transpose.

∂A/∂α and ∂A/∂φ of the rotation are the closed forms of ``epg_train._drf``, contracted
with λ in place. Relaxation is never inverted (it is unstable backwards): the forward
states are recomputed from checkpoints instead (Griewank & Walther 2000, "revolve" with
one level). With T = n_pulses steps (step j: pulse j and what follows it up to the next
pulse: GRE its echo and TR; FSE ESP/2, echo j − 1, ESP/2, the excitation ESP/2 only) and
segments of C = ⌈√T⌉ steps, one program (a block of spins, state in registers as in
``_fwd``):

1. sweeps the train forward, storing the state at the start of every segment
   (⌈T/C⌉ checkpoints per spin, global memory);
2. walks the segments from the last: reloads the segment's checkpoint, recomputes its C
   step-entry states into a per-program scratch buffer, then runs the adjoint backwards
   through them, recomputing each step's intermediate states (after the pulse, after
   the FSE half interval) in registers from its entry state.

The sweep and the reruns are one loop, so the forward step is compiled once.

Per-spin gradients (propagators Ξ, recovery, start state Z₀, B1 through b1·α, MT W·T)
accumulate in registers and are written once; per-pulse gradients (flip, phase, ∫B1²)
are reduced over the program's spins and written to a ``[3, n_pulses, n_programs]``
buffer that the host sums (no atomics).

Cost. About 1 + 1 + 3 forward passes of arithmetic for every gradient at once (forward
sweep, recompute, adjoint step with its in-register recompute and the gradient dot
products), whatever the number of pulses; global memory (⌈T/C⌉ + C) ≈ 2√T states per
spin, in chunks of spins within ``ADJOINT_BUFFER_BYTES``.

References
----------
- Giles MB. Collected matrix derivative results for forward and reverse mode
  algorithmic differentiation. In: Advances in Automatic Differentiation, 2008:35-44.
- Griewank A, Walther A. Algorithm 799: revolve. ACM TOMS 2000;26:19-45.
- Wang X, Tan Z, Scholand N, Roeloffs V, Uecker M. Physics-based reconstruction methods
  for MRI (adjoint EPG for sequence optimisation). Phil Trans R Soc A 2021;379:20200196.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from epgx.kernels.epg_train import (
    _INPUTS,
    _N_IN,
    _PER_PULSE,
    _PER_SPIN,
    _PULSE_ROWS,
    _STATE_REGS_PER_PROGRAM,
    INTERPRETED,
    _block_spins,
    _check_inputs,
    _check_train,
    _echo_value,
    _f0,
    _first_order,
    _fold_spins,
    _interval,
    _load_spins,
    _no_second_order,
    _no_setup,
    _phase_products,
    _primal_shapes,
    _pulse,
    _pulse_table,
    _relax1,
    _relax2,
    _relax_mt,
    _rf,
    _rf_coefficients,
)
from torch import Tensor
from torch.library import custom_op

ADJOINT_BUFFER_BYTES = 4 << 30
"""Most bytes of checkpoint + scratch states one backward launch allocates; more spins run
in chunks (a few GiB: a fraction of an 80 GB GPU beside the caller's tensors, and still
thousands of programs per chunk)."""

# States live in the registers of one adjoint step at its widest (FSE): the entry state,
# the state after the pulse, after the half interval, and the adjoint.
_LIVE_STATES = 4
# Rows of the per-pulse gradient buffer: flip, phase, ∫B1².
_GRAD_PULSE_ROWS = 3


@triton.jit
def _save(p, o_s, a, b, PLANE: tl.constexpr, TWO_POOL: tl.constexpr, MT: tl.constexpr):
    """Store a state (pool a, pool b) at slot p; planes PLANE apart, o_s the offsets in one.

    MT stores only the bound pool's Z planes (its transverse planes stay zero).
    """
    tl.store(p + o_s, a[0])
    tl.store(p + PLANE + o_s, a[1])
    tl.store(p + 2 * PLANE + o_s, a[2])
    tl.store(p + 3 * PLANE + o_s, a[3])
    tl.store(p + 4 * PLANE + o_s, a[4])
    tl.store(p + 5 * PLANE + o_s, a[5])
    if TWO_POOL:
        if MT:
            tl.store(p + 6 * PLANE + o_s, b[4])
            tl.store(p + 7 * PLANE + o_s, b[5])
        else:
            tl.store(p + 6 * PLANE + o_s, b[0])
            tl.store(p + 7 * PLANE + o_s, b[1])
            tl.store(p + 8 * PLANE + o_s, b[2])
            tl.store(p + 9 * PLANE + o_s, b[3])
            tl.store(p + 10 * PLANE + o_s, b[4])
            tl.store(p + 11 * PLANE + o_s, b[5])


@triton.jit
def _restore(p, o_s, zero, PLANE: tl.constexpr, TWO_POOL: tl.constexpr, MT: tl.constexpr):
    """The state :func:`_save` stored at slot p (a single pool's pool b: a placeholder)."""
    a = (
        tl.load(p + o_s),
        tl.load(p + PLANE + o_s),
        tl.load(p + 2 * PLANE + o_s),
        tl.load(p + 3 * PLANE + o_s),
        tl.load(p + 4 * PLANE + o_s),
        tl.load(p + 5 * PLANE + o_s),
    )
    b = a
    if TWO_POOL:
        if MT:
            b = (zero, zero, zero, zero, tl.load(p + 6 * PLANE + o_s), tl.load(p + 7 * PLANE + o_s))
        else:
            b = (
                tl.load(p + 6 * PLANE + o_s),
                tl.load(p + 7 * PLANE + o_s),
                tl.load(p + 8 * PLANE + o_s),
                tl.load(p + 9 * PLANE + o_s),
                tl.load(p + 10 * PLANE + o_s),
                tl.load(p + 11 * PLANE + o_s),
            )
    return a, b


@triton.jit
def _sel6(on, s, t):
    """Plane-wise s where on, else t (one pool's 6-tuple of planes)."""
    return (
        tl.where(on, s[0], t[0]),
        tl.where(on, s[1], t[1]),
        tl.where(on, s[2], t[2]),
        tl.where(on, s[3], t[3]),
        tl.where(on, s[4], t[4]),
        tl.where(on, s[5], t[5]),
    )


@triton.jit
def _sel(on, s, t):
    """s where on, else t, for states (pool a, pool b)."""
    return _sel6(on, s[0], t[0]), _sel6(on, s[1], t[1])


@triton.jit
def _sel_acc(on, s, t):
    """s where on, else t, for the per-spin accumulators (xt 8, xl 4, rec a, rec b, b1, wt)."""
    return (
        (
            tl.where(on, s[0][0], t[0][0]),
            tl.where(on, s[0][1], t[0][1]),
            tl.where(on, s[0][2], t[0][2]),
            tl.where(on, s[0][3], t[0][3]),
            tl.where(on, s[0][4], t[0][4]),
            tl.where(on, s[0][5], t[0][5]),
            tl.where(on, s[0][6], t[0][6]),
            tl.where(on, s[0][7], t[0][7]),
        ),
        (
            tl.where(on, s[1][0], t[1][0]),
            tl.where(on, s[1][1], t[1][1]),
            tl.where(on, s[1][2], t[1][2]),
            tl.where(on, s[1][3], t[1][3]),
        ),
        tl.where(on, s[2], t[2]),
        tl.where(on, s[3], t[3]),
        tl.where(on, s[4], t[4]),
        tl.where(on, s[5], t[5]),
    )


@triton.jit
def _step(
    x,
    j,
    p_pulse,
    n_pulses,
    b_sp,
    o_k,
    n_states,
    K_PAD: tl.constexpr,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
    GRE: tl.constexpr,
):
    """Step j forward on x = (pool a, pool b): pulse j, then one interval (GRE), or two
    with echo j − 1 between them (FSE; the excitation, j = 0, has the first only)."""
    b_b1, b_wt, b_xt, b_xl, b_rec_a, b_rec_b = b_sp
    y = _pulse(x[0], x[1], p_pulse, j, n_pulses, b_b1, b_wt, TWO_POOL, MT)
    w = _interval(y[0], y[1], b_xt, b_xl, b_rec_a, b_rec_b, o_k, n_states, K_PAD, 1, TWO_POOL, MT)
    if not GRE:
        w = _sel(
            j > 0,
            _interval(w[0], w[1], b_xt, b_xl, b_rec_a, b_rec_b, o_k, n_states, K_PAD, 1, TWO_POOL, MT),
            w,
        )
    return w


@triton.jit
def _shift_t(lam, o_k, n_states, K_PAD: tl.constexpr):
    """Sᵀ on one pool's adjoint planes: λF+ₖ ← λF+ₖ₊₁, λF-ₖ ← λF-ₖ₋₁, plus conj λF+₀ into λF-₁.

    The transpose of ``epg_train._shift_recover`` (F+ₖ ← F+ₖ₋₁, F-ₖ ← F-ₖ₊₁, F+₀ ← conj F-₁,
    truncation at K = n_states); Z is not shifted.
    """
    l_pr, l_pi, l_mr, l_mi, l_zr, l_zi = lam
    o_dn = tl.broadcast_to(tl.maximum(o_k - 1, 0), l_pr.shape)
    o_up = tl.broadcast_to(tl.minimum(o_k + 1, K_PAD - 1), l_pr.shape)
    m_up = o_k + 1 < n_states
    m_dn = (o_k >= 1) & (o_k < n_states)
    m_0 = o_k == 0
    # order 1 of λF- takes λF-₀ and conj λF+₀ (F+₀ was conj F-₁): gather their sum once
    c_r = l_mr + tl.where(m_0, l_pr, 0.0)
    c_i = l_mi - tl.where(m_0, l_pi, 0.0)
    n_pr = tl.where(m_up, tl.gather(l_pr, o_up, 1), 0.0)
    n_pi = tl.where(m_up, tl.gather(l_pi, o_up, 1), 0.0)
    n_mr = tl.where(m_dn, tl.gather(c_r, o_dn, 1), 0.0)
    n_mi = tl.where(m_dn, tl.gather(c_i, o_dn, 1), 0.0)
    return n_pr, n_pi, n_mr, n_mi, l_zr, l_zi


@triton.jit
def _xdot(nu, y):
    """∂⟨ν, X·y⟩ w.r.t. (Re X, Im X) for X acting on F+ (and conj X on the stored F-), and
    ∂⟨ν, x·y⟩ w.r.t. a real x on Z: three per-spin sums over the orders."""
    re = tl.sum(nu[0] * y[0] + nu[1] * y[1] + nu[2] * y[2] + nu[3] * y[3], axis=1, keep_dims=True)
    im = tl.sum(nu[1] * y[0] - nu[0] * y[1] + nu[2] * y[3] - nu[3] * y[2], axis=1, keep_dims=True)
    return re, im, tl.sum(nu[4] * y[4] + nu[5] * y[5], axis=1, keep_dims=True)


@triton.jit
def _zdot(nu, y):
    """∂⟨ν, x·y⟩ w.r.t. a real x on Z only (per spin)."""
    return tl.sum(nu[4] * y[4] + nu[5] * y[5], axis=1, keep_dims=True)


@triton.jit
def _interval_adj(
    lam,
    y,
    acc,
    b_xt,
    b_xl,
    o_k,
    n_states,
    K_PAD: tl.constexpr,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
    GRE: tl.constexpr,
):
    """Adjoint of one interval x' = S(Ξ y) + rec·e(Z₀): λ ← Ξᵀ Sᵀ λ; gradients of Ξ and rec.

    y = (pool a, pool b) is the state that entered the interval; acc the per-spin
    accumulators (xt 8, xl 4, rec a, rec b, b1, wt).
    """
    lam_a, lam_b = lam
    y_a, y_b = y
    g_xt, g_xl, g_ra, g_rb, g_b1, g_wt = acc
    g_ra += _f0(lam_a[4], o_k, 1)[:, None]
    nu_a = _shift_t(lam_a, o_k, n_states, K_PAD)
    aa_r, aa_i, ab_r, ab_i, ba_r, ba_i, bb_r, bb_i = b_xt
    if TWO_POOL:
        g_rb += _f0(lam_b[4], o_k, 1)[:, None]
        if MT:
            nu_b = lam_b  # the bound pool has no transverse states to shift
            r, i, z = _xdot(nu_a, y_a)
            g_xt = (g_xt[0] + r, g_xt[1] + i, g_xt[2], g_xt[3], g_xt[4], g_xt[5], g_xt[6], g_xt[7])
            g_xl = (
                g_xl[0] + z,
                g_xl[1] + _zdot(nu_a, y_b),
                g_xl[2] + _zdot(nu_b, y_a),
                g_xl[3] + _zdot(nu_b, y_b),
            )
            lam_a, lam_b = _relax_mt(nu_a, nu_b, aa_r, -aa_i, (b_xl[0], b_xl[2], b_xl[1], b_xl[3]))
        else:
            nu_b = _shift_t(lam_b, o_k, n_states, K_PAD)
            r0, i0, z0 = _xdot(nu_a, y_a)
            r1, i1, z1 = _xdot(nu_a, y_b)
            r2, i2, z2 = _xdot(nu_b, y_a)
            r3, i3, z3 = _xdot(nu_b, y_b)
            g_xt = (
                g_xt[0] + r0,
                g_xt[1] + i0,
                g_xt[2] + r1,
                g_xt[3] + i1,
                g_xt[4] + r2,
                g_xt[5] + i2,
                g_xt[6] + r3,
                g_xt[7] + i3,
            )
            g_xl = (g_xl[0] + z0, g_xl[1] + z1, g_xl[2] + z2, g_xl[3] + z3)
            # the conjugate transpose of the complex pool matrix, the transpose of the real one
            xt_h = (aa_r, -aa_i, ba_r, -ba_i, ab_r, -ab_i, bb_r, -bb_i)
            lam_a, lam_b = _relax2(nu_a, nu_b, xt_h, (b_xl[0], b_xl[2], b_xl[1], b_xl[3]))
    else:
        r, i, z = _xdot(nu_a, y_a)
        g_xt = (g_xt[0] + r, g_xt[1] + i, g_xt[2], g_xt[3], g_xt[4], g_xt[5], g_xt[6], g_xt[7])
        g_xl = (g_xl[0] + z, g_xl[1], g_xl[2], g_xl[3])
        lam_a = _relax1(nu_a, aa_r, -aa_i, b_xl[0])
    return (lam_a, lam_b), (g_xt, g_xl, g_ra, g_rb, g_b1, g_wt)


@triton.jit
def _echo_adj(
    lam,
    y,
    p_g,
    p_pulse,
    i_e,
    n_echoes,
    n_pulses,
    n_b,
    o_b,
    m_b,
    o_k,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
    GRE: tl.constexpr,
):
    """Adjoint of echo i_e = i·F+₀(y) (summed over pools for BM; GRE: times e^{−iφ}).

    Adds ∂L/∂F+₀ to λ and returns it with ∂L/∂φ of the demodulation per spin (GRE; zero
    for FSE). g = p_g [2, n_echoes, B] (re, im).
    """
    lam_a, lam_b = lam
    i_g = tl.maximum(i_e, 0)  # FSE's excitation step has no echo (i_e = −1): g = 0
    g_re = tl.load(p_g + i_g * n_b + o_b, mask=m_b, other=0.0)  # [BLOCK_SPINS, 1]
    g_im = tl.load(p_g + (n_echoes + i_g) * n_b + o_b, mask=m_b, other=0.0)
    g_re = tl.where(i_e >= 0, g_re, 0.0)
    g_im = tl.where(i_e >= 0, g_im, 0.0)
    if GRE:
        # echo = i F e^{−iφ}: ∂/∂F = (g_re sin φ + g_im cos φ, g_im sin φ − g_re cos φ);
        # ∂echo/∂φ = F e^{−iφ}
        cp = tl.load(p_pulse + n_pulses + i_e)
        sp = tl.load(p_pulse + 2 * n_pulses + i_e)
        d_r = g_re * sp + g_im * cp
        d_i = g_im * sp - g_re * cp
        f_re, f_im = _echo_value(y[0], y[1], p_pulse, i_e, n_pulses, o_k, 1, TWO_POOL, MT, True)
        b_dphi = g_re * f_re[:, None] + g_im * f_im[:, None]
    else:
        d_r = g_im
        d_i = -g_re
        b_dphi = 0.0 * g_re
    m_0 = o_k == 0
    lam_a = (
        lam_a[0] + tl.where(m_0, d_r, 0.0),
        lam_a[1] + tl.where(m_0, d_i, 0.0),
        lam_a[2],
        lam_a[3],
        lam_a[4],
        lam_a[5],
    )
    if TWO_POOL:
        if not MT:
            lam_b = (
                lam_b[0] + tl.where(m_0, d_r, 0.0),
                lam_b[1] + tl.where(m_0, d_i, 0.0),
                lam_b[2],
                lam_b[3],
                lam_b[4],
                lam_b[5],
            )
    return (lam_a, lam_b), b_dphi


@triton.jit
def _rf_t(lam, c2, s2, sa, ca, cp, sp, c2p, s2p):
    """Tᵀλ = D T(−α, φ) D⁻¹ λ, D = diag(1, 1, 1, 1, 2, 2): the transpose of :func:`_rf`."""
    r = _rf((lam[0], lam[1], lam[2], lam[3], 0.5 * lam[4], 0.5 * lam[5]), c2, s2, -sa, ca, cp, sp, c2p, s2p)
    return r[0], r[1], r[2], r[3], 2.0 * r[4], 2.0 * r[5]


@triton.jit
def _rf_grad(lam, x, c2, s2, sa, ca, cp, sp, c2p, s2p):
    """(⟨λ, ∂T/∂α x⟩, ⟨λ, ∂T/∂φ x⟩) per spin: ``epg_train._drf`` contracted with λ.

    _drf's dT·x is linear in its coefficients (u, v, w, sda); with dα = 1 they are
    (sin α/2, 0, cos α, sin α), with dφ = 1 (0, 2 sin²(α/2), i sin α, 0). The sums below
    are λ's products with each coefficient's term.
    """
    fpr, fpi, fmr, fmi, zr, zi = x
    l_pr, l_pi, l_mr, l_mi, l_zr, l_zi = lam
    efr, efi, epr, epi, z1r, z1i, z2r, z2i, p3r, p3i, p4r, p4i = _phase_products(x, cp, sp, c2p, s2p)
    q_u = l_pr * (efr - fpr) + l_pi * (efi - fpi) + l_mr * (epr - fmr) + l_mi * (epi - fmi)
    q_v = l_pi * efr - l_pr * efi + l_mr * epi - l_mi * epr
    q_wr = l_pr * z1i - l_pi * z1r - l_mr * z2i + l_mi * z2r + 0.5 * (l_zr * (p3i - p4i) + l_zi * (p4r - p3r))
    q_wi = l_pr * z1r + l_pi * z1i + l_mr * z2r + l_mi * z2i - 0.5 * (l_zr * (p3r + p4r) + l_zi * (p3i + p4i))
    q_s = l_zr * zr + l_zi * zi
    g_alpha = tl.sum(0.5 * sa * q_u + ca * q_wr - sa * q_s, axis=1, keep_dims=True)
    g_phi = tl.sum(2.0 * s2 * q_v + sa * q_wi, axis=1, keep_dims=True)
    return g_alpha, g_phi


@triton.jit
def _pulse_adj(
    lam,
    x,
    acc,
    b_dphi,
    j,
    p_pulse,
    n_pulses,
    b_b1,
    b_wt,
    p_gp,
    n_cols,
    o_b,
    m_b,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
    GRE: tl.constexpr,
    PULSE_PER_SPIN: tl.constexpr,
):
    """Adjoint of pulse j applied to x: λ ← Tᵀλ (MT: bound-pool saturation), gradients.

    Per spin: B1 (through b1·α_j) and W·T into acc; per pulse: flip, phase (plus b_dphi,
    the GRE demodulation's share) and ∫B1², stored in p_gp [3, n_pulses, n_cols]: summed
    over the program's spins (in the program's column), or (PULSE_PER_SPIN) per spin o_b.
    """
    lam_a, lam_b = lam
    x_a, x_b = x
    g_xt, g_xl, g_ra, g_rb, g_b1, g_wt = acc
    flip = tl.load(p_pulse + j)
    b_c2, b_s2, b_sa, b_ca = _rf_coefficients(flip * b_b1)  # [BLOCK_SPINS, 1]
    cp = tl.load(p_pulse + n_pulses + j)
    sp = tl.load(p_pulse + 2 * n_pulses + j)
    c2p = tl.load(p_pulse + 3 * n_pulses + j)
    s2p = tl.load(p_pulse + 4 * n_pulses + j)
    g_alpha, g_phi = _rf_grad(lam_a, x_a, b_c2, b_s2, b_sa, b_ca, cp, sp, c2p, s2p)
    lam_a = _rf_t(lam_a, b_c2, b_s2, b_sa, b_ca, cp, sp, c2p, s2p)
    g_energy = 0.0 * g_alpha
    if TWO_POOL:
        if MT:
            # Z_b' = e^{−E·W} Z_b: ∂L/∂(E·W) = −e^{−E·W} ⟨λ, Z_b⟩
            energy = tl.load(p_pulse + 5 * n_pulses + j)
            b_sat = tl.exp(-energy * b_wt)  # [BLOCK_SPINS, 1]
            g_ew = -b_sat * _zdot(lam_b, x_b)
            g_wt += energy * g_ew
            g_energy = b_wt * g_ew
            lam_b = (lam_b[0], lam_b[1], lam_b[2], lam_b[3], lam_b[4] * b_sat, lam_b[5] * b_sat)
        else:
            g_alpha_b, g_phi_b = _rf_grad(lam_b, x_b, b_c2, b_s2, b_sa, b_ca, cp, sp, c2p, s2p)
            g_alpha += g_alpha_b
            g_phi += g_phi_b
            lam_b = _rf_t(lam_b, b_c2, b_s2, b_sa, b_ca, cp, sp, c2p, s2p)
    g_b1 += flip * g_alpha
    g_flip = tl.where(m_b, b_b1 * g_alpha, 0.0)
    g_phase = tl.where(m_b, g_phi + b_dphi, 0.0)
    g_energy = tl.where(m_b, g_energy, 0.0)
    if PULSE_PER_SPIN:
        tl.store(p_gp + j * n_cols + o_b, g_flip, mask=m_b)
        tl.store(p_gp + (n_pulses + j) * n_cols + o_b, g_phase, mask=m_b)
        tl.store(p_gp + (2 * n_pulses + j) * n_cols + o_b, g_energy, mask=m_b)
    else:
        tl.store(p_gp + j * n_cols, tl.sum(g_flip))
        tl.store(p_gp + (n_pulses + j) * n_cols, tl.sum(g_phase))
        tl.store(p_gp + (2 * n_pulses + j) * n_cols, tl.sum(g_energy))
    return (lam_a, lam_b), (g_xt, g_xl, g_ra, g_rb, g_b1, g_wt)


@triton.jit
def _step_adj(
    lam,
    x,
    acc,
    j,
    p_pulse,
    p_g,
    p_gp,
    b_sp,
    n_sz,
    o_bk,
    K_PAD: tl.constexpr,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
    GRE: tl.constexpr,
    PULSE_PER_SPIN: tl.constexpr,
):
    """Adjoint of step j (:func:`_step`) entered with state x: λ before the step from λ after it.

    n_sz = (n_pulses, n_echoes, n_states, n_b, n_cols); o_bk = (o_b, m_b, o_k).
    """
    n_pulses, n_echoes, n_states, n_b, n_cols = n_sz
    o_b, m_b, o_k = o_bk
    b_b1, b_wt, b_xt, b_xl, b_rec_a, b_rec_b = b_sp
    y = _pulse(x[0], x[1], p_pulse, j, n_pulses, b_b1, b_wt, TWO_POOL, MT)
    if GRE:
        lam, acc = _interval_adj(lam, y, acc, b_xt, b_xl, o_k, n_states, K_PAD, TWO_POOL, MT, GRE)
        lam, b_dphi = _echo_adj(
            lam, y, p_g, p_pulse, j, n_echoes, n_pulses, n_b, o_b, m_b, o_k, TWO_POOL, MT, GRE
        )
    else:
        w = _interval(y[0], y[1], b_xt, b_xl, b_rec_a, b_rec_b, o_k, n_states, K_PAD, 1, TWO_POOL, MT)
        # the excitation (j = 0) has no second interval: λ passes it unchanged
        lam2, acc2 = _interval_adj(lam, w, acc, b_xt, b_xl, o_k, n_states, K_PAD, TWO_POOL, MT, GRE)
        lam = _sel(j > 0, lam2, lam)
        acc = _sel_acc(j > 0, acc2, acc)
        lam, b_dphi = _echo_adj(
            lam, w, p_g, p_pulse, j - 1, n_echoes, n_pulses, n_b, o_b, m_b, o_k, TWO_POOL, MT, GRE
        )
        lam, acc = _interval_adj(lam, y, acc, b_xt, b_xl, o_k, n_states, K_PAD, TWO_POOL, MT, GRE)
    return _pulse_adj(
        lam,
        x,
        acc,
        b_dphi,
        j,
        p_pulse,
        n_pulses,
        b_b1,
        b_wt,
        p_gp,
        n_cols,
        o_b,
        m_b,
        TWO_POOL,
        MT,
        GRE,
        PULSE_PER_SPIN,
    )


@triton.jit
def _store_grads(p_gspin, acc, lam, o_b, m_b, o_k, n_b, TWO_POOL: tl.constexpr):
    """Per-spin gradients in the rows of p_gspin [xt_re P², xt_im P², xl P², rec P, z0 P, b1, wt].

    λ is the adjoint of the start state, whose only input is Re Z₀.
    """
    g_xt, g_xl, g_ra, g_rb, g_b1, g_wt = acc
    g_za = _f0(lam[0][4], o_k, 1)[:, None]
    g_zb = _f0(lam[1][4], o_k, 1)[:, None]
    o = o_b
    m = m_b
    if TWO_POOL:
        # xt rows are [P, P] re then im: the accumulators interleave re and im per entry
        for i in tl.static_range(4):
            tl.store(p_gspin + i * n_b + o, g_xt[2 * i], mask=m)
            tl.store(p_gspin + (4 + i) * n_b + o, g_xt[2 * i + 1], mask=m)
            tl.store(p_gspin + (8 + i) * n_b + o, g_xl[i], mask=m)
        tl.store(p_gspin + 12 * n_b + o, g_ra, mask=m)
        tl.store(p_gspin + 13 * n_b + o, g_rb, mask=m)
        tl.store(p_gspin + 14 * n_b + o, g_za, mask=m)
        tl.store(p_gspin + 15 * n_b + o, g_zb, mask=m)
        tl.store(p_gspin + 16 * n_b + o, g_b1, mask=m)
        tl.store(p_gspin + 17 * n_b + o, g_wt, mask=m)
    else:
        tl.store(p_gspin + o, g_xt[0], mask=m)
        tl.store(p_gspin + n_b + o, g_xt[1], mask=m)
        tl.store(p_gspin + 2 * n_b + o, g_xl[0], mask=m)
        tl.store(p_gspin + 3 * n_b + o, g_ra, mask=m)
        tl.store(p_gspin + 4 * n_b + o, g_za, mask=m)
        tl.store(p_gspin + 5 * n_b + o, g_b1, mask=m)
        tl.store(p_gspin + 6 * n_b + o, g_wt, mask=m)


@triton.jit
def _adj(
    p_xt_re,
    p_xt_im,
    p_xl,
    p_rec,
    p_z0,
    p_b1,
    p_wt,
    p_pulse,
    p_g,
    p_work,
    p_gspin,
    p_gpulse,
    n_spins,
    n_pulses,
    n_echoes,
    n_states,
    seg_len,
    spin0,
    n_cols,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
    GRE: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_SPINS: tl.constexpr,
    PULSE_PER_SPIN: tl.constexpr,
):
    """Gradients of Σ g·echoes w.r.t. every kernel input for BLOCK_SPINS spins from spin0.

    Inputs as ``epg_train._fwd``; p_g [2, n_echoes, B] the echoes' cotangent. p_work: per
    program ⌈n_pulses/seg_len⌉ checkpoint and seg_len scratch state slots (N_PLANES planes
    of [BLOCK_SPINS, K_PAD]). Writes p_gspin [rows, B] (see :func:`_store_grads`) and, in
    column spin0/BLOCK_SPINS + program of p_gpulse [3, n_pulses, n_cols], the program's
    per-pulse sums (PULSE_PER_SPIN: each spin's share, in its column, n_cols = B).
    """
    PLANE: tl.constexpr = BLOCK_SPINS * K_PAD
    N_PLANES: tl.constexpr = (8 if MT else 12) if TWO_POOL else 6
    SLOT: tl.constexpr = N_PLANES * PLANE
    i_p = tl.program_id(0).to(tl.int64)
    o_b = (spin0 + i_p * BLOCK_SPINS + tl.arange(0, BLOCK_SPINS))[:, None]
    m_b = o_b < n_spins
    o_k = tl.arange(0, K_PAD)[None, :]
    o_s = tl.arange(0, BLOCK_SPINS)[:, None] * K_PAD + o_k
    n_b = tl.cast(n_spins, tl.int64)
    dtype = p_xt_re.dtype.element_ty
    zero = tl.zeros([BLOCK_SPINS, K_PAD], dtype=dtype)
    zero1 = tl.zeros([BLOCK_SPINS, 1], dtype=dtype)
    n_seg = tl.cdiv(n_pulses, seg_len)
    # slots 0 .. n_seg − 1: checkpoints; n_seg .. n_seg + seg_len − 1: the segment's states
    p_w = p_work + i_p * (n_seg + seg_len) * SLOT
    p_gp = p_gpulse if PULSE_PER_SPIN else p_gpulse + spin0 // BLOCK_SPINS + i_p

    b_b1, b_xt, b_xl, b_rec_a, b_rec_b, b_za, b_zb, b_wt = _load_spins(
        p_xt_re, p_xt_im, p_xl, p_rec, p_z0, p_b1, p_wt, o_b, 0, m_b, n_b, TWO_POOL, MT
    )
    b_sp = (b_b1, b_wt, b_xt, b_xl, b_rec_a, b_rec_b)
    n_sz = (n_pulses, n_echoes, n_states, n_b, n_cols)
    o_bk = (o_b, m_b, o_k)
    x = (
        (zero, zero, zero, zero, tl.where(o_k == 0, b_za, 0.0), zero),
        (zero, zero, zero, zero, tl.where(o_k == 0, b_zb, 0.0), zero),
    )
    _save(p_w, o_s, x[0], x[1], PLANE, TWO_POOL, MT)
    lam = ((zero, zero, zero, zero, zero, zero), (zero, zero, zero, zero, zero, zero))
    acc = (
        (zero1, zero1, zero1, zero1, zero1, zero1, zero1, zero1),
        (zero1, zero1, zero1, zero1),
        zero1,
        zero1,
        zero1,
        zero1,
    )
    # Pass 0 sweeps the train from the start state, saving a checkpoint every seg_len
    # steps; pass r ≥ 1 reruns segment n_seg − r from its checkpoint, saving every step's
    # entry state, then runs the adjoint back through them. One loop, so that the forward
    # step is compiled once.
    for r in range(0, n_seg + 1):
        sweep = r == 0
        s = tl.where(sweep, 0, n_seg - r)
        j_a = s * seg_len
        j_b = tl.where(sweep, (n_seg - 1) * seg_len, tl.minimum(j_a + seg_len, n_pulses) - 1)
        every = tl.where(sweep, seg_len, 1)
        first = tl.where(sweep, 0, n_seg)
        tl.debug_barrier()  # slots written by other threads of the program are read below
        x = _restore(p_w + s * SLOT, o_s, zero, PLANE, TWO_POOL, MT)
        for j in range(j_a, j_b):
            if (j - j_a) % every == 0:
                _save(p_w + (first + (j - j_a) // every) * SLOT, o_s, x[0], x[1], PLANE, TWO_POOL, MT)
            x = _step(x, j, p_pulse, n_pulses, b_sp, o_k, n_states, K_PAD, TWO_POOL, MT, GRE)
        _save(p_w + (first + (j_b - j_a) // every) * SLOT, o_s, x[0], x[1], PLANE, TWO_POOL, MT)
        tl.debug_barrier()
        for i in range(0, tl.where(sweep, 0, j_b - j_a + 1)):
            j = j_b - i
            x = _restore(p_w + (n_seg + j - j_a) * SLOT, o_s, zero, PLANE, TWO_POOL, MT)
            lam, acc = _step_adj(
                lam, x, acc, j, p_pulse, p_g, p_gp, b_sp, n_sz, o_bk, K_PAD, TWO_POOL, MT, GRE, PULSE_PER_SPIN
            )
    _store_grads(p_gspin, acc, lam, o_b, m_b, o_k, n_b, TWO_POOL)


def adjoint_config(kind: str, dtype: torch.dtype, n_states: int, n_spins: int) -> tuple[int, int, int]:
    """``(K_PAD, BLOCK_SPINS, num_warps)`` of an adjoint launch.

    As ``epg_train.launch_config``: the block of spins is sized so that the states live
    in one adjoint step (``_LIVE_STATES``: entry state, two recomputed states, adjoint)
    fit the register budget; one spin's orders stay within a warp (``tl.gather``).
    """
    k_pad = triton.next_power_of_2(n_states)
    if INTERPRETED:
        return k_pad, min(256, triton.next_power_of_2(n_spins)), 1
    regs_per_value = 2 if dtype == torch.float64 else 1
    fit = max(1, _STATE_REGS_PER_PROGRAM // (_n_planes(kind) * _LIVE_STATES * k_pad * regs_per_value))
    block_spins = min(128, 1 << (fit.bit_length() - 1), triton.next_power_of_2(n_spins))
    return k_pad, block_spins, max(1, min(4, block_spins * min(k_pad, 32) // 32))


def _n_planes(kind: str) -> int:
    """Real planes of one stored state: F+, F-, Z per pool (MT: the bound pool's Z only)."""
    return {"single": 6, "bm": 12, "mt": 8}[kind]


def default_segment(n_steps: int) -> int:
    """C = ⌈√T⌉ steps per segment: ⌈T/C⌉ checkpoints + C scratch slots ≈ 2√T states, the fewest."""
    return max(1, math.isqrt(n_steps - 1) + 1) if n_steps > 1 else 1


def _launch_adj(
    primals: Sequence[Tensor],
    pulses: Tensor,
    g: Tensor,
    gspin: Tensor,
    gpulse: Tensor,
    *,
    kind: str,
    gre: bool,
    n_states: int,
    block_spins: int | None,
    segment: int | None = None,
    buffer_bytes: int = ADJOINT_BUFFER_BYTES,
    pulse_per_spin: bool = False,
) -> None:
    """Check shapes and launch :func:`_adj` over the spins, in chunks within ``buffer_bytes``.

    primals: the seven per-spin inputs of ``epg_train._launch_fwd``; pulses the
    [_PULSE_ROWS, n_pulses] table; g [2, n_echoes, B]. Fills gspin [rows, B] (rows of
    :func:`_store_grads`) and gpulse [3, n_pulses, n_programs] (per-program sums), or
    with ``pulse_per_spin`` gpulse [3, n_pulses, B] (each spin's share).
    ``segment`` overrides C (steps per checkpoint segment; any C ≥ 1 is exact).
    """
    b1 = primals[5]
    n_spins = b1.shape[0]
    n_pulses = pulses.shape[1]
    n_echoes = _check_train(kind, gre, n_states, n_pulses)
    seg = default_segment(n_pulses) if segment is None else segment
    if seg < 1:
        raise ValueError(f"epg_train adjoint: segment must be >= 1 step; got {seg}.")
    k_pad, bs, num_warps = adjoint_config(kind, b1.dtype, n_states, n_spins)
    bs = _block_spins(bs, block_spins, "epg_train")
    n_programs = triton.cdiv(n_spins, bs)
    p = 1 if kind == "single" else 2
    expected = {
        k: (t, s) for (k, s), t in zip(_primal_shapes(kind, n_spins, n_pulses).items(), primals, strict=True)
    }
    expected["pulses"] = (pulses, (_PULSE_ROWS, n_pulses))
    expected["g"] = (g, (2, n_echoes, n_spins))
    expected["gspin"] = (gspin, (3 * p * p + 2 * p + 2, n_spins))
    n_cols = n_spins if pulse_per_spin else n_programs
    expected["gpulse"] = (gpulse, (_GRAD_PULSE_ROWS, n_pulses, n_cols))
    _check_inputs(expected, b1)
    if n_spins == 0:
        return
    n_seg = triton.cdiv(n_pulses, seg)
    slot = _n_planes(kind) * bs * k_pad  # values per state slot of one program
    per_program = (n_seg + seg) * slot * b1.element_size()
    chunk = max(1, min(n_programs, buffer_bytes // per_program))
    work = b1.new_empty(chunk * (n_seg + seg) * slot)
    for first in range(0, n_programs, chunk):
        _adj[(min(chunk, n_programs - first),)](
            *primals,
            pulses,
            g,
            work,
            gspin,
            gpulse,
            n_spins,
            n_pulses,
            n_echoes,
            n_states,
            seg,
            first * bs,
            n_cols,
            TWO_POOL=kind != "single",
            MT=kind == "mt",
            GRE=gre,
            K_PAD=k_pad,
            BLOCK_SPINS=bs,
            PULSE_PER_SPIN=pulse_per_spin,
            num_warps=num_warps,
        )


def _adjoint(
    inputs: Sequence[Tensor],
    grad: Tensor,
    kind: str,
    gre: bool,
    n_states: int,
    block_spins: int | None,
    segment: int | None = None,
    pulse_per_spin: bool = False,
) -> list[Tensor]:
    """Jᵀ·grad for the ten kernel inputs (``epg_train._INPUTS``), each shaped as its input.

    With ``pulse_per_spin`` the per-pulse gradients are ``[n_pulses, B]``, each spin's share.
    """
    xt_re, xt_im, xl, recovery, z0, b1, wt, flip, phase, energy = inputs
    primals = [t.contiguous() for t in (xt_re, xt_im, xl, recovery, z0, b1, wt)]
    n_spins, n_pulses = b1.shape[0], flip.shape[0]
    k_pad, bs, _ = adjoint_config(kind, b1.dtype, n_states, n_spins)
    bs = block_spins or bs
    p = 1 if kind == "single" else 2
    gspin = b1.new_empty(3 * p * p + 2 * p + 2, n_spins)
    n_cols = n_spins if pulse_per_spin else triton.cdiv(n_spins, bs)
    gpulse = b1.new_empty(_GRAD_PULSE_ROWS, n_pulses, n_cols)
    _launch_adj(
        primals,
        _pulse_table(flip, phase, energy),
        grad.contiguous(),
        gspin,
        gpulse,
        kind=kind,
        gre=gre,
        n_states=n_states,
        block_spins=block_spins,
        segment=segment,
        pulse_per_spin=pulse_per_spin,
    )
    pp = p * p
    rows = torch.split(gspin, [pp, pp, pp, p, p, 1, 1])
    # one tensor each: a custom op's outputs may not alias one another
    per_spin = [r.reshape(t.shape).clone() for r, t in zip(rows, primals, strict=True)]
    if pulse_per_spin:
        return [*per_spin, *(row.clone() for row in gpulse)]
    return [*per_spin, *(row.sum(-1) for row in gpulse)]


@custom_op("epgx::epg_train_adjoint", mutates_args=())
def _adjoint_op(
    xt_re: Tensor,
    xt_im: Tensor,
    xl: Tensor,
    recovery: Tensor,
    z0: Tensor,
    b1: Tensor,
    wt: Tensor,
    flip: Tensor,
    phase: Tensor,
    energy: Tensor,
    grad: Tensor,
    kind: str,
    gre: bool,
    n_states: int,
    block_spins: int | None,
) -> list[Tensor]:
    """Gradients of Σ grad·echoes w.r.t. the ten kernel inputs, each shaped as its input.

    Inputs as ``epgx::epg_train``; ``grad`` the cotangent ``[2, n_echoes, B]`` of the echoes.
    """
    inputs = (xt_re, xt_im, xl, recovery, z0, b1, wt, flip, phase, energy)
    return _adjoint(inputs, grad, kind, gre, n_states, block_spins)


@_adjoint_op.register_fake
def _adjoint_fake(*args: Any) -> list[Tensor]:
    return [torch.empty_like(t) for t in args[:_N_IN]]


@_adjoint_op.register_vmap
def _adjoint_vmap(info: Any, in_dims: Sequence[int | None], *args: Any) -> tuple[list[Tensor], list[int]]:
    """Batched per-spin inputs or cotangents (``jacrev``): the batch joins the spins, one launch.

    The per-pulse gradients then come per spin (``pulse_per_spin``) and are summed per batch
    element. A batched pulse input, or inputs still batched by an outer vmap (``vmap(jacrev)``:
    the launch below is not an op the outer level could batch): one call per batch element.
    """
    nb = info.batch_size
    outer = any(isinstance(a, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(a) for a in args)
    if outer or any(in_dims[i] is not None for i in _PER_PULSE):
        outs = [
            torch.ops.epgx.epg_train_adjoint.default(
                *(a if d is None else a.select(d, i) for a, d in zip(args, in_dims, strict=True))
            )
            for i in range(nb)
        ]
        return [torch.stack(o) for o in zip(*outs, strict=True)], [0] * _N_IN
    b1 = args[5]
    n_b = b1.shape[-1] if in_dims[5] is None else b1.movedim(in_dims[5], 0).shape[-1]
    folded = [_fold_spins(args[i], in_dims[i], nb, n_b) for i in (*_PER_SPIN, _N_IN)]
    kind, gre, n_states, block_spins = args[_N_IN + 1 :]
    primals = (*folded[:-1], *args[7:_N_IN])
    grads = _adjoint(primals, folded[-1], kind, gre, n_states, block_spins, pulse_per_spin=True)
    per_spin = [g.unflatten(-1, (nb, n_b)) for g in grads[:7]]
    per_pulse = [g.unflatten(-1, (nb, n_b)).sum(-1).T.contiguous() for g in grads[7:]]
    return [*per_spin, *per_pulse], [g.dim() - 2 for g in per_spin] + [0, 0, 0]


_adjoint_op.register_autograd(_no_second_order, setup_context=_no_setup)


def vjp(
    primals: Sequence[Tensor], grad: Tensor, needs: Sequence[bool], config: Sequence[Any]
) -> list[Tensor | None]:
    """Jᵀ·grad for the kernel inputs that need it (``None`` for the others): one adjoint launch."""
    if primals[5].shape[-1] == 0:
        return [torch.zeros_like(p) if need else None for p, need in zip(primals, needs, strict=True)]
    grads = _first_order(torch.ops.epgx.epg_train_adjoint.default, *primals, grad, *config)
    return [g if need else None for g, need in zip(grads, needs, strict=True)]


assert len(_INPUTS) == _N_IN == 10
