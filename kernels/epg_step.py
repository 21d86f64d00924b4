"""One fused EPG-X timestep: RF pulse, relaxation/exchange, shift and recovery in one launch.

The state is the ``[P, 6, K, B]`` real tensor of :mod:`epgx.ops` (per pool: F+ₙ, F-ₙ
stored as conj F₋ₙ, Zₙ as real/imaginary planes, n = 0..K−1, B spins). One step is::

    x' = S Ξ R x + b,

R Weigel's rotation T(b1·α, φ) (Weigel 2015, eq. 15) on every order of every pool that
carries transverse states (the MT bound pool is saturated by exp(−W·T) instead, Gloor
2008), Ξ = exp(τΛ) the per-spin relaxation/exchange propagator (Malik 2018, eq. 11), S
the shift by one order (F+ₖ ← F+ₖ₋₁, F-ₖ ← F-ₖ₊₁, F+₀ ← conj F-₁; orders ≥ K dropped,
EPG-X's truncation) and b the recovery on Re Z₀. Either half can be left out: R alone
(a pulse before a GRE readout) or S Ξ x + b alone (a free interval). It is the fused twin
of ``ops.rf`` → ``ops.relax(..., with_recovery=True)`` → ``ops.shift``, and the
building block for runs that must store every state (``return_states=True``), where the
whole-train kernel of :mod:`epgx.kernels.epg_train` cannot keep the state on chip.

Layout. One program takes a block of spins and loops over all K orders in blocks of
``BLOCK_K``; a ``[BLOCK_K, BLOCK_SPINS]`` block has the spins contiguous, so every load
and store is coalesced. R and Ξ act order by order, so the shift needs no gather: output
order k reads its F+ from orders k−1, its F- from k+1 and its Z from k of the input and
applies R and Ξ there (the compiler drops the planes each read does not need).

Derivatives. The kernel's inputs are the state, Ξ's entries and the recovery (``[P, P,
B]``, ``[P, B]``, from :func:`epgx.ops.relaxation` on the host, as in ``epg_train``) and,
per spin, the flip b1·α, the phase φ and the MT saturation exp(−W·T): torch's autograd
and forward mode carry T1, T2, f, k_ab, df, df_b, B1, the flip angle and ∫B1² dt to these
on the host. Per kernel input the rules are analytic:

- ``_bwd`` (the adjoint of one step): with h = Sᵀg (g the cotangent of x'), z = R x,
  gz = Ξᵀh: ∂/∂x = Rᵀ gz, ∂/∂Ξ = Σₙ h zᵀ, ∂/∂b = g at Re Z₀, ∂/∂(b1α) = Σₙ ⟨gz, ∂R/∂α x⟩,
  ∂/∂φ likewise, ∂/∂ sat = Σₙ ⟨gz_b, x_b⟩ (sums over orders, per spin). Rᵀ is Weigel's
  matrix at −α conjugated by diag(1, 1, 2) on (F+, F-, Z) (Tᴴ = D T(−α, φ) D⁻¹).
- ``_jvp``: the tangent dx' = S(Ξ R dx + Ξ dR x + dΞ R x) + db beside the primal, dR
  from :func:`epgx.kernels.epg_train._drf`.

The launches are ``torch.library.custom_op`` s (``epgx::epg_step``, ``epgx::epg_step_bwd``,
``epgx::epg_step_jvp``) with fake kernels and vmap rules (every input is per spin, so a
vmap batch joins the spins: one launch), behind :class:`_Step`, an autograd Function
with ``jvp`` and ``backward``. Second-order derivatives raise.

References
----------
- Weigel M. Extended phase graphs: dephasing, RF pulses, and echoes - pure and simple.
  JMRI 2015;41:266-295.
- Malik SJ, Teixeira RPAG, Hajnal JV. Extended phase graph formalism for systems with
  magnetization transfer and exchange. MRM 2018;80:767-779 (EPG-X).
- Gloor M, Scheffler K, Bieri O. Quantitative magnetization transfer imaging using
  balanced SSFP. MRM 2008;60:691-700.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from epgx.kernels.epg_train import (
    INTERPRETED,
    _add,
    _block_spins,
    _dense,
    _drf,
    _first_order,
    _fold_spins,
    _load_spins,
    _no_second_order,
    _no_setup,
    _relax1,
    _relax2,
    _relax_mt,
    _rf,
    _rf_coefficients,
)
from torch import Tensor
from torch.library import custom_op

from epgx import ops
from epgx.tissue import KINDS

# Kernel inputs, in the order of the ops' arguments; every one ends in the spin axis.
_INPUTS = ("state", "xt_re", "xt_im", "xl", "recovery", "alpha", "phase", "sat")
_N_IN = len(_INPUTS)

# Values of one program's [BLOCK_K, BLOCK_SPINS] block in a float32 single-pool forward
# pass, halved for two pools, float64 and the derivative kernels: 2-4 per thread, within
# sm_90's registers without spills but for float64 BM derivatives
# (tests/test_kernels_step_compile.py; one element per thread needed more registers).
_BLOCK_VALUES = 512


@triton.jit
def _scale(s, c):
    """All six planes of a pool times c."""
    return s[0] * c, s[1] * c, s[2] * c, s[3] * c, s[4] * c, s[5] * c


@triton.jit
def _dot(s, t):
    """Plane-wise Σ s·t of two pool states (elementwise over the block)."""
    return s[0] * t[0] + s[1] * t[1] + s[2] * t[2] + s[3] * t[3] + s[4] * t[4] + s[5] * t[5]


@triton.jit
def _osum(x):
    """Sum over the orders of a [BLOCK_K, BLOCK_SPINS] block: [1, BLOCK_SPINS]."""
    return tl.sum(x, axis=0, keep_dims=True)


@triton.jit
def _load_pool(p_x, pool, o_k, o_b, m, n_k, n_b):
    """Pool ``pool``'s six planes at orders o_k [BLOCK_K, 1] and spins o_b [1, BLOCK_SPINS]."""
    p = p_x + (pool * 6 * n_k + o_k) * n_b + o_b
    s = n_k * n_b
    return (
        tl.load(p, mask=m, other=0.0),
        tl.load(p + s, mask=m, other=0.0),
        tl.load(p + 2 * s, mask=m, other=0.0),
        tl.load(p + 3 * s, mask=m, other=0.0),
        tl.load(p + 4 * s, mask=m, other=0.0),
        tl.load(p + 5 * s, mask=m, other=0.0),
    )


