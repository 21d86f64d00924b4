"""Fused MOLLI T1 fit: grid start and Levenberg–Marquardt for every voxel, in one launch.

Model (Messroghli et al., MRM 2004;52:141–146), per voxel, at the sorted inversion
times t::

    S(t) = |A − B·exp(−t / T1*)|,   T1 = T1*·(B/A − 1)   (Deichmann & Haase, JMR 1992).

One program fits a block of voxels; each voxel's n samples (and its TIs, unless they
are shared) stay in registers as ``[BLOCK_VOXELS, N_PAD]`` blocks, N_PAD ≥ n + 1. This is
the algorithm of the torch path, :func:`epgx.fit.molli._fit_lm`, step for step, so the
two agree to rounding:

1. **Grid** over the G log-spaced T1* values, with the sign patterns m = 0..n (the first
   m samples negated; complex data: m = 0 or n, i.e. ±1) of every voxel in one pass:
   with Q = (E − Ē)/‖E − Ē‖, E = e^{−t/T1*}, pattern m explains (Σyₘ)²/n + uₘ² of Σy²,
   uₘ = Σ yₘ·Q = u₀ − 2·Σ_{i<m} yᵢQᵢ (a prefix sum along the samples; variable
   projection). Running maxima over the grid, per pattern, keep the best grid point
   and its two neighbours: for the unconstrained search (patterns m < n) and for the
   one that only admits A, B > 0 (uₘ < 0 and Σyₘ/n + uₘ·Ē/‖E − Ē‖ > 0). Scores are in
   float32, as the torch path's. The best pattern's T1* is refined by a parabola in
   log T1*; A and B follow by linear least squares; a voxel whose winner has not
   A, B > 0 takes the constrained winner. Magnitude data also refine the runner-up
   pattern: within ``AMBIGUOUS_RSS_*`` of the best it is a second start.
2. **Levenberg–Marquardt** on (A, B, T1*) of the magnitude model (complex data: the
   signed model, the grid's overall sign applied) from each start: the 3×3 Newton
   system (JᵀJ + S)·δ = −Jᵀr, S = Σ r·∇²r (Gauss–Newton, S = 0, where JᵀJ + S + λ·diag
   is not positive definite), scaled to unit diagonal and Marquardt-damped, solved in
   closed form (adjugate); λ ×0.1 on a step that lowers the cost (the change Σ Δr·(2r +
   Δr) formed from the step, exact where the cost is flat), ×10 otherwise; a voxel stops
   on a small step (``LM_XTOL_FP64``, or ``LM_NEWTON_XTOL_FP64`` for a Newton step taken),
   λ > ``LM_LAMBDA_MAX`` or a zero cost, at most ``max_iter`` steps (the block runs
   while a voxel is active).
   A second start replaces the first where its final cost is lower.

Outputs, per voxel, in rows of one ``[N_ROWS, V]`` buffer of the data's dtype: A, B,
T1* (ms), the residual sum of squares, the LM steps (both starts), converged (0/1),
the polarity of the fitted curve (samples with A − B·e^{−t/T1*} < 0) and the grid's
sign pattern m (complex data: 0 for +, n for −). The maps (T1, its SD from σ²(JᵀJ)⁻¹,
R², ok) are built from them by :func:`epgx.fit.molli._maps`, as for the torch path.

References
----------
- Messroghli DR et al. Modified Look-Locker inversion recovery (MOLLI) for
  high-resolution T1 mapping of the heart. MRM 2004;52:141-146.
- Barral JK et al. A robust methodology for in vivo T1 mapping. MRM 2010;64:1057-1067
  (polarity restoration).
- Marquardt DW. An algorithm for least-squares estimation of nonlinear parameters.
  J SIAM 1963;11:431-441.
"""

from __future__ import annotations

import contextlib
import importlib
import math

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# the torch path's module (the attribute epgx.fit.molli is the function of that name)
_ref = importlib.import_module("epgx.fit.molli")

