"""The pure-torch engines' no-derivative path: preallocated state, fused relax-shift.

When no derivative is taken (dictionary generation, plain simulation: no input requires
grad under grad mode, no forward-mode tangent, no ``torch.func`` transform), the
event loops of :func:`epgx.gre` / :func:`epgx.fse` and of :mod:`epgx.blocks` run here
instead of through the functional operators of :mod:`epgx.ops`. The arithmetic is the
same (the same propagators of :func:`epgx.ops.relaxation`, the same RF matrices of
:func:`epgx.ops.rf_matrix`); what changes is how the state moves through memory:

- the state lives in two preallocated ``[P, C, K_max, B]`` buffers; an event writes the
  orders 0..n−1 of one from the other (``out=`` / in place), so nothing is allocated per
  event and a state of n orders is a contiguous ``[C, n·B]`` view per pool;
- relaxation and the shift are one pass: the relaxed orders are written straight to
  their shifted places (F+ₖ₊₁ ← X·F+ₖ, F-ₖ ← X̄·F-ₖ₊₁, F+₀ ← X·conj F-₁; relaxation acts on
  every order alike, so it commutes with the shift), and recovery touches Z₀ only;
- readouts copy order 0 into a ``[n_readouts, ·, B]`` buffer and are demodulated once
  at the end.

Real-plane trains. When every RF phase is a multiple of 180°, relaxation has no
off-resonance phase (``df = 0``, and ``df_b = 0`` for BM), there is no frame rotation and
the start state has real Z and imaginary F (equilibrium, inversion and saturation
preparations do), Weigel's matrix maps {F imaginary, Z real} to itself (its entries are
then real on the diagonal blocks and imaginary between F and Z; Weigel 2015, eq. 15),
and so do relaxation and the shift (F+₀ ← conj F-₁ keeps F imaginary). The other three
planes stay zero for the whole train, so they are not carried: C = 3 instead of 6
(FISP-MRF, FISP/bSSFP with 0°/180° phases, CPMG-free single-phase trains). The RF
matrices' couplings out of that subspace are sin(kπ) ≈ 1e-16 rounding there, dropped.

Reference: Weigel M. Extended phase graphs: dephasing, RF pulses, and echoes - pure and
simple. JMRI 2015;41:266-295.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.autograd.forward_ad as fwAD

from epgx import ops

if TYPE_CHECKING:
    from epgx.blocks import _Program

# Switch for tests and for timing the functional reference path; True in normal use.
ENABLED = True

# Planes carried: all six, or (F+ im, F- im, Z re) for real-plane trains.
_FULL = (ops.FP_RE, ops.FP_IM, ops.FM_RE, ops.FM_IM, ops.Z_RE, ops.Z_IM)
_REAL = (ops.FP_IM, ops.FM_IM, ops.Z_RE)


def plain(*tensors: torch.Tensor | None) -> bool:
    """True when no derivative or ``torch.func`` transform acts on any of ``tensors``."""
    if not ENABLED:
        return False
    for t in tensors:
        if t is None:
            continue
        if ops.is_transformed(t) or fwAD.unpack_dual(t).tangent is not None:
            return False
        if t.requires_grad and torch.is_grad_enabled():
            return False
    return True


class _Coefs:
    """One interval's relaxation coefficients as ``[B]`` tensors, found by index:
    X re (transverse pools o ← i), X im (off-resonance only), the longitudinal
    propagator, the recovery per pool."""

    def __init__(self, op: ops.Relaxation, n_pools: int, n_transverse: int, n_intervals: int, k: int) -> None:
        nt, npl = n_transverse, n_pools

        def rows(x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:  # interval k of [.., n_int·B]
            return x.reshape(n, n_intervals, -1)[:, k].unbind(0)

        self.complex_x = op.xt_im is not None  # X has an imaginary part (off-resonance)
        xi = () if op.xt_im is None else rows(op.xt_im[:nt, :nt], nt * nt)
        xr = rows(op.xt_re[:nt, :nt], nt * nt)
        self.flat = (*xr, *xi, *rows(op.xl, npl * npl), *rows(op.recovery, npl))
        self._nt, self._np = nt, npl
        self._xl = nt * nt * (2 if self.complex_x else 1)

    def xr(self, o: int, i: int) -> int:
        return o * self._nt + i

    def xi(self, o: int, i: int) -> int:
        return self._nt**2 + o * self._nt + i

    def xl(self, o: int, i: int) -> int:
        return self._xl + o * self._np + i

    def recovery(self, o: int) -> int:
        return self._xl + self._np**2 + o


# Steps of a cached relaxation plan: (op, dst, src, coef)
_MUL, _ADDCMUL, _ZERO, _ADD = range(4)


class _Runner:
    """One chunk's two state buffers and the event operations on them.

    The views of the buffers an event works on depend only on which buffer holds the
    state and on the state counts, so they are made once and reused: in Python, making
    a view costs more than the arithmetic on it at these sizes.
    """

    def __init__(self, start: torch.Tensor, n_max: int, *, mt: bool, real: bool, n_echoes: int) -> None:
        n_pools, _, k0, b = start.shape
        self.real = real
        self.planes = _REAL if real else _FULL
        c = len(self.planes)
        n_max = max(n_max, k0)
        self.bufs = (start.new_zeros(n_pools, c, n_max, b), start.new_zeros(n_pools, c, n_max, b))
        self.par = 0  # index of the buffer holding the state
        self.bufs[0][:, :, :k0] = start[:, list(self.planes)]
        self.m = k0  # orders held
        self.n_pools = n_pools
        self.n_tr = 1 if mt else n_pools  # pools with transverse states (MT: pool b has none)
        self.mt = mt
        # plane indices in the buffer: F+ (re, im), F- (re, im), Z; re None: not carried
        self.fp: tuple[int | None, int] = (None, 0) if real else (0, 1)
        self.fm: tuple[int | None, int] = (None, 1) if real else (2, 3)
        self.z: tuple[int, ...] = (2,) if real else (4, 5)
        self.f0 = start.new_zeros(n_echoes, 2, b)  # order-0 F+ (re, im) of each readout
        self.i_echo = 0
        self.cache: dict[tuple[Any, ...], Any] = {}

    @property
    def cur(self) -> torch.Tensor:
        return self.bufs[self.par]

    def rf(self, mat: torch.Tensor, sat: torch.Tensor | None) -> None:
        """Weigel's rotation: ``mat`` is ``[C, C]`` (shared) or ``[C, C, B]`` (per spin);
        ``sat`` is the MT bound pool's saturation ``[B]``."""
        key = ("rf", self.par, self.m)
        v = self.cache.get(key)
        if v is None:
            v = self.cache[key] = self._rf_views()
        pairs, planes, bound = v
        if mat.ndim == 2:
            for dst, src in pairs:
                torch.mm(mat, src, out=dst)
        else:
            for dst, src in planes:  # per pool: C destination planes, C source planes
                for i, d in enumerate(dst):
                    torch.mul(src[0], mat[i, 0], out=d)
                    for j in range(1, len(src)):
                        d.addcmul_(src[j], mat[i, j])
        if bound is not None:
            dst, src = bound
            if sat is None:
                dst.copy_(src)
            else:
                torch.mul(src, sat, out=dst)
        self.par ^= 1

    def _rf_views(self) -> tuple[Any, ...]:
        m = self.m
        cur, nxt = self.bufs[self.par], self.bufs[self.par ^ 1]
        c, b = cur.shape[1], cur.shape[3]
        pairs = [(nxt[o, :, :m].view(c, m * b), cur[o, :, :m].view(c, m * b)) for o in range(self.n_tr)]
        planes = [
            ([nxt[o, i, :m] for i in range(c)], [cur[o, j, :m] for j in range(c)]) for o in range(self.n_tr)
        ]
        z = slice(self.z[0], None)
        bound = (nxt[1:, z, :m], cur[1:, z, :m]) if self.mt else None
        return pairs, planes, bound

    def relax(self, co: _Coefs, n: int, shift: int) -> None:
        """Relaxation/exchange over an interval, then a shift of 0 or 1 orders, then
        recovery on Z₀; the state holds ``n`` orders after it."""
        key = ("relax", co.complex_x, self.par, self.m, n, shift)
        plan = self.cache.get(key)
        if plan is None:
            if shift not in (0, 1):
                raise ValueError(f"the no-derivative engine shifts by 0 or 1 orders; got {shift}.")
            plan = self.cache[key] = self._relax_plan(co, n, shift)
        flat = co.flat
        for op, dst, src, k, sign in plan:
            if op == _MUL:
                torch.mul(src, flat[k], out=dst)
                if sign < 0:
                    dst.neg_()
            elif op == _ADDCMUL:
                dst.addcmul_(src, flat[k], value=sign)
            elif op == _ZERO:
                dst.zero_()
            else:
                dst.add_(flat[k])
        self.m = n
        self.par ^= 1

    def _relax_plan(self, co: _Coefs, n: int, shift: int) -> list[tuple[Any, ...]]:
        """The calls of one relaxation as (op, dst view, src view, coefficient index)."""
        m = self.m
        cur, nxt = self.bufs[self.par], self.bufs[self.par ^ 1]
        q = min(m, n)  # orders of the (resized) state that hold values
        nt, npl = self.n_tr, self.n_pools
        fp_re, fp_im = self.fp
        fm_re, fm_im = self.fm
        plan: list[tuple[Any, ...]] = []

        def lin(dst: torch.Tensor, terms: list[tuple[torch.Tensor, int, int]]) -> None:
            """dst ← Σ sign·coef·src (coefficients ``[B]`` broadcast over orders)."""
            for k, (src, coef, sign) in enumerate(terms):
                plan.append((_MUL if k == 0 else _ADDCMUL, dst, src, coef, sign))

        # destination and source orders of F+ (moving up) and F- (moving down)
        if shift == 0:
            up_dst = up_src = dn_dst = dn_src = slice(0, q)
            top_fp, top_fm = q, q
        else:
            hi = min(q, n - 1)
            up_dst, up_src = slice(1, hi + 1), slice(0, hi)
            dn_dst, dn_src = slice(0, q - 1), slice(1, q)
            top_fp, top_fm = hi + 1, max(q - 1, 0)
        fps = slice(0, 2) if fp_re is not None else slice(fp_im, fp_im + 1)
        fms = slice(2, 4) if fm_re is not None else slice(fm_im, fm_im + 1)
        r = range(nt)
        for o in r:
            if not co.complex_x:
                # a real propagator scales re and im alike: one call per plane pair
                lin(nxt[o, fps, up_dst], [(cur[i, fps, up_src], co.xr(o, i), 1) for i in r])
                lin(nxt[o, fms, dn_dst], [(cur[i, fms, dn_src], co.xr(o, i), 1) for i in r])
            else:  # all six planes: F+ ← X·F+, stored F- ← conj(X)·F-
                assert fp_re is not None and fm_re is not None
                fp_terms = [(cur[i, fp_re, up_src], co.xr(o, i), 1) for i in r]
                fp_terms += [(cur[i, fp_im, up_src], co.xi(o, i), -1) for i in r]
                lin(nxt[o, fp_re, up_dst], fp_terms)
                fp_terms = [(cur[i, fp_im, up_src], co.xr(o, i), 1) for i in r]
                fp_terms += [(cur[i, fp_re, up_src], co.xi(o, i), 1) for i in r]
                lin(nxt[o, fp_im, up_dst], fp_terms)
                fm_terms = [(cur[i, fm_re, dn_src], co.xr(o, i), 1) for i in r]
                fm_terms += [(cur[i, fm_im, dn_src], co.xi(o, i), 1) for i in r]
                lin(nxt[o, fm_re, dn_dst], fm_terms)
                fm_terms = [(cur[i, fm_im, dn_src], co.xr(o, i), 1) for i in r]
                fm_terms += [(cur[i, fm_re, dn_src], co.xi(o, i), -1) for i in r]
                lin(nxt[o, fm_im, dn_dst], fm_terms)
            if shift and q > 1:
                # F+₀ ← X·conj(F-₁): conj flips the sign of the source's imaginary part
                one = slice(1, 2)
                if fp_re is not None and fm_re is not None:
                    terms = [(cur[i, fm_re, one], co.xr(o, i), 1) for i in r]
                    if co.complex_x:
                        terms += [(cur[i, fm_im, one], co.xi(o, i), 1) for i in r]
                    lin(nxt[o, fp_re, 0:1], terms)
                terms = [(cur[i, fm_im, one], co.xr(o, i), -1) for i in r]
                if co.complex_x and fm_re is not None:
                    terms += [(cur[i, fm_re, one], co.xi(o, i), 1) for i in r]
                lin(nxt[o, fp_im, 0:1], terms)
            elif shift:
                plan.append((_ZERO, nxt[o, fps, 0:1], None, None, 1))
            # orders entering from beyond the resized state are zero
            if top_fp < n:
                plan.append((_ZERO, nxt[o, fps, top_fp:n], None, None, 1))
            if top_fm < n:
                plan.append((_ZERO, nxt[o, fms, top_fm:n], None, None, 1))
        zs = slice(self.z[0], self.z[-1] + 1)
        for o in range(npl):
            lin(nxt[o, zs, :q], [(cur[i, zs, :q], co.xl(o, i), 1) for i in range(npl)])
            if q < n:
                plan.append((_ZERO, nxt[o, zs, q:n], None, None, 1))
        for o in range(npl):  # recovery on Re Z₀
            plan.append((_ADD, nxt[o, self.z[0], 0], None, co.recovery(o), 1))
        return plan

    def echo(self) -> None:
        """Record order-0 F+ (re, im), summed over the pools with transverse states."""
        key = ("echo", self.par)
        src = self.cache.get(key)
        if src is None:
            fps = slice(self.fp[1], self.fp[1] + 1) if self.real else slice(0, 2)
            src = self.cache[key] = self.cur[: self.n_tr, fps, 0]  # [T, 1 or 2, B] view
        dst = self.f0[self.i_echo, 2 - src.shape[1] :]
        self.i_echo += 1
        if src.shape[0] == 1:
            dst.copy_(src[0])
        else:
            torch.sum(src, dim=0, out=dst)

    def spoil(self) -> None:
        """Ideal spoiler: only Z₀ is kept."""
        self.cur[:, : self.z[0], 0] = 0
        self.m = 1

    def scale_z(self, scale: torch.Tensor) -> None:
        """Z₀ of each pool times ``scale`` (``[P, B]``): inversion after a spoiler."""
        self.cur[:, self.z[0] :, 0].mul_(scale.unsqueeze(1))

    def rotate(self, angle_rad: float) -> None:
        """Frame rotation F+ → F+·e^{−iθ}, stored F- → F-·e^{+iθ} (all six planes only)."""
        if self.real:
            raise AssertionError("a frame rotation leaves the real-plane subspace")
        c, s = math.cos(angle_rad), math.sin(angle_rad)
        st = self.cur[:, :, : self.m]
        fp_re, fp_im, fm_re, fm_im = (st[:, i].clone() for i in range(4))
        st[:, 0] = fp_re * c + fp_im * s
        st[:, 1] = fp_im * c - fp_re * s
        st[:, 2] = fm_re * c - fm_im * s
        st[:, 3] = fm_im * c + fm_re * s

    def final(self) -> torch.Tensor:
        """The state as ``[P, 6, m, B]`` (all six planes)."""
        p, _, _, b = self.cur.shape
        out = self.cur.new_zeros(p, 6, self.m, b)
        out[:, list(self.planes)] = self.cur[:, :, : self.m]
        return out


