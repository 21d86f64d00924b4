"""Whole-echo-train EPG-X forward kernel: an entire FSE or GRE train in one launch.

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

This step is the forward pass only: inputs that require grad are refused (the fused
backward, jvp and ``torch.library`` registration come next), and diffusion is not
fused yet.

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

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from epgx import ops
from epgx.tissue import KINDS

# Rows of the per-pulse table: flip (rad), cos φ, sin φ, cos 2φ, sin 2φ, ∫B1² dt (µT²·ms).
_PULSE_ROWS = 6

# Register budget of one program's live state, in 32-bit registers: with 4 warps this is
# 64 per thread, which compiles for sm_90 without spills (tests/test_kernels_compile.py).
_STATE_REGS_PER_PROGRAM = 8192


@triton.jit
def _cmul(xr, xi, ar, ai):
    """Complex product x·a on real/imaginary planes."""
    return xr * ar - xi * ai, xr * ai + xi * ar


@triton.jit
def _rf(s, c2, s2, sa, ca, cp, sp, c2p, s2p):
    """Weigel's rotation on one pool's planes s = (F+ re, F+ im, F- re, F- im, Z re, Z im).

    c2 = cos²(α/2), s2 = sin²(α/2), sa = sin α, ca = cos α (per spin, [BLOCK_SPINS, 1]);
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
def _shift_recover(s, rec, o_k, n_states, K_PAD: tl.constexpr):
    """Shift by one order with EPG-X truncation at K = n_states, then add rec to Re Z₀."""
    b_fpr, b_fpi, b_fmr, b_fmi, b_zr, b_zi = s
    o_dn = tl.broadcast_to(tl.maximum(o_k - 1, 0)[None, :], b_fpr.shape)
    o_up = tl.broadcast_to(tl.minimum(o_k + 1, K_PAD - 1)[None, :], b_fpr.shape)
    m_up = (o_k + 1 < n_states)[None, :]
    m_dn = (o_k < n_states)[None, :]
    m_0 = (o_k == 0)[None, :]
    # F-ₖ ← F-ₖ₊₁ (zero enters at the top); order 0 of the result is F-₁
    n_fmr = tl.where(m_up, tl.gather(b_fmr, o_up, 1), 0.0)
    n_fmi = tl.where(m_up, tl.gather(b_fmi, o_up, 1), 0.0)
    # F+ₖ ← F+ₖ₋₁ (order K−1 drops out); F+₀ ← conj(F-₁)
    n_fpr = tl.where(m_0, n_fmr, tl.where(m_dn, tl.gather(b_fpr, o_dn, 1), 0.0))
    n_fpi = tl.where(m_0, -n_fmi, tl.where(m_dn, tl.gather(b_fpi, o_dn, 1), 0.0))
    return n_fpr, n_fpi, n_fmr, n_fmi, b_zr + tl.where(m_0, rec, 0.0), b_zi


@triton.jit
def _f0(x, o_k):
    """Order-0 column of a [BLOCK_SPINS, K_PAD] plane, as [BLOCK_SPINS]."""
    return tl.sum(tl.where((o_k == 0)[None, :], x, 0.0), axis=1)


