"""Block-sequence EPG-X forward kernel: any sequence of primitive events in one launch.

The sequences of :mod:`epgx.blocks` (MPRAGE, MP2RAGE, FISP/bSSFP-MRF with varying TR and
TE, MOLLI, T1-T2 shuffling, ...) lower to a list of primitive events. This kernel
interprets that list at run time: one program holds a block of spins, each spin's
EPG-X state (per pool: F+ₙ, F-ₙ stored as conj F₋ₙ, and Zₙ for n = 0..K−1, as
real/imaginary planes) stays in registers as ``[BLOCK_SPINS, K_PAD]`` blocks for the
whole sequence, and a loop over the event table applies, per event::

    rf      x ← T(b1·α, φ) x          Weigel's rotation of every pool carrying transverse
                                       states (Weigel 2015, eq. 15); MT bound pool: Z ← e^{−W·T} Z
    relax   x ← S^s(Ξ x) + b          relaxation/exchange/off-resonance Ξ = exp(τΛ), then a
                                       shift by s ∈ {0, 1} orders, then recovery b on Z₀
                                       (EPG-X's order; Malik 2018, eq. 11)
    echo    store e^{−iψ}·i·F+₀       summed over pools (BM), of the free pool (MT)
    spoil   x ← Z₀ only               ideal crusher
    invert  x ← −η·Z₀ (free pools)    adiabatic inversion after a crusher; MT bound pool
                                       saturated by e^{−W·T} instead (Gloor 2008)
    rotate  F+ ← F+ e^{−iθ}, F- ← F- e^{iθ}   frame rotation (phase-cycled bSSFP)

Orders shifted past K − 1 drop out and zeros enter at the top (EPG-X's truncation). One
K for the whole sequence is exact for the echoes when it is at least the largest pruned
state count of :meth:`epgx.blocks._Program.sizes`: the kernel then keeps every order the
pruned torch engine keeps (and some it drops, which can no longer reach order 0 before
their segment ends).

The per-spin propagators Ξ and recoveries b of every distinct interval of the sequence
are computed on the host by :func:`epgx.ops.relaxation` (one vectorised call) and read
by index, so the kernel is exact to rounding against the pure-torch engine. Pulses,
readout demodulations, inversions and rotations are small per-event tables. The start
state is the order-0 state of each spin (equilibrium, or the probe states of a
steady-state solve); the order-0 state at the end is written for that solve.

This is the forward pass only: inputs that require grad are refused. Diffusion and flow
are not block events.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl
from epgx.kernels.epg_train import INTERPRETED, _relax1, _relax2, _relax_mt, _rf, launch_config

from epgx import ops
from epgx.engine import _relax_kwargs
from epgx.tissue import KINDS

if TYPE_CHECKING:
    from epgx.blocks import _Program

__all__ = ["INTERPRETED", "Tables", "epg_program", "run_program", "spins_per_launch", "tables"]

# Opcodes of the event table (row 0), in the order of _fwd's branches; row 1 indexes the
# event's own table, row 2 is the shift of a relaxation (0 or 1 orders).
_OPCODES = {name: code for code, name in enumerate(("rf", "relax", "echo", "spoil", "invert", "rotate"))}
# Rows of the per-pulse table: flip (rad), cos φ, sin φ, cos 2φ, sin 2φ, ∫B1² dt (µT²·ms).
_PULSE_ROWS = 6

# Largest per-spin propagator tables one launch may hold (bytes): the host splits the
# spins where a sequence with many distinct intervals (MRF with varying TR) needs more.
TABLE_BUDGET_BYTES = 1 << 30


@triton.jit
def _order0(x, m_0):
    """Order-0 column of a [BLOCK_SPINS, K_PAD] plane, as [BLOCK_SPINS]."""
    return tl.sum(tl.where(m_0, x, 0.0), axis=1)


@triton.jit
def _shift(s, o_k, n_states, K_PAD: tl.constexpr):
    """Dephase by one order with EPG-X truncation at K = n_states; Z unchanged."""
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
    return n_fpr, n_fpi, n_fmr, n_fmi, b_zr, b_zi


@triton.jit
def _spoil(s, m_0):
    """Ideal crusher on one pool: Z₀ (re, im) kept, every other state zero."""
    zero = tl.zeros_like(s[0])
    return zero, zero, zero, zero, tl.where(m_0, s[4], 0.0), tl.where(m_0, s[5], 0.0)


@triton.jit
def _scale(s, c):
    """Every plane of one pool times c."""
    return s[0] * c, s[1] * c, s[2] * c, s[3] * c, s[4] * c, s[5] * c


@triton.jit
def _rotate(s, c, sn):
    """Frame rotation by θ (c = cos θ, sn = sin θ): F+ ← F+ e^{−iθ}, stored F- ← F- e^{iθ}."""
    return (
        s[0] * c + s[1] * sn,
        s[1] * c - s[0] * sn,
        s[2] * c - s[3] * sn,
        s[3] * c + s[2] * sn,
        s[4],
        s[5],
    )


@triton.jit
def _load_order0(p_state, pool, n_b, o_b, m_b, m_0):
    """Pool ``pool`` of a [P, 6, B] order-0 state as six [BLOCK_SPINS, K_PAD] planes."""
    base = p_state + pool * 6 * n_b + o_b
    return (
        tl.where(m_0, tl.load(base, mask=m_b, other=0.0)[:, None], 0.0),
        tl.where(m_0, tl.load(base + n_b, mask=m_b, other=0.0)[:, None], 0.0),
        tl.where(m_0, tl.load(base + 2 * n_b, mask=m_b, other=0.0)[:, None], 0.0),
        tl.where(m_0, tl.load(base + 3 * n_b, mask=m_b, other=0.0)[:, None], 0.0),
        tl.where(m_0, tl.load(base + 4 * n_b, mask=m_b, other=0.0)[:, None], 0.0),
        tl.where(m_0, tl.load(base + 5 * n_b, mask=m_b, other=0.0)[:, None], 0.0),
    )


@triton.jit
def _store_order0(p_state, s, pool, n_b, o_b, m_b, m_0):
    """Order 0 of one pool's planes into a [P, 6, B] state."""
    base = p_state + pool * 6 * n_b + o_b
    for c in tl.static_range(6):
        tl.store(base + c * n_b, _order0(s[c], m_0), mask=m_b)


