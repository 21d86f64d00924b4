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

Derivatives (forward mode, exact), as :mod:`epgx.kernels.epg_train` does for plain
trains: every event is affine in the state, x' = A x + c, so a tangent direction follows
dx' = A dx + dA x + dc. The tangent kernel ``_tan`` interprets the same event table with
NT ≤ ``NT_MAX`` tangent copies of the state beside it (``[BLOCK_SPINS, NT, K_PAD]``
blocks) and writes the tangents of the readouts and of the final order-0 state. Its
inputs are the tangents of the kernel's own inputs: the propagators and recovery of
every distinct interval, the start state, B1 and MT W·T per spin, and flip, phase and
∫B1² per pulse; torch's forward mode computes those on the host from the tissue and
sequence tangents, so the steady-state solve of :meth:`epgx.blocks._Program.steady`
(probe runs through this kernel and a small host solve) is differentiated by torch around
it. dA is analytic in the kernel: Weigel's matrix w.r.t. flip and phase, the MT
saturation w.r.t. W·T and ∫B1² (epg_train's ``_pulse_tan``), Ξ by its tangent, the MT
inversion's saturation w.r.t. W·T. Demodulation phases, inversion efficiencies and
frame rotations are constants of the sequence.

The launches are ``torch.library.custom_op`` s (``epgx::epg_program``, its tangent
``epgx::epg_program_tangent`` and the contraction ``epgx::epg_program_vjp``) with fake
kernels and vmap rules, behind :class:`_ProgramFn`, an autograd Function with ``jvp`` and
``backward``: ``.backward()``, ``torch.func`` jvp/jacfwd/jacrev/vmap and
:func:`epgx.jacobian` work through every block model on ``backend="triton"``.

Cost. A jvp or :func:`epgx.jacobian` over p ≤ NT_MAX tissue fields is one tangent
launch (NT = p). The backward is the forward-mode contraction Jᵀg of epg_train: one
one-hot direction per entry of a per-spin input that needs a gradient (per distinct
interval: 3 propagators of P² entries and P recoveries, so 4 (single), 14 (BM) or 7 (MT)
per interval, plus the 6P start-state planes, B1 and W·T) and one per pulse of a per-pulse
input (flip angles: n_pulses directions), NT_MAX directions per launch. So gradients by
``.backward()`` cost O(n_intervals + n_pulses) forward passes: cheap for prepared and
steady-state models (a few distinct intervals), but for MRF trains with a different TR
per pulse both counts grow with the train; there, derivatives w.r.t. tissue are far
cheaper by :func:`epgx.jacobian` (one pass), and an adjoint (reverse-time) kernel would
make the backward O(1) passes; it is not implemented. Second-order derivatives raise.

Diffusion and flow are not block events.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl
from epgx.kernels.epg_train import (
    _DPULSE_ROWS,
    INTERPRETED,
    NT_MAX,
    _add,
    _block_spins,
    _col4,
    _col8,
    _dense,
    _echo_value,
    _f0,
    _first_order,
    _fold_directions,
    _mid,
    _no_second_order,
    _no_setup,
    _pulse,
    _pulse_tan,
    _relax1,
    _relax2,
    _relax_mt,
    _shift_recover,
    _spin_tangents,
    _vmap_loop,
    launch_config,
)
from torch import Tensor
from torch.library import custom_op

from epgx import ops
from epgx.engine import _relax_kwargs
from epgx.tissue import KINDS

if TYPE_CHECKING:
    from epgx.blocks import _Program

__all__ = ["INTERPRETED", "NT_MAX", "Tables", "epg_program", "run_program", "spins_per_launch", "tables"]

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
def _load_order0_tan(p_dstate, pool, n_bt, o_d, m, m_03, P: tl.constexpr):
    """Pool ``pool`` of [n_tan, P, 6, B?] order-0 tangents as six [BLOCK_SPINS, NT, K_PAD] planes.

    o_d = direction·P·6·n_bt + spin ([BLOCK_SPINS, NT]); m_03: order 0, [1, 1, K_PAD].
    """
    base = p_dstate + pool * 6 * n_bt + o_d
    return (
        tl.where(m_03, tl.load(base, mask=m, other=0.0)[:, :, None], 0.0),
        tl.where(m_03, tl.load(base + n_bt, mask=m, other=0.0)[:, :, None], 0.0),
        tl.where(m_03, tl.load(base + 2 * n_bt, mask=m, other=0.0)[:, :, None], 0.0),
        tl.where(m_03, tl.load(base + 3 * n_bt, mask=m, other=0.0)[:, :, None], 0.0),
        tl.where(m_03, tl.load(base + 4 * n_bt, mask=m, other=0.0)[:, :, None], 0.0),
        tl.where(m_03, tl.load(base + 5 * n_bt, mask=m, other=0.0)[:, :, None], 0.0),
    )


@triton.jit
def _store_order0(p_state, s, pool, n_b, o_b, m_b, m_0):
    """Order 0 of one pool's planes into a [P, 6, B] state."""
    base = p_state + pool * 6 * n_b + o_b
    for c in tl.static_range(6):
        tl.store(base + c * n_b, _order0(s[c], m_0), mask=m_b)


@triton.jit
def _final_tan(p_dfinal, p_gfinal, ds, b_acc, pool, n_b, o_b2, m_b2, o_d, m, o_k3, CONTRACT: tl.constexpr):
    """Order 0 of one pool's tangent planes: stored into [n_tan, P, 6, B] (o_d = direction·P·6·B
    + spin), or (CONTRACT) dotted with the cotangent p_gfinal [P, 6, B] into b_acc."""
    for c in tl.static_range(6):
        b_d = _f0(ds[c], o_k3, 2)  # [BLOCK_SPINS, NT]
        if CONTRACT:
            b_acc += tl.load(p_gfinal + (pool * 6 + c) * n_b + o_b2, mask=m_b2, other=0.0) * b_d
        else:
            tl.store(p_dfinal + o_d + (pool * 6 + c) * n_b, b_d, mask=m)
    return b_acc


@triton.jit
def _load_interval(p_xt_re, p_xt_im, p_xl, p_rec, o_x, o_r, step, m, TWO_POOL: tl.constexpr):
    """One interval's propagators and recovery: (xt, xl, rec_a, rec_b) at offsets o_x (entry 0 of
    the [P, P] propagators) and o_r (entry 0 of the [P] recovery), entries ``step`` apart.

    A single pool fills pool b and the off-diagonal entries with unused placeholders (the
    compiler drops them).
    """
    b_x0 = tl.load(p_xt_re + o_x, mask=m, other=0.0)
    b_x1 = tl.load(p_xt_im + o_x, mask=m, other=0.0)
    b_l0 = tl.load(p_xl + o_x, mask=m, other=0.0)
    b_rec_a = tl.load(p_rec + o_r, mask=m, other=0.0)
    b_xt = (b_x0, b_x1, b_x0, b_x1, b_x0, b_x1, b_x0, b_x1)
    b_xl = (b_l0, b_l0, b_l0, b_l0)
    b_rec_b = b_rec_a
    if TWO_POOL:
        b_xl = (
            b_l0,
            tl.load(p_xl + o_x + step, mask=m, other=0.0),
            tl.load(p_xl + o_x + 2 * step, mask=m, other=0.0),
            tl.load(p_xl + o_x + 3 * step, mask=m, other=0.0),
        )
        b_xt = (
            b_x0,
            b_x1,
            tl.load(p_xt_re + o_x + step, mask=m, other=0.0),
            tl.load(p_xt_im + o_x + step, mask=m, other=0.0),
            tl.load(p_xt_re + o_x + 2 * step, mask=m, other=0.0),
            tl.load(p_xt_im + o_x + 2 * step, mask=m, other=0.0),
            tl.load(p_xt_re + o_x + 3 * step, mask=m, other=0.0),
            tl.load(p_xt_im + o_x + 3 * step, mask=m, other=0.0),
        )
        b_rec_b = tl.load(p_rec + o_r + step, mask=m, other=0.0)
    return b_xt, b_xl, b_rec_a, b_rec_b


@triton.jit
def _relax_pools(a, b, xt, xl, TWO_POOL: tl.constexpr, MT: tl.constexpr):
    """Relaxation/exchange Ξ of both pools (no shift, no recovery); linear in the state and in Ξ."""
    if TWO_POOL:
        if MT:
            a, b = _relax_mt(a, b, xt[0], xt[1], xl)
        else:
            a, b = _relax2(a, b, xt, xl)
    else:
        a = _relax1(a, xt[0], xt[1], xl[0])
    return a, b


@triton.jit
def _recover(s, rec, shift, o_k, n_states, K_PAD: tl.constexpr, AXIS: tl.constexpr):
    """Shift one pool by ``shift`` ∈ {0, 1} orders (EPG-X truncation at n_states), then add rec to Re Z₀."""
    if shift != 0:
        s = _shift_recover(s, rec, o_k, n_states, K_PAD, AXIS)
    else:
        s = (s[0], s[1], s[2], s[3], s[4] + tl.where(o_k == 0, rec, 0.0), s[5])
    return s


@triton.jit
def _recover_pools(
    a,
    b,
    rec_a,
    rec_b,
    shift,
    o_k,
    n_states,
    K_PAD: tl.constexpr,
    AXIS: tl.constexpr,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
):
    """Shift both pools by ``shift`` orders, then add the recovery on Z₀; the MT bound pool
    has no transverse states to shift: recovery only."""
    if TWO_POOL:
        if MT:
            b = (b[0], b[1], b[2], b[3], b[4] + tl.where(o_k == 0, rec_b, 0.0), b[5])
        else:
            b = _recover(b, rec_b, shift, o_k, n_states, K_PAD, AXIS)
    a = _recover(a, rec_a, shift, o_k, n_states, K_PAD, AXIS)
    return a, b


@triton.jit
def _interval(
    a,
    b,
    sp,
    shift,
    o_k,
    n_states,
    K_PAD: tl.constexpr,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
):
    """One interval on [BLOCK_SPINS, K_PAD] planes, sp = (xt, xl, rec_a, rec_b) per spin
    [BLOCK_SPINS, 1]: relaxation/exchange, a shift by ``shift`` orders, recovery on Z₀
    (EPG-X's order)."""
    b_xt, b_xl, b_rec_a, b_rec_b = sp
    a, b = _relax_pools(a, b, b_xt, b_xl, TWO_POOL, MT)
    return _recover_pools(a, b, b_rec_a, b_rec_b, shift, o_k, n_states, K_PAD, 1, TWO_POOL, MT)


@triton.jit
def _interval_tan(
    x, sp, dsp, shift, o_k2, o_k3, n_states, K_PAD: tl.constexpr, TWO_POOL: tl.constexpr, MT: tl.constexpr
):
    """One interval on x = (a, b, da, db): dx' = S(Ξ dx + dΞ x) + d(rec) on Z₀.

    sp = (xt, xl, rec_a, rec_b) per spin [BLOCK_SPINS, 1], dsp their tangents
    [BLOCK_SPINS, NT]; orders o_k2 [1, K_PAD] for the state, o_k3 [1, 1, K_PAD] for tangents.
    """
    a, b, da, db = x
    b_xt, b_xl, b_rec_a, b_rec_b = sp
    b_dxt, b_dxl, b_drec_a, b_drec_b = dsp
    ta, tb = _relax_pools(da, db, _col8(b_xt), _col4(b_xl), TWO_POOL, MT)
    sa, sb = _relax_pools(_mid(a), _mid(b), _col8(b_dxt), _col4(b_dxl), TWO_POOL, MT)
    if MT:
        # the bound pool's transverse planes pass through Ξ unchanged: no dΞ·x there
        sb = (
            tl.zeros_like(tb[0]),
            tl.zeros_like(tb[1]),
            tl.zeros_like(tb[2]),
            tl.zeros_like(tb[3]),
            sb[4],
            sb[5],
        )
    da, db = _recover_pools(
        _add(ta, sa),
        _add(tb, sb),
        b_drec_a[:, :, None],
        b_drec_b[:, :, None],
        shift,
        o_k3,
        n_states,
        K_PAD,
        2,
        TWO_POOL,
        MT,
    )
    a, b = _interval(a, b, sp, shift, o_k2, n_states, K_PAD, TWO_POOL, MT)
    return a, b, da, db


@triton.jit
def _echo(a, b, p_echo, p_out, j, n_echoes, n_b, o_b, m_b, o_k, TWO_POOL: tl.constexpr, MT: tl.constexpr):
    """Store readout j = e^{−iψ_j}·i·F+₀ (BM: summed over pools) as (re, im) rows of p_out.

    Planes [BLOCK_SPINS, K_PAD], o_k [1, K_PAD]; spins o_b, m_b [BLOCK_SPINS].
    """
    b_re, b_im = _echo_value(a, b, p_echo, j, n_echoes, o_k, 1, TWO_POOL, MT, False)
    c = tl.load(p_echo + j)
    sn = tl.load(p_echo + n_echoes + j)
    b_re, b_im = b_re * c + b_im * sn, b_im * c - b_re * sn
    tl.store(p_out + j * n_b + o_b, -b_im, mask=m_b)
    tl.store(p_out + (n_echoes + j) * n_b + o_b, b_re, mask=m_b)


@triton.jit
def _echo_tan(
    da,
    db,
    b_acc,
    p_echo,
    p_g,
    p_dout,
    j,
    n_echoes,
    n_b,
    o_io,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
    CONTRACT: tl.constexpr,
):
    """Tangents of readout j (the demodulation ψ_j is a constant): stored into
    p_dout [n_tan, 2, n_echoes, B], or (CONTRACT) dotted with the cotangent g = p_g
    [2, n_echoes, B] into b_acc [BLOCK_SPINS, NT].

    o_io = (o_b2, m_b2, o_t, m, o_k3): spins [BLOCK_SPINS, 1], directions [1, NT], their
    joint mask, orders [1, 1, K_PAD].
    """
    o_b2, m_b2, o_t, m, o_k3 = o_io
    b_dre, b_dim = _echo_value(da, db, p_echo, j, n_echoes, o_k3, 2, TWO_POOL, MT, False)
    c = tl.load(p_echo + j)
    sn = tl.load(p_echo + n_echoes + j)
    b_dre, b_dim = b_dre * c + b_dim * sn, b_dim * c - b_dre * sn
    # the readout is i·F = (−Im F, Re F)
    if CONTRACT:
        g_re = tl.load(p_g + j * n_b + o_b2, mask=m_b2, other=0.0)
        g_im = tl.load(p_g + (n_echoes + j) * n_b + o_b2, mask=m_b2, other=0.0)
        b_acc += g_im * b_dre - g_re * b_dim
    else:
        o_d = (o_t * (2 * n_echoes) + j) * n_b + o_b2
        tl.store(p_dout + o_d, -b_dim, mask=m)
        tl.store(p_dout + o_d + n_echoes * n_b, b_dre, mask=m)
    return b_acc


@triton.jit
def _invert(s, eff, m_0):
    """Adiabatic inversion of a free pool after a crusher: Z₀ ← −eff·Z₀, the rest zero."""
    return _scale(_spoil(s, m_0), -eff)


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
    P2: tl.constexpr = 4 if TWO_POOL else 1
    P: tl.constexpr = 2 if TWO_POOL else 1
    i_b = tl.program_id(0).to(tl.int64)
    o_b = i_b * BLOCK_SPINS + tl.arange(0, BLOCK_SPINS)
    m_b = o_b < n_spins
    o_b2 = o_b[:, None]
    m_b2 = m_b[:, None]
    o_k = tl.arange(0, K_PAD)[None, :]
    m_0 = o_k == 0
    n_b = tl.cast(n_spins, tl.int64)  # also when Triton specialises n_spins == 1 as a constant

    b_b1 = tl.load(p_b1 + o_b2, mask=m_b2, other=0.0)
    b_pa = _load_order0(p_start, 0, n_b, o_b, m_b, m_0)
    # a single pool carries pool b as an unused placeholder (the compiler drops it)
    b_pb = b_pa
    b_wt = b_b1
    if TWO_POOL:
        b_pb = _load_order0(p_start, 1, n_b, o_b, m_b, m_0)
        if MT:
            b_wt = tl.load(p_wt + o_b2, mask=m_b2, other=0.0)

    for i in range(0, n_events):
        op = tl.load(p_code + i)
        j = tl.load(p_code + n_events + i)
        if op == 0:  # rf
            b_pa, b_pb = _pulse(b_pa, b_pb, p_pulse, j, n_pulses, b_b1, b_wt, TWO_POOL, MT)
        elif op == 1:  # relax
            shift = tl.load(p_code + 2 * n_events + i)
            o_x = j.to(tl.int64) * P2 * n_b + o_b2  # [n_intervals, P, P, B] tables
            o_r = j.to(tl.int64) * P * n_b + o_b2  # [n_intervals, P, B] recovery
            sp = _load_interval(p_xt_re, p_xt_im, p_xl, p_rec, o_x, o_r, n_b, m_b2, TWO_POOL)
            b_pa, b_pb = _interval(b_pa, b_pb, sp, shift, o_k, n_states, K_PAD, TWO_POOL, MT)
        elif op == 2:  # echo
            _echo(b_pa, b_pb, p_echo, p_out, j, n_echoes, n_b, o_b, m_b, o_k, TWO_POOL, MT)
        elif op == 3:  # spoil
            b_pa = _spoil(b_pa, m_0)
            if TWO_POOL:
                b_pb = _spoil(b_pb, m_0)
        elif op == 4:  # invert
            eff = tl.load(p_inv + j)
            b_pa = _invert(b_pa, eff, m_0)
            if TWO_POOL:
                if MT:
                    b_sat = tl.exp(-tl.load(p_inv + n_inv + j) * b_wt)
                    b_pb = _scale(_spoil(b_pb, m_0), b_sat)
                else:
                    b_pb = _invert(b_pb, eff, m_0)
        else:  # rotate
            c = tl.load(p_rot + j)
            sn = tl.load(p_rot + n_rot + j)
            b_pa = _rotate(b_pa, c, sn)
            if TWO_POOL:
                b_pb = _rotate(b_pb, c, sn)

    _store_order0(p_final, b_pa, 0, n_b, o_b, m_b, m_0)
    if TWO_POOL:
        _store_order0(p_final, b_pb, 1, n_b, o_b, m_b, m_0)


@triton.jit
def _tan(
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
    p_dxt_re,
    p_dxt_im,
    p_dxl,
    p_drec,
    p_dstart,
    p_db1,
    p_dwt,
    p_dpulse,
    p_g,
    p_gfinal,
    p_out,
    p_final,
    p_dout,
    p_dfinal,
    n_spins,
    n_events,
    n_pulses,
    n_echoes,
    n_inv,
    n_rot,
    n_int,
    n_states,
    n_tan,
    n_tan_spins,
    TWO_POOL: tl.constexpr,
    MT: tl.constexpr,
    CONTRACT: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_SPINS: tl.constexpr,
    NT: tl.constexpr,
):
    """The event table of :func:`_fwd` with n_tan ≤ NT tangent directions carried beside the state.

    Primal inputs as :func:`_fwd`; their tangents have a leading direction axis:
    p_dxt_re, p_dxt_im, p_dxl [n_tan, n_int, P, P, B], p_drec [n_tan, n_int, P, B],
    p_dstart [n_tan, P, 6, B], p_db1, p_dwt [n_tan, B], p_dpulse [n_tan, _DPULSE_ROWS,
    n_pulses]; with n_tan_spins = 1 instead of B the per-spin tangents hold one value for
    every spin (the backward's one-hot directions). Writes the readouts and final state
    (p_out, p_final as :func:`_fwd`) and their tangents p_dout [n_tan, 2, n_echoes, B],
    p_dfinal [n_tan, P, 6, B]; with CONTRACT, writes p_dout [n_tan, B] = Σ g·d(readouts)
    + Σ g_final·d(final) instead (g = p_g [2, n_echoes, B], g_final = p_gfinal [P, 6, B]:
    one row of Jᵀg per direction), and not the primal outputs.
    """
    P2: tl.constexpr = 4 if TWO_POOL else 1
    P: tl.constexpr = 2 if TWO_POOL else 1
    i_b = tl.program_id(0).to(tl.int64)
    o_b = i_b * BLOCK_SPINS + tl.arange(0, BLOCK_SPINS)
    m_b = o_b < n_spins
    o_b2 = o_b[:, None]
    m_b2 = m_b[:, None]
    o_t = tl.arange(0, NT)[None, :]
    m = m_b2 & (o_t < n_tan)
    n_bt = tl.cast(n_tan_spins, tl.int64)
    o_bt = o_b2 % n_bt  # the spin of a per-spin tangent, or 0 where one value serves all
    o_k2 = tl.arange(0, K_PAD)[None, :]
    o_k3 = tl.arange(0, K_PAD)[None, None, :]
    m_0 = o_k2 == 0
    m_03 = o_k3 == 0
    n_b = tl.cast(n_spins, tl.int64)
    dtype = p_xt_re.dtype.element_ty

    b_b1 = tl.load(p_b1 + o_b2, mask=m_b2, other=0.0)
    b_db1 = tl.load(p_db1 + o_t * n_bt + o_bt, mask=m, other=0.0)
    o_ds = o_t * (P * 6) * n_bt + o_bt  # [n_tan, P, 6, B?] start tangents
    b_pa = _load_order0(p_start, 0, n_b, o_b, m_b, m_0)
    b_da = _load_order0_tan(p_dstart, 0, n_bt, o_ds, m, m_03, P)
    b_pb = b_pa
    b_db = b_da
    b_wt = b_b1
    b_dwt = b_db1
    if TWO_POOL:
        b_pb = _load_order0(p_start, 1, n_b, o_b, m_b, m_0)
        b_db = _load_order0_tan(p_dstart, 1, n_bt, o_ds, m, m_03, P)
        if MT:
            b_wt = tl.load(p_wt + o_b2, mask=m_b2, other=0.0)
            b_dwt = tl.load(p_dwt + o_t * n_bt + o_bt, mask=m, other=0.0)
    x = (b_pa, b_pb, b_da, b_db)
    b_rfs = (b_b1, b_wt, b_db1, b_dwt)
    o_io = (o_b2, m_b2, o_t, m, o_k3)
    b_acc = tl.zeros([BLOCK_SPINS, NT], dtype=dtype)

    for i in range(0, n_events):
        op = tl.load(p_code + i)
        j = tl.load(p_code + n_events + i)
        if op == 0:  # rf
            x = _pulse_tan(x, p_pulse, p_dpulse, j, n_pulses, b_rfs, o_t, o_t < n_tan, TWO_POOL, MT)
        elif op == 1:  # relax
            shift = tl.load(p_code + 2 * n_events + i)
            j64 = j.to(tl.int64)
            sp = _load_interval(
                p_xt_re,
                p_xt_im,
                p_xl,
                p_rec,
                j64 * P2 * n_b + o_b2,
                j64 * P * n_b + o_b2,
                n_b,
                m_b2,
                TWO_POOL,
            )
            o_dt = o_t * n_int + j64  # direction and interval of the tangent tables
            dsp = _load_interval(
                p_dxt_re,
                p_dxt_im,
                p_dxl,
                p_drec,
                o_dt * P2 * n_bt + o_bt,
                o_dt * P * n_bt + o_bt,
                n_bt,
                m,
                TWO_POOL,
            )
            x = _interval_tan(x, sp, dsp, shift, o_k2, o_k3, n_states, K_PAD, TWO_POOL, MT)
        elif op == 2:  # echo
            if not CONTRACT:
                _echo(x[0], x[1], p_echo, p_out, j, n_echoes, n_b, o_b, m_b, o_k2, TWO_POOL, MT)
            b_acc = _echo_tan(
                x[2], x[3], b_acc, p_echo, p_g, p_dout, j, n_echoes, n_b, o_io, TWO_POOL, MT, CONTRACT
            )
        elif op == 3:  # spoil
            a, b, da, db = x
            a = _spoil(a, m_0)
            da = _spoil(da, m_03)
            if TWO_POOL:
                b = _spoil(b, m_0)
                db = _spoil(db, m_03)
            x = (a, b, da, db)
        elif op == 4:  # invert (efficiency and ∫B1² are constants; W·T is not)
            a, b, da, db = x
            eff = tl.load(p_inv + j)
            a = _invert(a, eff, m_0)
            da = _invert(da, eff, m_03)
            if TWO_POOL:
                if MT:
                    energy = tl.load(p_inv + n_inv + j)
                    b_sat = tl.exp(-energy * b_wt)  # [BLOCK_SPINS, 1]
                    b_dsat = (-energy * b_sat * b_dwt)[:, :, None]  # [BLOCK_SPINS, NT, 1]
                    db = _add(
                        _scale(_spoil(db, m_03), b_sat[:, :, None]), _scale(_spoil(_mid(b), m_03), b_dsat)
                    )
                    b = _scale(_spoil(b, m_0), b_sat)
                else:
                    b = _invert(b, eff, m_0)
                    db = _invert(db, eff, m_03)
            x = (a, b, da, db)
        else:  # rotate
            a, b, da, db = x
            c = tl.load(p_rot + j)
            sn = tl.load(p_rot + n_rot + j)
            a = _rotate(a, c, sn)
            da = _rotate(da, c, sn)
            if TWO_POOL:
                b = _rotate(b, c, sn)
                db = _rotate(db, c, sn)
            x = (a, b, da, db)

    a, b, da, db = x
    o_df = o_t * (P * 6) * n_b + o_b2  # [n_tan, P, 6, B] final tangents
    if not CONTRACT:
        _store_order0(p_final, a, 0, n_b, o_b, m_b, m_0)
    b_acc = _final_tan(p_dfinal, p_gfinal, da, b_acc, 0, n_b, o_b2, m_b2, o_df, m, o_k3, CONTRACT)
    if TWO_POOL:
        if not CONTRACT:
            _store_order0(p_final, b, 1, n_b, o_b, m_b, m_0)
        b_acc = _final_tan(p_dfinal, p_gfinal, db, b_acc, 1, n_b, o_b2, m_b2, o_df, m, o_k3, CONTRACT)
    if CONTRACT:
        tl.store(p_dout + o_t * n_b + o_b2, b_acc, mask=m)


@dataclass(frozen=True)
class Tables:
    """A run's event table and its per-event and per-spin tables (see :func:`_fwd`).

    Attributes:
        code: int32 ``[3, n_events]``: opcode, index into the event's table, shift.
        flip, phase, energy: ``[n_pulses]`` flip angle (rad), RF phase (rad) and ∫B1² dt
            (µT²·ms) of each pulse.
        echoes: ``[2, n_echoes]`` cos ψ, sin ψ of each readout's demodulation.
        inversions: ``[2, n_inv]`` efficiency, ∫B1² dt (µT²·ms).
        rotations: ``[2, n_rot]`` cos θ, sin θ.
        xt_re, xt_im, xl: ``[n_intervals, P, P, B]`` propagators of each distinct interval.
        recovery: ``[n_intervals, P, B]``.
        n_states: orders K kept for the whole run.
    """

    code: Tensor
    flip: Tensor
    phase: Tensor
    energy: Tensor
    echoes: Tensor
    inversions: Tensor
    rotations: Tensor
    xt_re: Tensor
    xt_im: Tensor
    xl: Tensor
    recovery: Tensor
    n_states: int


# Differentiable kernel inputs, in the order of the ops' arguments. Per-spin inputs end in
# the spin axis; the sequence's constant tables (code, echoes, inversions, rotations) and
# the configuration (kind, n_states, block_spins) follow them.
_INPUTS = ("xt_re", "xt_im", "xl", "recovery", "start", "b1", "wt", "flip", "phase", "energy")
_N_IN = len(_INPUTS)
_PER_SPIN = range(0, 7)
_PER_PULSE = range(7, 10)


def _pulses(flip: Tensor, phase: Tensor, energy: Tensor) -> Tensor:
    """[_PULSE_ROWS, n_pulses]: flip, cos φ, sin φ, cos 2φ, sin 2φ, ∫B1² dt (one zero column
    for a sequence without pulses: no null pointers)."""
    if flip.shape[0] == 0:
        return flip.new_zeros(_PULSE_ROWS, 1)
    return torch.stack(
        [flip, torch.cos(phase), torch.sin(phase), torch.cos(2 * phase), torch.sin(2 * phase), energy]
    ).contiguous()


def _dpulses(d_flip: Tensor, d_phase: Tensor, d_energy: Tensor) -> Tensor:
    """[n_tan, _DPULSE_ROWS, n_pulses] tangents of flip, phase and ∫B1² (one zero column
    without pulses)."""
    if d_flip.shape[-1] == 0:
        return d_flip.new_zeros(d_flip.shape[0], _DPULSE_ROWS, 1)
    return torch.stack([d_flip, d_phase, d_energy], dim=1).contiguous()


def _spin_shapes(kind: str, n_int: int, n_spins: int) -> dict[str, tuple[int, ...]]:
    p = 1 if kind == "single" else 2
    return {
        "xt_re": (n_int, p, p, n_spins),
        "xt_im": (n_int, p, p, n_spins),
        "xl": (n_int, p, p, n_spins),
        "recovery": (n_int, p, n_spins),
        "start": (p, 6, n_spins),
        "b1": (n_spins,),
        "wt": (n_spins,),
    }


def _check(expected: dict[str, tuple[Tensor, tuple[int, ...]]], like: Tensor, code: Tensor) -> None:
    """Shapes, dtype, device and contiguity of a launch's tensors (``like`` sets the last three)."""
    if like.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"epg_program: dtype must be torch.float32 or torch.float64; got {like.dtype}.")
    for name, (x, shape) in expected.items():
        if tuple(x.shape) != shape:
            raise ValueError(f"epg_program: {name} must have shape {shape}; got {tuple(x.shape)}.")
        if x.dtype != like.dtype or x.device != like.device or not x.is_contiguous():
            raise ValueError(
                f"epg_program: {name} must be a contiguous {like.dtype} tensor on {like.device}; "
                f"got {x.dtype} on {x.device} (contiguous: {x.is_contiguous()})."
            )
    if code.dtype != torch.int32 or code.device != like.device or code.ndim != 2 or code.shape[0] != 3:
        raise ValueError(
            f"epg_program: code must be an int32 [3, n_events] tensor on {like.device}; "
            f"got {code.dtype} {tuple(code.shape)} on {code.device}."
        )