@triton.jit
def _pulse(a, b, p_pulse, j, n_pulses, b_b1, b_wt, TWO_POOL: tl.constexpr, MT: tl.constexpr):
    """Pulse j: Weigel's rotation at flip b1·α_j, phase φ_j; MT saturation of pool b."""
    b_alpha = tl.load(p_pulse + j) * b_b1
    b_ch = tl.cos(0.5 * b_alpha)
    b_sh = tl.sin(0.5 * b_alpha)
    b_c2 = (b_ch * b_ch)[:, None]
    b_s2 = (b_sh * b_sh)[:, None]
    b_sa = tl.sin(b_alpha)[:, None]
    b_ca = tl.cos(b_alpha)[:, None]
    cp = tl.load(p_pulse + n_pulses + j)
    sp = tl.load(p_pulse + 2 * n_pulses + j)
    c2p = tl.load(p_pulse + 3 * n_pulses + j)
    s2p = tl.load(p_pulse + 4 * n_pulses + j)
    a = _rf(a, b_c2, b_s2, b_sa, b_ca, cp, sp, c2p, s2p)
    if TWO_POOL:
        if MT:
            b_sat = tl.exp(-tl.load(p_pulse + 5 * n_pulses + j) * b_wt)[:, None]
            b = (b[0], b[1], b[2], b[3], b[4] * b_sat, b[5] * b_sat)
        else:
            b = _rf(b, b_c2, b_s2, b_sa, b_ca, cp, sp, c2p, s2p)
    return a, b


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
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
):
    """One free interval: relaxation/exchange, shift, recovery on Z₀ (EPG-X's order)."""
    if TWO_POOL:
        if MT:
            a, b = _relax_mt(a, b, b_xt[0], b_xt[1], b_xl)
            # the bound pool has no transverse states to shift: recovery only
            b = (b[0], b[1], b[2], b[3], b[4] + tl.where((o_k == 0)[None, :], b_rec_b, 0.0), b[5])
        else:
            a, b = _relax2(a, b, b_xt, b_xl)
            b = _shift_recover(b, b_rec_b, o_k, n_states, K_PAD)
    else:
        a = _relax1(a, b_xt[0], b_xt[1], b_xl[0])
    a = _shift_recover(a, b_rec_a, o_k, n_states, K_PAD)
    return a, b


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
    b_re = _f0(a[0], o_k)
    b_im = _f0(a[1], o_k)
    if TWO_POOL:
        if not MT:
            b_re += _f0(b[0], o_k)
            b_im += _f0(b[1], o_k)
    if GRE:
        cp = tl.load(p_pulse + n_pulses + i_e)
        sp = tl.load(p_pulse + 2 * n_pulses + i_e)
        b_re, b_im = b_re * cp + b_im * sp, b_im * cp - b_re * sp
    tl.store(p_out + i_e * n_b + o_b, -b_im, mask=m_b)
    tl.store(p_out + (n_echoes + i_e) * n_b + o_b, b_re, mask=m_b)


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
    o_k = tl.arange(0, K_PAD)
    m_0 = (o_k == 0)[None, :]
    n_b = tl.cast(n_spins, tl.int64)  # also when Triton specialises n_spins == 1 as a constant
    zero = tl.zeros([BLOCK_SPINS, K_PAD], dtype=p_xt_re.dtype.element_ty)

    b_b1 = tl.load(p_b1 + o_b, mask=m_b, other=0.0)
    b_x0 = tl.load(p_xt_re + o_b, mask=m_b, other=0.0)[:, None]
    b_x1 = tl.load(p_xt_im + o_b, mask=m_b, other=0.0)[:, None]
    b_l0 = tl.load(p_xl + o_b, mask=m_b, other=0.0)[:, None]
    b_rec_a = tl.load(p_rec + o_b, mask=m_b, other=0.0)[:, None]
    b_za = tl.load(p_z0 + o_b, mask=m_b, other=0.0)[:, None]
    # planes of pool a and pool b; a single pool leaves pool b and the off-diagonal
    # propagators as unused placeholders (the compiler drops them)
    b_pa = (zero, zero, zero, zero, tl.where(m_0, b_za, 0.0), zero)
    b_pb = (zero, zero, zero, zero, zero, zero)
    b_xt = (b_x0, b_x1, b_x0, b_x1, b_x0, b_x1, b_x0, b_x1)
    b_xl = (b_l0, b_l0, b_l0, b_l0)
    b_rec_b = b_rec_a
    b_wt = b_b1
    if TWO_POOL:
        b_xl = (
            b_l0,
            tl.load(p_xl + n_b + o_b, mask=m_b, other=0.0)[:, None],
            tl.load(p_xl + 2 * n_b + o_b, mask=m_b, other=0.0)[:, None],
            tl.load(p_xl + 3 * n_b + o_b, mask=m_b, other=0.0)[:, None],
        )
        b_xt = (
            b_x0,
            b_x1,
            tl.load(p_xt_re + n_b + o_b, mask=m_b, other=0.0)[:, None],
            tl.load(p_xt_im + n_b + o_b, mask=m_b, other=0.0)[:, None],
            tl.load(p_xt_re + 2 * n_b + o_b, mask=m_b, other=0.0)[:, None],
            tl.load(p_xt_im + 2 * n_b + o_b, mask=m_b, other=0.0)[:, None],
            tl.load(p_xt_re + 3 * n_b + o_b, mask=m_b, other=0.0)[:, None],
            tl.load(p_xt_im + 3 * n_b + o_b, mask=m_b, other=0.0)[:, None],
        )
        b_rec_b = tl.load(p_rec + n_b + o_b, mask=m_b, other=0.0)[:, None]
        b_zb = tl.load(p_z0 + n_b + o_b, mask=m_b, other=0.0)[:, None]
        b_pb = (zero, zero, zero, zero, tl.where(m_0, b_zb, 0.0), zero)
        if MT:
            b_wt = tl.load(p_wt + o_b, mask=m_b, other=0.0)

    if GRE:
        for j in range(0, n_pulses):
            b_pa, b_pb = _pulse(b_pa, b_pb, p_pulse, j, n_pulses, b_b1, b_wt, TWO_POOL, MT)
            _echo(b_pa, b_pb, p_out, p_pulse, j, n_echoes, n_pulses, n_b, o_b, m_b, o_k, TWO_POOL, MT, GRE)
            b_pa, b_pb = _interval(
                b_pa, b_pb, b_xt, b_xl, b_rec_a, b_rec_b, o_k, n_states, K_PAD, TWO_POOL, MT
            )
    else:
        b_pa, b_pb = _pulse(b_pa, b_pb, p_pulse, 0, n_pulses, b_b1, b_wt, TWO_POOL, MT)
        b_pa, b_pb = _interval(b_pa, b_pb, b_xt, b_xl, b_rec_a, b_rec_b, o_k, n_states, K_PAD, TWO_POOL, MT)
        for j in range(1, n_pulses):
            b_pa, b_pb = _pulse(b_pa, b_pb, p_pulse, j, n_pulses, b_b1, b_wt, TWO_POOL, MT)
            b_pa, b_pb = _interval(
                b_pa, b_pb, b_xt, b_xl, b_rec_a, b_rec_b, o_k, n_states, K_PAD, TWO_POOL, MT
            )
            _echo(
                b_pa, b_pb, p_out, p_pulse, j - 1, n_echoes, n_pulses, n_b, o_b, m_b, o_k, TWO_POOL, MT, GRE
            )
            b_pa, b_pb = _interval(
                b_pa, b_pb, b_xt, b_xl, b_rec_a, b_rec_b, o_k, n_states, K_PAD, TWO_POOL, MT
            )