@contextlib.contextmanager
def _flush_denormals() -> Iterator[None]:
    """Treat subnormal floats as zero while the loop runs, then restore the caller's mode.

    High orders of long trains decay into the subnormal range (< 1.2e-38 in float32),
    where CPU arithmetic is tens of times slower: the exact FISP-MRF model ran 3x slower
    with them. Flushing changes results by less than that range. torch has no getter for
    the mode, so a float32 subnormal is probed (it reads as 0 when flushing is on).
    """
    was_on = bool((torch.tensor([1e-39], dtype=torch.float32) * 1.0 == 0).item())
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


def _real_start(start: torch.Tensor) -> bool:
    """The start state lies in {F imaginary, Z real}."""
    return not bool(start[:, [ops.FP_RE, ops.FM_RE, ops.Z_IM]].any())


def _multiple_of_180(phase_deg: torch.Tensor) -> bool:
    return bool((torch.remainder(phase_deg.to(torch.float64), 180.0) == 0).all())


def _local(mats: torch.Tensor, planes: tuple[int, ...]) -> torch.Tensor:
    """``[..., 6, 6]`` RF matrices restricted to the carried planes: ``[..., C, C]``."""
    idx = torch.tensor(planes, device=mats.device)
    return mats.index_select(-2, idx).index_select(-1, idx)