@triton.jit
def _load_pools(p_x, o_k, o_b, m, n_k, n_b, TWO_POOL: tl.constexpr):
    """(pool a, pool b) at orders o_k; a single pool's pool b is pool a (unused)."""
    a = _load_pool(p_x, 0, o_k, o_b, m, n_k, n_b)
    b = a
    if TWO_POOL:
        b = _load_pool(p_x, 1, o_k, o_b, m, n_k, n_b)
    return a, b


@triton.jit
def _store_pool(p_x, pool, s, o_k, o_b, m, n_k, n_b):
    p = p_x + (pool * 6 * n_k + o_k) * n_b + o_b
    st = n_k * n_b
    for i in tl.static_range(6):
        tl.store(p + i * st, s[i], mask=m)


@triton.jit
def _rotate(a, b, rfc, sat, TWO_POOL: tl.constexpr, MT: tl.constexpr):
    """R: Weigel's rotation of every pool with transverse states; the MT bound pool times sat."""
    c2, s2, sa, ca, cp, sp, c2p, s2p = rfc
    a = _rf(a, c2, s2, sa, ca, cp, sp, c2p, s2p)
    if TWO_POOL:
        if MT:
            b = _scale(b, sat)
        else:
            b = _rf(b, c2, s2, sa, ca, cp, sp, c2p, s2p)
    return a, b


@triton.jit
def _rotate_t(h, rfc):
    """Rᵀh of one pool: Weigel's matrix at −α between Z scaled by 1/2 and by 2 (Tᴴ = D T(−α) D⁻¹)."""
    c2, s2, sa, ca, cp, sp, c2p, s2p = rfc
    t = _rf((h[0], h[1], h[2], h[3], 0.5 * h[4], 0.5 * h[5]), c2, s2, -sa, ca, cp, sp, c2p, s2p)
    return t[0], t[1], t[2], t[3], 2.0 * t[4], 2.0 * t[5]


@triton.jit
def _relax(a, b, xt, xl, TWO_POOL: tl.constexpr, MT: tl.constexpr):
    """Ξ: relaxation/exchange; the MT bound pool keeps Z only (its transverse planes become 0).

    Bilinear in the state and (xt, xl), so the tangent pass applies it to (dx, Ξ) and (x, dΞ).
    """
    if TWO_POOL:
        if MT:
            a, b = _relax_mt(a, b, xt[0], xt[1], xl)
            zero = tl.zeros_like(b[4])
            b = (zero, zero, zero, zero, b[4], b[5])
        else:
            a, b = _relax2(a, b, xt, xl)
    else:
        a = _relax1(a, xt[0], xt[1], xl[0])
    return a, b


@triton.jit
def _relax_t(h_a, h_b, xt, xl, TWO_POOL: tl.constexpr, MT: tl.constexpr):
    """Ξᵀ: the transposed real operator (conjugate-transposed complex propagators)."""
    xlt = (xl[0], xl[2], xl[1], xl[3])
    if TWO_POOL:
        if MT:
            a, b = _relax_mt(h_a, h_b, xt[0], -xt[1], xlt)
            zero = tl.zeros_like(b[4])
            b = (zero, zero, zero, zero, b[4], b[5])
        else:
            xtt = (xt[0], -xt[1], xt[4], -xt[5], xt[2], -xt[3], xt[6], -xt[7])
            a, b = _relax2(h_a, h_b, xtt, xlt)
    else:
        a = _relax1(h_a, xt[0], -xt[1], xl[0])
        b = h_b
    return a, b


@triton.jit
def _dxi(h, z):
    """∂⟨h, Ξz⟩ per block element w.r.t. one propagator entry: (Re X, Im X, longitudinal)."""
    re = h[0] * z[0] + h[1] * z[1] + h[2] * z[2] + h[3] * z[3]
    im = h[1] * z[0] - h[0] * z[1] + h[2] * z[3] - h[3] * z[2]
    return _osum(re), _osum(im), _osum(h[4] * z[4] + h[5] * z[5])


@triton.jit
def _stage(a, b, c, TWO_POOL: tl.constexpr, MT: tl.constexpr, RF: tl.constexpr, RELAX: tl.constexpr):
    """Ξ R x (or the half asked for) at one block of orders; c = (rfc, sat, xt, xl)."""
    rfc, sat, xt, xl = c
    if RF:
        a, b = _rotate(a, b, rfc, sat, TWO_POOL, MT)
    if RELAX:
        a, b = _relax(a, b, xt, xl, TWO_POOL, MT)
    return a, b


@triton.jit
def _stage_tan(x, c, dc, TWO_POOL: tl.constexpr, MT: tl.constexpr, RF: tl.constexpr, RELAX: tl.constexpr):
    """:func:`_stage` on x = (a, b, da, db) and its tangent: d(ΞRx) = Ξ R dx + Ξ dR x + dΞ R x.

    dc = (drf, dsat, dxt, dxl), drf the coefficients (u, v, wr, wi, sda) of :func:`_drf`.
    """
    a, b, da, db = x
    rfc, sat, xt, xl = c
    drf, dsat, dxt, dxl = dc
    if RF:
        c2, s2, sa, ca, cp, sp, c2p, s2p = rfc
        u, v, wr, wi, sda = drf
        da = _add(_rf(da, c2, s2, sa, ca, cp, sp, c2p, s2p), _drf(a, u, v, wr, wi, sda, cp, sp, c2p, s2p))
        if TWO_POOL:
            if MT:
                db = _add(_scale(db, sat), _scale(b, dsat))
            else:
                db = _add(
                    _rf(db, c2, s2, sa, ca, cp, sp, c2p, s2p), _drf(b, u, v, wr, wi, sda, cp, sp, c2p, s2p)
                )
        a, b = _rotate(a, b, rfc, sat, TWO_POOL, MT)
    if RELAX:
        ta, tb = _relax(da, db, xt, xl, TWO_POOL, MT)
        sa_, sb_ = _relax(a, b, dxt, dxl, TWO_POOL, MT)
        da = _add(ta, sa_)
        if TWO_POOL:
            db = _add(tb, sb_)
        a, b = _relax(a, b, xt, xl, TWO_POOL, MT)
    return a, b, da, db