def _launch_config(
    kind: str, dtype: torch.dtype, n_states: int, n_spins: int, n_tan: int, block_spins: int | None
) -> tuple[int, int, int]:
    """``(K_PAD, BLOCK_SPINS, num_warps)``: epg_train's register budget, or the caller's block."""
    if n_states < 1:
        raise ValueError(f"epg_program: n_states must be >= 1; got {n_states}.")
    k_pad, bs, num_warps = launch_config(kind, dtype, n_states, n_spins, n_tan)
    return k_pad, _block_spins(bs, block_spins, "epg_program"), num_warps


def _launch_fwd(
    tabs: Sequence[Tensor],
    primals: Sequence[Tensor],
    out: Tensor,
    final: Tensor,
    *,
    kind: str,
    n_states: int,
    block_spins: int | None,
) -> None:
    """Check shapes, dtypes and devices, pick the grid and launch :func:`_fwd`.

    tabs: (code, pulses, echoes, inversions, rotations); primals: the seven per-spin
    inputs (``_INPUTS[:7]``); out [2, n_echoes, B], final [P, 6, B].
    """
    code, pulses, echoes, inversions, rotations = tabs
    b1 = primals[5]
    n_spins = b1.shape[0]
    n_pools = 1 if kind == "single" else 2
    spin_shapes = _spin_shapes(kind, primals[2].shape[0], n_spins)
    expected = {k: (x, s) for (k, s), x in zip(spin_shapes.items(), primals, strict=True)}
    expected |= {
        "pulses": (pulses, (_PULSE_ROWS, pulses.shape[1])),
        "echoes": (echoes, (2, echoes.shape[1])),
        "inversions": (inversions, (2, inversions.shape[1])),
        "rotations": (rotations, (2, rotations.shape[1])),
        "out": (out, (2, echoes.shape[1], n_spins)),
        "final": (final, (n_pools, 6, n_spins)),
    }
    _check(expected, b1, code)
    k_pad, bs, num_warps = _launch_config(kind, b1.dtype, n_states, n_spins, 0, block_spins)
    if n_spins == 0:
        return
    _fwd[(triton.cdiv(n_spins, bs),)](
        code,
        pulses,
        echoes,
        inversions,
        rotations,
        *primals,
        out,
        final,
        n_spins,
        code.shape[1],
        pulses.shape[1],
        echoes.shape[1],
        inversions.shape[1],
        rotations.shape[1],
        n_states,
        TWO_POOL=n_pools == 2,
        MT=kind == "mt",
        K_PAD=k_pad,
        BLOCK_SPINS=bs,
        num_warps=num_warps,
    )


