"""Whole-echo-train EPG-X kernels: an entire FSE or GRE train in one launch, and its derivatives.

One program simulates a block of spins. Each spin's EPG-X state (per pool: F+ₙ, F-ₙ
stored as conj F₋ₙ, and Zₙ for n = 0..K−1, as real/imaginary planes) stays in
registers as ``[BLOCK_SPINS, K_PAD]`` blocks for the whole train; only the echoes are
written. Per interval of duration τ the state follows EPG-X (Malik 2018, eq. 11)::

    x ← S(Ξ x) + b,   Ξ = exp(τΛ) per spin (relaxation, exchange, off-resonance),

with S the shift by one order (F+ₖ ← F+ₖ₋₁, F-ₖ ← F-ₖ₊₁, F+₀ ← conj F-₁; orders ≥ K are
dropped and zero enters at the top, EPG-X's truncation) and b the recovery on Z₀.
A pulse applies Weigel's rotation T(b1·α, φ) (Weigel 2015, eq. 15) to every order of
every pool carrying transverse states; an MT bound pool is saturated by exp(−W·T)
instead (Gloor 2008). The echo is i·F+₀ summed over pools (BM) or of the free pool
(MT); GRE echoes are demodulated by the pulse phase, e^{−iφ}.

Schedules (those of :mod:`epgx.engine`, τ = ESP/2 for FSE, TR for GRE)::

    FSE: T₀, relax, then per refocusing pulse j: Tⱼ, relax, echo, relax
    GRE: per pulse j: Tⱼ, echo (demodulated by φⱼ), relax

The trailing interval after the last echo is run too (it changes no output).

The per-spin propagators Ξ and recovery b are computed on the host by
:func:`epgx.ops.relaxation` (a few numbers per spin, constant over the train); the
kernel only applies them, so it is exact to rounding against the pure-torch engine.
A fixed K for the whole train is exact for the echoes when K is at least the largest
pruned block size of :func:`epgx.engine._block_sizes` (states above it never reach
order 0 before the last echo), and reproduces ``kmax`` truncation when K = kmax + 1.

Derivatives (forward mode, exact): every step is affine in the state, x' = A x + c, so
a tangent direction follows dx' = A dx + dA x + dc. The tangent kernel ``_tan`` carries
NT tangent copies of the state beside it as ``[BLOCK_SPINS, NT, K_PAD]`` blocks and
writes d(echo) for each direction in the same pass. Its inputs are the tangents of the
kernel's own inputs (propagators, recovery, start state, B1, MT W·T per spin; flip,
phase, ∫B1² per pulse): torch's forward mode computes those on the host from the
tissue and sequence tangents. dA is analytic in the kernel: Weigel's matrix w.r.t.
flip and phase (``_drf``), Ξ by its tangent, the MT saturation w.r.t. W·T and ∫B1².

The launches are registered as ``torch.library.custom_op`` s (``epgx::epg_train``, its
tangent ``epgx::epg_train_tangent``, the tangents' contraction with a cotangent
``epgx::epg_train_vjp``, and the reverse-mode ``epgx::epg_train_adjoint`` of
:mod:`epgx.kernels.epg_train_adjoint`), each with a fake kernel and a vmap rule, behind
:class:`_Train`, an autograd Function with ``jvp`` and ``backward``, so ``.backward()``,
``torch.func.jvp``/``jacfwd``/``jacrev``/``vmap`` and ``torch.autograd.gradcheck`` work
through it. They are opaque custom ops,
not ``triton_op`` s: ``torch.compile`` has nothing to fuse into a whole-train kernel, and
a ``triton_op`` cannot be traced under the interpreter (it runs the kernel on fake
tensors), so ``torch.library.opcheck`` could not check it in the CPU lanes.

Cost. One tangent pass with NT directions does the arithmetic of roughly 1 + 2·NT
forward passes (per direction: the rotation of the tangent plus dT·x with the phase
products shared, relaxation twice; an operation count, not yet timed on a GPU) in one
launch, NT ≤ ``NT_MAX`` per launch (more directions run in chunks). ``jacfwd`` and
:func:`epgx.jacobian` over p ≤ NT_MAX parameters: one pass with NT = p. The backward
(``.backward()``, ``jacrev``) is the adjoint EPG of :mod:`epgx.kernels.epg_train_adjoint`:
one launch gives the gradients w.r.t. every input at once, whatever the number of
pulses, at about 4-5 forward passes of arithmetic (a forward sweep storing ⌈√T⌉
checkpoints, the recomputation of each segment, the transposed operators backwards);
no state of the train is kept beyond the ≈ 2√T checkpoint and segment slots per spin.
Measured in the interpreter, where time counts operations: the flip-angle gradient of
a 64-pulse GRE train took 8 tangent launches of 8 directions before (20 s single pool,
43 s BM for 4 spins) and takes one adjoint launch now (3.5 s, 7.9 s; one forward pass
0.8 s, 1.5 s). The contraction op ``epgx::epg_train_vjp`` (Jᵀg by one-hot tangent
directions, O(number of pulses) passes) remains as an independent oracle for the tests.
Second-order derivatives (backward through a jvp or a backward, jvp of a jvp) are not
supported: they raise.

Diffusion is not fused yet.

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

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op
from triton.runtime.interpreter import InterpretedFunction

from epgx import ops
from epgx.tissue import KINDS

# Rows of the per-pulse table: flip (rad), cos φ, sin φ, cos 2φ, sin 2φ, ∫B1² dt (µT²·ms).
_PULSE_ROWS = 6
# Rows of the per-pulse tangent table, per direction: d flip (rad), d φ (rad), d ∫B1² dt.
_DPULSE_ROWS = 3
_DPULSE_ROWS_C = tl.constexpr(_DPULSE_ROWS)  # the same, readable inside the kernels

# Register budget of one program's live state, in 32-bit registers: with 4 warps this is
# 64 per thread, which compiles for sm_90 without spills (tests/test_kernels_compile.py).
_STATE_REGS_PER_PROGRAM = 8192

NT_MAX = 8
"""Most tangent directions one launch carries; more run in chunks of this size."""

# Kernel inputs, in the order of the ops' arguments. Per-spin inputs end in the spin axis.
_INPUTS = ("xt_re", "xt_im", "xl", "recovery", "z0", "b1", "wt", "flip", "phase", "energy")
_N_IN = len(_INPUTS)
_PER_SPIN = range(0, 7)
_PER_PULSE = range(7, 10)


@triton.jit
def _cmul(xr, xi, ar, ai):
    """Complex product x·a on real/imaginary planes."""
    return xr * ar - xi * ai, xr * ai + xi * ar


@triton.jit
def _add(s, t):
    """Plane-wise sum of two pool states (6-tuples)."""
    return s[0] + t[0], s[1] + t[1], s[2] + t[2], s[3] + t[3], s[4] + t[4], s[5] + t[5]


@triton.jit
def _mid(s):
    """A pool's [BLOCK_SPINS, K_PAD] planes as [BLOCK_SPINS, 1, K_PAD], to meet tangent blocks."""
    return (
        s[0][:, None, :],
        s[1][:, None, :],
        s[2][:, None, :],
        s[3][:, None, :],
        s[4][:, None, :],
        s[5][:, None, :],
    )


@triton.jit
def _col4(x):
    """Per-spin coefficients [BLOCK_SPINS, D] as [BLOCK_SPINS, D, 1] (a 4-tuple)."""
    return x[0][:, :, None], x[1][:, :, None], x[2][:, :, None], x[3][:, :, None]


@triton.jit
def _col8(x):
    """Per-spin coefficients [BLOCK_SPINS, D] as [BLOCK_SPINS, D, 1] (an 8-tuple)."""
    lo = _col4((x[0], x[1], x[2], x[3]))
    hi = _col4((x[4], x[5], x[6], x[7]))
    return lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]


@triton.jit
def _rf(s, c2, s2, sa, ca, cp, sp, c2p, s2p):
    """Weigel's rotation on one pool's planes s = (F+ re, F+ im, F- re, F- im, Z re, Z im).

    c2 = cos²(α/2), s2 = sin²(α/2), sa = sin α, ca = cos α (per spin);
    cp, sp, c2p, s2p = cos φ, sin φ, cos 2φ, sin 2φ (per pulse, scalars).
    """
    fpr, fpi, fmr, fmi, zr, zi = s
    # e^{2iφ}·F- and e^{−2iφ}·F+
    efr = c2p * fmr - s2p * fmi
    efi = s2p * fmr + c2p * fmi
    epr = c2p * fpr + s2p * fpi
    epi = c2p * fpi - s2p * fpr
    # F+' = c2 F+ + s2 e^{2iφ} F- + sa (sin φ − i cos φ) Z
    nfpr = c2 * fpr + s2 * efr + sa * (sp * zr + cp * zi)
    nfpi = c2 * fpi + s2 * efi + sa * (sp * zi - cp * zr)
    # F-' = s2 e^{−2iφ} F+ + c2 F- + sa (sin φ + i cos φ) Z
    nfmr = s2 * epr + c2 * fmr + sa * (sp * zr - cp * zi)
    nfmi = s2 * epi + c2 * fmi + sa * (sp * zi + cp * zr)
    # Z' = ca Z − sa/2 [(sin φ + i cos φ) F+ + (sin φ − i cos φ) F-]
    h = 0.5 * sa
    nzr = ca * zr - h * (sp * fpr - cp * fpi + sp * fmr + cp * fmi)
    nzi = ca * zi - h * (sp * fpi + cp * fpr + sp * fmi - cp * fmr)
    return nfpr, nfpi, nfmr, nfmi, nzr, nzi