@triton.jit
def _shifted(p, c, n, rec, o_k):
    """Output orders o_k of S(·) + rec from the staged planes at orders o_k−1 (p), o_k (c), o_k+1 (n)."""
    m_0 = o_k == 0
    return (
        tl.where(m_0, n[2], p[0]),
        tl.where(m_0, -n[3], p[1]),
        n[2],
        n[3],
        c[4] + tl.where(m_0, rec, 0.0),
        c[5],
    )


@triton.jit
def _load_shift_t(p_g, pool, o_k, o_b, m_b, n_k, n_b):
    """h = Sᵀg of one pool at orders o_k: F+ₖ ← gF+ₖ₊₁, F-ₖ ← gF-ₖ₋₁ (+ conj gF+₀ at k = 1), Z ← gZₖ."""
    p = p_g + (pool * 6 * n_k + o_k) * n_b + o_b
    s = n_k * n_b
    m_up = m_b & (o_k + 1 < n_k)
    m_dn = m_b & (o_k >= 1) & (o_k < n_k)
    m_1 = m_b & (o_k == 1) & (o_k < n_k)
    m_c = m_b & (o_k < n_k)
    return (
        tl.load(p + n_b, mask=m_up, other=0.0),
        tl.load(p + s + n_b, mask=m_up, other=0.0),
        tl.load(p + 2 * s - n_b, mask=m_dn, other=0.0) + tl.load(p - n_b, mask=m_1, other=0.0),
        tl.load(p + 3 * s - n_b, mask=m_dn, other=0.0) - tl.load(p + s - n_b, mask=m_1, other=0.0),
        tl.load(p + 4 * s, mask=m_c, other=0.0),
        tl.load(p + 5 * s, mask=m_c, other=0.0),
    )


@triton.jit
def _coefficients(
    p_xt_re,
    p_xt_im,
    p_xl,
    p_rec,
    p_alpha,
    p_phase,
    p_sat,
    o_b,
    m_b,
    n_b,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
):
    """Per-spin inputs as [1, BLOCK_SPINS] blocks: ((rfc, sat, xt, xl), rec_a, rec_b).

    rfc = (cos²(α/2), sin²(α/2), sin α, cos α, cos φ, sin φ, cos 2φ, sin 2φ) of the spin's
    flip α = b1·α_nominal and phase φ.
    """
    b_alpha, b_xt, b_xl, b_rec_a, b_rec_b, _, _, b_sat = _load_spins(
        p_xt_re, p_xt_im, p_xl, p_rec, p_rec, p_alpha, p_sat, o_b, 0, m_b, n_b, TWO_POOL, MT
    )
    b_phi = tl.load(p_phase + o_b, mask=m_b, other=0.0)
    b_c2, b_s2, b_sa, b_ca = _rf_coefficients(b_alpha)
    rfc = (b_c2, b_s2, b_sa, b_ca, tl.cos(b_phi), tl.sin(b_phi), tl.cos(2.0 * b_phi), tl.sin(2.0 * b_phi))
    return (rfc, b_sat, b_xt, b_xl), b_rec_a, b_rec_b


@triton.jit
def _fwd(
    p_x,
    p_xt_re,
    p_xt_im,
    p_xl,
    p_rec,
    p_alpha,
    p_phase,
    p_sat,
    p_out,
    n_spins,
    n_states,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
    RF: tl.constexpr,
    RELAX: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_SPINS: tl.constexpr,
):
    """x' = S Ξ R x + b for BLOCK_SPINS spins, all orders; p_x, p_out [P, 6, K, B].

    p_xt_re, p_xt_im, p_xl: [P, P, B] propagators; p_rec: [P, B] recovery; p_alpha,
    p_phase, p_sat: [B] flip (rad), phase (rad) and MT saturation per spin.
    """
    i_b = tl.program_id(0).to(tl.int64)
    o_b = (i_b * BLOCK_SPINS + tl.arange(0, BLOCK_SPINS))[None, :]
    m_b = o_b < n_spins
    n_b = tl.cast(n_spins, tl.int64)  # also when Triton specialises n_spins == 1 as a constant
    n_k = tl.cast(n_states, tl.int64)
    c, b_rec_a, b_rec_b = _coefficients(
        p_xt_re, p_xt_im, p_xl, p_rec, p_alpha, p_phase, p_sat, o_b, m_b, n_b, TWO_POOL, MT
    )
    for k0 in range(0, n_states, BLOCK_K):
        o_k = (k0 + tl.arange(0, BLOCK_K))[:, None]
        m = m_b & (o_k < n_states)
        if RELAX:
            pa, pb = _load_pools(p_x, o_k - 1, o_b, m & (o_k >= 1), n_k, n_b, TWO_POOL)
            ca, cb = _load_pools(p_x, o_k, o_b, m, n_k, n_b, TWO_POOL)
            na, nb = _load_pools(p_x, o_k + 1, o_b, m_b & (o_k + 1 < n_states), n_k, n_b, TWO_POOL)
            pa, pb = _stage(pa, pb, c, TWO_POOL, MT, RF, RELAX)
            ca, cb = _stage(ca, cb, c, TWO_POOL, MT, RF, RELAX)
            na, nb = _stage(na, nb, c, TWO_POOL, MT, RF, RELAX)
            _store_pool(p_out, 0, _shifted(pa, ca, na, b_rec_a, o_k), o_k, o_b, m, n_k, n_b)
            if TWO_POOL:
                _store_pool(p_out, 1, _shifted(pb, cb, nb, b_rec_b, o_k), o_k, o_b, m, n_k, n_b)
        else:
            ca, cb = _load_pools(p_x, o_k, o_b, m, n_k, n_b, TWO_POOL)
            ca, cb = _stage(ca, cb, c, TWO_POOL, MT, RF, RELAX)
            _store_pool(p_out, 0, ca, o_k, o_b, m, n_k, n_b)
            if TWO_POOL:
                _store_pool(p_out, 1, cb, o_k, o_b, m, n_k, n_b)