@triton.jit
def _pulse(a, b, p_pulse, j, n_pulses, b_b1, b_wt, TWO_POOL: tl.constexpr, MT: tl.constexpr):
    """Pulse j of the table: rotation at flip b1·α_j, phase φ_j; MT saturation of pool b."""
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
def _relax(
    a,
    b,
    p_xt_re,
    p_xt_im,
    p_xl,
    p_rec,
    j,
    shift,
    n_b,
    o_b,
    m_b,
    o_k,
    n_states,
    K_PAD: tl.constexpr,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
):
    """Interval j of the table: relaxation/exchange, a shift by ``shift`` orders, recovery on Z₀."""
    m_0 = (o_k == 0)[None, :]
    P2: tl.constexpr = 4 if TWO_POOL else 1
    P: tl.constexpr = 2 if TWO_POOL else 1
    o_x = j.to(tl.int64) * P2 * n_b + o_b  # [n_intervals, P, P, B] tables
    o_r = j.to(tl.int64) * P * n_b + o_b  # [n_intervals, P, B] recovery
    b_x0 = tl.load(p_xt_re + o_x, mask=m_b, other=0.0)[:, None]
    b_x1 = tl.load(p_xt_im + o_x, mask=m_b, other=0.0)[:, None]
    b_l0 = tl.load(p_xl + o_x, mask=m_b, other=0.0)[:, None]
    b_rec_a = tl.load(p_rec + o_r, mask=m_b, other=0.0)[:, None]
    if TWO_POOL:
        b_xl = (
            b_l0,
            tl.load(p_xl + o_x + n_b, mask=m_b, other=0.0)[:, None],
            tl.load(p_xl + o_x + 2 * n_b, mask=m_b, other=0.0)[:, None],
            tl.load(p_xl + o_x + 3 * n_b, mask=m_b, other=0.0)[:, None],
        )
        b_rec_b = tl.load(p_rec + o_r + n_b, mask=m_b, other=0.0)[:, None]
        if MT:
            a, b = _relax_mt(a, b, b_x0, b_x1, b_xl)
        else:
            b_xt = (
                b_x0,
                b_x1,
                tl.load(p_xt_re + o_x + n_b, mask=m_b, other=0.0)[:, None],
                tl.load(p_xt_im + o_x + n_b, mask=m_b, other=0.0)[:, None],
                tl.load(p_xt_re + o_x + 2 * n_b, mask=m_b, other=0.0)[:, None],
                tl.load(p_xt_im + o_x + 2 * n_b, mask=m_b, other=0.0)[:, None],
                tl.load(p_xt_re + o_x + 3 * n_b, mask=m_b, other=0.0)[:, None],
                tl.load(p_xt_im + o_x + 3 * n_b, mask=m_b, other=0.0)[:, None],
            )
            a, b = _relax2(a, b, b_xt, b_xl)
            if shift != 0:
                b = _shift(b, o_k, n_states, K_PAD)
        # the MT bound pool has no transverse states to shift: recovery only
        b = (b[0], b[1], b[2], b[3], b[4] + tl.where(m_0, b_rec_b, 0.0), b[5])
    else:
        a = _relax1(a, b_x0, b_x1, b_l0)
    if shift != 0:
        a = _shift(a, o_k, n_states, K_PAD)
    a = (a[0], a[1], a[2], a[3], a[4] + tl.where(m_0, b_rec_a, 0.0), a[5])
    return a, b