@triton.jit
def _phase_products(s, cp, sp, c2p, s2p):
    """The phase-rotated planes that the derivatives of Weigel's rotation are made of, with
    E₁ = e^{iφ}, E₂ = e^{2iφ} (cp, sp = cos φ, sin φ; c2p, s2p = cos 2φ, sin 2φ), as
    (re, im) pairs: E₂ F-, E₂* F+, E₁ Z, E₁* Z, E₁* F+, E₁ F-."""
    fpr, fpi, fmr, fmi, zr, zi = s
    efr = c2p * fmr - s2p * fmi  # E₂ F-
    efi = s2p * fmr + c2p * fmi
    epr = c2p * fpr + s2p * fpi  # E₂* F+
    epi = c2p * fpi - s2p * fpr
    z1r = cp * zr - sp * zi  # E₁ Z
    z1i = sp * zr + cp * zi
    z2r = cp * zr + sp * zi  # E₁* Z
    z2i = cp * zi - sp * zr
    p3r = cp * fpr + sp * fpi  # E₁* F+
    p3i = cp * fpi - sp * fpr
    p4r = cp * fmr - sp * fmi  # E₁ F-
    p4i = sp * fmr + cp * fmi
    return efr, efi, epr, epi, z1r, z1i, z2r, z2i, p3r, p3i, p4r, p4i


@triton.jit
def _drf(s, u, v, wr, wi, sda, cp, sp, c2p, s2p):
    """dT·s: the tangent of Weigel's rotation along (dα, dφ), applied to the primal planes s.

    With E₁ = e^{iφ}, E₂ = e^{2iφ}, u = sin α·dα/2, v = 2 sin²(α/2)·dφ,
    w = cos α·dα + i sin α·dφ (wr, wi) and sda = sin α·dα, differentiating the rows of
    T (see :func:`_rf`) gives::

        dF+ = −u F+ + (u + iv) E₂ F- − i w E₁ Z
        dF- = −u F- + (u − iv) E₂* F+ + i w* E₁* Z
        dZ  = −(i/2) w* E₁* F+ + (i/2) w E₁ F- − sda Z

    s is [BLOCK_SPINS, 1, K_PAD] (one state); u, v, wr, wi, sda are [BLOCK_SPINS, NT, 1]
    (one value per direction), so the phase products are formed once for all directions.
    """
    fpr, fpi, fmr, fmi, zr, zi = s
    efr, efi, epr, epi, z1r, z1i, z2r, z2i, p3r, p3i, p4r, p4i = _phase_products(s, cp, sp, c2p, s2p)
    dfpr = u * (efr - fpr) - v * efi + wr * z1i + wi * z1r
    dfpi = u * (efi - fpi) + v * efr - wr * z1r + wi * z1i
    dfmr = u * (epr - fmr) + v * epi - wr * z2i + wi * z2r
    dfmi = u * (epi - fmi) - v * epr + wr * z2r + wi * z2i
    dzr = 0.5 * (wr * (p3i - p4i) - wi * (p3r + p4r)) - sda * zr
    dzi = 0.5 * (wr * (p4r - p3r) - wi * (p3i + p4i)) - sda * zi
    return dfpr, dfpi, dfmr, dfmi, dzr, dzi


@triton.jit
def _relax1(s, xr, xi, xl):
    """One pool: F+ ← X·F+, stored F- ← conj(X)·F-, Z ← xl·Z."""
    fpr, fpi = _cmul(xr, xi, s[0], s[1])
    fmr, fmi = _cmul(xr, -xi, s[2], s[3])
    return fpr, fpi, fmr, fmi, xl * s[4], xl * s[5]


@triton.jit
def _relax2(a, b, xt, xl):
    """Two exchanging pools: transverse xt = (aa, ab, ba, bb) complex, longitudinal xl real."""
    aa_r, aa_i, ab_r, ab_i, ba_r, ba_i, bb_r, bb_i = xt
    r0, i0 = _cmul(aa_r, aa_i, a[0], a[1])
    r1, i1 = _cmul(ab_r, ab_i, b[0], b[1])
    r2, i2 = _cmul(aa_r, -aa_i, a[2], a[3])
    r3, i3 = _cmul(ab_r, -ab_i, b[2], b[3])
    r4, i4 = _cmul(ba_r, ba_i, a[0], a[1])
    r5, i5 = _cmul(bb_r, bb_i, b[0], b[1])
    r6, i6 = _cmul(ba_r, -ba_i, a[2], a[3])
    r7, i7 = _cmul(bb_r, -bb_i, b[2], b[3])
    new_a = (r0 + r1, i0 + i1, r2 + r3, i2 + i3, xl[0] * a[4] + xl[1] * b[4], xl[0] * a[5] + xl[1] * b[5])
    new_b = (r4 + r5, i4 + i5, r6 + r7, i6 + i7, xl[2] * a[4] + xl[3] * b[4], xl[2] * a[5] + xl[3] * b[5])
    return new_a, new_b


@triton.jit
def _relax_mt(a, b, xr, xi, xl):
    """MT: free-pool transverse decay; Z of the free and bound pools exchange through xl."""
    fpr, fpi = _cmul(xr, xi, a[0], a[1])
    fmr, fmi = _cmul(xr, -xi, a[2], a[3])
    new_a = (fpr, fpi, fmr, fmi, xl[0] * a[4] + xl[1] * b[4], xl[0] * a[5] + xl[1] * b[5])
    new_b = (b[0], b[1], b[2], b[3], xl[2] * a[4] + xl[3] * b[4], xl[2] * a[5] + xl[3] * b[5])
    return new_a, new_b


@triton.jit
def _shift_recover(s, rec, o_k, n_states, K_PAD: tl.constexpr, AXIS: tl.constexpr):
    """Shift by one order with EPG-X truncation at K = n_states, then add rec to Re Z₀.

    The orders run along AXIS, the last axis of the planes; o_k holds them shaped to
    broadcast against the planes ([1, K_PAD] or [1, 1, K_PAD]).
    """
    b_fpr, b_fpi, b_fmr, b_fmi, b_zr, b_zi = s
    o_dn = tl.broadcast_to(tl.maximum(o_k - 1, 0), b_fpr.shape)
    o_up = tl.broadcast_to(tl.minimum(o_k + 1, K_PAD - 1), b_fpr.shape)
    m_up = o_k + 1 < n_states
    m_dn = o_k < n_states
    m_0 = o_k == 0
    # F-ₖ ← F-ₖ₊₁ (zero enters at the top); order 0 of the result is F-₁
    n_fmr = tl.where(m_up, tl.gather(b_fmr, o_up, AXIS), 0.0)
    n_fmi = tl.where(m_up, tl.gather(b_fmi, o_up, AXIS), 0.0)
    # F+ₖ ← F+ₖ₋₁ (order K−1 drops out); F+₀ ← conj(F-₁)
    n_fpr = tl.where(m_0, n_fmr, tl.where(m_dn, tl.gather(b_fpr, o_dn, AXIS), 0.0))
    n_fpi = tl.where(m_0, -n_fmi, tl.where(m_dn, tl.gather(b_fpi, o_dn, AXIS), 0.0))
    return n_fpr, n_fpi, n_fmr, n_fmi, b_zr + tl.where(m_0, rec, 0.0), b_zi


@triton.jit
def _f0(x, o_k, AXIS: tl.constexpr):
    """Order-0 entries of a plane (orders along AXIS, o_k shaped to broadcast), AXIS removed."""
    return tl.sum(tl.where(o_k == 0, x, 0.0), axis=AXIS)