INTERPRETED = isinstance(_fwd, InterpretedFunction)
"""True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""


def launch_config(kind: str, dtype: torch.dtype, n_states: int, n_spins: int) -> tuple[int, int, int]:
    """``(K_PAD, BLOCK_SPINS, num_warps)`` of a launch.

    On a GPU the block of spins is sized so that the live state of one program stays
    within a register budget (float64 values take two registers). ``tl.gather`` along
    the order axis is compiled warp-local, so Triton lays one spin's K_PAD orders out
    within one warp and spreads warps over spins only: more warps than spins (or than
    32-order rows) would replicate the state instead of splitting it. Per-thread state
    is then K_PAD/32 values per plane at least, so past K_PAD ≈ 128 (single pool, fp32)
    the state no longer fits in registers and spills (see tests/test_kernels_compile.py).
    In the interpreter numpy's cost is per operation, so few large programs are fastest.
    """
    k_pad = triton.next_power_of_2(n_states)
    if INTERPRETED:
        return k_pad, min(256, triton.next_power_of_2(n_spins)), 1
    regs_per_value = 2 if dtype == torch.float64 else 1
    n_planes = 6 if kind == "single" else 12
    fit = max(1, _STATE_REGS_PER_PROGRAM // (n_planes * k_pad * regs_per_value))
    block_spins = min(128, 1 << (fit.bit_length() - 1), triton.next_power_of_2(n_spins))
    rows = block_spins * min(k_pad, 32) // 32  # warp-sized groups of whole spins
    return k_pad, block_spins, max(1, min(4, rows))


def _launch_fwd(
    xt_re: torch.Tensor,
    xt_im: torch.Tensor,
    xl: torch.Tensor,
    recovery: torch.Tensor,
    z0: torch.Tensor,
    b1: torch.Tensor,
    wt: torch.Tensor,
    pulses: torch.Tensor,
    out: torch.Tensor,
    *,
    kind: str,
    gre: bool,
    n_states: int,
    block_spins: int | None,
) -> None:
    """Check shapes, dtypes and devices, pick the grid and launch :func:`_fwd`."""
    n_pools = 1 if kind == "single" else 2
    n_spins = b1.shape[0]
    n_pulses = pulses.shape[1]
    n_echoes = n_pulses if gre else n_pulses - 1
    expected = {
        "xt_re": (xt_re, (n_pools, n_pools, n_spins)),
        "xt_im": (xt_im, (n_pools, n_pools, n_spins)),
        "xl": (xl, (n_pools, n_pools, n_spins)),
        "recovery": (recovery, (n_pools, n_spins)),
        "z0": (z0, (n_pools, n_spins)),
        "b1": (b1, (n_spins,)),
        "wt": (wt, (n_spins,)),
        "pulses": (pulses, (_PULSE_ROWS, n_pulses)),
        "out": (out, (2, n_echoes, n_spins)),
    }
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"epg_train: {name} must have shape {shape}; got {tuple(t.shape)}.")
        if t.dtype != b1.dtype or t.device != b1.device or not t.is_contiguous():
            raise ValueError(
                f"epg_train: {name} must be a contiguous {b1.dtype} tensor on {b1.device}; "
                f"got {t.dtype} on {t.device} (contiguous: {t.is_contiguous()})."
            )
    if b1.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"epg_train: dtype must be torch.float32 or torch.float64; got {b1.dtype}.")
    if n_states < 1 or n_pulses < (1 if gre else 2):
        raise ValueError(
            f"epg_train: need n_states >= 1 and at least {1 if gre else 2} pulses; "
            f"got n_states={n_states}, {n_pulses} pulses."
        )
    k_pad, bs, num_warps = launch_config(kind, b1.dtype, n_states, n_spins)
    if block_spins is not None:
        if block_spins < 1 or block_spins & (block_spins - 1):
            raise ValueError(f"epg_train: block_spins must be a power of two; got {block_spins}.")
        bs = block_spins
    grid = (triton.cdiv(n_spins, bs),)
    _fwd[grid](
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
        TWO_POOL=n_pools == 2,
        MT=kind == "mt",
        GRE=gre,
        K_PAD=k_pad,
        BLOCK_SPINS=bs,
        num_warps=num_warps,
    )


def epg_train(
    relaxation: ops.Relaxation,
    z0: torch.Tensor,
    b1: torch.Tensor,
    flip_rad: torch.Tensor,
    phase_rad: torch.Tensor,
    *,
    kind: str,
    gre: bool,
    n_states: int,
    mt_lineshape_us: torch.Tensor | None = None,
    b1sq_tau_ut2ms: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block_spins: int | None = None,
) -> torch.Tensor:
    """Echoes of a whole FSE or GRE train of B spins, in one fused kernel launch.

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
        out: optional ``[2, n_echoes, B]`` buffer for (re, im) of the echoes.
        block_spins: spins per program (a power of two); None picks one.

    Returns:
        complex ``[B, n_echoes]`` (n_echoes = n_pulses for GRE, n_pulses − 1 for FSE).

    Raises:
        ValueError: an input requires grad (no fused backward yet), bad shapes, dtypes
            or kind.
    """
    if kind not in KINDS:
        raise ValueError(f"epg_train: kind must be one of {KINDS}; got {kind!r}.")
    if (kind == "mt") != (mt_lineshape_us is not None and b1sq_tau_ut2ms is not None):
        raise ValueError("epg_train: mt_lineshape_us and b1sq_tau_ut2ms are needed for, and only for, MT.")
    inputs = [relaxation.xt_re, relaxation.xt_im, relaxation.xl, relaxation.recovery, z0, b1]
    inputs += [flip_rad, phase_rad, mt_lineshape_us, b1sq_tau_ut2ms]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        raise ValueError(
            "backend='triton' runs the forward pass only: the fused backward is not "
            "implemented yet, and an input requires grad. Use backend='torch' for gradients."
        )
    dtype, device = b1.dtype, b1.device
    n_spins = b1.shape[0]
    n_pulses = flip_rad.shape[0]

    def dense(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype=dtype, device=device).contiguous()

    xt_im = torch.zeros_like(relaxation.xt_re) if relaxation.xt_im is None else relaxation.xt_im
    if kind == "mt":
        assert mt_lineshape_us is not None and b1sq_tau_ut2ms is not None
        # W·T per µT²·ms of ∫B1² dt: π γ² b1² G (G in ms), as ops.mt_saturation
        wt = math.pi * ops.GAMMA_RAD_PER_MS_PER_UT**2 * 1e-3 * (b1 * b1) * mt_lineshape_us
        energy = b1sq_tau_ut2ms
    else:
        wt, energy = torch.zeros_like(b1), torch.zeros_like(flip_rad)
    pulses = torch.stack(
        [
            flip_rad,
            torch.cos(phase_rad),
            torch.sin(phase_rad),
            torch.cos(2 * phase_rad),
            torch.sin(2 * phase_rad),
            energy.expand(n_pulses),
        ]
    )
    n_echoes = n_pulses if gre else n_pulses - 1
    if out is None:
        out = torch.empty(2, n_echoes, n_spins, dtype=dtype, device=device)
    if n_spins > 0:
        _launch_fwd(
            dense(relaxation.xt_re),
            dense(xt_im),
            dense(relaxation.xl),
            dense(relaxation.recovery),
            dense(z0),
            dense(b1),
            dense(wt),
            dense(pulses),
            out,
            kind=kind,
            gre=gre,
            n_states=n_states,
            block_spins=block_spins,
        )
    return torch.complex(out[0], out[1]).T