@triton.jit
def _bwd(
    p_x,
    p_xt_re,
    p_xt_im,
    p_xl,
    p_rec,
    p_alpha,
    p_phase,
    p_sat,
    p_g,
    p_gx,
    p_gxt_re,
    p_gxt_im,
    p_gxl,
    p_grec,
    p_galpha,
    p_gphase,
    p_gsat,
    n_spins,
    n_states,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
    RF: tl.constexpr,
    RELAX: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_SPINS: tl.constexpr,
):
    """The adjoint of :func:`_fwd`: from g = ∂L/∂x' [P, 6, K, B], every input's gradient.

    Writes p_gx [P, 6, K, B]; p_gxt_re, p_gxt_im, p_gxl [P, P, B] and p_grec [P, B] (sums
    over orders per spin; zero for entries a kind does not use); p_galpha, p_gphase,
    p_gsat [B]: ∂L/∂α, ∂L/∂φ, ∂L/∂sat per spin (the host sums them over spins for per-pulse parameters).
    """
    i_b = tl.program_id(0).to(tl.int64)
    o_b = (i_b * BLOCK_SPINS + tl.arange(0, BLOCK_SPINS))[None, :]
    m_b = o_b < n_spins
    n_b = tl.cast(n_spins, tl.int64)
    n_k = tl.cast(n_states, tl.int64)
    c, b_rec_a, b_rec_b = _coefficients(
        p_xt_re, p_xt_im, p_xl, p_rec, p_alpha, p_phase, p_sat, o_b, m_b, n_b, TWO_POOL, MT
    )
    rfc, b_sat, b_xt, b_xl = c
    b_s2, b_sa, b_ca = rfc[1], rfc[2], rfc[3]
    b_cp, b_sp, b_c2p, b_s2p = rfc[4], rfc[5], rfc[6], rfc[7]
    zero = tl.zeros([1, BLOCK_SPINS], dtype=p_x.dtype.element_ty)
    # Σ over orders per spin: propagator entries (re, im, longitudinal) ×4, recovery ×2, α, φ, sat
    acc = (zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero)
    acc_rf = (zero, zero, zero, zero, zero)
    for k0 in range(0, n_states, BLOCK_K):
        o_k = (k0 + tl.arange(0, BLOCK_K))[:, None]
        m = m_b & (o_k < n_states)
        xa, xb = _load_pools(p_x, o_k, o_b, m, n_k, n_b, TWO_POOL)
        if RELAX:
            ha = _load_shift_t(p_g, 0, o_k, o_b, m_b, n_k, n_b)
            hb = ha
            if TWO_POOL:
                hb = _load_shift_t(p_g, 1, o_k, o_b, m_b, n_k, n_b)
        else:
            ha, hb = _load_pools(p_g, o_k, o_b, m, n_k, n_b, TWO_POOL)
        za, zb = xa, xb
        if RF:
            za, zb = _rotate(xa, xb, rfc, b_sat, TWO_POOL, MT)
        ga, gb = ha, hb
        if RELAX:
            ga, gb = _relax_t(ha, hb, b_xt, b_xl, TWO_POOL, MT)
            r0, i0, l0 = _dxi(ha, za)
            r1, i1, l1 = r0, i0, l0
            r2, i2, l2 = r0, i0, l0
            r3, i3, l3 = r0, i0, l0
            if TWO_POOL:
                r1, i1, l1 = _dxi(ha, zb)
                r2, i2, l2 = _dxi(hb, za)
                r3, i3, l3 = _dxi(hb, zb)
                if MT:  # the bound pool has no transverse propagator entries
                    r1, i1, r2, i2, r3, i3 = zero, zero, zero, zero, zero, zero
            m_0 = o_k == 0
            acc = (
                acc[0] + r0,
                acc[1] + r1,
                acc[2] + r2,
                acc[3] + r3,
                acc[4] + i0,
                acc[5] + i1,
                acc[6] + i2,
                acc[7] + i3,
                acc[8] + l0,
                acc[9] + l1,
                acc[10] + l2,
                acc[11] + l3,
            )
            acc_rf = (
                acc_rf[0] + _osum(tl.where(m_0, ha[4], 0.0)),
                acc_rf[1] + _osum(tl.where(m_0, hb[4], 0.0)),
                acc_rf[2],
                acc_rf[3],
                acc_rf[4],
            )
        if RF:
            # ∂R/∂α and ∂R/∂φ applied to x (unit directions of _drf)
            da = _dot(ga, _drf(xa, 0.5 * b_sa, 0.0, b_ca, 0.0, b_sa, b_cp, b_sp, b_c2p, b_s2p))
            dp = _dot(ga, _drf(xa, 0.0, 2.0 * b_s2, 0.0, b_sa, 0.0, b_cp, b_sp, b_c2p, b_s2p))
            ds = tl.zeros_like(da)
            gxa = _rotate_t(ga, rfc)
            gxb = gb
            if TWO_POOL:
                if MT:
                    ds = _dot(gb, xb)
                    gxb = _scale(gb, b_sat)
                else:
                    da += _dot(gb, _drf(xb, 0.5 * b_sa, 0.0, b_ca, 0.0, b_sa, b_cp, b_sp, b_c2p, b_s2p))
                    dp += _dot(gb, _drf(xb, 0.0, 2.0 * b_s2, 0.0, b_sa, 0.0, b_cp, b_sp, b_c2p, b_s2p))
                    gxb = _rotate_t(gb, rfc)
            acc_rf = (
                acc_rf[0],
                acc_rf[1],
                acc_rf[2] + _osum(da),
                acc_rf[3] + _osum(dp),
                acc_rf[4] + _osum(ds),
            )
            ga, gb = gxa, gxb
        _store_pool(p_gx, 0, ga, o_k, o_b, m, n_k, n_b)
        if TWO_POOL:
            _store_pool(p_gx, 1, gb, o_k, o_b, m, n_k, n_b)
    P2: tl.constexpr = 4 if TWO_POOL else 1
    P: tl.constexpr = 2 if TWO_POOL else 1
    for e in tl.static_range(P2):
        tl.store(p_gxt_re + e * n_b + o_b, acc[e], mask=m_b)
        tl.store(p_gxt_im + e * n_b + o_b, acc[4 + e], mask=m_b)
        tl.store(p_gxl + e * n_b + o_b, acc[8 + e], mask=m_b)
    for i in tl.static_range(P):
        tl.store(p_grec + i * n_b + o_b, acc_rf[i], mask=m_b)
    tl.store(p_galpha + o_b, acc_rf[2], mask=m_b)
    tl.store(p_gphase + o_b, acc_rf[3], mask=m_b)
    tl.store(p_gsat + o_b, acc_rf[4], mask=m_b)