@triton.jit
def _load_spins(
    p_xt_re,
    p_xt_im,
    p_xl,
    p_rec,
    p_z0,
    p_b1,
    p_wt,
    o_b,
    o_d,
    m,
    n_b,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
):
    """Per-spin inputs as [BLOCK_SPINS, D] blocks: D = 1 (primal) or NT (tangent directions).

    Every input is ``[D?, *entries, B]`` (the direction axis leading for tangents), read at
    spins o_b ([BLOCK_SPINS, 1]) and directions o_d ([1, D]). Returns (b1, xt, xl, rec_a,
    rec_b, z_a, z_b, wt); a single pool fills pool b and the off-diagonal propagators with
    unused placeholders (the compiler drops them), as does W·T outside MT.
    """
    P2: tl.constexpr = 4 if TWO_POOL else 1
    P: tl.constexpr = 2 if TWO_POOL else 1
    b_b1 = tl.load(p_b1 + o_d * n_b + o_b, mask=m, other=0.0)
    b_x0 = tl.load(p_xt_re + (o_d * P2) * n_b + o_b, mask=m, other=0.0)
    b_x1 = tl.load(p_xt_im + (o_d * P2) * n_b + o_b, mask=m, other=0.0)
    b_l0 = tl.load(p_xl + (o_d * P2) * n_b + o_b, mask=m, other=0.0)
    b_rec_a = tl.load(p_rec + (o_d * P) * n_b + o_b, mask=m, other=0.0)
    b_za = tl.load(p_z0 + (o_d * P) * n_b + o_b, mask=m, other=0.0)
    b_xt = (b_x0, b_x1, b_x0, b_x1, b_x0, b_x1, b_x0, b_x1)
    b_xl = (b_l0, b_l0, b_l0, b_l0)
    b_rec_b = b_rec_a
    b_zb = b_za
    b_wt = b_b1
    if TWO_POOL:
        b_xl = (
            b_l0,
            tl.load(p_xl + (o_d * P2 + 1) * n_b + o_b, mask=m, other=0.0),
            tl.load(p_xl + (o_d * P2 + 2) * n_b + o_b, mask=m, other=0.0),
            tl.load(p_xl + (o_d * P2 + 3) * n_b + o_b, mask=m, other=0.0),
        )
        b_xt = (
            b_x0,
            b_x1,
            tl.load(p_xt_re + (o_d * P2 + 1) * n_b + o_b, mask=m, other=0.0),
            tl.load(p_xt_im + (o_d * P2 + 1) * n_b + o_b, mask=m, other=0.0),
            tl.load(p_xt_re + (o_d * P2 + 2) * n_b + o_b, mask=m, other=0.0),
            tl.load(p_xt_im + (o_d * P2 + 2) * n_b + o_b, mask=m, other=0.0),
            tl.load(p_xt_re + (o_d * P2 + 3) * n_b + o_b, mask=m, other=0.0),
            tl.load(p_xt_im + (o_d * P2 + 3) * n_b + o_b, mask=m, other=0.0),
        )
        b_rec_b = tl.load(p_rec + (o_d * P + 1) * n_b + o_b, mask=m, other=0.0)
        b_zb = tl.load(p_z0 + (o_d * P + 1) * n_b + o_b, mask=m, other=0.0)
        if MT:
            b_wt = tl.load(p_wt + o_d * n_b + o_b, mask=m, other=0.0)
    return b_b1, b_xt, b_xl, b_rec_a, b_rec_b, b_za, b_zb, b_wt


@triton.jit
def _rf_coefficients(b_alpha):
    """cos²(α/2), sin²(α/2), sin α, cos α of the per-spin flip angles α."""
    b_ch = tl.cos(0.5 * b_alpha)
    b_sh = tl.sin(0.5 * b_alpha)
    return b_ch * b_ch, b_sh * b_sh, tl.sin(b_alpha), tl.cos(b_alpha)


@triton.jit
def _pulse(a, b, p_pulse, j, n_pulses, b_b1, b_wt, TWO_POOL: tl.constexpr, MT: tl.constexpr):
    """Pulse j: Weigel's rotation at flip b1·α_j, phase φ_j; MT saturation of pool b.

    b_b1, b_wt: [BLOCK_SPINS, 1] B1 scale and MT W·T per µT²·ms of each spin.
    """
    b_c2, b_s2, b_sa, b_ca = _rf_coefficients(tl.load(p_pulse + j) * b_b1)
    cp = tl.load(p_pulse + n_pulses + j)
    sp = tl.load(p_pulse + 2 * n_pulses + j)
    c2p = tl.load(p_pulse + 3 * n_pulses + j)
    s2p = tl.load(p_pulse + 4 * n_pulses + j)
    a = _rf(a, b_c2, b_s2, b_sa, b_ca, cp, sp, c2p, s2p)
    if TWO_POOL:
        if MT:
            b_sat = tl.exp(-tl.load(p_pulse + 5 * n_pulses + j) * b_wt)
            b = (b[0], b[1], b[2], b[3], b[4] * b_sat, b[5] * b_sat)
        else:
            b = _rf(b, b_c2, b_s2, b_sa, b_ca, cp, sp, c2p, s2p)
    return a, b


@triton.jit
def _pulse_tan(x, p_pulse, p_dpulse, j, n_pulses, b_rfs, o_t, m_t, TWO_POOL: tl.constexpr, MT: tl.constexpr):
    """Pulse j on x = (a, b, da, db), the pools' state and tangents: dx' = T dx + dT x.

    b_rfs = (b1, W·T) [BLOCK_SPINS, 1] and their tangents [BLOCK_SPINS, NT]; the pulse's
    own tangents (flip, phase, ∫B1²) come from p_dpulse. dα = dB1·α_j + B1·dα_j per spin
    and direction (o_t, m_t: [1, NT]).
    """
    a, b, da, db = x
    b_b1, b_wt, b_db1, b_dwt = b_rfs
    flip = tl.load(p_pulse + j)
    o_dp = o_t * (_DPULSE_ROWS_C * n_pulses) + j
    dflip = tl.load(p_dpulse + o_dp, mask=m_t, other=0.0)  # [1, NT]
    dphi = tl.load(p_dpulse + o_dp + n_pulses, mask=m_t, other=0.0)
    b_c2, b_s2, b_sa, b_ca = _rf_coefficients(flip * b_b1)  # [BLOCK_SPINS, 1]
    b_dalpha = flip * b_db1 + b_b1 * dflip  # [BLOCK_SPINS, NT]
    cp = tl.load(p_pulse + n_pulses + j)
    sp = tl.load(p_pulse + 2 * n_pulses + j)
    c2p = tl.load(p_pulse + 3 * n_pulses + j)
    s2p = tl.load(p_pulse + 4 * n_pulses + j)
    # dT coefficients, [BLOCK_SPINS, NT, 1]; T's own as [BLOCK_SPINS, 1, 1]
    u = (0.5 * b_sa * b_dalpha)[:, :, None]
    v = (2.0 * b_s2 * dphi)[:, :, None]
    wr = (b_ca * b_dalpha)[:, :, None]
    wi = (b_sa * dphi)[:, :, None]
    sda = (b_sa * b_dalpha)[:, :, None]
    c2 = b_c2[:, :, None]
    s2 = b_s2[:, :, None]
    sa = b_sa[:, :, None]
    ca = b_ca[:, :, None]
    da = _add(_rf(da, c2, s2, sa, ca, cp, sp, c2p, s2p), _drf(_mid(a), u, v, wr, wi, sda, cp, sp, c2p, s2p))
    a = _rf(a, b_c2, b_s2, b_sa, b_ca, cp, sp, c2p, s2p)
    if TWO_POOL:
        if MT:
            energy = tl.load(p_pulse + 5 * n_pulses + j)
            denergy = tl.load(p_dpulse + o_dp + 2 * n_pulses, mask=m_t, other=0.0)
            b_sat = tl.exp(-energy * b_wt)  # [BLOCK_SPINS, 1]
            b_dsat = (-b_sat * (denergy * b_wt + energy * b_dwt))[:, :, None]
            sat = b_sat[:, :, None]
            b3 = _mid(b)
            db = (db[0], db[1], db[2], db[3], db[4] * sat + b_dsat * b3[4], db[5] * sat + b_dsat * b3[5])
            b = (b[0], b[1], b[2], b[3], b[4] * b_sat, b[5] * b_sat)
        else:
            db = _add(
                _rf(db, c2, s2, sa, ca, cp, sp, c2p, s2p), _drf(_mid(b), u, v, wr, wi, sda, cp, sp, c2p, s2p)
            )
            b = _rf(b, b_c2, b_s2, b_sa, b_ca, cp, sp, c2p, s2p)
    return a, b, da, db