def _launch_tan(
    tabs: Sequence[Tensor],
    primals: Sequence[Tensor],
    tangents: Sequence[Tensor],
    dpulses: Tensor,
    grads: tuple[Tensor, Tensor] | None,
    outs: Sequence[Tensor],
    *,
    kind: str,
    n_states: int,
    block_spins: int | None,
) -> None:
    """Check shapes and launch :func:`_tan` once per chunk of ≤ NT_MAX directions.

    tabs, primals: as :func:`_launch_fwd`; tangents: the primals' tangents with a leading
    direction axis, either all per spin (last axis B) or all one value for every spin
    (last axis 1); dpulses [n_tan, _DPULSE_ROWS, n_pulses]. Without ``grads``, outs =
    (out, final, dout [n_tan, 2, n_echoes, B], dfinal [n_tan, P, 6, B]); with grads =
    (g [2, n_echoes, B], g_final [P, 6, B]), outs = (dout [n_tan, B],): the contraction.
    """
    code, pulses, echoes, inversions, rotations = tabs
    b1 = primals[5]
    n_spins = b1.shape[0]
    n_pools = 1 if kind == "single" else 2
    n_int = primals[2].shape[0]
    n_echoes = echoes.shape[1]
    n_tan = dpulses.shape[0]
    n_tan_spins = tangents[5].shape[-1]
    expected: dict[str, tuple[Tensor, tuple[int, ...]]] = {}
    for (name, shape), x, dx in zip(
        _spin_shapes(kind, n_int, n_spins).items(), primals, tangents, strict=True
    ):
        expected[name] = (x, shape)
        expected["d" + name] = (dx, (n_tan, *shape[:-1], n_tan_spins))
    expected |= {
        "pulses": (pulses, (_PULSE_ROWS, pulses.shape[1])),
        "dpulses": (dpulses, (n_tan, _DPULSE_ROWS, pulses.shape[1])),
        "echoes": (echoes, (2, n_echoes)),
        "inversions": (inversions, (2, inversions.shape[1])),
        "rotations": (rotations, (2, rotations.shape[1])),
    }
    if grads is not None:
        g, g_final = grads
        (dout,) = outs
        expected |= {
            "g": (g, (2, n_echoes, n_spins)),
            "g_final": (g_final, (n_pools, 6, n_spins)),
            "dout": (dout, (n_tan, n_spins)),
        }
        out, final, dfinal = dout, dout, dout
    else:
        out, final, dout, dfinal = outs
        g, g_final = out, final
        expected |= {
            "out": (out, (2, n_echoes, n_spins)),
            "final": (final, (n_pools, 6, n_spins)),
            "dout": (dout, (n_tan, 2, n_echoes, n_spins)),
            "dfinal": (dfinal, (n_tan, n_pools, 6, n_spins)),
        }
    if n_tan_spins not in (1, n_spins):
        raise ValueError(
            f"epg_program: per-spin tangents must end in 1 or {n_spins} spins; got {n_tan_spins}."
        )
    _check(expected, b1, code)
    if n_spins == 0 or n_tan == 0:
        return
    for start in range(0, n_tan, NT_MAX):
        stop = min(start + NT_MAX, n_tan)
        k_pad, bs, num_warps = _launch_config(kind, b1.dtype, n_states, n_spins, stop - start, block_spins)
        _tan[(triton.cdiv(n_spins, bs),)](
            code,
            pulses,
            echoes,
            inversions,
            rotations,
            *primals,
            *(t[start:stop] for t in tangents),
            dpulses[start:stop],
            g,
            g_final,
            out,
            final,
            dout[start:stop],
            dfinal if grads is not None else dfinal[start:stop],
            n_spins,
            code.shape[1],
            pulses.shape[1],
            n_echoes,
            inversions.shape[1],
            rotations.shape[1],
            n_int,
            n_states,
            stop - start,
            n_tan_spins,
            TWO_POOL=n_pools == 2,
            MT=kind == "mt",
            CONTRACT=grads is not None,
            K_PAD=k_pad,
            BLOCK_SPINS=bs,
            NT=triton.next_power_of_2(stop - start),
            num_warps=num_warps,
        )