# Rows of the output buffer, in the order the kernel stores them.
ROWS = ("a", "b", "t1_star_ms", "rss", "n_iter", "converged", "polarity", "pattern")
ROW_A, ROW_B, ROW_T1_STAR, ROW_RSS, ROW_N_ITER, ROW_CONVERGED, ROW_POLARITY, ROW_PATTERN = range(len(ROWS))
N_ROWS = len(ROWS)
_N_ROWS = tl.constexpr(N_ROWS)

# ~16 live [BLOCK_VOXELS, N_PAD] blocks per program (the data, the times, the prefix sums
# and the running maxima of both grid searches) within this many 32-bit registers: with
# 4 warps 64 per thread, 32 (float32) or 16 (float64) voxels per program at N_PAD 16.
# ptxas then uses 108–182 registers per thread for sm_90 and spills at most 4 bytes
# (tests/test_molli_kernel.py compiles every variant and reads its report).
_BLOCK_REGS_PER_PROGRAM = 8192
_LIVE_BLOCKS = 16
_MAX_BLOCK_VOXELS = 128


@triton.jit
def _rowsum(x):
    """Sum over the samples (axis 1)."""
    return tl.sum(x, axis=1)


@triton.jit
def _pick(x, sel):
    """x[v, sel[v]] of a [BLOCK_VOXELS, N_PAD] block (one element per row is kept)."""
    o_m = tl.arange(0, x.shape[1])
    return tl.sum(tl.where(o_m[None, :] == sel[:, None], x, 0), axis=1)


@triton.jit
def _finite_or_zero(x):
    """torch.nan_to_num(x, 0, 0, 0): NaN and ±inf become 0."""
    return tl.where((x == x) & (tl.abs(x) != float("inf")), x, 0.0)


@triton.jit
def _expm1(x):
    """e^x − 1 to ~1e-18 relative for |x| < 1e-3 (Taylor to x⁵: remainder x⁵/720), else
    exp(x) − 1 (≤ eps/1e-3 relative): Triton has no expm1 without libdevice."""
    b_p = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0)))))
    return tl.where(tl.abs(x) < 1e-3, b_p, tl.exp(x) - 1.0)


@triton.jit
def _track(b_s, g, best, arg, prv, nxt, last):
    """Running argmax over the grid of one score per (voxel, pattern), with its neighbours.

    best/arg: the largest score so far and its grid index (the first of ties, as
    torch's ``max``); prv/nxt: the scores at arg − 1 and arg + 1 (nxt is the score at
    arg itself until grid point arg + 1 arrives: the clamp at the last grid point);
    last: the score of the previous grid point.
    """
    nxt = tl.where(arg == g - 1, b_s, nxt)
    upd = b_s > best
    prv = tl.where(upd, last, prv)
    nxt = tl.where(upd, b_s, nxt)
    arg = tl.where(upd, g, arg)
    best = tl.where(upd, b_s, best)
    return best, arg, prv, nxt, b_s


@triton.jit
def _refine(sel, best, arg, prv, nxt, p_grid, n_grid, LOG_STEP: tl.constexpr):
    """T1* (ms) of pattern ``sel``: its best grid point moved to the vertex of the parabola
    through the scores at it and its neighbours, in log T1* (at most one grid step;
    none at the ends of the grid or where the scores are not concave)."""
    s_0 = _pick(best, sel)
    s_m = _pick(prv, sel)
    s_p = _pick(nxt, sel)
    gg = _pick(arg, sel)
    curv = s_m - 2.0 * s_0 + s_p
    shift = tl.minimum(tl.maximum(_finite_or_zero(0.5 * (s_m - s_p) / curv), -1.0), 1.0)
    shift = tl.where((gg > 0) & (gg < n_grid - 1) & (curv < 0), shift, 0.0)
    b_grid = tl.load(p_grid + gg)
    return b_grid * tl.exp(shift.to(b_grid.dtype) * LOG_STEP)