@triton.jit
def _interval(
    a,
    b,
    b_xt,
    b_xl,
    b_rec_a,
    b_rec_b,
    o_k,
    n_states,
    K_PAD: tl.constexpr,
    AXIS: tl.constexpr,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
):
    """One free interval: relaxation/exchange, shift, recovery on Z₀ (EPG-X's order).

    Orders run along AXIS (o_k shaped to broadcast); the coefficients broadcast against
    the planes. Relaxation is linear in the state and in (b_xt, b_xl) apart from the MT
    bound pool's transverse planes, which stay zero; the tangent pass applies it to
    (dx, Ξ) and (x, dΞ) with this same code.
    """
    if TWO_POOL:
        if MT:
            a, b = _relax_mt(a, b, b_xt[0], b_xt[1], b_xl)
            # the bound pool has no transverse states to shift: recovery only
            b = (b[0], b[1], b[2], b[3], b[4] + tl.where(o_k == 0, b_rec_b, 0.0), b[5])
        else:
            a, b = _relax2(a, b, b_xt, b_xl)
            b = _shift_recover(b, b_rec_b, o_k, n_states, K_PAD, AXIS)
    else:
        a = _relax1(a, b_xt[0], b_xt[1], b_xl[0])
    a = _shift_recover(a, b_rec_a, o_k, n_states, K_PAD, AXIS)
    return a, b


@triton.jit
def _interval_tan(
    x, b_sp, b_dsp, o_k2, o_k3, n_states, K_PAD: tl.constexpr, TWO_POOL: tl.constexpr, MT: tl.constexpr
):
    """One interval on x = (a, b, da, db): dx' = S(Ξ dx + dΞ x) + db on Z₀.

    b_sp = (xt, xl, rec_a, rec_b) per spin [BLOCK_SPINS, 1], b_dsp their tangents
    [BLOCK_SPINS, NT]; orders o_k2 [1, K_PAD] for the state, o_k3 [1, 1, K_PAD] for tangents.
    """
    a, b, da, db = x
    b_xt, b_xl, b_rec_a, b_rec_b = b_sp
    b_dxt, b_dxl, b_drec_a, b_drec_b = b_dsp
    xt3 = _col8(b_xt)
    xl3 = _col4(b_xl)
    dxt3 = _col8(b_dxt)
    dxl3 = _col4(b_dxl)
    a3 = _mid(a)
    b3 = _mid(b)
    if TWO_POOL:
        if MT:
            ta, tb = _relax_mt(da, db, xt3[0], xt3[1], xl3)
            sa, sb = _relax_mt(a3, b3, dxt3[0], dxt3[1], dxl3)
            da = _add(ta, sa)
            db = (
                tb[0],
                tb[1],
                tb[2],
                tb[3],
                tb[4] + sb[4] + tl.where(o_k3 == 0, b_drec_b[:, :, None], 0.0),
                tb[5] + sb[5],
            )
        else:
            ta, tb = _relax2(da, db, xt3, xl3)
            sa, sb = _relax2(a3, b3, dxt3, dxl3)
            da = _add(ta, sa)
            db = _shift_recover(_add(tb, sb), b_drec_b[:, :, None], o_k3, n_states, K_PAD, 2)
    else:
        da = _add(_relax1(da, xt3[0], xt3[1], xl3[0]), _relax1(a3, dxt3[0], dxt3[1], dxl3[0]))
    da = _shift_recover(da, b_drec_a[:, :, None], o_k3, n_states, K_PAD, 2)
    a, b = _interval(a, b, b_xt, b_xl, b_rec_a, b_rec_b, o_k2, n_states, K_PAD, 1, TWO_POOL, MT)
    return a, b, da, db


@triton.jit
def _echo_value(
    a,
    b,
    p_pulse,
    i_e,
    n_pulses,
    o_k,
    AXIS: tl.constexpr,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
    GRE: tl.constexpr,
):
    """(Re, Im) of F+₀ summed over pools (BM) or of pool a (MT); GRE: times e^{−iφ} of pulse i_e."""
    b_re = _f0(a[0], o_k, AXIS)
    b_im = _f0(a[1], o_k, AXIS)
    if TWO_POOL:
        if not MT:
            b_re += _f0(b[0], o_k, AXIS)
            b_im += _f0(b[1], o_k, AXIS)
    if GRE:
        cp = tl.load(p_pulse + n_pulses + i_e)
        sp = tl.load(p_pulse + 2 * n_pulses + i_e)
        b_re, b_im = b_re * cp + b_im * sp, b_im * cp - b_re * sp
    return b_re, b_im