@triton.jit
def _echo(a, b, p_echo, p_out, j, n_echoes, n_b, o_b, m_b, m_0, TWO_POOL: tl.constexpr, MT: tl.constexpr):
    """Store readout j = e^{−iψ_j}·i·F+₀ (BM: summed over pools) as (re, im) rows of p_out."""
    b_re = _order0(a[0], m_0)
    b_im = _order0(a[1], m_0)
    if TWO_POOL:
        if not MT:
            b_re += _order0(b[0], m_0)
            b_im += _order0(b[1], m_0)
    c = tl.load(p_echo + j)
    sn = tl.load(p_echo + n_echoes + j)
    b_re, b_im = b_re * c + b_im * sn, b_im * c - b_re * sn
    tl.store(p_out + j * n_b + o_b, -b_im, mask=m_b)
    tl.store(p_out + (n_echoes + j) * n_b + o_b, b_re, mask=m_b)


@triton.jit
def _fwd(
    p_code,
    p_pulse,
    p_echo,
    p_inv,
    p_rot,
    p_xt_re,
    p_xt_im,
    p_xl,
    p_rec,
    p_start,
    p_b1,
    p_wt,
    p_out,
    p_final,
    n_spins,
    n_events,
    n_pulses,
    n_echoes,
    n_inv,
    n_rot,
    n_states,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_SPINS: tl.constexpr,
):
    """Run the event table on BLOCK_SPINS spins; write the readouts and the final order-0 state.

    p_code: int32 [3, n_events] (opcode, table index, shift); p_pulse: [_PULSE_ROWS,
    n_pulses]; p_echo: [2, n_echoes] demodulation cos ψ, sin ψ; p_inv: [2, n_inv]
    efficiency, ∫B1² dt; p_rot: [2, n_rot] cos θ, sin θ; p_xt_re, p_xt_im, p_xl:
    [n_intervals, P, P, B] propagators; p_rec: [n_intervals, P, B] recovery; p_start,
    p_final: [P, 6, B] order-0 states; p_b1, p_wt: [B] B1 scale and MT W·T per µT²·ms;
    p_out: [2, n_echoes, B] (re, im).
    """
    i_b = tl.program_id(0).to(tl.int64)
    o_b = i_b * BLOCK_SPINS + tl.arange(0, BLOCK_SPINS)
    m_b = o_b < n_spins
    o_k = tl.arange(0, K_PAD)
    m_0 = (o_k == 0)[None, :]
    n_b = tl.cast(n_spins, tl.int64)  # also when Triton specialises n_spins == 1 as a constant

    b_b1 = tl.load(p_b1 + o_b, mask=m_b, other=0.0)
    b_pa = _load_order0(p_start, 0, n_b, o_b, m_b, m_0)
    # a single pool carries pool b as an unused placeholder (the compiler drops it)
    b_pb = b_pa
    b_wt = b_b1
    if TWO_POOL:
        b_pb = _load_order0(p_start, 1, n_b, o_b, m_b, m_0)
        if MT:
            b_wt = tl.load(p_wt + o_b, mask=m_b, other=0.0)

    for i in range(0, n_events):
        op = tl.load(p_code + i)
        j = tl.load(p_code + n_events + i)
        if op == 0:  # rf
            b_pa, b_pb = _pulse(b_pa, b_pb, p_pulse, j, n_pulses, b_b1, b_wt, TWO_POOL, MT)
        elif op == 1:  # relax
            shift = tl.load(p_code + 2 * n_events + i)
            b_pa, b_pb = _relax(
                b_pa,
                b_pb,
                p_xt_re,
                p_xt_im,
                p_xl,
                p_rec,
                j,
                shift,
                n_b,
                o_b,
                m_b,
                o_k,
                n_states,
                K_PAD,
                TWO_POOL,
                MT,
            )
        elif op == 2:  # echo
            _echo(b_pa, b_pb, p_echo, p_out, j, n_echoes, n_b, o_b, m_b, m_0, TWO_POOL, MT)
        elif op == 3:  # spoil
            b_pa = _spoil(b_pa, m_0)
            if TWO_POOL:
                b_pb = _spoil(b_pb, m_0)
        elif op == 4:  # invert
            eff = tl.load(p_inv + j)
            b_pa = _scale(_spoil(b_pa, m_0), -eff)
            if TWO_POOL:
                if MT:
                    b_sat = tl.exp(-tl.load(p_inv + n_inv + j) * b_wt)[:, None]
                    b_pb = _scale(_spoil(b_pb, m_0), b_sat)
                else:
                    b_pb = _scale(_spoil(b_pb, m_0), -eff)
        else:  # rotate
            c = tl.load(p_rot + j)
            sn = tl.load(p_rot + n_rot + j)
            b_pa = _rotate(b_pa, c, sn)
            if TWO_POOL:
                b_pb = _rotate(b_pb, c, sn)

    _store_order0(p_final, b_pa, 0, n_b, o_b, m_b, m_0)
    if TWO_POOL:
        _store_order0(p_final, b_pb, 1, n_b, o_b, m_b, m_0)