@triton.jit
def _linear_fit(b_y, b_t, m_s, pattern, b_ts, n):
    """A, B and the residual sum of squares of the signed data (first ``pattern`` samples
    negated) at T1* ``b_ts``, by linear least squares on the basis (1, −E)."""
    o_s = tl.arange(0, b_y.shape[1])
    b_ys = tl.where(o_s[None, :] < pattern[:, None], -b_y, b_y)
    b_e = tl.where(m_s, tl.exp(-b_t / b_ts[:, None]), 0.0)
    s1 = _rowsum(b_e)
    s2 = _rowsum(b_e * b_e)
    sa = _rowsum(b_ys)
    sc = _rowsum(b_ys * b_e)
    det = n * s2 - s1 * s1
    b_a = (s2 * sa - s1 * sc) / det
    b_b = (s1 * sa - n * sc) / det
    b_r = tl.where(m_s, b_a[:, None] - b_b[:, None] * b_e - b_ys, 0.0)
    return b_a, b_b, _rowsum(b_r * b_r)


@triton.jit
def _residual(b_y, b_t, m_s, b_a, b_b, b_ts, SIGNED: tl.constexpr):
    """E = e^{t·(−1/T1*)}, f = A − B·E and w = sgn(f)·r (magnitude: r = |f| − y), masked."""
    b_e = tl.where(m_s, tl.exp(b_t * (-1.0 / b_ts)[:, None]), 0.0)
    b_f = b_a[:, None] - b_b[:, None] * b_e
    if SIGNED:
        b_w = b_f - b_y
    else:
        b_w = b_f - tl.where(b_f < 0, -b_y, b_y)
    return b_e, b_f, tl.where(m_s, b_w, 0.0)


@triton.jit
def _cost(b_y, b_t, m_s, b_a, b_b, b_ts, SIGNED: tl.constexpr):
    """Σr² at (A, B, T1*)."""
    _, _, b_w = _residual(b_y, b_t, m_s, b_a, b_b, b_ts, SIGNED)
    return _rowsum(b_w * b_w)


@triton.jit
def _solve_sym3(h0, h1, h2, h3, h4, h5, s12, s22, v0, v1, v2, lam, TINY_SQRT: tl.constexpr):
    """(H + λ·diag H)⁻¹·v for symmetric H = (h00 h01 h02 h11 h12 h22), by the adjugate of
    the unit-diagonal D⁻¹HD⁻¹ + λI, D = √diag H, with the second-order terms (s12, s22)
    added (Newton) wherever that stays positive definite (as fit.molli._solve_sym3).
    Returns the solution and where it is the Newton one."""
    d0 = tl.maximum(tl.sqrt(h0), TINY_SQRT, propagate_nan=tl.PropagateNan.ALL)
    d1 = tl.maximum(tl.sqrt(h3), TINY_SQRT, propagate_nan=tl.PropagateNan.ALL)
    d2 = tl.maximum(tl.sqrt(h5), TINY_SQRT, propagate_nan=tl.PropagateNan.ALL)
    m01 = h1 / (d0 * d1)
    m02 = h2 / (d0 * d2)
    m12 = h4 / (d1 * d2)
    m00 = 1.0 + lam
    m22 = m00
    n12 = m12 + s12 / (d1 * d2)
    n22 = m22 + s22 / (d2 * d2)
    det_n = m00 * (m00 * n22 - n12 * n12) - m01 * (m01 * n22 - n12 * m02) + m02 * (m01 * n12 - m00 * m02)
    newton = det_n > 0  # the leading minors 1 + λ and (1 + λ)² − m01² are > 0 already
    m12 = tl.where(newton, n12, m12)
    m22 = tl.where(newton, n22, m22)
    v0 = v0 / d0
    v1 = v1 / d1
    v2 = v2 / d2
    c00 = m00 * m22 - m12 * m12
    c01 = m02 * m12 - m01 * m22
    c02 = m01 * m12 - m02 * m00
    c11 = m00 * m22 - m02 * m02
    c12 = m01 * m02 - m00 * m12
    c22 = m00 * m00 - m01 * m01
    det = m00 * c00 + m01 * c01 + m02 * c02
    x0 = c00 * v0 + c01 * v1 + c02 * v2
    x1 = c01 * v0 + c11 * v1 + c12 * v2
    x2 = c02 * v0 + c12 * v1 + c22 * v2
    return x0 / (det * d0), x1 / (det * d1), x2 / (det * d2), newton