@triton.jit
def _echo(
    a,
    b,
    p_out,
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
    """Store echo i_e = i·F+₀ (BM: summed over pools; GRE: times e^{−iφ} of pulse i_e)."""
    b_re, b_im = _echo_value(a, b, p_pulse, i_e, n_pulses, o_k, 1, TWO_POOL, MT, GRE)
    tl.store(p_out + i_e * n_b + o_b, -b_im, mask=m_b)
    tl.store(p_out + (n_echoes + i_e) * n_b + o_b, b_re, mask=m_b)


@triton.jit
def _echo_tan(
    x,
    b_acc,
    p_io,
    i_e,
    n_echoes,
    n_pulses,
    n_b,
    o_io,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
    GRE: tl.constexpr,
    CONTRACT: tl.constexpr,
):
    """Echo i_e and its tangents: stored, or (CONTRACT) dotted with the cotangent g into b_acc.

    x = (a, b, da, db); p_io = (p_out, p_dout, p_g, p_pulse, p_dpulse); o_io = (o_b, m_b,
    o_t, m_t, o_k3): spins [BLOCK_SPINS, 1], directions [1, NT], orders [1, 1, K_PAD].
    GRE: d(e^{−iφ}F) = e^{−iφ}(dF − i dφ F). Returns b_acc ([BLOCK_SPINS, NT]).
    """
    a, b, da, db = x
    p_out, p_dout, p_g, p_pulse, p_dpulse = p_io
    o_b, m_b, o_t, m_t, o_k3 = o_io
    b_re, b_im = _echo_value(_mid(a), _mid(b), p_pulse, i_e, n_pulses, o_k3, 2, TWO_POOL, MT, False)
    b_dre, b_dim = _echo_value(da, db, p_pulse, i_e, n_pulses, o_k3, 2, TWO_POOL, MT, False)
    if GRE:
        cp = tl.load(p_pulse + n_pulses + i_e)
        sp = tl.load(p_pulse + 2 * n_pulses + i_e)
        dphi = tl.load(p_dpulse + o_t * (_DPULSE_ROWS_C * n_pulses) + n_pulses + i_e, mask=m_t, other=0.0)
        b_re, b_im = b_re * cp + b_im * sp, b_im * cp - b_re * sp
        b_dre, b_dim = (
            b_dre * cp + b_dim * sp + dphi * b_im,
            b_dim * cp - b_dre * sp - dphi * b_re,
        )
    # the echo is i·F = (−Im F, Re F)
    if CONTRACT:
        g_re = tl.load(p_g + i_e * n_b + o_b, mask=m_b, other=0.0)
        g_im = tl.load(p_g + (n_echoes + i_e) * n_b + o_b, mask=m_b, other=0.0)
        b_acc += g_im * b_dre - g_re * b_dim
    else:
        tl.store(p_out + i_e * n_b + o_b, -b_im, mask=m_b)
        tl.store(p_out + (n_echoes + i_e) * n_b + o_b, b_re, mask=m_b)
        o_d = (o_t * (2 * n_echoes) + i_e) * n_b + o_b
        tl.store(p_dout + o_d, -b_dim, mask=m_b & m_t)
        tl.store(p_dout + o_d + n_echoes * n_b, b_dre, mask=m_b & m_t)
    return b_acc


@triton.jit
def _fwd(
    p_xt_re,
    p_xt_im,
    p_xl,
    p_rec,
    p_z0,
    p_b1,
    p_wt,
    p_pulse,
    p_out,
    n_spins,
    n_pulses,
    n_echoes,
    n_states,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
    GRE: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_SPINS: tl.constexpr,
):
    """Run the whole train for BLOCK_SPINS spins; write the echoes to p_out.

    p_xt_re, p_xt_im, p_xl: [P, P, B] propagators (F+ transverse, longitudinal);
    p_rec, p_z0: [P, B] recovery and initial Re Z₀; p_b1, p_wt: [B] B1 scale and MT
    W·T per µT²·ms; p_pulse: [_PULSE_ROWS, n_pulses]; p_out: [2, n_echoes, B] (re, im).
    """
    i_b = tl.program_id(0).to(tl.int64)
    o_b = i_b * BLOCK_SPINS + tl.arange(0, BLOCK_SPINS)
    m_b = o_b < n_spins
    o_k = tl.arange(0, K_PAD)[None, :]
    n_b = tl.cast(n_spins, tl.int64)  # also when Triton specialises n_spins == 1 as a constant
    zero = tl.zeros([BLOCK_SPINS, K_PAD], dtype=p_xt_re.dtype.element_ty)

    b_b1, b_xt, b_xl, b_rec_a, b_rec_b, b_za, b_zb, b_wt = _load_spins(
        p_xt_re, p_xt_im, p_xl, p_rec, p_z0, p_b1, p_wt, o_b[:, None], 0, m_b[:, None], n_b, TWO_POOL, MT
    )
    # planes of pool a and pool b (a single pool's pool b is an unused placeholder)
    b_pa = (zero, zero, zero, zero, tl.where(o_k == 0, b_za, 0.0), zero)
    b_pb = (zero, zero, zero, zero, tl.where(o_k == 0, b_zb, 0.0), zero)

    if GRE:
        for j in range(0, n_pulses):
            b_pa, b_pb = _pulse(b_pa, b_pb, p_pulse, j, n_pulses, b_b1, b_wt, TWO_POOL, MT)
            _echo(b_pa, b_pb, p_out, p_pulse, j, n_echoes, n_pulses, n_b, o_b, m_b, o_k, TWO_POOL, MT, GRE)
            b_pa, b_pb = _interval(
                b_pa, b_pb, b_xt, b_xl, b_rec_a, b_rec_b, o_k, n_states, K_PAD, 1, TWO_POOL, MT
            )
    else:
        b_pa, b_pb = _pulse(b_pa, b_pb, p_pulse, 0, n_pulses, b_b1, b_wt, TWO_POOL, MT)
        b_pa, b_pb = _interval(
            b_pa, b_pb, b_xt, b_xl, b_rec_a, b_rec_b, o_k, n_states, K_PAD, 1, TWO_POOL, MT
        )
        for j in range(1, n_pulses):
            b_pa, b_pb = _pulse(b_pa, b_pb, p_pulse, j, n_pulses, b_b1, b_wt, TWO_POOL, MT)
            b_pa, b_pb = _interval(
                b_pa, b_pb, b_xt, b_xl, b_rec_a, b_rec_b, o_k, n_states, K_PAD, 1, TWO_POOL, MT
            )
            _echo(
                b_pa, b_pb, p_out, p_pulse, j - 1, n_echoes, n_pulses, n_b, o_b, m_b, o_k, TWO_POOL, MT, GRE
            )
            b_pa, b_pb = _interval(
                b_pa, b_pb, b_xt, b_xl, b_rec_a, b_rec_b, o_k, n_states, K_PAD, 1, TWO_POOL, MT
            )


@triton.jit
def _tan(
    p_xt_re,
    p_xt_im,
    p_xl,
    p_rec,
    p_z0,
    p_b1,
    p_wt,
    p_pulse,
    p_dxt_re,
    p_dxt_im,
    p_dxl,
    p_drec,
    p_dz0,
    p_db1,
    p_dwt,
    p_dpulse,
    p_g,
    p_out,
    p_dout,
    n_spins,
    n_pulses,
    n_echoes,
    n_states,
    n_tan,
    n_tan_spins,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
    GRE: tl.constexpr,
    CONTRACT: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_SPINS: tl.constexpr,
    NT: tl.constexpr,
):
    """The train of :func:`_fwd` with n_tan ≤ NT tangent directions carried beside the state.

    Primal inputs as :func:`_fwd`; their tangents have a leading direction axis:
    p_dxt_re, p_dxt_im, p_dxl [n_tan, P, P, B], p_drec, p_dz0 [n_tan, P, B], p_db1,
    p_dwt [n_tan, B], p_dpulse [n_tan, _DPULSE_ROWS, n_pulses]; with n_tan_spins = 1
    instead of B the per-spin tangents are [n_tan, ..., 1], one value for every spin (the
    backward's one-hot directions). Writes the echoes to
    p_out [2, n_echoes, B] and their tangents to p_dout [n_tan, 2, n_echoes, B]; with
    CONTRACT, writes p_dout [n_tan, B] = Σ over echoes and (re, im) of g·d(echo) instead,
    g = p_g [2, n_echoes, B] (one row of Jᵀg per direction), and not the echoes.
    """
    i_b = tl.program_id(0).to(tl.int64)
    o_b = (i_b * BLOCK_SPINS + tl.arange(0, BLOCK_SPINS))[:, None]
    m_b = o_b < n_spins
    o_t = tl.arange(0, NT)[None, :]
    m_t = o_t < n_tan
    n_bt = tl.cast(n_tan_spins, tl.int64)
    o_bt = o_b % n_bt  # the spin of a per-spin tangent, or 0 where one value serves all
    o_k2 = tl.arange(0, K_PAD)[None, :]
    o_k3 = tl.arange(0, K_PAD)[None, None, :]
    n_b = tl.cast(n_spins, tl.int64)
    dtype = p_xt_re.dtype.element_ty
    zero = tl.zeros([BLOCK_SPINS, K_PAD], dtype=dtype)
    zero3 = tl.zeros([BLOCK_SPINS, NT, K_PAD], dtype=dtype)

    b_b1, b_xt, b_xl, b_rec_a, b_rec_b, b_za, b_zb, b_wt = _load_spins(
        p_xt_re, p_xt_im, p_xl, p_rec, p_z0, p_b1, p_wt, o_b, 0, m_b, n_b, TWO_POOL, MT
    )
    b_db1, b_dxt, b_dxl, b_drec_a, b_drec_b, b_dza, b_dzb, b_dwt = _load_spins(
        p_dxt_re, p_dxt_im, p_dxl, p_drec, p_dz0, p_db1, p_dwt, o_bt, o_t, m_b & m_t, n_bt, TWO_POOL, MT
    )
    b_pa = (zero, zero, zero, zero, tl.where(o_k2 == 0, b_za, 0.0), zero)
    b_pb = (zero, zero, zero, zero, tl.where(o_k2 == 0, b_zb, 0.0), zero)
    b_da = (zero3, zero3, zero3, zero3, tl.where(o_k3 == 0, b_dza[:, :, None], 0.0), zero3)
    b_db = (zero3, zero3, zero3, zero3, tl.where(o_k3 == 0, b_dzb[:, :, None], 0.0), zero3)
    x = (b_pa, b_pb, b_da, b_db)
    b_rfs = (b_b1, b_wt, b_db1, b_dwt)
    b_sp = (b_xt, b_xl, b_rec_a, b_rec_b)
    b_dsp = (b_dxt, b_dxl, b_drec_a, b_drec_b)
    p_io = (p_out, p_dout, p_g, p_pulse, p_dpulse)
    o_io = (o_b, m_b, o_t, m_t, o_k3)
    b_acc = tl.zeros([BLOCK_SPINS, NT], dtype=dtype)

    if GRE:
        for j in range(0, n_pulses):
            x = _pulse_tan(x, p_pulse, p_dpulse, j, n_pulses, b_rfs, o_t, m_t, TWO_POOL, MT)
            b_acc = _echo_tan(x, b_acc, p_io, j, n_echoes, n_pulses, n_b, o_io, TWO_POOL, MT, GRE, CONTRACT)
            x = _interval_tan(x, b_sp, b_dsp, o_k2, o_k3, n_states, K_PAD, TWO_POOL, MT)
    else:
        x = _pulse_tan(x, p_pulse, p_dpulse, 0, n_pulses, b_rfs, o_t, m_t, TWO_POOL, MT)
        x = _interval_tan(x, b_sp, b_dsp, o_k2, o_k3, n_states, K_PAD, TWO_POOL, MT)
        for j in range(1, n_pulses):
            x = _pulse_tan(x, p_pulse, p_dpulse, j, n_pulses, b_rfs, o_t, m_t, TWO_POOL, MT)
            x = _interval_tan(x, b_sp, b_dsp, o_k2, o_k3, n_states, K_PAD, TWO_POOL, MT)
            b_acc = _echo_tan(
                x, b_acc, p_io, j - 1, n_echoes, n_pulses, n_b, o_io, TWO_POOL, MT, GRE, CONTRACT
            )
            x = _interval_tan(x, b_sp, b_dsp, o_k2, o_k3, n_states, K_PAD, TWO_POOL, MT)
    if CONTRACT:
        tl.store(p_dout + o_t * n_b + o_b, b_acc, mask=m_b & m_t)


INTERPRETED = isinstance(_fwd, InterpretedFunction)
"""True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""


def launch_config(
    kind: str, dtype: torch.dtype, n_states: int, n_spins: int, n_tangents: int = 0
) -> tuple[int, int, int]:
    """``(K_PAD, BLOCK_SPINS, num_warps)`` of a launch carrying ``n_tangents`` directions (≤ NT_MAX).

    On a GPU the block of spins is sized so that the live state of one program (and its
    tangent copies) stays within a register budget (float64 values take two registers).
    ``tl.gather`` along the order axis is compiled warp-local, so Triton lays one spin's
    K_PAD orders out within one warp and spreads warps over spins (and directions) only:
    more warps than such rows would replicate the state instead of splitting it.
    Per-thread state is then K_PAD/32 values per plane at least, so past K_PAD ≈ 128
    (single pool, fp32, no tangents) the state no longer fits in registers and spills
    (see tests/test_kernels_compile.py). In the interpreter numpy's cost is per
    operation, so few large programs are fastest.
    """
    k_pad = triton.next_power_of_2(n_states)
    nt = triton.next_power_of_2(n_tangents) if n_tangents else 0
    if INTERPRETED:
        return k_pad, min(256, triton.next_power_of_2(n_spins)), 1
    regs_per_value = 2 if dtype == torch.float64 else 1
    n_planes = 6 if kind == "single" else 12
    budget = _STATE_REGS_PER_PROGRAM // 2 if nt else _STATE_REGS_PER_PROGRAM
    fit = max(1, budget // (n_planes * (1 + nt) * k_pad * regs_per_value))
    block_spins = min(128, 1 << (fit.bit_length() - 1), triton.next_power_of_2(n_spins))
    rows = block_spins * max(1, nt) * min(k_pad, 32) // 32  # warp-sized groups of whole spins
    return k_pad, block_spins, max(1, min(4, rows))


def _check_inputs(expected: dict[str, tuple[Tensor, tuple[int, ...]]], like: Tensor) -> None:
    """Shapes, dtype, device and contiguity of a launch's tensors (``like`` sets the last three)."""
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"epg_train: {name} must have shape {shape}; got {tuple(t.shape)}.")
        if t.dtype != like.dtype or t.device != like.device or not t.is_contiguous():
            raise ValueError(
                f"epg_train: {name} must be a contiguous {like.dtype} tensor on {like.device}; "
                f"got {t.dtype} on {t.device} (contiguous: {t.is_contiguous()})."
            )
    if like.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"epg_train: dtype must be torch.float32 or torch.float64; got {like.dtype}.")