@triton.jit
def _jvp(
    p_x,
    p_xt_re,
    p_xt_im,
    p_xl,
    p_rec,
    p_alpha,
    p_phase,
    p_sat,
    p_dx,
    p_dxt_re,
    p_dxt_im,
    p_dxl,
    p_drec,
    p_dalpha,
    p_dphase,
    p_dsat,
    p_out,
    p_dout,
    n_spins,
    n_states,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
    RF: tl.constexpr,
    RELAX: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_SPINS: tl.constexpr,
):
    """:func:`_fwd` and its tangent: p_dx and p_d* are the inputs' tangents (same shapes);
    writes x' to p_out and dx' = S(Ξ R dx + Ξ dR x + dΞ R x) + db to p_dout."""
    i_b = tl.program_id(0).to(tl.int64)
    o_b = (i_b * BLOCK_SPINS + tl.arange(0, BLOCK_SPINS))[None, :]
    m_b = o_b < n_spins
    n_b = tl.cast(n_spins, tl.int64)
    n_k = tl.cast(n_states, tl.int64)
    c, b_rec_a, b_rec_b = _coefficients(
        p_xt_re, p_xt_im, p_xl, p_rec, p_alpha, p_phase, p_sat, o_b, m_b, n_b, TWO_POOL, MT
    )
    b_dalpha, b_dxt, b_dxl, b_drec_a, b_drec_b, _, _, b_dsat = _load_spins(
        p_dxt_re, p_dxt_im, p_dxl, p_drec, p_drec, p_dalpha, p_dsat, o_b, 0, m_b, n_b, TWO_POOL, MT
    )
    b_dphi = tl.load(p_dphase + o_b, mask=m_b, other=0.0)
    b_s2, b_sa, b_ca = c[0][1], c[0][2], c[0][3]
    drf = (0.5 * b_sa * b_dalpha, 2.0 * b_s2 * b_dphi, b_ca * b_dalpha, b_sa * b_dphi, b_sa * b_dalpha)
    dc = (drf, b_dsat, b_dxt, b_dxl)
    for k0 in range(0, n_states, BLOCK_K):
        o_k = (k0 + tl.arange(0, BLOCK_K))[:, None]
        m = m_b & (o_k < n_states)
        if RELAX:
            m_p = m & (o_k >= 1)
            m_n = m_b & (o_k + 1 < n_states)
            pa, pb = _load_pools(p_x, o_k - 1, o_b, m_p, n_k, n_b, TWO_POOL)
            dpa, dpb = _load_pools(p_dx, o_k - 1, o_b, m_p, n_k, n_b, TWO_POOL)
            ca, cb = _load_pools(p_x, o_k, o_b, m, n_k, n_b, TWO_POOL)
            dca, dcb = _load_pools(p_dx, o_k, o_b, m, n_k, n_b, TWO_POOL)
            na, nb = _load_pools(p_x, o_k + 1, o_b, m_n, n_k, n_b, TWO_POOL)
            dna, dnb = _load_pools(p_dx, o_k + 1, o_b, m_n, n_k, n_b, TWO_POOL)
            pa, pb, dpa, dpb = _stage_tan((pa, pb, dpa, dpb), c, dc, TWO_POOL, MT, RF, RELAX)
            ca, cb, dca, dcb = _stage_tan((ca, cb, dca, dcb), c, dc, TWO_POOL, MT, RF, RELAX)
            na, nb, dna, dnb = _stage_tan((na, nb, dna, dnb), c, dc, TWO_POOL, MT, RF, RELAX)
            _store_pool(p_out, 0, _shifted(pa, ca, na, b_rec_a, o_k), o_k, o_b, m, n_k, n_b)
            _store_pool(p_dout, 0, _shifted(dpa, dca, dna, b_drec_a, o_k), o_k, o_b, m, n_k, n_b)
            if TWO_POOL:
                _store_pool(p_out, 1, _shifted(pb, cb, nb, b_rec_b, o_k), o_k, o_b, m, n_k, n_b)
                _store_pool(p_dout, 1, _shifted(dpb, dcb, dnb, b_drec_b, o_k), o_k, o_b, m, n_k, n_b)
        else:
            ca, cb = _load_pools(p_x, o_k, o_b, m, n_k, n_b, TWO_POOL)
            dca, dcb = _load_pools(p_dx, o_k, o_b, m, n_k, n_b, TWO_POOL)
            ca, cb, dca, dcb = _stage_tan((ca, cb, dca, dcb), c, dc, TWO_POOL, MT, RF, RELAX)
            _store_pool(p_out, 0, ca, o_k, o_b, m, n_k, n_b)
            _store_pool(p_dout, 0, dca, o_k, o_b, m, n_k, n_b)
            if TWO_POOL:
                _store_pool(p_out, 1, cb, o_k, o_b, m, n_k, n_b)
                _store_pool(p_dout, 1, dcb, o_k, o_b, m, n_k, n_b)