@triton.jit
def _cost_change(b_t, m_s, b_e, b_f, b_w, b_b, b_ts, s0, s1, s2, SIGNED: tl.constexpr):
    """Σr² at (A, B, T1*) + step minus Σr² at (A, B, T1*), as Σ Δr·(2r + Δr) with Δf formed
    from the step (E' − E = E·expm1(t·δT1*/(T1*·T1*'))): exact to the change's own
    rounding (fit.molli._cost_change). b_e, b_f, b_w: _residual at (A, B, T1*)."""
    b_de = b_e * _expm1(b_t * (s2 / (b_ts * (b_ts + s2)))[:, None])
    b_df = s0[:, None] - s1[:, None] * (b_e + b_de) - b_b[:, None] * b_de
    b_df = tl.where(m_s, b_df, 0.0)
    if SIGNED:
        b_dr = b_df
        b_r = b_w
    else:
        b_sgn = tl.where(b_f < 0, -1.0, 1.0)
        b_fn = b_f + b_df
        b_dr = b_sgn * b_df + (tl.where(b_fn < 0, -1.0, 1.0) - b_sgn) * b_fn
        b_r = b_sgn * b_w
    return _rowsum(b_dr * (2.0 * b_r + b_dr))


@triton.jit
def _lm(
    b_y,
    b_t,
    m_s,
    b_a,
    b_b,
    b_ts,
    active,
    n,
    max_iter,
    SIGNED: tl.constexpr,
    XTOL: tl.constexpr,
    NEWTON_XTOL: tl.constexpr,
    LAMBDA0: tl.constexpr,
    LAMBDA_MAX: tl.constexpr,
    TINY_SQRT: tl.constexpr,
):
    """Levenberg–Marquardt from (A, B, T1*) for the ``active`` voxels (fit.molli._lm).

    Returns (A, B, T1*, converged, steps, final cost).
    """
    lam = tl.zeros_like(b_a) + LAMBDA0
    n_iter = tl.zeros_like(active.to(tl.int32))
    it = 0
    while (it < max_iter) & (tl.max(active.to(tl.int32), axis=0) > 0):
        b_e, b_f, b_w = _residual(b_y, b_t, m_s, b_a, b_b, b_ts, SIGNED)
        cost = _rowsum(b_w * b_w)
        b_et = b_e * b_t
        b_wet = _rowsum(b_w * b_et)
        q = b_b / (b_ts * b_ts)
        h0 = tl.zeros_like(cost) + n
        h1 = -_rowsum(b_e)
        h2 = -q * _rowsum(b_et)
        h3 = _rowsum(b_e * b_e)
        h4 = q * _rowsum(b_e * b_et)
        h5 = q * q * _rowsum(b_et * b_et)
        g0 = _rowsum(b_w)
        g1 = -_rowsum(b_w * b_e)
        g2 = -q * b_wet
        s12 = -b_wet / (b_ts * b_ts)
        s22 = (2.0 * q / b_ts) * b_wet - (q / (b_ts * b_ts)) * _rowsum(b_w * b_et * b_t)
        x0, x1, x2, newton = _solve_sym3(h0, h1, h2, h3, h4, h5, s12, s22, g0, g1, g2, lam, TINY_SQRT)
        s0 = _finite_or_zero(-x0)
        s1 = _finite_or_zero(-x1)
        s2 = _finite_or_zero(-x2)
        t_ts = b_ts + s2
        d_cost = _cost_change(b_t, m_s, b_e, b_f, b_w, b_b, b_ts, s0, s1, s2, SIGNED)
        accept = (d_cost < 0) & (t_ts > 0) & active
        small_step = (
            (tl.abs(s0) <= XTOL * (tl.abs(b_a) + XTOL))
            & (tl.abs(s1) <= XTOL * (tl.abs(b_b) + XTOL))
            & (tl.abs(s2) <= XTOL * (tl.abs(b_ts) + XTOL))
        )
        small_newton = (
            (tl.abs(s0) <= NEWTON_XTOL * (tl.abs(b_a) + NEWTON_XTOL))
            & (tl.abs(s1) <= NEWTON_XTOL * (tl.abs(b_b) + NEWTON_XTOL))
            & (tl.abs(s2) <= NEWTON_XTOL * (tl.abs(b_ts) + NEWTON_XTOL))
        )
        b_a = tl.where(accept, b_a + s0, b_a)
        b_b = tl.where(accept, b_b + s1, b_b)
        b_ts = tl.where(accept, t_ts, b_ts)
        lam = lam * (10.0 - 9.9 * accept.to(lam.dtype))  # ×0.1 on success, ×10 on failure
        n_iter += active.to(tl.int32)
        done = small_step | (accept & newton & small_newton) | (lam > LAMBDA_MAX) | (cost == 0)
        active = active & ~done
        it += 1
    return b_a, b_b, b_ts, ~active, n_iter, _cost(b_y, b_t, m_s, b_a, b_b, b_ts, SIGNED)