def _primal_shapes(kind: str, n_spins: int, n_pulses: int) -> dict[str, tuple[int, ...]]:
    p = 1 if kind == "single" else 2
    return {
        "xt_re": (p, p, n_spins),
        "xt_im": (p, p, n_spins),
        "xl": (p, p, n_spins),
        "recovery": (p, n_spins),
        "z0": (p, n_spins),
        "b1": (n_spins,),
        "wt": (n_spins,),
    }


def _block_spins(bs: int, block_spins: int | None, who: str) -> int:
    """The caller's ``block_spins`` (a power of two; ``who`` names the kernel in the error)
    or, when None, the launch configuration's ``bs``."""
    if block_spins is None:
        return bs
    if block_spins < 1 or block_spins & (block_spins - 1):
        raise ValueError(f"{who}: block_spins must be a power of two; got {block_spins}.")
    return block_spins


def _pick_block(
    kind: str, dtype: torch.dtype, n_states: int, n_spins: int, n_tan: int, block_spins: int | None
):
    k_pad, bs, num_warps = launch_config(kind, dtype, n_states, n_spins, n_tan)
    return k_pad, _block_spins(bs, block_spins, "epg_train"), num_warps


def _check_train(kind: str, gre: bool, n_states: int, n_pulses: int) -> int:
    """Validate the train's configuration; returns the number of echoes."""
    if kind not in KINDS:
        raise ValueError(f"epg_train: kind must be one of {KINDS}; got {kind!r}.")
    if n_states < 1 or n_pulses < (1 if gre else 2):
        raise ValueError(
            f"epg_train: need n_states >= 1 and at least {1 if gre else 2} pulses; "
            f"got n_states={n_states}, {n_pulses} pulses."
        )
    return n_pulses if gre else n_pulses - 1


def _launch_fwd(
    xt_re: Tensor,
    xt_im: Tensor,
    xl: Tensor,
    recovery: Tensor,
    z0: Tensor,
    b1: Tensor,
    wt: Tensor,
    pulses: Tensor,
    out: Tensor,
    *,
    kind: str,
    gre: bool,
    n_states: int,
    block_spins: int | None,
) -> None:
    """Check shapes, dtypes and devices, pick the grid and launch :func:`_fwd`."""
    n_spins = b1.shape[0]
    n_pulses = pulses.shape[1]
    n_echoes = _check_train(kind, gre, n_states, n_pulses)
    tensors = dict(xt_re=xt_re, xt_im=xt_im, xl=xl, recovery=recovery, z0=z0, b1=b1, wt=wt)
    expected = {k: (tensors[k], s) for k, s in _primal_shapes(kind, n_spins, n_pulses).items()}
    expected["pulses"] = (pulses, (_PULSE_ROWS, n_pulses))
    expected["out"] = (out, (2, n_echoes, n_spins))
    _check_inputs(expected, b1)
    if n_spins == 0:
        return
    k_pad, bs, num_warps = _pick_block(kind, b1.dtype, n_states, n_spins, 0, block_spins)
    _fwd[(triton.cdiv(n_spins, bs),)](
        xt_re,
        xt_im,
        xl,
        recovery,
        z0,
        b1,
        wt,
        pulses,
        out,
        n_spins,
        n_pulses,
        n_echoes,
        n_states,
        TWO_POOL=kind != "single",
        MT=kind == "mt",
        GRE=gre,
        K_PAD=k_pad,
        BLOCK_SPINS=bs,
        num_warps=num_warps,
    )


def _launch_tan(
    primals: Sequence[Tensor],
    pulses: Tensor,
    tangents: Sequence[Tensor],
    dpulses: Tensor,
    g: Tensor | None,
    out: Tensor,
    dout: Tensor,
    *,
    kind: str,
    gre: bool,
    n_states: int,
    block_spins: int | None,
) -> None:
    """Check shapes and launch :func:`_tan` once per chunk of ≤ NT_MAX directions.

    primals: the seven per-spin inputs of :func:`_launch_fwd`; tangents: the same with a
    leading direction axis, and either all per spin (last axis B) or all one value for
    every spin (last axis 1); dpulses [n_tan, _DPULSE_ROWS, n_pulses]. Without ``g`` fills
    out [2, n_echoes, B] and dout [n_tan, 2, n_echoes, B]; with ``g`` [2, n_echoes, B]
    fills dout [n_tan, B] with the contraction (``out`` is then not written).
    """
    b1 = primals[5]
    n_spins = b1.shape[0]
    n_pulses = pulses.shape[1]
    n_tan = dpulses.shape[0]
    n_echoes = _check_train(kind, gre, n_states, n_pulses)
    n_tan_spins = tangents[5].shape[-1]
    expected: dict[str, tuple[Tensor, tuple[int, ...]]] = {}
    for (name, shape), t, dt in zip(
        _primal_shapes(kind, n_spins, n_pulses).items(), primals, tangents, strict=True
    ):
        expected[name] = (t, shape)
        expected["d" + name] = (dt, (n_tan, *shape[:-1], n_tan_spins))
    expected["pulses"] = (pulses, (_PULSE_ROWS, n_pulses))
    expected["dpulses"] = (dpulses, (n_tan, _DPULSE_ROWS, n_pulses))
    if g is not None:
        expected["g"] = (g, (2, n_echoes, n_spins))
        expected["dout"] = (dout, (n_tan, n_spins))
    else:
        expected["out"] = (out, (2, n_echoes, n_spins))
        expected["dout"] = (dout, (n_tan, 2, n_echoes, n_spins))
    _check_inputs(expected, b1)
    if n_spins == 0 or n_tan == 0:
        return
    for start in range(0, n_tan, NT_MAX):
        stop = min(start + NT_MAX, n_tan)
        k_pad, bs, num_warps = _pick_block(kind, b1.dtype, n_states, n_spins, stop - start, block_spins)
        _tan[(triton.cdiv(n_spins, bs),)](
            *primals,
            pulses,
            *(t[start:stop] for t in tangents),
            dpulses[start:stop],
            out if g is None else g,
            out,
            dout[start:stop],
            n_spins,
            n_pulses,
            n_echoes,
            n_states,
            stop - start,
            n_tan_spins,
            TWO_POOL=kind != "single",
            MT=kind == "mt",
            GRE=gre,
            CONTRACT=g is not None,
            K_PAD=k_pad,
            BLOCK_SPINS=bs,
            NT=triton.next_power_of_2(stop - start),
            num_warps=num_warps,
        )


def _pulse_table(flip: Tensor, phase: Tensor, energy: Tensor) -> Tensor:
    """[_PULSE_ROWS, n_pulses]: flip, cos φ, sin φ, cos 2φ, sin 2φ, ∫B1² dt."""
    return torch.stack(
        [flip, torch.cos(phase), torch.sin(phase), torch.cos(2 * phase), torch.sin(2 * phase), energy]
    ).contiguous()


def _dense(ts: Sequence[Tensor]) -> list[Tensor]:
    return [t.contiguous() for t in ts]


def _spin_tangents(ts: Sequence[Tensor], n_spins: int) -> list[Tensor]:
    """Per-spin tangents, contiguous: kept at one value for every spin (last axis 1) when
    all are, else each spread over the n_spins spins."""
    if all(t.shape[-1] == 1 for t in ts):
        return _dense(ts)
    return _dense([t.expand(*t.shape[:-1], n_spins) for t in ts])