@_flush_denormals()
def run_engine_chunk(
    kind: str,
    state: torch.Tensor,
    events: list[tuple[Any, ...]],
    sizes: list[int],
    op: ops.Relaxation,
    flip_rad: torch.Tensor,
    phase_rad: torch.Tensor,
    b1: torch.Tensor,
    sat: torch.Tensor | None,
    gre: bool,
) -> torch.Tensor:
    """The event loop of :func:`epgx.engine._run_chunk` (no diffusion, no recorded states).

    Args:
        state: ``[P, 6, 1, B]`` start state (after any preparation).
        events: ``("rf", j)``, ``("relax",)`` (TR or ESP/2, one shift), ``("echo", j)``.
        sizes: state count after each relaxation.
        op: the one relaxation propagator of the train.
        flip_rad, phase_rad: ``[n_pulses]`` pulses, radians.
        b1: ``[B]`` transmit scale.
        sat: ``[n_pulses, B]`` MT bound-pool saturation, or None.
        gre: demodulate readouts by their pulse's phase.

    Returns:
        complex ``[B, n_echoes]``: i·F₀ at each readout.
    """
    mt = kind == "mt"
    # the engine's phases are degrees (reduced modulo 360) times π/180: 0 and 180° exactly
    half_turn = torch.full((), 180.0, dtype=phase_rad.dtype, device=phase_rad.device) * (math.pi / 180)
    real_phases = bool(((phase_rad == 0) | (phase_rad == half_turn)).all())
    real = op.xt_im is None and real_phases and _real_start(state)
    n_echoes = sum(1 for e in events if e[0] == "echo")
    run = _Runner(state, max(sizes, default=1), mt=mt, real=real, n_echoes=n_echoes)
    shared = not bool((b1 != b1[0]).any())
    if shared:
        mats = _local(ops.rf_matrix(flip_rad * b1[0], phase_rad), run.planes)  # [n, C, C]
    co = _Coefs(op, run.n_pools, run.n_tr, 1, 0)
    i_relax = 0
    echo_pulse: list[int] = []
    for e in events:
        kind_e = e[0]
        if kind_e == "rf":
            j = e[1]
            if shared:
                mat = mats[j]
            else:
                full = ops.rf_matrix(flip_rad[j] * b1, phase_rad[j])
                mat = _local(full, run.planes).permute(1, 2, 0).contiguous()  # [C, C, B]
            run.rf(mat, None if sat is None else sat[j])
        elif kind_e == "relax":
            run.relax(co, sizes[i_relax], 1)
            i_relax += 1
        else:
            run.echo()
            if gre:
                echo_pulse.append(e[1])
    cos_sin: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    if gre:
        ph = phase_rad[torch.tensor(echo_pulse, dtype=torch.long, device=phase_rad.device)]
        cos_sin = (torch.cos(ph).unsqueeze(1), torch.sin(ph).unsqueeze(1))
    return ops.readout(run.f0[:, 0], run.f0[:, 1], *cos_sin).T  # [B, n_echoes]