def launch_config(
    kind: str, dtype: torch.dtype, n_states: int, n_spins: int, mode: str = "fwd"
) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_SPINS, num_warps)`` of a ``mode`` (``"fwd"``, ``"bwd"``, ``"jvp"``) launch.

    On a GPU a program holds about ``_BLOCK_VALUES`` values per plane (fewer for two pools,
    float64 and the derivative kernels, which keep more planes live), spins first: up to
    128 contiguous spins make the loads and stores coalesced, and the orders fill the rest
    of the block, looping over K. In the interpreter numpy's cost is per operation, so few
    large programs are fastest.
    """
    k_pad = triton.next_power_of_2(max(n_states, 2))
    spins = triton.next_power_of_2(max(n_spins, 1))
    if INTERPRETED:
        return min(k_pad, 64), min(256, spins), 1
    values = _BLOCK_VALUES
    values //= 1 if kind == "single" else 2
    values //= 2 if dtype == torch.float64 else 1
    values //= 1 if mode == "fwd" else 2
    block_spins = min(128, spins, values // 2)
    block_k = max(2, min(k_pad, values // block_spins))
    return block_k, block_spins, max(1, min(4, block_k * block_spins // 64))


def _shapes(kind: str, n_states: int, n_spins: int) -> dict[str, tuple[int, ...]]:
    p = 1 if kind == "single" else 2
    return {
        "state": (p, 6, n_states, n_spins),
        "xt_re": (p, p, n_spins),
        "xt_im": (p, p, n_spins),
        "xl": (p, p, n_spins),
        "recovery": (p, n_spins),
        "alpha": (n_spins,),
        "phase": (n_spins,),
        "sat": (n_spins,),
    }


def _check(kind: str, rf: bool, relax: bool, tensors: dict[str, Tensor], like: Tensor) -> tuple[int, int]:
    """Validate a launch: kind, what the step does, shapes, dtypes, devices; returns (K, B)."""
    if kind not in KINDS:
        raise ValueError(f"epg_step: kind must be one of {KINDS}; got {kind!r}.")
    if not (rf or relax):
        raise ValueError("epg_step: a step needs an RF pulse, a relaxation interval or both; got neither.")
    if like.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"epg_step: dtype must be torch.float32 or torch.float64; got {like.dtype}.")
    state = tensors["state"]
    if state.ndim != 4:
        raise ValueError(f"epg_step: state must be [P, 6, K, B]; got shape {tuple(state.shape)}.")
    n_states, n_spins = state.shape[2], state.shape[3]
    if n_states < 1:
        raise ValueError(f"epg_step: state needs K >= 1 orders; got shape {tuple(state.shape)}.")
    shapes = _shapes(kind, n_states, n_spins)
    for name, t in tensors.items():
        shape = (
            shapes[name.removeprefix("d_").removeprefix("g_")]
            if name not in ("out", "grad")
            else shapes["state"]
        )
        if tuple(t.shape) != shape:
            raise ValueError(
                f"epg_step: {name} must have shape {shape} for kind={kind!r}; got {tuple(t.shape)}."
            )
        if t.dtype != like.dtype or t.device != like.device or not t.is_contiguous():
            raise ValueError(
                f"epg_step: {name} must be a contiguous {like.dtype} tensor on {like.device}; "
                f"got {t.dtype} on {t.device} (contiguous: {t.is_contiguous()})."
            )
    return n_states, n_spins


def _pick(kind: str, dtype: torch.dtype, n_states: int, n_spins: int, mode: str, block_spins: int | None):
    block_k, bs, num_warps = launch_config(kind, dtype, n_states, n_spins, mode)
    bs = _block_spins(bs, block_spins, "epg_step")
    return (triton.cdiv(n_spins, bs),), dict(
        TWO_POOL=kind != "single",
        MT=kind == "mt",
        BLOCK_K=block_k,
        BLOCK_SPINS=bs,
        num_warps=num_warps,
    )


def _launch_fwd(
    inputs: Sequence[Tensor], out: Tensor, *, kind: str, rf: bool, relax: bool, block_spins: int | None
) -> None:
    """Check the eight inputs (``_INPUTS``) and ``out`` [P, 6, K, B]; launch :func:`_fwd`."""
    tensors = dict(zip(_INPUTS, inputs, strict=True)) | {"out": out}
    n_states, n_spins = _check(kind, rf, relax, tensors, inputs[0])
    if n_spins == 0:
        return
    grid, meta = _pick(kind, out.dtype, n_states, n_spins, "fwd", block_spins)
    _fwd[grid](*inputs, out, n_spins, n_states, RF=rf, RELAX=relax, **meta)


@custom_op("epgx::epg_step", mutates_args=())
def _step_op(
    state: Tensor,
    xt_re: Tensor,
    xt_im: Tensor,
    xl: Tensor,
    recovery: Tensor,
    alpha: Tensor,
    phase: Tensor,
    sat: Tensor,
    kind: str,
    rf: bool,
    relax: bool,
    block_spins: int | None,
) -> Tensor:
    """x' ``[P, 6, K, B]`` of one step; inputs as :func:`_fwd`."""
    inputs = _dense((state, xt_re, xt_im, xl, recovery, alpha, phase, sat))
    out = torch.empty_like(inputs[0])
    _launch_fwd(inputs, out, kind=kind, rf=rf, relax=relax, block_spins=block_spins)
    return out