@triton.jit
def _fwd(
    p_y,
    p_t,
    p_grid,
    p_out,
    n_voxels,
    n,
    n_grid,
    max_iter,
    SIGNED: tl.constexpr,
    T_SHARED: tl.constexpr,
    LOG_STEP: tl.constexpr,
    XTOL: tl.constexpr,
    NEWTON_XTOL: tl.constexpr,
    LAMBDA0: tl.constexpr,
    LAMBDA_MAX: tl.constexpr,
    TINY_SQRT: tl.constexpr,
    RSS_RATIO: tl.constexpr,
    RSS_FLOOR: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_VOXELS: tl.constexpr,
):
    """Fit BLOCK_VOXELS voxels: grid start, Levenberg–Marquardt, one column of p_out each.

    p_y: [V, n] data (magnitude, or phase-aligned real part), each voxel / its max |y|;
    p_t: [V, n] or [n] (T_SHARED) TIs, ms, sorted; p_grid: [n_grid] T1* grid, ms,
    log-spaced by LOG_STEP; p_out: [N_ROWS, V].
    """
    i_v = tl.program_id(0).to(tl.int64)
    o_v = i_v * BLOCK_VOXELS + tl.arange(0, BLOCK_VOXELS)
    m_v = o_v < n_voxels
    o_s = tl.arange(0, N_PAD)
    m_s = (o_s < n)[None, :]
    n_b = tl.cast(n_voxels, tl.int64)  # also when Triton specialises n_voxels == 1 as a constant
    # voxels past the end (a partial last block) fit a copy of the first: finite
    # arithmetic, never stored, never iterated
    o_ld = tl.where(m_v, o_v, 0)[:, None] * n + o_s[None, :]
    b_y = tl.load(p_y + o_ld, mask=m_s, other=0.0)
    if T_SHARED:
        b_t = tl.load(p_t + o_s[None, :], mask=m_s, other=0.0)  # [1, N_PAD]
    else:
        b_t = tl.load(p_t + o_ld, mask=m_s, other=0.0)

    # ---- grid over T1* × sign patterns m (the first m samples negated), float32 scores
    o_m = o_s[None, :]  # pattern axis = sample axis: m = 0..N_PAD-1, N_PAD > n
    b_ys = b_y.to(tl.float32)
    y_excl = tl.cumsum(b_ys, axis=1) - b_ys  # Σ_{i<m} yᵢ
    b_sa = _rowsum(b_ys)[:, None] - 2.0 * y_excl  # Σyₘ of pattern m
    bias = b_sa * b_sa / n
    neg_inf = tl.full([BLOCK_VOXELS, N_PAD], float("-inf"), tl.float32)
    zero_i = tl.zeros([BLOCK_VOXELS, N_PAD], dtype=tl.int32)
    zero_f = tl.zeros([BLOCK_VOXELS, N_PAD], dtype=tl.float32)
    best_u, arg_u, prv_u, nxt_u, last_u = neg_inf, zero_i, zero_f, zero_f, zero_f
    best_c, arg_c, prv_c, nxt_c, last_c = neg_inf, zero_i, zero_f, zero_f, zero_f
    for g in range(0, n_grid):
        b_e = tl.where(m_s, tl.exp(-b_t / tl.load(p_grid + g)), 0.0)
        mean_e = _rowsum(b_e) / n
        b_ec = tl.where(m_s, b_e - mean_e[:, None], 0.0)
        norm = tl.sqrt(_rowsum(b_ec * b_ec))
        b_q = tl.where(norm[:, None] > 0, b_ec / norm[:, None], 0.0).to(tl.float32)
        slope = (mean_e / norm).to(tl.float32)
        b_yq = b_ys * b_q
        b_u = _rowsum(b_yq)[:, None] - 2.0 * (tl.cumsum(b_yq, axis=1) - b_yq)
        b_s = b_u * b_u
        invalid = (b_u >= 0) | (b_u * slope[:, None] <= -(b_sa / n))
        best_u, arg_u, prv_u, nxt_u, last_u = _track(b_s, g, best_u, arg_u, prv_u, nxt_u, last_u)
        b_sc = tl.where(invalid, float("-inf"), b_s)
        best_c, arg_c, prv_c, nxt_c, last_c = _track(b_sc, g, best_c, arg_c, prv_c, nxt_c, last_c)

    if SIGNED:  # one pattern and its negation (m = n): A, B > 0 picks the overall sign
        ok_u = o_m == 0
        ok_c = (o_m == 0) | (o_m == n)
    else:
        ok_u = o_m < n
        ok_c = o_m <= n
    tot_u = tl.where(ok_u, best_u + bias, float("-inf"))
    k1 = tl.argmax(tot_u, axis=1, tie_break_left=True)
    ts1 = _refine(k1, best_u, arg_u, prv_u, nxt_u, p_grid, n_grid, LOG_STEP)
    b_a, b_b, rss = _linear_fit(b_y, b_t, m_s, k1, ts1, n)
    # the all-positive pattern fitted with A, B < 0 is the all-negated one with A, B > 0
    negated = (k1 == 0) & (b_a < 0) & (b_b < 0)
    b_a = tl.where(negated, -b_a, b_a)
    b_b = tl.where(negated, -b_b, b_b)
    pattern = tl.where(negated, n, k1)
    bad = ~((b_a > 0) & (b_b > 0))
    k_c = tl.argmax(tl.where(ok_c, best_c + bias, float("-inf")), axis=1, tie_break_left=True)
    ts_c = _refine(k_c, best_c, arg_c, prv_c, nxt_c, p_grid, n_grid, LOG_STEP)
    a_c, b_c, rss_c = _linear_fit(b_y, b_t, m_s, k_c, ts_c, n)
    b_a = tl.where(bad, a_c, b_a)
    b_b = tl.where(bad, b_c, b_b)
    b_ts = tl.where(bad, ts_c, ts1)
    rss = tl.where(bad, rss_c, rss)
    pattern = tl.where(bad, k_c, pattern)

    # ---- Levenberg–Marquardt from the grid's start (and the runner-up's, if ambiguous)
    if SIGNED:
        b_y = tl.where(pattern[:, None] == n, -b_y, b_y)  # the overall sign the grid chose
    lm_consts = (XTOL, NEWTON_XTOL, LAMBDA0, LAMBDA_MAX, TINY_SQRT)
    b_a, b_b, b_ts, conv, n_iter, cost = _lm(
        b_y, b_t, m_s, b_a, b_b, b_ts, m_v, n, max_iter, SIGNED, *lm_consts
    )
    if not SIGNED:
        k2 = tl.argmax(tl.where(o_m == k1[:, None], float("-inf"), tot_u), axis=1, tie_break_left=True)
        ts2 = _refine(k2, best_u, arg_u, prv_u, nxt_u, p_grid, n_grid, LOG_STEP)
        a2, b2, rss2 = _linear_fit(b_y, b_t, m_s, k2, ts2, n)
        flip2 = a2 < 0  # |A − B·E| = |−A + B·E|
        a2 = tl.where(flip2, -a2, a2)
        b2 = tl.where(flip2, -b2, b2)
        close = rss2 <= RSS_RATIO * rss + RSS_FLOOR * _rowsum(b_y * b_y)
        ambiguous = m_v & ~bad & (a2 > 0) & (b2 > 0) & close
        a2, b2, ts2, conv2, n_iter2, cost2 = _lm(
            b_y, b_t, m_s, a2, b2, ts2, ambiguous, n, max_iter, SIGNED, *lm_consts
        )
        better = ambiguous & (cost2 < cost)
        b_a = tl.where(better, a2, b_a)
        b_b = tl.where(better, b2, b_b)
        b_ts = tl.where(better, ts2, b_ts)
        conv = tl.where(better, conv2, conv)
        cost = tl.where(better, cost2, cost)
        n_iter += n_iter2  # 0 where the second start did not run

    _, b_f, _ = _residual(b_y, b_t, m_s, b_a, b_b, b_ts, SIGNED)
    polarity = _rowsum(tl.where(m_s & (b_f < 0), 1, 0))
    rows = (b_a, b_b, b_ts, cost, n_iter, conv, polarity, pattern)  # ROWS
    for r in tl.static_range(_N_ROWS):
        tl.store(p_out + r * n_b + o_v, rows[r].to(p_out.dtype.element_ty), mask=m_v)