def _n_echoes(flip: Tensor, gre: bool) -> int:
    return flip.shape[0] if gre else flip.shape[0] - 1


@custom_op("epgx::epg_train", mutates_args=())
def _train_op(
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
    kind: str,
    gre: bool,
    n_states: int,
    block_spins: int | None,
) -> Tensor:
    """Echoes ``[2, n_echoes, B]`` (re, im) of the train; inputs as :func:`_launch_fwd`, pulses as vectors."""
    xt_re, xt_im, xl, recovery, z0, b1, wt = _dense((xt_re, xt_im, xl, recovery, z0, b1, wt))
    out = b1.new_empty(2, _n_echoes(flip, gre), b1.shape[0])
    _launch_fwd(
        xt_re,
        xt_im,
        xl,
        recovery,
        z0,
        b1,
        wt,
        _pulse_table(flip, phase, energy),
        out,
        kind=kind,
        gre=gre,
        n_states=n_states,
        block_spins=block_spins,
    )
    return out


@custom_op("epgx::epg_train_tangent", mutates_args=())
def _tangent_op(
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
    d_xt_re: Tensor,
    d_xt_im: Tensor,
    d_xl: Tensor,
    d_recovery: Tensor,
    d_z0: Tensor,
    d_b1: Tensor,
    d_wt: Tensor,
    d_flip: Tensor,
    d_phase: Tensor,
    d_energy: Tensor,
    kind: str,
    gre: bool,
    n_states: int,
    block_spins: int | None,
) -> tuple[Tensor, Tensor]:
    """Echoes ``[2, n_echoes, B]`` and their tangents ``[n_tan, 2, n_echoes, B]``.

    Each ``d_*`` is the tangent of its input along n_tan directions (leading axis).
    """
    n_tan, n_e, n_b = d_b1.shape[0], _n_echoes(flip, gre), b1.shape[0]
    out = b1.new_empty(2, n_e, n_b)
    dout = b1.new_empty(n_tan, 2, n_e, n_b)
    _launch_tan(
        _dense((xt_re, xt_im, xl, recovery, z0, b1, wt)),
        _pulse_table(flip, phase, energy),
        _spin_tangents((d_xt_re, d_xt_im, d_xl, d_recovery, d_z0, d_b1, d_wt), b1.shape[0]),
        torch.stack([d_flip, d_phase, d_energy], dim=1).contiguous(),
        None,
        out,
        dout,
        kind=kind,
        gre=gre,
        n_states=n_states,
        block_spins=block_spins,
    )
    return out, dout


@custom_op("epgx::epg_train_vjp", mutates_args=())
def _vjp_op(
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
    d_xt_re: Tensor,
    d_xt_im: Tensor,
    d_xl: Tensor,
    d_recovery: Tensor,
    d_z0: Tensor,
    d_b1: Tensor,
    d_wt: Tensor,
    d_flip: Tensor,
    d_phase: Tensor,
    d_energy: Tensor,
    grad: Tensor,
    kind: str,
    gre: bool,
    n_states: int,
    block_spins: int | None,
) -> Tensor:
    """``[n_tan, B]``: per spin and direction, Σ over echoes of ⟨grad, d(echo)⟩ (re and im).

    ``grad`` is the cotangent ``[2, n_echoes, B]`` of the echoes; the tangents as
    :func:`_tangent_op`. With one-hot directions these are the rows of Jᵀ·grad.
    """
    n_tan, n_b = d_b1.shape[0], b1.shape[0]
    dout = b1.new_empty(n_tan, n_b)
    _launch_tan(
        _dense((xt_re, xt_im, xl, recovery, z0, b1, wt)),
        _pulse_table(flip, phase, energy),
        _spin_tangents((d_xt_re, d_xt_im, d_xl, d_recovery, d_z0, d_b1, d_wt), b1.shape[0]),
        torch.stack([d_flip, d_phase, d_energy], dim=1).contiguous(),
        grad.contiguous(),
        dout,
        dout,
        kind=kind,
        gre=gre,
        n_states=n_states,
        block_spins=block_spins,
    )
    return dout


@_train_op.register_fake
def _train_fake(*args: Any) -> Tensor:
    b1, flip, gre = args[5], args[7], args[_N_IN + 1]
    return b1.new_empty(2, _n_echoes(flip, gre), b1.shape[0])


@_tangent_op.register_fake
def _tangent_fake(*args: Any) -> tuple[Tensor, Tensor]:
    b1, flip, d_b1, gre = args[5], args[7], args[_N_IN + 5], args[2 * _N_IN + 1]
    n_e = _n_echoes(flip, gre)
    return b1.new_empty(2, n_e, b1.shape[0]), b1.new_empty(d_b1.shape[0], 2, n_e, b1.shape[0])


@_vjp_op.register_fake
def _vjp_fake(*args: Any) -> Tensor:
    b1, d_b1 = args[5], args[_N_IN + 5]
    return b1.new_empty(d_b1.shape[0], b1.shape[0])


def _fold_spins(t: Tensor, dim: int | None, n_batch: int, n_spins: int) -> Tensor:
    """Fold a vmap batch dimension into the spin axis (last): [..., B] → [..., n_batch·B].

    An unbatched tensor is repeated for every batch element, except a tangent with one
    value for every spin (last axis 1), which serves the folded spins as it is.
    """
    if dim is None:
        if t.shape[-1] == 1 and n_spins != 1:
            return t
        t = t.unsqueeze(-2).expand(*t.shape[:-1], n_batch, t.shape[-1])
    else:
        t = t.movedim(dim, -2)
        t = t.expand(*t.shape[:-1], n_spins)
    return t.reshape(*t.shape[:-2], -1).contiguous()


def _fold_directions(t: Tensor, dim: int | None, n_batch: int) -> Tensor:
    """Fold a vmap batch dimension into the leading direction axis: [n_tan, ...] → [n_batch·n_tan, ...]."""
    t = t.unsqueeze(0).expand(n_batch, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.reshape(-1, *t.shape[2:]).contiguous()


def _vmap_loop(
    op: Callable[..., Any], n_batch: int, in_dims: Sequence[int | None], args: Sequence[Any]
) -> Any:
    """The general vmap rule: one call per batch element, outputs stacked along dim 0."""
    outs = [
        op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims, strict=True)))
        for i in range(n_batch)
    ]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs, strict=True)), (0,) * len(outs[0])
    return torch.stack(outs), 0


@_train_op.register_vmap
def _train_vmap(info: Any, in_dims: Sequence[int | None], *args: Any) -> tuple[Tensor, int]:
    """Per-spin inputs batched: the batch joins the spins (one launch); a batched pulse input: a loop."""
    nb = info.batch_size
    if any(in_dims[i] is not None for i in _PER_PULSE):
        return _vmap_loop(torch.ops.epgx.epg_train.default, nb, in_dims, args)
    n_b = args[5].shape[-1] if in_dims[5] is None else args[5].movedim(in_dims[5], 0).shape[-1]
    folded = [_fold_spins(args[i], in_dims[i], nb, n_b) for i in _PER_SPIN]
    out = torch.ops.epgx.epg_train.default(*folded, *args[7:])
    return out.unflatten(-1, (nb, n_b)), 2


@_tangent_op.register_vmap
def _tangent_vmap(
    info: Any, in_dims: Sequence[int | None], *args: Any
) -> tuple[tuple[Tensor, Tensor], tuple[Any, Any]]:
    """Only tangents batched (``jacfwd``): the batch joins the directions (one pass for all).

    Per-spin primals batched: the batch joins the spins. A batched pulse primal, or pulse
    tangents batched with the spins: a loop.
    """
    nb = info.batch_size
    op = torch.ops.epgx.epg_train_tangent.default
    prim, tan, cfg = args[:_N_IN], args[_N_IN : 2 * _N_IN], args[2 * _N_IN :]
    pd, td = in_dims[:_N_IN], in_dims[_N_IN : 2 * _N_IN]
    spins_batched = any(pd[i] is not None for i in _PER_SPIN)
    if any(pd[i] is not None for i in _PER_PULSE) or (
        spins_batched and any(td[i] is not None for i in _PER_PULSE)
    ):
        return _vmap_loop(op, nb, in_dims, args)
    if not spins_batched:
        n_tan = tan[5].shape[0] if td[5] is None else tan[5].movedim(td[5], 0).shape[1]
        folded = [_fold_directions(t, d, nb) for t, d in zip(tan, td, strict=True)]
        out, dout = op(*prim, *folded, *cfg)
        return (out, dout.unflatten(0, (nb, n_tan))), (None, 0)
    n_b = prim[5].shape[-1] if pd[5] is None else prim[5].movedim(pd[5], 0).shape[-1]
    fp = [_fold_spins(prim[i], pd[i], nb, n_b) for i in _PER_SPIN]
    ft = [_fold_spins(tan[i], td[i], nb, n_b) for i in _PER_SPIN]
    out, dout = op(*fp, *prim[7:], *ft, *tan[7:], *cfg)
    return (out.unflatten(-1, (nb, n_b)), dout.unflatten(-1, (nb, n_b))), (2, 3)