@custom_op("epgx::epg_step_bwd", mutates_args=())
def _bwd_op(
    state: Tensor,
    xt_re: Tensor,
    xt_im: Tensor,
    xl: Tensor,
    recovery: Tensor,
    alpha: Tensor,
    phase: Tensor,
    sat: Tensor,
    grad: Tensor,
    kind: str,
    rf: bool,
    relax: bool,
    block_spins: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ⟨grad, x'⟩ w.r.t. the eight inputs (each of its input's shape)."""
    inputs = _dense((state, xt_re, xt_im, xl, recovery, alpha, phase, sat))
    grad = grad.contiguous()
    tensors = dict(zip(_INPUTS, inputs, strict=True)) | {"grad": grad}
    n_states, n_spins = _check(kind, rf, relax, tensors, inputs[0])
    g_state = torch.empty_like(inputs[0])
    g_xt_re, g_xt_im, g_xl = (torch.empty_like(t) for t in inputs[1:4])
    g_rec = torch.empty_like(inputs[4])
    g_alpha, g_phase, g_sat = (torch.empty_like(t) for t in inputs[5:])
    if n_spins > 0:
        grid, meta = _pick(kind, g_state.dtype, n_states, n_spins, "bwd", block_spins)
        _bwd[grid](
            *inputs,
            grad,
            g_state,
            g_xt_re,
            g_xt_im,
            g_xl,
            g_rec,
            g_alpha,
            g_phase,
            g_sat,
            n_spins,
            n_states,
            RF=rf,
            RELAX=relax,
            **meta,
        )
    return g_state, g_xt_re, g_xt_im, g_xl, g_rec, g_alpha, g_phase, g_sat


@custom_op("epgx::epg_step_jvp", mutates_args=())
def _jvp_op(
    state: Tensor,
    xt_re: Tensor,
    xt_im: Tensor,
    xl: Tensor,
    recovery: Tensor,
    alpha: Tensor,
    phase: Tensor,
    sat: Tensor,
    d_state: Tensor,
    d_xt_re: Tensor,
    d_xt_im: Tensor,
    d_xl: Tensor,
    d_recovery: Tensor,
    d_alpha: Tensor,
    d_phase: Tensor,
    d_sat: Tensor,
    kind: str,
    rf: bool,
    relax: bool,
    block_spins: int | None,
) -> tuple[Tensor, Tensor]:
    """x' and its tangent along the inputs' tangents ``d_*`` (each of its input's shape)."""
    inputs = _dense((state, xt_re, xt_im, xl, recovery, alpha, phase, sat))
    tangents = _dense((d_state, d_xt_re, d_xt_im, d_xl, d_recovery, d_alpha, d_phase, d_sat))
    tensors = dict(zip(_INPUTS, inputs, strict=True))
    tensors |= {"d_" + n: t for n, t in zip(_INPUTS, tangents, strict=True)}
    n_states, n_spins = _check(kind, rf, relax, tensors, inputs[0])
    out = torch.empty_like(inputs[0])
    dout = torch.empty_like(inputs[0])
    if n_spins > 0:
        grid, meta = _pick(kind, out.dtype, n_states, n_spins, "jvp", block_spins)
        _jvp[grid](*inputs, *tangents, out, dout, n_spins, n_states, RF=rf, RELAX=relax, **meta)
    return out, dout


@_step_op.register_fake
def _step_fake(*args: Any) -> Tensor:
    return torch.empty_like(args[0])


@_bwd_op.register_fake
def _bwd_fake(*args: Any) -> tuple[Tensor, ...]:
    return tuple(torch.empty_like(t) for t in args[:_N_IN])


@_jvp_op.register_fake
def _jvp_fake(*args: Any) -> tuple[Tensor, Tensor]:
    return torch.empty_like(args[0]), torch.empty_like(args[0])


def _fold(
    info: Any, in_dims: Sequence[int | None], args: Sequence[Any], n_tensors: int
) -> tuple[list[Any], int]:
    """Fold a vmap batch into the spin axis of every tensor argument (all are per spin)."""
    i_alpha = _INPUTS.index("alpha")
    alpha, d = args[i_alpha], in_dims[i_alpha]
    n_b = alpha.shape[-1] if d is None else alpha.movedim(d, 0).shape[-1]
    folded = [
        _fold_spins(t, dim, info.batch_size, n_b) for t, dim in zip(args[:n_tensors], in_dims, strict=False)
    ]
    return [*folded, *args[n_tensors:]], n_b


def _unfold(t: Tensor, n_batch: int, n_b: int) -> tuple[Tensor, int]:
    """[..., n_batch·B] → [..., n_batch, B] and the batch dimension's index."""
    t = t.unflatten(-1, (n_batch, n_b))
    return t, t.ndim - 2


@_step_op.register_vmap
def _step_vmap(info: Any, in_dims: Sequence[int | None], *args: Any) -> tuple[Tensor, int]:
    new, n_b = _fold(info, in_dims, args, _N_IN)
    return _unfold(torch.ops.epgx.epg_step.default(*new), info.batch_size, n_b)


@_bwd_op.register_vmap
def _bwd_vmap(
    info: Any, in_dims: Sequence[int | None], *args: Any
) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
    new, n_b = _fold(info, in_dims, args, _N_IN + 1)
    outs = [_unfold(t, info.batch_size, n_b) for t in torch.ops.epgx.epg_step_bwd.default(*new)]
    return tuple(o[0] for o in outs), tuple(o[1] for o in outs)


@_jvp_op.register_vmap
def _jvp_vmap(
    info: Any, in_dims: Sequence[int | None], *args: Any
) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
    new, n_b = _fold(info, in_dims, args, 2 * _N_IN)
    outs = [_unfold(t, info.batch_size, n_b) for t in torch.ops.epgx.epg_step_jvp.default(*new)]
    return tuple(o[0] for o in outs), tuple(o[1] for o in outs)


def _step_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs[:_N_IN])
    ctx.config = inputs[_N_IN:]


def _step_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    grads = _first_order(torch.ops.epgx.epg_step_bwd.default, *ctx.saved_tensors, grad, *ctx.config)
    needs = ctx.needs_input_grad[:_N_IN]
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)), *(None for _ in ctx.config))


_step_op.register_autograd(_step_backward, setup_context=_step_setup)
_bwd_op.register_autograd(_no_second_order, setup_context=_no_setup)
_jvp_op.register_autograd(_no_second_order, setup_context=_no_setup)