def _outputs_like(b1: Tensor, echoes: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Empty readouts [2, n_echoes, B] and final state [P, 6, B]."""
    n_pools = 1 if kind == "single" else 2
    return b1.new_empty(2, echoes.shape[1], b1.shape[0]), b1.new_empty(n_pools, 6, b1.shape[0])


@custom_op("epgx::epg_program", mutates_args=())
def _program_op(
    xt_re: Tensor,
    xt_im: Tensor,
    xl: Tensor,
    recovery: Tensor,
    start: Tensor,
    b1: Tensor,
    wt: Tensor,
    flip: Tensor,
    phase: Tensor,
    energy: Tensor,
    code: Tensor,
    echoes: Tensor,
    inversions: Tensor,
    rotations: Tensor,
    kind: str,
    n_states: int,
    block_spins: int | None,
) -> tuple[Tensor, Tensor]:
    """Readouts ``[2, n_echoes, B]`` (re, im) and final order-0 state ``[P, 6, B]``."""
    out, final = _outputs_like(b1, echoes, kind)
    _launch_fwd(
        (code, _pulses(flip, phase, energy), echoes, inversions, rotations),
        _dense((xt_re, xt_im, xl, recovery, start, b1, wt)),
        out,
        final,
        kind=kind,
        n_states=n_states,
        block_spins=block_spins,
    )
    return out, final


@custom_op("epgx::epg_program_tangent", mutates_args=())
def _tangent_op(
    xt_re: Tensor,
    xt_im: Tensor,
    xl: Tensor,
    recovery: Tensor,
    start: Tensor,
    b1: Tensor,
    wt: Tensor,
    flip: Tensor,
    phase: Tensor,
    energy: Tensor,
    d_xt_re: Tensor,
    d_xt_im: Tensor,
    d_xl: Tensor,
    d_recovery: Tensor,
    d_start: Tensor,
    d_b1: Tensor,
    d_wt: Tensor,
    d_flip: Tensor,
    d_phase: Tensor,
    d_energy: Tensor,
    code: Tensor,
    echoes: Tensor,
    inversions: Tensor,
    rotations: Tensor,
    kind: str,
    n_states: int,
    block_spins: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Readouts, final state and their tangents ``[n_tan, 2, n_echoes, B]``, ``[n_tan, P, 6, B]``.

    Each ``d_*`` is the tangent of its input along n_tan directions (leading axis).
    """
    n_tan = d_b1.shape[0]
    out, final = _outputs_like(b1, echoes, kind)
    dout = b1.new_empty(n_tan, *out.shape)
    dfinal = b1.new_empty(n_tan, *final.shape)
    _launch_tan(
        (code, _pulses(flip, phase, energy), echoes, inversions, rotations),
        _dense((xt_re, xt_im, xl, recovery, start, b1, wt)),
        _spin_tangents((d_xt_re, d_xt_im, d_xl, d_recovery, d_start, d_b1, d_wt), b1.shape[0]),
        _dpulses(d_flip, d_phase, d_energy),
        None,
        (out, final, dout, dfinal),
        kind=kind,
        n_states=n_states,
        block_spins=block_spins,
    )
    return out, final, dout, dfinal


@custom_op("epgx::epg_program_vjp", mutates_args=())
def _vjp_op(
    xt_re: Tensor,
    xt_im: Tensor,
    xl: Tensor,
    recovery: Tensor,
    start: Tensor,
    b1: Tensor,
    wt: Tensor,
    flip: Tensor,
    phase: Tensor,
    energy: Tensor,
    d_xt_re: Tensor,
    d_xt_im: Tensor,
    d_xl: Tensor,
    d_recovery: Tensor,
    d_start: Tensor,
    d_b1: Tensor,
    d_wt: Tensor,
    d_flip: Tensor,
    d_phase: Tensor,
    d_energy: Tensor,
    grad: Tensor,
    grad_final: Tensor,
    code: Tensor,
    echoes: Tensor,
    inversions: Tensor,
    rotations: Tensor,
    kind: str,
    n_states: int,
    block_spins: int | None,
) -> Tensor:
    """``[n_tan, B]``: per spin and direction, ⟨grad, d(readouts)⟩ + ⟨grad_final, d(final)⟩.

    ``grad`` ``[2, n_echoes, B]`` and ``grad_final`` ``[P, 6, B]`` are the cotangents of the
    two outputs; the tangents as :func:`_tangent_op`. With one-hot directions these are
    the rows of Jᵀ·grad.
    """
    dout = b1.new_empty(d_b1.shape[0], b1.shape[0])
    _launch_tan(
        (code, _pulses(flip, phase, energy), echoes, inversions, rotations),
        _dense((xt_re, xt_im, xl, recovery, start, b1, wt)),
        _spin_tangents((d_xt_re, d_xt_im, d_xl, d_recovery, d_start, d_b1, d_wt), b1.shape[0]),
        _dpulses(d_flip, d_phase, d_energy),
        (grad.contiguous(), grad_final.contiguous()),
        (dout,),
        kind=kind,
        n_states=n_states,
        block_spins=block_spins,
    )
    return dout


@_program_op.register_fake
def _program_fake(*args: Any) -> tuple[Tensor, Tensor]:
    return _outputs_like(args[5], args[_N_IN + 1], args[_N_IN + 4])


@_tangent_op.register_fake
def _tangent_fake(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b1, d_b1, echoes, kind = args[5], args[_N_IN + 5], args[2 * _N_IN + 1], args[2 * _N_IN + 4]
    out, final = _outputs_like(b1, echoes, kind)
    n_tan = d_b1.shape[0]
    return out, final, b1.new_empty(n_tan, *out.shape), b1.new_empty(n_tan, *final.shape)


@_vjp_op.register_fake
def _vjp_fake(*args: Any) -> Tensor:
    b1, d_b1 = args[5], args[_N_IN + 5]
    return b1.new_empty(d_b1.shape[0], b1.shape[0])


@_program_op.register_vmap
def _program_vmap(info: Any, in_dims: Sequence[int | None], *args: Any) -> tuple[Any, Any]:
    """A loop over the batch (vmap over tissues or flip trains outside a jvp)."""
    return _vmap_loop(torch.ops.epgx.epg_program.default, info.batch_size, in_dims, args)


@_tangent_op.register_vmap
def _tangent_vmap(info: Any, in_dims: Sequence[int | None], *args: Any) -> tuple[Any, Any]:
    """Only tangents batched (``jacfwd``, :func:`epgx.jacobian`): the batch joins the
    directions (one pass for all, NT_MAX per launch); anything else batched: a loop."""
    nb = info.batch_size
    op = torch.ops.epgx.epg_program_tangent.default
    if any(d is not None for i, d in enumerate(in_dims) if not _N_IN <= i < 2 * _N_IN):
        return _vmap_loop(op, nb, in_dims, args)
    prim, tan, rest = args[:_N_IN], args[_N_IN : 2 * _N_IN], args[2 * _N_IN :]
    td = in_dims[_N_IN : 2 * _N_IN]
    n_tan = tan[5].shape[0] if td[5] is None else tan[5].movedim(td[5], 0).shape[1]
    folded = [_fold_directions(t, d, nb) for t, d in zip(tan, td, strict=True)]
    out, final, dout, dfinal = op(*prim, *folded, *rest)
    return (out, final, dout.unflatten(0, (nb, n_tan)), dfinal.unflatten(0, (nb, n_tan))), (None, None, 0, 0)


@_vjp_op.register_vmap
def _vjp_vmap(info: Any, in_dims: Sequence[int | None], *args: Any) -> tuple[Any, Any]:
    """A loop over the batch (``jacrev``, vmap over tissues)."""
    return _vmap_loop(torch.ops.epgx.epg_program_vjp.default, info.batch_size, in_dims, args)


def _used_entries(kind: str, index: int, n_entries: int) -> list[int]:
    """Entries of kernel input ``index`` (per spin without the spin axis, or per pulse) that
    reach the outputs for ``kind``."""
    name = _INPUTS[index]
    if name in ("xt_re", "xt_im") and kind == "mt":
        return list(range(0, n_entries, 4))  # per interval, the free pool's only: no bound transverse
    if name in ("wt", "energy") and kind != "mt":
        return []  # no MT saturation outside MT
    return list(range(n_entries))


def _vjp(
    primals: Sequence[Tensor], grads: tuple[Tensor, Tensor], needs: Sequence[bool], rest: Sequence[Any]
) -> list[Tensor | None]:
    """Jᵀ·grad for the kernel inputs that need it, by one-hot tangent directions.

    One direction per used entry of a per-spin input (all spins at once: each spin's
    outputs depend on its own inputs only) and one per pulse of a per-pulse input,
    contracted with the cotangents in the kernel, NT_MAX directions per launch.
    """
    kind = rest[4]
    n_b = primals[5].shape[-1]
    if n_b == 0:
        return [torch.zeros_like(p) if need else None for p, need in zip(primals, needs, strict=True)]
    g = grads[0].contiguous()
    g_final = grads[1].contiguous()

    def n_entries(i: int) -> int:
        return primals[i].numel() // n_b if i in _PER_SPIN else primals[i].shape[0]

    directions = [
        (i, e) for i, need in enumerate(needs) if need for e in _used_entries(kind, i, n_entries(i))
    ]
    rows: dict[tuple[int, int], Tensor] = {}
    vjp_op = torch.ops.epgx.epg_program_vjp.default
    for start in range(0, len(directions), NT_MAX):
        chunk = directions[start : start + NT_MAX]
        # one value for every spin: no [directions, ..., B] arrays are allocated
        tangents = [
            p.new_zeros(len(chunk), *p.shape[:-1], 1) if i in _PER_SPIN else p.new_zeros(len(chunk), *p.shape)
            for i, p in enumerate(primals)
        ]
        for d, (i, e) in enumerate(chunk):
            tangents[i][d].view(-1)[e] = 1
        res = _first_order(vjp_op, *primals, *tangents, g, g_final, *rest)  # [n_dir, B]
        for d, (i, e) in enumerate(chunk):
            rows[i, e] = res[d] if i in _PER_SPIN else res[d].sum(-1)
    out: list[Tensor | None] = []
    for i, need in enumerate(needs):
        if not need:
            out.append(None)
            continue
        p = primals[i]
        zero = p.new_zeros(n_b) if i in _PER_SPIN else p.new_zeros(())
        out.append(torch.stack([rows.get((i, e), zero) for e in range(n_entries(i))]).reshape(p.shape))
    return out


def _cotangents(ctx: Any, g: Tensor | None, g_final: Tensor | None) -> tuple[Tensor, Tensor]:
    """The two outputs' cotangents, zeros for an output that received none."""
    b1 = ctx.saved_tensors[5]
    out, final = _outputs_like(b1, ctx.rest[1], ctx.rest[4])
    return (
        torch.zeros_like(out) if g is None else g,
        torch.zeros_like(final) if g_final is None else g_final,
    )


def _program_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs[:_N_IN])
    ctx.rest = inputs[_N_IN:]


def _program_backward(ctx: Any, g: Tensor | None, g_final: Tensor | None) -> tuple[Tensor | None, ...]:
    grads = _vjp(ctx.saved_tensors, _cotangents(ctx, g, g_final), ctx.needs_input_grad[:_N_IN], ctx.rest)
    return (*grads, *(None for _ in ctx.rest))


_program_op.register_autograd(_program_backward, setup_context=_program_setup)
_tangent_op.register_autograd(_no_second_order, setup_context=_no_setup)
_vjp_op.register_autograd(_no_second_order, setup_context=_no_setup)


class _ProgramFn(torch.autograd.Function):
    """The fused block sequence as a differentiable function of the ten kernel inputs (``_INPUTS``).

    ``jvp`` runs the tangent kernel (NT = 1 here; ``torch.func.jacfwd``/``vmap`` turn a
    batch of tangents into NT directions of one pass through the op's vmap rule);
    ``backward`` contracts one-hot directions with the upstream gradients (:func:`_vjp`).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(*args: Any) -> tuple[Tensor, Tensor]:
        return torch.ops.epgx.epg_program.default(*args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs[:_N_IN])
        ctx.save_for_forward(*inputs[:_N_IN])
        ctx.rest = inputs[_N_IN:]

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple[Tensor, Tensor]:
        primals = ctx.saved_tensors
        tans = [
            (torch.zeros_like(p) if t is None else t).unsqueeze(0)
            for p, t in zip(primals, tangents[:_N_IN], strict=True)
        ]
        tangent_op = torch.ops.epgx.epg_program_tangent.default
        _, _, dout, dfinal = _first_order(tangent_op, *primals, *tans, *ctx.rest)
        return dout[0], dfinal[0]

    @staticmethod
    def backward(ctx: Any, g: Tensor | None, g_final: Tensor | None) -> tuple[Tensor | None, ...]:
        return _program_backward(ctx, g, g_final)


def epg_program(
    t: Tables,
    start: Tensor,
    b1: Tensor,
    *,
    kind: str,
    mt_lineshape_us: Tensor | None = None,
    out: Tensor | None = None,
    final: Tensor | None = None,
    block_spins: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Readouts and final order-0 state of B spins through an event table, in one launch.

    Differentiable w.r.t. every tensor argument and the tensors of ``t`` but ``code``,
    ``echoes``, ``inversions`` and ``rotations`` (autograd, ``torch.func`` jvp, jacfwd,
    jacrev, vmap): the derivatives are exact, from the tangent kernel (see the module
    docstring for their cost). Second-order derivatives are not supported.

    Args:
        t: the run's tables (:func:`tables`).
        start: ``[P, 6, B]`` order-0 state of each spin before the first event.
        b1: ``[B]`` transmit scale per spin (multiplies every flip angle and, squared,
            the MT saturation energy).
        kind: ``"single"``, ``"bm"`` or ``"mt"`` (P = 1, 2, 2).
        mt_lineshape_us: ``[B]`` bound-pool lineshape G, µs (MT only).
        out: optional ``[2, n_echoes, B]`` buffer for (re, im) of the readouts; forward only.
        final: optional ``[P, 6, B]`` buffer for the final order-0 state; forward only.
        block_spins: spins per program (a power of two); None picks one.

    Returns:
        (complex ``[B, n_echoes]``, final order-0 state ``[P, 6, B]``).

    Raises:
        ValueError: bad shapes, dtypes or kind; ``out``/``final`` given with inputs that
            carry derivatives.
    """
    if kind not in KINDS:
        raise ValueError(f"epg_program: kind must be one of {KINDS}; got {kind!r}.")
    if (kind == "mt") != (mt_lineshape_us is not None):
        raise ValueError("epg_program: mt_lineshape_us is needed for, and only for, MT.")
    dtype, device = b1.dtype, b1.device
    if mt_lineshape_us is not None:
        # W·T per µT²·ms of ∫B1² dt: π γ² b1² G (G in ms), as ops.mt_saturation
        wt = math.pi * ops.GAMMA_RAD_PER_MS_PER_UT**2 * 1e-3 * (b1 * b1) * mt_lineshape_us
    else:
        wt = torch.zeros_like(b1)
    inputs = [t.xt_re, t.xt_im, t.xl, t.recovery, start, b1, wt, t.flip, t.phase, t.energy]
    inputs = [x.to(dtype=dtype, device=device).contiguous() for x in inputs]
    rest = (t.code, t.echoes, t.inversions, t.rotations, kind, t.n_states, block_spins)
    if out is None and final is None:
        res, last = _ProgramFn.apply(*inputs, *rest)
    else:
        if any(ops.differentiated(x) for x in inputs):
            raise ValueError(
                "epg_program: out= and final= are for the forward pass only; inputs that carry "
                "derivatives need neither (the differentiable path allocates its outputs)."
            )
        new_out, new_final = _outputs_like(b1, t.echoes, kind)
        res = new_out if out is None else out
        last = new_final if final is None else final
        _launch_fwd(
            (t.code, _pulses(*inputs[7:]), t.echoes, t.inversions, t.rotations),
            inputs[:7],
            res,
            last,
            kind=kind,
            n_states=t.n_states,
            block_spins=block_spins,
        )
    return torch.complex(res[0], res[1]).T, last


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
        flip=program.flip_rad,
        phase=program.phase_rad,
        energy=program.energy,
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
        start0 = ops.equilibrium(m0, 1)[:, :, 0]  # out of place: m0 may carry tangents
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