INTERPRETED = isinstance(_fwd, InterpretedFunction)
"""True when the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""


def launch_config(dtype: torch.dtype, n: int, n_voxels: int) -> tuple[int, int, int]:
    """``(N_PAD, BLOCK_VOXELS, num_warps)`` of a launch for ``n`` TIs.

    N_PAD holds the n + 1 sign patterns (m = 0..n) as well as the n samples. On a GPU
    the block of voxels is sized so that the ~``_LIVE_BLOCKS`` live [BLOCK_VOXELS, N_PAD]
    blocks of a program stay within a register budget (float64 data take two registers
    per value; the grid's scores are float32 in both). In the interpreter numpy's cost
    is per operation, so few large programs are fastest.
    """
    n_pad = triton.next_power_of_2(n + 1)
    if INTERPRETED:
        return n_pad, min(256, triton.next_power_of_2(n_voxels)), 1
    regs_per_value = 2 if dtype == torch.float64 else 1
    fit = max(1, _BLOCK_REGS_PER_PROGRAM // (_LIVE_BLOCKS * n_pad * regs_per_value))
    block = min(_MAX_BLOCK_VOXELS, 1 << (fit.bit_length() - 1), triton.next_power_of_2(n_voxels))
    return n_pad, block, max(1, min(4, block * n_pad // 32))


def _constants(dtype: torch.dtype, n_grid: int, grid_ms: tuple[float, float]) -> dict[str, float]:
    """The torch path's constants for ``dtype`` (compile-time constants of the kernel)."""
    finfo = torch.finfo(dtype)
    return dict(
        LOG_STEP=math.log(grid_ms[1] / grid_ms[0]) / (n_grid - 1),
        XTOL=max(_ref.LM_XTOL_FP64, 10 * finfo.eps),
        NEWTON_XTOL=max(_ref.LM_NEWTON_XTOL_FP64, 10 * finfo.eps),
        LAMBDA0=_ref.LM_LAMBDA0,
        LAMBDA_MAX=_ref.LM_LAMBDA_MAX,
        TINY_SQRT=finfo.tiny**0.5,
        RSS_RATIO=_ref.AMBIGUOUS_RSS_RATIO,
        RSS_FLOOR=_ref.AMBIGUOUS_RSS_FLOOR,
    )


def molli_fit(
    y: torch.Tensor,
    t_ms: torch.Tensor,
    *,
    signed: bool,
    n_grid: int,
    grid_t1_star_ms: tuple[float, float],
    max_iter: int,
    out: torch.Tensor | None = None,
    block_voxels: int | None = None,
) -> torch.Tensor:
    """Grid start + Levenberg–Marquardt MOLLI fit of V voxels, in one kernel launch.

    Args:
        y: ``[V, n]`` float32/float64 data with the TIs sorted: magnitude, or (``signed``)
            the phase-aligned real part; each voxel divided by its max |y| (as
            :func:`epgx.fit.molli._prepare` leaves it).
        t_ms: ``[V, n]`` or ``[1, n]`` sorted inversion times, ms, same dtype.
        signed: fit the signed model to phase-sensitive data (sign patterns ±1 only).
        n_grid: number of T1* grid values (>= 2), log-spaced over ``grid_t1_star_ms``.
        grid_t1_star_ms: (min, max) of the T1* grid, ms.
        max_iter: LM steps per start (>= 1).
        out: optional ``[N_ROWS, V]`` buffer (``y``'s dtype and device) to write into.
        block_voxels: voxels per program (a power of two); None picks one.

    Returns:
        ``[N_ROWS, V]``: rows ``ROW_A``, ``ROW_B`` (A, B in the units of ``y``),
        ``ROW_T1_STAR`` (ms), ``ROW_RSS`` (Σr² at the solution), ``ROW_N_ITER`` (LM steps of
        both starts), ``ROW_CONVERGED`` (1/0), ``ROW_POLARITY`` (samples where the fitted
        A − B·e^{−t/T1*} < 0) and ``ROW_PATTERN`` (the grid's sign pattern: the first m
        samples negated; signed data: 0 for +, n for −).

    Raises:
        ValueError: bad shapes, dtypes, devices or options; a CPU tensor outside the
            interpreter.
    """
    if y.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"molli kernel: y must be float32 or float64; got {y.dtype}.")
    if y.ndim != 2 or y.shape[1] < _ref.MIN_TIS:
        raise ValueError(f"molli kernel: y must be [V, n] with n >= {_ref.MIN_TIS}; got {tuple(y.shape)}.")
    if y.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"molli kernel: y must be on a CUDA device (got {y.device}), or TRITON_INTERPRET=1 set "
            "before epgx.kernels is imported (Triton's CPU interpreter)."
        )
    n_voxels, n = y.shape
    if t_ms.dtype != y.dtype or t_ms.device != y.device or tuple(t_ms.shape) not in ((1, n), (n_voxels, n)):
        raise ValueError(
            f"molli kernel: t_ms must be [1, {n}] or [{n_voxels}, {n}], {y.dtype} on {y.device}; got "
            f"{tuple(t_ms.shape)}, {t_ms.dtype} on {t_ms.device}."
        )
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 2:
        raise ValueError(f"molli kernel: n_grid must be an int >= 2; got {n_grid!r}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"molli kernel: max_iter must be a positive int; got {max_iter!r}.")
    if out is None:
        out = torch.empty(N_ROWS, n_voxels, dtype=y.dtype, device=y.device)
    elif tuple(out.shape) != (N_ROWS, n_voxels) or out.dtype != y.dtype or out.device != y.device:
        raise ValueError(
            f"molli kernel: out must be [{N_ROWS}, {n_voxels}], {y.dtype} on {y.device}; got "
            f"{tuple(out.shape)}, {out.dtype} on {out.device}."
        )
    if not out.is_contiguous():
        raise ValueError("molli kernel: out must be contiguous.")
    n_pad, bv, num_warps = launch_config(y.dtype, n, n_voxels)
    if block_voxels is not None:
        if block_voxels < 1 or block_voxels & (block_voxels - 1):
            raise ValueError(f"molli kernel: block_voxels must be a power of two; got {block_voxels}.")
        bv = block_voxels
    if n_voxels == 0:
        return out
    # the torch path's grid (fit.molli._grid_start), bit for bit
    lo, hi = grid_t1_star_ms
    grid = torch.logspace(math.log10(lo), math.log10(hi), n_grid, dtype=y.dtype, device=y.device)
    # the interpreter's numpy warns about the IEEE inf/NaN arithmetic that a GPU does
    # silently and the kernel handles (as the torch path), e.g. unfittable voxels
    with np.errstate(all="ignore") if INTERPRETED else contextlib.nullcontext():
        _fwd[(triton.cdiv(n_voxels, bv),)](
            y.contiguous(),
            t_ms.contiguous(),
            grid,
            out,
            n_voxels,
            n,
            n_grid,
            max_iter,
            SIGNED=signed,
            T_SHARED=t_ms.shape[0] == 1,
            N_PAD=n_pad,
            BLOCK_VOXELS=bv,
            num_warps=num_warps,
            **_constants(y.dtype, n_grid, grid_t1_star_ms),
        )
    return out