@dataclass(frozen=True)
class Tables:
    """A run's event table and its per-event and per-spin tables (see :func:`_fwd`).

    Attributes:
        code: int32 ``[3, n_events]``: opcode, index into the event's table, shift.
        pulses: ``[_PULSE_ROWS, n_pulses]``.
        echoes: ``[2, n_echoes]`` cos ψ, sin ψ of each readout's demodulation.
        inversions: ``[2, n_inv]`` efficiency, ∫B1² dt (µT²·ms).
        rotations: ``[2, n_rot]`` cos θ, sin θ.
        xt_re, xt_im, xl: ``[n_intervals, P, P, B]`` propagators of each distinct interval.
        recovery: ``[n_intervals, P, B]``.
        n_states: orders K kept for the whole run.
    """

    code: torch.Tensor
    pulses: torch.Tensor
    echoes: torch.Tensor
    inversions: torch.Tensor
    rotations: torch.Tensor
    xt_re: torch.Tensor
    xt_im: torch.Tensor
    xl: torch.Tensor
    recovery: torch.Tensor
    n_states: int


def _launch_fwd(
    t: Tables,
    start: torch.Tensor,
    b1: torch.Tensor,
    wt: torch.Tensor,
    out: torch.Tensor,
    final: torch.Tensor,
    *,
    kind: str,
    block_spins: int | None,
) -> None:
    """Check shapes, dtypes and devices, pick the grid and launch :func:`_fwd`."""
    n_pools = 1 if kind == "single" else 2
    n_spins = b1.shape[0]
    n_events = t.code.shape[1]
    n_int = t.xl.shape[0]
    shapes = {
        "pulses": (t.pulses, (_PULSE_ROWS, t.pulses.shape[1])),
        "echoes": (t.echoes, (2, t.echoes.shape[1])),
        "inversions": (t.inversions, (2, t.inversions.shape[1])),
        "rotations": (t.rotations, (2, t.rotations.shape[1])),
        "xt_re": (t.xt_re, (n_int, n_pools, n_pools, n_spins)),
        "xt_im": (t.xt_im, (n_int, n_pools, n_pools, n_spins)),
        "xl": (t.xl, (n_int, n_pools, n_pools, n_spins)),
        "recovery": (t.recovery, (n_int, n_pools, n_spins)),
        "start": (start, (n_pools, 6, n_spins)),
        "b1": (b1, (n_spins,)),
        "wt": (wt, (n_spins,)),
        "out": (out, (2, t.echoes.shape[1], n_spins)),
        "final": (final, (n_pools, 6, n_spins)),
    }
    if b1.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"epg_program: dtype must be torch.float32 or torch.float64; got {b1.dtype}.")
    for name, (x, shape) in shapes.items():
        if tuple(x.shape) != shape:
            raise ValueError(f"epg_program: {name} must have shape {shape}; got {tuple(x.shape)}.")
        if x.dtype != b1.dtype or x.device != b1.device or not x.is_contiguous():
            raise ValueError(
                f"epg_program: {name} must be a contiguous {b1.dtype} tensor on {b1.device}; "
                f"got {x.dtype} on {x.device} (contiguous: {x.is_contiguous()})."
            )
    if t.code.dtype != torch.int32 or t.code.device != b1.device or t.code.ndim != 2 or t.code.shape[0] != 3:
        raise ValueError(
            f"epg_program: code must be an int32 [3, n_events] tensor on {b1.device}; "
            f"got {t.code.dtype} {tuple(t.code.shape)} on {t.code.device}."
        )
    if t.n_states < 1:
        raise ValueError(f"epg_program: n_states must be >= 1; got {t.n_states}.")
    k_pad, bs, num_warps = launch_config(kind, b1.dtype, t.n_states, n_spins)
    if block_spins is not None:
        if block_spins < 1 or block_spins & (block_spins - 1):
            raise ValueError(f"epg_program: block_spins must be a power of two; got {block_spins}.")
        bs = block_spins
    grid = (triton.cdiv(n_spins, bs),)
    _fwd[grid](
        t.code,
        t.pulses,
        t.echoes,
        t.inversions,
        t.rotations,
        t.xt_re,
        t.xt_im,
        t.xl,
        t.recovery,
        start,
        b1,
        wt,
        out,
        final,
        n_spins,
        n_events,
        t.pulses.shape[1],
        t.echoes.shape[1],
        t.inversions.shape[1],
        t.rotations.shape[1],
        t.n_states,
        TWO_POOL=n_pools == 2,
        MT=kind == "mt",
        K_PAD=k_pad,
        BLOCK_SPINS=bs,
        num_warps=num_warps,
    )