@_vjp_op.register_vmap
def _vjp_vmap(info: Any, in_dims: Sequence[int | None], *args: Any) -> tuple[Tensor, int]:
    """Batched per-spin inputs or cotangents (``jacrev``) join the spins; batched pulse inputs loop."""
    nb = info.batch_size
    op = torch.ops.epgx.epg_train_vjp.default
    pulse_args = [*_PER_PULSE, *(_N_IN + i for i in _PER_PULSE)]
    if any(in_dims[i] is not None for i in pulse_args):
        return _vmap_loop(op, nb, in_dims, args)
    spin_args = [*_PER_SPIN, *(_N_IN + i for i in _PER_SPIN), 2 * _N_IN]
    b1 = args[5]
    n_b = b1.shape[-1] if in_dims[5] is None else b1.movedim(in_dims[5], 0).shape[-1]
    new = list(args)
    for i in spin_args:
        new[i] = _fold_spins(args[i], in_dims[i], nb, n_b)
    return op(*new).unflatten(-1, (nb, n_b)), 1


def _train_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs[:_N_IN])
    ctx.config = inputs[_N_IN:]


def _train_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    from epgx.kernels.epg_train_adjoint import vjp  # it imports this module's helpers

    grads = vjp(ctx.saved_tensors, grad, ctx.needs_input_grad[:_N_IN], ctx.config)
    return (*grads, *(None for _ in ctx.config))


_train_op.register_autograd(_train_backward, setup_context=_train_setup)

_SECOND_ORDER = (
    "second-order derivatives (a backward through forward-mode tangents or through a "
    "backward, a jvp of a jvp) are not implemented for backend='triton'; use backend='torch'"
)


def _no_second_order(ctx: Any, *grads: Any) -> Any:
    raise NotImplementedError(_SECOND_ORDER)


def _no_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    return None


_tangent_op.register_autograd(_no_second_order, setup_context=_no_setup)
_vjp_op.register_autograd(_no_second_order, setup_context=_no_setup)


class _FirstOrder(torch.autograd.Function):
    """A derivative launch (tangent, contraction, adjoint) run inside a backward or a jvp.

    Under ``torch.func.grad``/``vjp``/``jacrev`` a backward runs at a transform level,
    where a custom op's own autograd (``register_autograd``) refuses to run; this
    Function has ``setup_context`` and a vmap rule, so the transforms accept it, and its
    derivatives raise the second-order error.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(op: Callable[..., Any], *args: Any) -> Any:
        out = op(*args)
        return tuple(out) if isinstance(out, list) else out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        return None

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise NotImplementedError(_SECOND_ORDER)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        raise NotImplementedError(_SECOND_ORDER)


def _first_order(op: Callable[..., Any], *args: Any) -> Any:
    """``op(*args)`` (a list result as a tuple) through :class:`_FirstOrder`."""
    return _FirstOrder.apply(op, *args)


class _Train(torch.autograd.Function):
    """The fused train as a differentiable function of the ten kernel inputs (``_INPUTS``).

    ``jvp`` runs the tangent kernel (NT = 1 here; ``torch.func.jacfwd``/``vmap`` turn the
    batch of tangents into NT directions of one pass through the op's vmap rule);
    ``backward`` runs the adjoint kernel (:mod:`epgx.kernels.epg_train_adjoint`), one launch.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(*args: Any) -> Tensor:
        return torch.ops.epgx.epg_train.default(*args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs[:_N_IN])
        ctx.save_for_forward(*inputs[:_N_IN])
        ctx.config = inputs[_N_IN:]

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Tensor:
        primals = ctx.saved_tensors
        tans = [
            (torch.zeros_like(p) if t is None else t).unsqueeze(0)
            for p, t in zip(primals, tangents[:_N_IN], strict=True)
        ]
        return _first_order(torch.ops.epgx.epg_train_tangent.default, *primals, *tans, *ctx.config)[1][0]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return _train_backward(ctx, grad)


def epg_train(
    relaxation: ops.Relaxation,
    z0: Tensor,
    b1: Tensor,
    flip_rad: Tensor,
    phase_rad: Tensor,
    *,
    kind: str,
    gre: bool,
    n_states: int,
    mt_lineshape_us: Tensor | None = None,
    b1sq_tau_ut2ms: Tensor | None = None,
    out: Tensor | None = None,
    block_spins: int | None = None,
) -> Tensor:
    """Echoes of a whole FSE or GRE train of B spins, in one fused kernel launch.

    Differentiable w.r.t. every tensor argument (autograd, ``torch.func`` jvp, jacfwd,
    jacrev, vmap): the derivatives are exact, forward mode from the tangent kernel and
    reverse mode from the adjoint kernel (see the module docstring for their cost).
    Second-order derivatives are not supported.

    Args:
        relaxation: per-spin propagators over one interval (ESP/2 or TR), from
            :func:`epgx.ops.relaxation` (``[P, P, B]``, recovery ``[P, B]``).
        z0: ``[P, B]`` Re Z₀ per pool before the first pulse (after any preparation).
        b1: ``[B]`` transmit scale per spin (multiplies every flip angle).
        flip_rad: ``[n_pulses]`` nominal flip angles, radians (FSE: excitation first).
        phase_rad: ``[n_pulses]`` RF phases, radians (FSE: CPMG 90° already added).
        kind: ``"single"``, ``"bm"`` or ``"mt"`` (P = 1, 2, 2).
        gre: GRE schedule (echo right after each pulse, demodulated) instead of FSE.
        n_states: orders K kept for the whole train; EPG-X truncation above them.
        mt_lineshape_us: ``[B]`` bound-pool lineshape G, µs (MT only).
        b1sq_tau_ut2ms: ``[n_pulses]`` ∫B1² dt per pulse, µT²·ms (MT only).
        out: optional ``[2, n_echoes, B]`` buffer for (re, im) of the echoes; forward only.
        block_spins: spins per program (a power of two); None picks one.

    Returns:
        complex ``[B, n_echoes]`` (n_echoes = n_pulses for GRE, n_pulses − 1 for FSE).

    Raises:
        ValueError: bad shapes, dtypes or kind; ``out`` given with inputs that carry
            derivatives.
    """
    if kind not in KINDS:
        raise ValueError(f"epg_train: kind must be one of {KINDS}; got {kind!r}.")
    if (kind == "mt") != (mt_lineshape_us is not None and b1sq_tau_ut2ms is not None):
        raise ValueError("epg_train: mt_lineshape_us and b1sq_tau_ut2ms are needed for, and only for, MT.")
    dtype, device = b1.dtype, b1.device
    n_pulses = flip_rad.shape[0]

    def dense(t: Tensor) -> Tensor:
        return t.to(dtype=dtype, device=device).contiguous()

    xt_im = torch.zeros_like(relaxation.xt_re) if relaxation.xt_im is None else relaxation.xt_im
    if kind == "mt":
        assert mt_lineshape_us is not None and b1sq_tau_ut2ms is not None
        # W·T per µT²·ms of ∫B1² dt: π γ² b1² G (G in ms), as ops.mt_saturation
        wt = math.pi * ops.GAMMA_RAD_PER_MS_PER_UT**2 * 1e-3 * (b1 * b1) * mt_lineshape_us
        energy = b1sq_tau_ut2ms.expand(n_pulses)
    else:
        wt, energy = torch.zeros_like(b1), torch.zeros_like(flip_rad)
    inputs = [
        relaxation.xt_re,
        xt_im,
        relaxation.xl,
        relaxation.recovery,
        z0,
        b1,
        wt,
        flip_rad,
        phase_rad,
        energy,
    ]
    inputs = [dense(t) for t in inputs]
    n_echoes = _check_train(kind, gre, n_states, n_pulses)
    if out is not None:
        if any(ops.differentiated(t) for t in inputs):
            raise ValueError(
                "epg_train: out= is for the forward pass only; inputs that carry derivatives "
                "need out=None (the differentiable path allocates its output)."
            )
        xt_re, xt_im, xl, recovery, z0, b1, wt, flip, phase, energy = inputs
        _launch_fwd(
            xt_re,
            xt_im,
            xl,
            recovery,
            z0,
            b1,
            wt,
            _pulse_table(flip, phase, energy),
            out,
            kind=kind,
            gre=gre,
            n_states=n_states,
            block_spins=block_spins,
        )
    else:
        out = _Train.apply(*inputs, kind, gre, n_states, block_spins)
    assert out is not None and out.shape[-2] == n_echoes
    return torch.complex(out[0], out[1]).T