class _Step(torch.autograd.Function):
    """One step as a differentiable function of the eight kernel inputs (``_INPUTS``).

    ``backward`` runs the adjoint kernel, ``jvp`` the tangent kernel; ``torch.func``
    batches (``jacfwd``, ``jacrev``, ``vmap``) join the spins through the ops' vmap rules.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(*args: Any) -> Tensor:
        return torch.ops.epgx.epg_step.default(*args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs[:_N_IN])
        ctx.save_for_forward(*inputs[:_N_IN])
        ctx.config = inputs[_N_IN:]

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Tensor:
        primals = ctx.saved_tensors
        tans = [
            torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents[:_N_IN], strict=True)
        ]
        return _first_order(torch.ops.epgx.epg_step_jvp.default, *primals, *tans, *ctx.config)[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return _step_backward(ctx, grad)


def epg_step(
    state: Tensor,
    relaxation: ops.Relaxation | None,
    b1: Tensor,
    flip_rad: Tensor | float | None,
    phase_rad: Tensor | float = 0.0,
    *,
    kind: str,
    mt_lineshape_us: Tensor | None = None,
    b1sq_tau_ut2ms: Tensor | float | None = None,
    out: Tensor | None = None,
    block_spins: int | None = None,
) -> Tensor:
    """One EPG-X timestep of B spins in one launch: RF pulse → relaxation/exchange → shift → recovery.

    The fused twin of ``ops.rf`` → ``ops.relax(..., with_recovery=True)`` → ``ops.shift(·, 1)``
    (Weigel 2015, eq. 15; Malik 2018, eq. 11). Differentiable w.r.t. every tensor argument
    (autograd, ``torch.func`` jvp, jacfwd, jacrev, vmap) by analytic rules; second-order
    derivatives are not supported.

    Args:
        state: ``[P, 6, K, B]`` EPG state (layout of :mod:`epgx.ops`; P = 1 single, 2 BM/MT).
        relaxation: per-spin propagators of the interval from :func:`epgx.ops.relaxation`
            (``[P, P, B]``, recovery ``[P, B]``); None: the pulse only (no relaxation, no
            shift), as before a GRE readout.
        b1: ``[B]`` transmit scale per spin (multiplies the flip angle and, for MT, the
            pulse energy).
        flip_rad: nominal flip angle, radians: a number, a 0-d tensor or ``[B]``; None: no
            pulse (a free interval).
        phase_rad: RF phase, radians: a number, a 0-d tensor or ``[B]``.
        kind: ``"single"``, ``"bm"`` or ``"mt"``.
        mt_lineshape_us: ``[B]`` bound-pool lineshape G, µs (MT with a pulse only).
        b1sq_tau_ut2ms: ∫B1² dt of the pulse, µT²·ms (MT with a pulse only).
        out: optional ``[P, 6, K, B]`` buffer for the new state; forward only.
        block_spins: spins per program (a power of two); None picks one.

    Returns:
        the new state ``[P, 6, K, B]``.

    Raises:
        ValueError: bad kind, shapes, dtypes or devices; neither a pulse nor a relaxation;
            MT inputs missing or given outside MT; ``out`` with inputs that carry derivatives.
    """
    if kind not in KINDS:
        raise ValueError(f"epg_step: kind must be one of {KINDS}; got {kind!r}.")
    rf, relax = flip_rad is not None, relaxation is not None
    if not (rf or relax):
        raise ValueError("epg_step: a step needs flip_rad, relaxation or both; got neither.")
    mt_given = (mt_lineshape_us is not None, b1sq_tau_ut2ms is not None)
    if (kind == "mt" and rf) != mt_given[0] or mt_given[0] != mt_given[1]:
        raise ValueError(
            "epg_step: mt_lineshape_us and b1sq_tau_ut2ms are needed for, and only for, an MT "
            f"pulse; got kind={kind!r}, flip_rad {'given' if rf else 'None'}, mt_lineshape_us "
            f"{'given' if mt_given[0] else 'None'}, b1sq_tau_ut2ms {'given' if mt_given[1] else 'None'}."
        )
    if state.ndim != 4 or b1.ndim != 1 or state.shape[-1] != b1.shape[0]:
        raise ValueError(
            f"epg_step: state must be [P, 6, K, B] and b1 [B]; got {tuple(state.shape)} "
            f"and {tuple(b1.shape)}."
        )
    dtype, device = state.dtype, state.device
    n_pools, n_spins = (1 if kind == "single" else 2), b1.shape[0]

    def per_spin(name: str, value: Tensor | float) -> Tensor:
        t = torch.as_tensor(value, dtype=dtype, device=device)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, n_spins)):
            raise ValueError(
                f"epg_step: {name} must be a number or have shape [{n_spins}]; got {tuple(t.shape)}."
            )
        return t.expand(n_spins)

    if rf:
        assert flip_rad is not None
        alpha = b1 * per_spin("flip_rad", flip_rad)
        phase = per_spin("phase_rad", phase_rad)
        sat = b1.new_ones(n_spins)
        if kind == "mt":
            assert mt_lineshape_us is not None and b1sq_tau_ut2ms is not None
            sat = ops.mt_saturation(per_spin("b1sq_tau_ut2ms", b1sq_tau_ut2ms), mt_lineshape_us, b1)
    else:
        alpha = phase = sat = b1.new_zeros(n_spins)
    if relax:
        assert relaxation is not None
        xt_re, xl, recovery = relaxation.xt_re, relaxation.xl, relaxation.recovery
        xt_im = torch.zeros_like(xt_re) if relaxation.xt_im is None else relaxation.xt_im
    else:
        xt_re = xt_im = xl = b1.new_zeros(n_pools, n_pools, n_spins)
        recovery = b1.new_zeros(n_pools, n_spins)
    inputs = [
        t.to(dtype=dtype, device=device).contiguous()
        for t in (state, xt_re, xt_im, xl, recovery, alpha, phase, sat)
    ]
    if out is not None:
        if any(ops.differentiated(t) for t in inputs):
            raise ValueError(
                "epg_step: out= is for the forward pass only; inputs that carry derivatives "
                "need out=None (the differentiable path allocates its output)."
            )
        _launch_fwd(inputs, out, kind=kind, rf=rf, relax=relax, block_spins=block_spins)
        return out
    return _Step.apply(*inputs, kind, rf, relax, block_spins)
