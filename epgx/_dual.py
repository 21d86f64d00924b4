"""Dual-state forward mode of the pure-torch engine: the fast route of :func:`epgx.jacobian`.

The state of every spin is carried together with its NT tangent states (one per tissue
parameter) as one stacked tensor ``[P, 6, K, C, B]``, C = 1 + NT columns, column 0 the
state x and column 1 + t its derivative dx_t = ∂x/∂θ_t. Every operator of a train is
linear (RF, shift) or affine (relaxation + recovery) in the state, with coefficients
that depend on a few per-spin numbers, so with y = A(θ)·x + b(θ)

    y = A x + b,    dy_t = A dx_t + (∂A/∂θ_t) x + ∂b/∂θ_t

RF and the shift do not depend on tissue parameters (except RF on B1 and, for MT, the
bound-pool saturation on B1 and the lineshape): they are applied once to the whole
stacked tensor. ∂A/∂θ and ∂b/∂θ of the relaxation propagator, of the start state and
of the saturation are computed once per call, for all spins, by ``torch.func`` forward
mode on the ``[B]``-sized inputs of :func:`epgx.ops.relaxation`; the dRF/dB1 matrices
once per pulse and chunk. Nothing of the train runs under ``torch.func``, so there is
no per-operation transform overhead.

Two event loops share that arithmetic: where autograd records nothing (the usual case)
two preallocated ``[K, P, 6, C, B]`` buffers with relaxation and shift written in place
per plane group (:func:`_run_buffered`); where the sequence or a propagator needs
autograd (a CRLB objective back-propagated to flip angles) the functional loop on
``[P, 6, K, C, B]`` (:func:`run_chunk`), so the Jacobian stays differentiable.

Cost: propagating C columns and adding the NT source terms is about C + NT forward
passes of arithmetic per relaxation, and C per RF pulse; measured 5.3-5.6x one forward
pass for NT = 4 (two-pool FSE, 32 echoes, one CPU thread: bench/test_bench_jacobian.py),
5.5-6.7x faster than the generic route.

:func:`jacobian` claims the one call of :func:`epgx.fse` / :func:`epgx.gre` that a
model makes (``_simulate`` asks :func:`probing`); anything else declines, and
:func:`epgx.jacobian` falls back to its generic ``vmap`` of ``jvp``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import jvp, vmap

from epgx import ops
from epgx.tissue import Tissue


class Decline(Exception):
    """The model's call is not one the dual-state route covers (the generic route runs)."""


@dataclass
class _Request:
    tissue: Tissue
    names: tuple[str, ...]
    signal: torch.Tensor | None = None
    jac: torch.Tensor | None = None
    calls: list[str] = field(default_factory=list)


_REQUEST: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("epgx_dual", default=None)


def probing() -> bool:
    """True while :func:`jacobian` runs a model: the engine must call :func:`simulate`."""
    return _REQUEST.get() is not None


def decline(why: str) -> None:
    """Abort the dual-state attempt (if one is running): ``why`` names what is not covered."""
    if _REQUEST.get() is not None:
        raise Decline(why)


def _plain(t: torch.Tensor) -> bool:
    """No derivative of any kind is taken through ``t`` (autograd, forward AD, torch.func)."""
    return not (t.requires_grad or ops.is_transformed(t) or fwAD.unpack_dual(t).tangent is not None)