def epg_program(
    t: Tables,
    start: torch.Tensor,
    b1: torch.Tensor,
    *,
    kind: str,
    mt_lineshape_us: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    final: torch.Tensor | None = None,
    block_spins: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Readouts and final order-0 state of B spins through an event table, in one launch.

    Args:
        t: the run's tables (:func:`tables`).
        start: ``[P, 6, B]`` order-0 state of each spin before the first event.
        b1: ``[B]`` transmit scale per spin (multiplies every flip angle and, squared,
            the MT saturation energy).
        kind: ``"single"``, ``"bm"`` or ``"mt"`` (P = 1, 2, 2).
        mt_lineshape_us: ``[B]`` bound-pool lineshape G, µs (MT only).
        out: optional ``[2, n_echoes, B]`` buffer for (re, im) of the readouts.
        final: optional ``[P, 6, B]`` buffer for the final order-0 state.
        block_spins: spins per program (a power of two); None picks one.

    Returns:
        (complex ``[B, n_echoes]``, final order-0 state ``[P, 6, B]``).

    Raises:
        ValueError: an input requires grad (the kernel is forward only), bad shapes,
            dtypes or kind.
    """
    if kind not in KINDS:
        raise ValueError(f"epg_program: kind must be one of {KINDS}; got {kind!r}.")
    if (kind == "mt") != (mt_lineshape_us is not None):
        raise ValueError("epg_program: mt_lineshape_us is needed for, and only for, MT.")
    inputs = [t.pulses, t.xt_re, t.xt_im, t.xl, t.recovery, start, b1, mt_lineshape_us]
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        raise ValueError(
            "backend='triton' runs block sequences forward only (the kernel has no derivative "
            "rules) and an input requires grad; use backend='torch' for gradients."
        )
    dtype, device = b1.dtype, b1.device
    n_pools = 1 if kind == "single" else 2
    n_spins = b1.shape[0]
    if mt_lineshape_us is not None:
        # W·T per µT²·ms of ∫B1² dt: π γ² b1² G (G in ms), as ops.mt_saturation
        wt = math.pi * ops.GAMMA_RAD_PER_MS_PER_UT**2 * 1e-3 * (b1 * b1) * mt_lineshape_us
    else:
        wt = b1
    if out is None:
        out = torch.empty(2, t.echoes.shape[1], n_spins, dtype=dtype, device=device)
    if final is None:
        final = torch.empty(n_pools, 6, n_spins, dtype=dtype, device=device)
    if n_spins > 0:
        _launch_fwd(
            t,
            start.contiguous(),
            b1.contiguous(),
            wt.to(dtype).contiguous(),
            out,
            final,
            kind=kind,
            block_spins=block_spins,
        )
    return torch.complex(out[0], out[1]).T, final


def _table(rows: list[list[float]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rows of equal length as a table (one zero column when empty: no null pointers)."""
    data = rows if rows[0] else [[0.0] for _ in rows]
    return torch.tensor(data, dtype=torch.float64, device=device).to(dtype)


def tables(
    program: _Program,
    p: dict[str, torch.Tensor],
    events: list[tuple[Any, ...]],
    prune: bool,
    offsets: tuple[int, int],
) -> Tables:
    """The kernel's tables for ``events`` of ``program`` on one chunk of spins.

    Pulse and readout indices continue from ``offsets`` and wrap around the sequence
    (rotated steady-state runs), as in :meth:`epgx.blocks._Program.run`.
    """
    dtype, device = program.dtype, program.device
    n_rf = program.flip_rad.shape[0]
    n_demod = program.demod[0].shape[0]
    i_rf, i_echo = offsets
    code: list[list[int]] = [[], [], []]
    demod: list[int] = []
    inversions: list[list[float]] = [[], []]
    rotations: list[list[float]] = [[], []]
    intervals: dict[float, int] = {}
    for e in events:
        kind = e[0]
        index, shift = 0, 0
        if kind == "rf":
            index = i_rf % n_rf
            i_rf += 1
        elif kind == "relax":
            index = intervals.setdefault(float(e[1]), len(intervals))
            shift = int(e[2])
            if shift not in (0, 1):
                raise ValueError(f"epg_program: a relaxation shifts by 0 or 1 orders; got {shift}.")
        elif kind == "echo":
            index = len(demod)
            demod.append(i_echo % n_demod)
            i_echo += 1
        elif kind == "invert":
            index = len(inversions[0])
            inversions[0].append(float(e[1]))
            inversions[1].append(float(e[2]))
        elif kind == "rotate":
            index = len(rotations[0])
            theta = float(e[1]) * math.pi / 180
            rotations[0].append(math.cos(theta))
            rotations[1].append(math.sin(theta))
        elif kind != "spoil":
            raise ValueError(f"epg_program: unknown event {kind!r}.")
        code[0].append(_OPCODES[kind])
        code[1].append(index)
        code[2].append(shift)
    if n_rf:
        phase = program.phase_rad
        pulses = torch.stack(
            [
                program.flip_rad,
                torch.cos(phase),
                torch.sin(phase),
                torch.cos(2 * phase),
                torch.sin(2 * phase),
                program.energy,
            ]
        )
    else:
        pulses = torch.zeros(_PULSE_ROWS, 1, dtype=dtype, device=device)
    d = torch.tensor(demod, dtype=torch.long, device=device)
    echoes = (
        torch.stack([program.demod[0][d], program.demod[1][d]]) if demod else _table([[], []], dtype, device)
    )

    b = p["t1_ms"].shape[0]
    n_pools = program.n_pools
    n_int = max(len(intervals), 1)
    dts = list(intervals) or [0.0]
    # one vectorised call: every (interval, spin) pair as one entry of the spin axis
    kw: dict[str, Any] = {
        k: v.repeat(n_int) if isinstance(v, torch.Tensor) else v
        for k, v in _relax_kwargs(program.kind, p).items()
    }
    dt = torch.tensor(dts, dtype=torch.float64, device=device).to(dtype).repeat_interleave(b)
    op = ops.relaxation(dt, **kw)

    def per_interval(x: torch.Tensor) -> torch.Tensor:  # [..., n_int·B] -> [n_int, ..., B]
        return x.reshape(*x.shape[:-1], n_int, b).movedim(-2, 0).contiguous()

    xt_im = torch.zeros_like(op.xt_re) if op.xt_im is None else op.xt_im
    return Tables(
        code=torch.tensor(code, dtype=torch.int32, device=device),
        pulses=pulses.to(dtype).contiguous(),
        echoes=echoes.contiguous(),
        inversions=_table(inversions, dtype, device),
        rotations=_table(rotations, dtype, device),
        xt_re=per_interval(op.xt_re),
        xt_im=per_interval(xt_im),
        xl=per_interval(op.xl),
        recovery=per_interval(op.recovery.reshape(n_pools, -1)),
        n_states=max(program.sizes(events, prune), default=1),
    )


def run_program(
    program: _Program,
    p: dict[str, torch.Tensor],
    start: torch.Tensor | None,
    events: list[tuple[Any, ...]] | None = None,
    prune: bool = True,
    offsets: tuple[int, int] = (0, 0),
    *,
    out: torch.Tensor | None = None,
    final: torch.Tensor | None = None,
    block_spins: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`epgx.blocks._Program.run` through the fused kernel.

    Args:
        program: the lowered sequence.
        p: flat tissue fields of the chunk, ``[B]`` each.
        start: ``[P, 6, K, B]`` start state with nothing above order 0, or None for
            equilibrium.
        events, prune, offsets: as :meth:`~epgx.blocks._Program.run`.
        out, final, block_spins: as :func:`epg_program`.

    Returns:
        (complex readouts ``[B, n_readouts]``, final order-0 state ``[P, 6, 1, B]``).
    """
    events = program.events if events is None else events
    b1 = p["b1"]
    if start is None:
        m0 = torch.stack([1 - p["f"], p["f"]]) if program.kind != "single" else torch.ones_like(b1)[None]
        start0 = torch.zeros(program.n_pools, 6, b1.shape[0], dtype=b1.dtype, device=b1.device)
        start0[:, ops.Z_RE] = m0
    else:
        if start.shape[2] > 1 and bool((start[:, :, 1:] != 0).any()):
            raise ValueError("epg_program: the start state must have nothing above order 0.")
        start0 = start[:, :, 0]
    t = tables(program, p, events, prune, offsets)
    echoes, last = epg_program(
        t,
        start0,
        b1,
        kind=program.kind,
        mt_lineshape_us=p.get("mt_lineshape_us") if program.kind == "mt" else None,
        out=out,
        final=final,
        block_spins=block_spins,
    )
    return echoes, last.unsqueeze(2)


def spins_per_launch(program: _Program, n_spins: int, probes: int = 1) -> int:
    """Spins one launch takes: all of them, unless the propagator tables of the sequence's
    distinct intervals (times ``probes`` steady-state probe runs) exceed
    :data:`TABLE_BUDGET_BYTES`."""
    n_int = max(1, len({float(e[1]) for e in program.events if e[0] == "relax"}))
    per_spin = n_int * (3 * program.n_pools**2 + program.n_pools) * program.dtype.itemsize * probes
    return max(1, min(n_spins, TABLE_BUDGET_BYTES // per_spin))