@_flush_denormals()
def run_program(
    program: _Program,
    p: dict[str, torch.Tensor],
    start: torch.Tensor | None,
    events: list[tuple[Any, ...]] | None = None,
    prune: bool = True,
    offsets: tuple[int, int] = (0, 0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`epgx.blocks._Program.run` without derivatives (same arguments and results)."""
    from epgx.engine import _relax_kwargs

    events = program.events if events is None else events
    mt = program.kind == "mt"
    b1 = p["b1"]
    relax_kw = _relax_kwargs(program.kind, p)
    if start is None:
        m0 = torch.stack([1 - p["f"], p["f"]]) if program.kind != "single" else torch.ones_like(b1)[None]
        start = ops.equilibrium(m0, 1)
    sizes = program.sizes(events, prune)
    intervals = list(dict.fromkeys(float(e[1]) for e in events if e[0] == "relax"))
    n_int, b = max(len(intervals), 1), b1.shape[0]
    # every (interval, spin) pair in one vectorised call, as the fused kernel's tables
    kw: dict[str, Any] = {
        k: v.repeat(n_int) if isinstance(v, torch.Tensor) else v for k, v in relax_kw.items()
    }
    dt = torch.tensor(intervals or [0.0], dtype=torch.float64, device=b1.device)
    op = ops.relaxation(dt.to(program.dtype).repeat_interleave(b), **kw)
    pulse_deg = [e[2] for e in events if e[0] == "rf"]
    real = (
        op.xt_im is None
        and _multiple_of_180(torch.tensor(pulse_deg, dtype=torch.float64))
        and not any(e[0] == "rotate" for e in events)
        and _real_start(start)
    )
    n_echoes = sum(1 for e in events if e[0] == "echo")
    run = _Runner(start, max(sizes, default=1), mt=mt, real=real, n_echoes=n_echoes)
    coefs = {t: _Coefs(op, run.n_pools, run.n_tr, n_int, k) for k, t in enumerate(intervals)}
    n_rf = program.flip_rad.shape[0]
    n_demod = program.demod[0].shape[0]
    shared = not bool((b1 != b1[0]).any())
    mats = None
    if shared and n_rf:
        mats = _local(ops.rf_matrix(program.flip_rad * b1[0], program.phase_rad), run.planes)
    i_rf, i_echo = offsets
    i_relax = 0
    demod: list[int] = []
    for e in events:
        kind = e[0]
        if kind == "rf":
            j = i_rf % n_rf  # rotated steady-state runs wrap around the period
            i_rf += 1
            if mats is not None:
                mat = mats[j]
            else:
                full = ops.rf_matrix(program.flip_rad[j] * b1, program.phase_rad[j])
                mat = _local(full, run.planes).permute(1, 2, 0).contiguous()  # [C, C, B]
            sat = ops.mt_saturation(program.energy[j], p["mt_lineshape_us"], b1) if mt else None
            run.rf(mat, sat)
        elif kind == "relax":
            run.relax(coefs[float(e[1])], sizes[i_relax], int(e[2]))
            i_relax += 1
        elif kind == "echo":
            run.echo()
            demod.append(i_echo % n_demod)
            i_echo += 1
        elif kind == "spoil":
            run.spoil()
        elif kind == "invert":
            run.spoil()
            scale = b1.new_full((program.n_pools, b1.shape[0]), -float(e[1]))
            if mt:
                energy = torch.as_tensor(float(e[2]), dtype=program.dtype)
                scale[1] = ops.mt_saturation(energy, p["mt_lineshape_us"], b1)
            run.scale_z(scale)
        elif kind == "rotate":
            run.rotate(float(e[1]) * math.pi / 180)
    final = run.final()
    if not demod:
        return final.new_zeros(final.shape[-1], 0).to(_complex(program.dtype)), final
    d = torch.tensor(demod, dtype=torch.long, device=b1.device)
    c, s = program.demod[0][d].unsqueeze(1), program.demod[1][d].unsqueeze(1)
    return ops.readout(run.f0[:, 0], run.f0[:, 1], c, s).T, final


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64