def jacobian(
    model_fn: Callable[[Tissue], torch.Tensor], tissue: Tissue, names: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(signal, jacobian [*batch, n, NT])`` by the dual-state engine, or None where it
    does not apply: the model must return, unchanged, the output of its one call of
    the torch engine (``epgx.fse``/``epgx.gre``, no ``return_states``) on ``tissue``
    itself, and no tissue field may already carry derivatives (second order)."""
    if _REQUEST.get() is not None or not all(_plain(t) for t in tissue.fields().values()):
        return None
    request = _Request(tissue, names)
    token = _REQUEST.set(request)
    try:
        out = model_fn(tissue)
    except Decline:
        return None
    finally:
        _REQUEST.reset(token)
    if request.signal is None or out is not request.signal or request.jac is None:
        return None
    return request.signal, request.jac


def simulate(
    tissue: Tissue,
    triton: bool,
    return_states: bool,
    chunk_size: int,
    flat: dict[str, torch.Tensor],
    events: list[tuple[Any, ...]],
    sizes: list[int],
    flip_rad: torch.Tensor,
    phase_rad: torch.Tensor,
    dt_ms: torch.Tensor,
    sat_energy: torch.Tensor | None,
    waveform: tuple[torch.Tensor, torch.Tensor, str] | None,
    diff_d: torch.Tensor | None,
    z0: torch.Tensor | None,
    prep: Any,
    gre: bool,
) -> torch.Tensor:
    """The engine's hook (``engine._simulate``): claim this call for the running
    :func:`jacobian` and return its signal, or raise :class:`Decline`.

    The arguments are ``_simulate``'s, resolved (``triton``: the call would run the fused
    kernel). Chunks hold ``chunk_size`` spins, as the engine's.
    """
    request = _REQUEST.get()
    assert request is not None
    if triton:
        raise Decline("the Triton engine carries its own tangents")
    if return_states:
        raise Decline("return_states=True")
    if tissue is not request.tissue or request.calls:
        raise Decline("a model that changes the tissue or calls the engine more than once")
    sequence = (flip_rad, phase_rad, dt_ms, sat_energy, z0, diff_d, *(waveform or ())[:2])
    if any(
        ops.is_transformed(t) or fwAD.unpack_dual(t).tangent is not None for t in sequence if t is not None
    ):
        raise Decline("a sequence under torch.func or forward-mode AD (derivatives of derivatives)")
    request.calls.append("engine")
    n_spins = flat["t1_ms"].shape[0]
    values, tangents = _tissue_terms(tissue.kind, flat, request.names, dt_ms, sat_energy, z0, prep)
    step = chunk_size  # as the engine's chunks (chunk_size // (1 + NT) measured slower: more ops)
    sigs, jacs = [], []
    for start in range(0, n_spins, step):
        sl = slice(start, min(start + step, n_spins))
        weights = None
        if waveform is not None:
            assert diff_d is not None
            g, tau, negative_orders = waveform
            weights = ops.diffusion_weights(g, tau, diff_d[sl], max(sizes), negative_orders=negative_orders)
        sig, jac = run_chunk(
            tissue.kind,
            flat["b1"][sl],
            request.names,
            tuple(v[..., sl].contiguous() for v in values),
            tuple(v[..., sl].contiguous() for v in tangents),
            events,
            sizes,
            flip_rad,
            phase_rad,
            weights,
            gre,
        )
        sigs.append(sig)
        jacs.append(jac)
    signal = torch.cat(sigs, dim=0).reshape(*tissue.shape, -1)
    request.signal = signal
    request.jac = torch.cat(jacs, dim=0).reshape(*tissue.shape, *jacs[0].shape[1:])
    return signal


@dataclass(frozen=True)
class _Coefficients:
    """Per-spin relaxation coefficients and their derivatives.

    ``x`` ``[P, P, 6, 1, 1, B]`` per-plane propagator (transverse real part on planes
    0-3, longitudinal on 4-5), ``xi`` ``[P, P, 1, 1, B]`` imaginary transverse part or
    None, ``rec`` ``[P, B]`` recovery; ``dx``, ``dxi``, ``drec`` the same with the
    tangent axis NT in place of the column axis.
    """

    x: torch.Tensor
    xi: torch.Tensor | None
    rec: torch.Tensor
    dx: torch.Tensor
    dxi: torch.Tensor | None
    drec: torch.Tensor


def _per_plane(xt: torch.Tensor, xl: torch.Tensor) -> torch.Tensor:
    """``[P, P, N, B]`` transverse and longitudinal parts → ``[P, P, 6, 1, N, B]``."""
    p, _, n, b = xl.shape
    x = torch.cat([xt.unsqueeze(2).expand(p, p, 4, n, b), xl.unsqueeze(2).expand(p, p, 2, n, b)], 2)
    return x.unsqueeze(3).contiguous()  # dense: broadcasting over strided operands is slow


def _relax_shift(state: torch.Tensor, c: _Coefficients, w: torch.Tensor | None, n: int) -> torch.Tensor:
    """Relaxation/exchange, shift by one order and recovery on the stacked state.

    ``state`` ``[P, 6, K, C, B]`` → ``[P, 6, n, C, B]``: the engine's resize to ``n``
    orders, :func:`ops.relax` (with recovery) and :func:`ops.shift` by 1, with the
    relaxed orders written straight to their shifted places (one pass, no concatenation).
    Column 0: Ξx + b; column 1 + t: Ξ dx_t + (∂Ξ/∂θ_t) x + ∂b/∂θ_t. Diffusion weights
    ``w`` ``[6, ≥n, 1, B or 1]`` multiply before the recovery, as in :func:`ops.relax`.
    """
    p, _, k_in, cols, b = state.shape
    m = min(k_in, n)
    x = state[:, :, :m]
    x0 = x[:, :, :, :1]  # [P, 6, m, 1, B]
    rot = None
    if c.xi is not None or c.dxi is not None:
        # i·F+ = (−Im, Re); conj(X)·F- adds −i·Im(X)·F-: (+Im, −Re) per unit Im(X)
        rot = torch.stack([-x[:, 1], x[:, 0], x[:, 3], -x[:, 2]], dim=1)
    out = state.new_empty(p, 6, n, cols, b)
    fp = min(m, n - 1)  # F+ₖ ← F+ₖ₋₁ for k = 1..n−1
    for o in range(p):
        acc = x[0] * c.x[o, 0]  # [6, m, C, B]; a new tensor, so in place below is safe
        for i in range(1, p):
            acc = torch.addcmul(acc, x[i], c.x[o, i])
        tang = acc[:, :, 1:]
        for i in range(p):
            tang.addcmul_(x0[i], c.dx[o, i])
        if rot is not None:
            if c.xi is not None:
                for i in range(p):
                    acc[:4].addcmul_(rot[i], c.xi[o, i])
            if c.dxi is not None:
                for i in range(p):
                    acc[:4, :, 1:].addcmul_(rot[i, :, :, :1], c.dxi[o, i])
        if w is not None:
            acc = acc * w[:, :m]
        out[o, 0:2, 1 : 1 + fp] = acc[0:2, :fp]
        out[o, 0:2, 1 + fp :] = 0
        if m > 1:  # F+₀ ← conj F-₁
            out[o, 0, 0] = acc[2, 1]
            out[o, 1, 0] = -acc[3, 1]
        else:
            out[o, 0:2, 0] = 0
        out[o, 2:4, : m - 1] = acc[2:4, 1:m]  # F-ₖ ← F-ₖ₊₁
        out[o, 2:4, m - 1 :] = 0
        out[o, 4:6, :m] = acc[4:6]
        out[o, 4:6, m:] = 0
    out[:, ops.Z_RE, 0, 0] += c.rec
    out[:, ops.Z_RE, 0, 1:] += c.drec
    return out


def _rf(
    state: torch.Tensor,
    m: torch.Tensor,
    dm: torch.Tensor | None,
    db1: int | None,
    mt: bool,
    sat: torch.Tensor | None,
    dsat: torch.Tensor | None,
) -> torch.Tensor:
    """RF on the stacked state: ``m`` ``[6, 6]`` or ``[B, 6, 6]``; ``dm`` its B1 derivative
    (same shape; source of tangent column ``db1``); MT bound pool ``sat`` ``[B]`` and
    ``dsat`` ``[NT, B]``."""
    p, _, k, c, b = state.shape
    rotate = state[:1] if mt else state
    if m.ndim == 2:
        out = torch.matmul(m, rotate.reshape(rotate.shape[0], 6, k * c * b)).reshape(rotate.shape)
    else:
        out = torch.einsum("bij,pjkcb->pikcb", m, rotate)
    if dm is not None and db1 is not None:
        x0 = rotate[:, :, :, 0]
        src = (
            torch.matmul(dm, x0.reshape(x0.shape[0], 6, k * b)).reshape(x0.shape)
            if dm.ndim == 2
            else (torch.einsum("bij,pjkb->pikb", dm, x0))
        )
        out[:, :, :, db1] += src  # out is a new tensor: in place is safe for autograd
    if not mt:
        return out
    bound = state[1:]
    if sat is not None:
        bound = bound * sat
        if dsat is not None:
            bound = torch.cat([bound[:, :, :, :1], bound[:, :, :, 1:] + state[1:, :, :, :1] * dsat], dim=3)
    return torch.cat([out, bound], dim=0)


def _tissue_terms(
    kind: str,
    p: dict[str, torch.Tensor],
    names: Sequence[str],
    dt_ms: torch.Tensor,
    sat_energy: torch.Tensor | None,
    z0: torch.Tensor | None,
    prep: Any,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Every per-spin quantity of a train that depends on tissue fields, and its
    derivatives w.r.t. ``names``, by ``torch.func`` forward mode on ``[B]``-sized inputs.

    Returns:
        ``(xt_re, xt_im, xl, recovery, start, sat)`` of :func:`ops.relaxation`, the start
        state ``[P, 6, 1, B]`` and the MT saturation ``[n_pulses, B]`` (``xt_im``/``sat``
        empty where absent), and the same tuple of derivatives with a leading NT axis.
    """
    from epgx.engine import _relax_kwargs, _start_state

    def terms(*vals: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q = {**p, **dict(zip(names, vals, strict=True))}
        kw = _relax_kwargs(kind, q)
        op = ops.relaxation(dt_ms, **kw)
        xi = op.xt_im if op.xt_im is not None else op.xt_re.new_zeros(0)
        start = _start_state(kind, q, kw, z0, prep)
        sat = (
            ops.mt_saturation(sat_energy.reshape(-1, 1), q["mt_lineshape_us"], q["b1"])
            if kind == "mt" and sat_energy is not None
            else op.xl.new_zeros(0)
        )
        return op.xt_re, xi, op.xl, op.recovery, start, sat

    primals = tuple(p[n].contiguous() for n in names)
    basis = tuple(
        torch.zeros(len(names), *x.shape, dtype=x.dtype, device=x.device).index_fill_(
            0, torch.tensor([t], device=x.device), 1.0
        )
        for t, x in enumerate(primals)
    )
    out_dims: Any = (None, 0)  # the values once, the derivatives along the tangent axis
    mapped: Any = vmap(lambda *t: jvp(terms, primals, t), out_dims=out_dims, randomness="same")
    values, tangents = mapped(*basis)
    return values, tangents


def _echo(f0: torch.Tensor, phase_rad: torch.Tensor | None) -> torch.Tensor:
    """i·F0 ``[C, B]`` of the order-0 F+ planes ``f0`` ``[P, 2, C, B]`` (re, im) summed over
    the pools, demodulated by the pulse's phase (GRE) when given."""
    cos_sin = (None, None) if phase_rad is None else (torch.cos(phase_rad), torch.sin(phase_rad))
    return ops.readout(f0[:, 0].sum(0), f0[:, 1].sum(0), *cos_sin)


def run_chunk(
    kind: str,
    b1: torch.Tensor,
    names: Sequence[str],
    values: tuple[torch.Tensor, ...],
    tangents: tuple[torch.Tensor, ...],
    events: list[tuple[Any, ...]],
    sizes: list[int],
    flip_rad: torch.Tensor,
    phase_rad: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    gre: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of spins through an ``epgx.fse``/``epgx.gre`` event list, with tangents.

    Args:
        b1: ``[B]`` the chunk's B1.
        names: the tissue fields differentiated (NT).
        values, tangents: the chunk's :func:`_tissue_terms` (sliced on the spin axis).
        events, sizes, flip_rad, phase_rad, gre: as ``engine._run_chunk``.
        weights: the chunk's diffusion weights of the largest state count, or None.

    Returns:
        (complex signal ``[B, n]``, complex Jacobian ``[B, n, NT]``).
    """
    mt = kind == "mt"
    nt = len(names)
    n_b = b1.shape[0]
    xt, xi, xl, rec, start, sat = values
    dxt, dxi, dxl, drec, dstart, dsat = tangents
    # [P, P, B] and [NT, P, P, B] → per-plane coefficients over the column axis
    coef = _Coefficients(
        x=_per_plane(xt.unsqueeze(2), xl.unsqueeze(2)),
        xi=xi.reshape(*xi.shape[:2], 1, 1, n_b) if xi.numel() else None,
        rec=rec,
        dx=_per_plane(dxt.permute(1, 2, 0, 3), dxl.permute(1, 2, 0, 3)),
        dxi=dxi.permute(1, 2, 0, 3).unsqueeze(2).contiguous() if dxi.numel() and bool(dxi.any()) else None,
        drec=drec.permute(1, 0, 2).contiguous(),
    )
    state = torch.cat([start.unsqueeze(3), dstart.permute(1, 2, 3, 0, 4)], dim=3)  # [P, 6, 1, C, B]

    # RF: one matrix per pulse unless B1 varies over spins; dM/dB1 where B1 is a parameter
    db1 = 1 + names.index("b1") if "b1" in names else None
    shared = bool((b1 == b1[0]).all())
    b1_rf = b1[:1] if shared else b1
    angle = flip_rad.reshape(-1, 1) * b1_rf  # [n_pulses, 1 or B]
    phase = phase_rad.reshape(-1, 1).expand_as(angle)
    mats = ops.rf_matrix(angle, phase)  # [n_pulses, 1 or B, 6, 6]
    dmats: torch.Tensor | None = None
    if db1 is not None:  # dM/dB1 = flip · dM/dα
        dmats = jvp(lambda a: ops.rf_matrix(a, phase), (angle,), (flip_rad.reshape(-1, 1).expand_as(angle),))[
            1
        ]
    if shared:
        mats = mats[:, 0]
        dmats = None if dmats is None else dmats[:, 0]
    sat_t = sat.reshape(-1, 1, 1, 1, n_b) if mt else None  # [n_pulses, ·, ·, ·, B]
    dsat_t = dsat.permute(1, 0, 2).reshape(-1, 1, 1, nt, n_b) if mt else None

    w_all = None
    if weights is not None:
        w_fp, w_fm, w_z = weights  # [K, B or 1] each
        w_all = torch.stack([w_fp, w_fp, w_fm, w_fm, w_z, w_z]).unsqueeze(2)  # [6, K, 1, B or 1]

    sequence = (flip_rad, phase_rad, *(w for w in (weights or ()) if w is not None))
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (*sequence, *values, *tangents))):
        start_k = state.permute(2, 0, 1, 3, 4)  # [1, P, 6, C, B]
        rf_terms = (mats, dmats, db1, sat_t, dsat_t)
        return _run_buffered(start_k, coef, w_all, *rf_terms, events, sizes, phase_rad, mt, gre)
    signals: list[torch.Tensor] = []
    i_relax = 0
    for ev in events:
        if ev[0] == "rf":
            j = ev[1]
            state = _rf(
                state,
                mats[j],
                None if dmats is None else dmats[j],
                db1,
                mt,
                None if sat_t is None else sat_t[j],
                None if dsat_t is None else dsat_t[j],
            )
        elif ev[0] == "relax":
            n = sizes[i_relax]
            i_relax += 1
            state = _relax_shift(state, coef, w_all, n)
        else:
            f0 = state[:, :2, 0]  # [P, 2, C, B]
            signals.append(_echo(f0[:1] if mt else f0, phase_rad[ev[1]] if gre else None))
    out = torch.stack(signals, dim=-1)  # [C, B, n]
    return out[0], out[1:].permute(1, 2, 0)


def _run_buffered(
    start: torch.Tensor,
    c: _Coefficients,
    w_all: torch.Tensor | None,
    mats: torch.Tensor,
    dmats: torch.Tensor | None,
    db1: int | None,
    sat_t: torch.Tensor | None,
    dsat_t: torch.Tensor | None,
    events: list[tuple[Any, ...]],
    sizes: list[int],
    phase_rad: torch.Tensor,
    mt: bool,
    gre: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`run_chunk`'s event loop where autograd records nothing: two preallocated
    ``[K_max, P, 6, C, B]`` buffers (orders outermost, so the first k orders are one
    contiguous block), every operator writing into the other buffer (``out=``/in place).

    Same arithmetic as the functional loop; ``start`` is ``[1, P, 6, C, B]``.
    """
    _, p, _, cols, b = start.shape
    k_max = max([1, *sizes])
    bufs = [start.new_empty(k_max, p, 6, cols, b), start.new_empty(k_max, p, 6, cols, b)]
    bufs[0][:1] = start
    cur, k = 0, 1
    # coefficients in this layout: [P, P, 6, 1, B] and [P, P, 6, NT, B]
    cx, cdx = c.x[:, :, :, 0], c.dx[:, :, :, 0]
    xi = None if c.xi is None else c.xi[:, :, 0]  # [P, P, 1, B]
    dxi = None if c.dxi is None else c.dxi[:, :, 0]  # [P, P, NT, B]
    signals: list[torch.Tensor] = []
    i_relax = 0
    for ev in events:
        x = bufs[cur][:k]
        out = bufs[1 - cur][:k]
        if ev[0] == "rf":
            j = ev[1]
            m = mats[j]
            rot = x[:, :1] if mt else x
            dst = out[:, :1] if mt else out
            if m.ndim == 2:
                if mt:
                    dst.copy_(torch.matmul(m, rot.reshape(k, 6, cols * b)).reshape(dst.shape))
                else:
                    torch.matmul(m, rot.reshape(k * p, 6, cols * b), out=dst.view(k * p, 6, cols * b))
            else:
                dst.copy_(torch.einsum("bij,kpjcb->kpicb", m, rot))
            if dmats is not None and db1 is not None:
                dm = dmats[j]
                x0 = rot[:, :, :, 0]  # [k, P', 6, B]
                src = (
                    torch.matmul(dm, x0.reshape(-1, 6, b)).reshape(x0.shape)
                    if dm.ndim == 2
                    else torch.einsum("bij,kpjb->kpib", dm, x0)
                )
                dst[:, :, :, db1] += src
            if mt:
                assert sat_t is not None and dsat_t is not None
                torch.mul(x[:, 1], sat_t[j, 0], out=out[:, 1])
                out[:, 1, :, 1:].addcmul_(x[:, 1, :, :1], dsat_t[j, 0])
            cur = 1 - cur
        elif ev[0] == "relax":
            n = sizes[i_relax]
            i_relax += 1
            _relax_shift_into(bufs[cur][:k], bufs[1 - cur][:n], cx, cdx, xi, dxi, w_all, c)
            cur, k = 1 - cur, n
        else:
            f0 = x[0, :1, :2] if mt else x[0, :, :2]  # [P, 2, C, B]
            signals.append(_echo(f0, phase_rad[ev[1]] if gre else None))
    sig = torch.stack(signals, dim=-1)  # [C, B, n]
    return sig[0], sig[1:].permute(1, 2, 0)


def _relax_shift_into(
    x: torch.Tensor,
    out: torch.Tensor,
    cx: torch.Tensor,
    cdx: torch.Tensor,
    xi: torch.Tensor | None,
    dxi: torch.Tensor | None,
    w_all: torch.Tensor | None,
    c: _Coefficients,
) -> None:
    """:func:`_relax_shift` in the ``[K, P, 6, C, B]`` layout, written into ``out`` (n orders):
    each plane group (F+ up one order, F- down one, Z in place) in one pass."""
    k_in, p = x.shape[:2]
    n = out.shape[0]
    m = min(k_in, n)
    fp = min(m, n - 1)
    # (planes, source orders, destination orders, sign of the Im(X) term)
    groups = [
        (slice(0, 2), slice(0, fp), slice(1, 1 + fp), 1.0),
        (slice(2, 4), slice(1, m), slice(0, m - 1), -1.0),
    ]
    groups.append((slice(4, 6), slice(0, m), slice(0, m), 0.0))
    for o in range(p):
        for planes, src, dst, sign in groups:
            if src.stop <= src.start:
                continue
            d = out[dst, o, planes]  # [cnt, 2, C, B]
            xs = x[src, :, planes]  # [cnt, P, 2, C, B]
            torch.mul(xs[:, 0], cx[o, 0, planes], out=d)
            for i in range(1, p):
                d.addcmul_(xs[:, i], cx[o, i, planes])
            tang = d[:, :, 1:]
            for i in range(p):
                tang.addcmul_(xs[:, i, :, :1], cdx[o, i, planes])
            if sign and (xi is not None or dxi is not None):
                # F+: + i·Im(X)·F+ = (−Im, Re)·Im(X); stored F-: − i·Im(X)·F- = (+Im, −Re)·Im(X)
                for i in range(p):
                    if xi is not None:
                        d[:, 0].addcmul_(xs[:, i, 1], xi[o, i], value=-sign)
                        d[:, 1].addcmul_(xs[:, i, 0], xi[o, i], value=sign)
                    if dxi is not None:
                        d[:, 0, 1:].addcmul_(xs[:, i, 1, :1], dxi[o, i], value=-sign)
                        d[:, 1, 1:].addcmul_(xs[:, i, 0, :1], dxi[o, i], value=sign)
            if w_all is not None:  # [6, K, 1, B or 1] → [cnt, 2, 1, B or 1]
                d.mul_(w_all[planes, src].transpose(0, 1))
        if m > 1:  # F+₀ ← conj F-₁ (the relaxed F-₁ is now F-₀)
            out[0, o, 0] = out[0, o, 2]
            torch.neg(out[0, o, 3], out=out[0, o, 1])
        else:
            out[0, o, 0:2] = 0
        out[1 + fp :, o, 0:2] = 0
        out[max(m - 1, 0) :, o, 2:4] = 0
        out[m:, o, 4:6] = 0
    out[0, :, ops.Z_RE, 0] += c.rec
    out[0, :, ops.Z_RE, 1:] += c.drec
