"""Sequence blocks: preparations, delays, spoilers and readouts that compose into sequences.

A sequence is a list of blocks run one after the other on the full EPG state of every
spin of a :class:`~epgx.Tissue` batch::

    seq = [Inversion(), Delay(600.0), GreReadout(flip_deg=8.0, tr_ms=7.0, n_pulses=160)]
    signal = simulate(tissue, seq)                     # [*tissue.shape, 160] complex
    signal = simulate(tissue, seq, steady_state=True)  # the periodic steady state

Each block lowers to a few primitive events of :mod:`epgx.ops` (pulse, relaxation over an
interval followed by a gradient shift of 0 or 1 orders, ideal spoiling, readout), in
EPG-X's operator order: relaxation/exchange, then the shift, then recovery on Z₀. Every
readout records i·F₀ (summed over pools for BM, of the free pool for MT), demodulated by
the phase of its pulse, so the output is ``[*tissue.shape, n_readouts]`` complex.

States that can no longer reach order 0 before the next readout of their segment (a
segment ends at an ideal spoiler, which every preparation ends with) are pruned, exactly
as in :func:`epgx.fse` / :func:`epgx.gre`.

``steady_state=True`` returns the periodic steady state of the sequence repeated forever,
exactly: between two spoilers the sequence is an affine map of the longitudinal state, so
P + 1 probe runs (P pools) and one small solve replace the dummy shots. Balanced sequences
without a spoiler are affine in the full 6P-dimensional order-0 state and are solved the
same way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from epgx import _dual, inplace, ops
from epgx.engine import (
    DEFAULT_CHUNK,
    _check_backend,
    _check_tissue,
    _derivative_levels,
    _relax_kwargs,
    _to_tensor,
    _use_triton,
)
from epgx.tissue import Tissue

_log = logging.getLogger("epgx")

SPOILING = ("rf", "fisp", "balanced", "ideal")


def hard_pulse_b1sq_tau_ut2ms(flip_deg: Any, duration_ms: float) -> torch.Tensor:
    """∫B1² dt of a rectangular pulse of ``flip_deg`` lasting ``duration_ms``, µT²·ms.

    B1 = α / (γ τ), so ∫B1² dt = α² / (γ² τ); used for the bound-pool saturation of MT
    tissue (:func:`epgx.ops.mt_saturation`).
    """
    if not duration_ms > 0:
        raise ValueError(f"duration_ms must be > 0 ms; got {duration_ms!r}.")
    alpha = torch.as_tensor(flip_deg, dtype=torch.float64) * (math.pi / 180)
    return alpha**2 / (ops.GAMMA_RAD_PER_MS_PER_UT**2 * duration_ms)


def _time(name: str, value: Any, *, positive: bool = False) -> float:
    """A timing argument as a float (ms), finite and >= 0 (or > 0)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of ms; got {value!r}.") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'} ms; got {value!r}.")
    return v


def _per_pulse(name: str, value: Any, n: int | None) -> tuple[Any, int]:
    """A per-pulse argument: a number (repeated) or a 1-D sequence/tensor; returns (values, n)."""
    if isinstance(value, torch.Tensor):
        t = value
    else:
        try:
            t = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"{name} must be a number or a 1-D sequence of numbers; got {value!r}."
            ) from None
    if t.ndim == 0:
        if n is None:
            n = 1
        return t.expand(n), n
    if t.ndim != 1 or t.shape[0] == 0:
        raise ValueError(f"{name} must be a number or a non-empty 1-D sequence; got shape {tuple(t.shape)}.")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} values but the readout has {n} pulses.")
    if not bool(torch.isfinite(ops.primal(t.detach())).all()):
        raise ValueError(f"{name} must be finite; got {t.tolist()}.")
    return t, int(t.shape[0])


class Block:
    """Base class of sequence blocks: lowers itself to primitive events."""

    def events(self) -> list[tuple[Any, ...]]:
        """Primitive events: ``("rf", flip_deg, phase_deg, b1sq_tau_ut2ms)``,
        ``("relax", dt_ms, shift)``, ``("spoil",)``, ``("invert", efficiency, b1sq_tau_ut2ms)``,
        ``("rotate", angle_deg)``, ``("echo", demod_phase_deg)``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Inversion(Block):
    """Adiabatic inversion: Z → −efficiency·Z in every free pool, B1-insensitive; transverse
    magnetisation and all dephased orders spoiled (a crusher follows the pulse).

    Args:
        efficiency: inversion efficiency (1 = perfect; MP2RAGE's ``eff``, Marques et al.
            2010), in [0, 1].
        b1sq_tau_ut2ms: ∫B1² dt of the pulse, µT²·ms: saturates the MT bound pool by
            exp(−W·T) (MT tissue only; 0 leaves it untouched).
    """

    efficiency: float = 1.0
    b1sq_tau_ut2ms: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.efficiency <= 1:
            raise ValueError(f"Inversion efficiency must be in [0, 1]; got {self.efficiency!r}.")
        _time("Inversion b1sq_tau_ut2ms", self.b1sq_tau_ut2ms)

    def events(self) -> list[tuple[Any, ...]]:
        return [("invert", float(self.efficiency), float(self.b1sq_tau_ut2ms))]


@dataclass(frozen=True)
class Saturation(Block):
    """Saturation: a (B1-sensitive) pulse followed by an ideal spoiler, Z → cos(b1·α)·Z.

    Args:
        flip_deg: flip angle, degrees (90 = saturation).
        b1sq_tau_ut2ms: ∫B1² dt of the pulse, µT²·ms (MT bound-pool saturation).
    """

    flip_deg: float = 90.0
    b1sq_tau_ut2ms: float = 0.0

    def events(self) -> list[tuple[Any, ...]]:
        return [("rf", self.flip_deg, 0.0, self.b1sq_tau_ut2ms), ("spoil",)]


@dataclass(frozen=True)
class Delay(Block):
    """Free relaxation (and exchange, off-resonance) for ``duration_ms``; no gradient."""

    duration_ms: float

    def __post_init__(self) -> None:
        _time("Delay duration_ms", self.duration_ms)

    def events(self) -> list[tuple[Any, ...]]:
        return [("relax", float(self.duration_ms), 0)] if self.duration_ms > 0 else []


@dataclass(frozen=True)
class Spoiler(Block):
    """Ideal crusher: every transverse state and every dephased order is destroyed; Z₀ kept."""

    def events(self) -> list[tuple[Any, ...]]:
        return [("spoil",)]


@dataclass(frozen=True)
class T2Prep(Block):
    """T2 preparation 90°ₓ–[τ–180°ᵧ–τ]ₙ–(−90°ₓ), then an ideal spoiler (Brittain et al. 1995).

    τ = te_ms / (2n); crushers around each refocusing pulse (one shift per τ) dephase what
    an imperfect 180° does not refocus. With ideal pulses Z → Z·exp(−TE/T2); B1 errors and
    T1 recovery during the preparation are simulated, not assumed away.

    Args:
        te_ms: preparation echo time, ms (> 0).
        n_refocusing: number of 180° pulses (>= 1).
        b1sq_tau_ut2ms: ∫B1² dt of each refocusing pulse, µT²·ms (MT tissue).
    """

    te_ms: float = 50.0
    n_refocusing: int = 4
    b1sq_tau_ut2ms: float = 0.0

    def __post_init__(self) -> None:
        _time("T2Prep te_ms", self.te_ms, positive=True)
        if (
            isinstance(self.n_refocusing, bool)
            or not isinstance(self.n_refocusing, int)
            or self.n_refocusing < 1
        ):
            raise ValueError(f"T2Prep n_refocusing must be an int >= 1; got {self.n_refocusing!r}.")

    def events(self) -> list[tuple[Any, ...]]:
        tau = self.te_ms / (2 * self.n_refocusing)
        ev: list[tuple[Any, ...]] = [("rf", 90.0, 0.0, self.b1sq_tau_ut2ms / 4)]
        for _ in range(self.n_refocusing):
            ev += [("relax", tau, 1), ("rf", 180.0, 90.0, self.b1sq_tau_ut2ms), ("relax", tau, 1)]
        return [*ev, ("rf", 90.0, 180.0, self.b1sq_tau_ut2ms / 4), ("spoil",)]


@dataclass(frozen=True)
class GreReadout(Block):
    """A gradient-echo readout train: per pulse, the pulse, readouts at ``te_ms`` after it,
    then the rest of its TR ending with the train's gradient.

    Spoiling: ``"rf"`` quadratic RF spoiling (increment ``rf_increment_deg``, Zur et al.
    1991) with one dephasing order per TR; ``"fisp"`` unbalanced (one order per TR,
    constant phase); ``"balanced"`` no net gradient, RF phase alternating 0°/180° (or
    incremented by ``phase_increment_deg``); ``"ideal"`` every transverse state destroyed
    at the end of each TR (the Ernst steady state). Readouts are demodulated by the pulse
    phase.

    Args:
        flip_deg: flip angle(s), degrees: a number or one per pulse (a tensor keeps its
            autograd history, for sequence optimisation).
        tr_ms: repetition time(s), ms: a number or one per pulse (> every TE).
        n_pulses: number of pulses (needed only when every argument is a number).
        te_ms: echo time(s) after each pulse, ms: one number, or an increasing list for a
            multi-echo readout (MEMPRAGE); 0 reads right after the pulse (EPG-X).
        spoiling: ``"rf"``, ``"fisp"``, ``"balanced"`` or ``"ideal"``.
        rf_increment_deg: quadratic phase increment of RF spoiling, degrees.
        phase_increment_deg: linear phase increment per pulse of a balanced train,
            degrees (180 = the usual alternation).
        b1sq_tau_ut2ms: ∫B1² dt per pulse, µT²·ms (MT tissue), a number or one per pulse.
    """

    flip_deg: Any
    tr_ms: Any
    n_pulses: int | None = None
    te_ms: Any = 0.0
    spoiling: str = "rf"
    rf_increment_deg: float = 117.0
    phase_increment_deg: float = 180.0
    b1sq_tau_ut2ms: Any = 0.0

    def __post_init__(self) -> None:
        if self.spoiling not in SPOILING:
            raise ValueError(f"GreReadout spoiling must be one of {SPOILING}; got {self.spoiling!r}.")
        n = self.n_pulses
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"GreReadout n_pulses must be an int >= 1; got {n!r}.")
        _, n = _per_pulse("GreReadout flip_deg", self.flip_deg, n)
        tr, n = _per_pulse("GreReadout tr_ms", self.tr_ms, n)
        _per_pulse("GreReadout b1sq_tau_ut2ms", self.b1sq_tau_ut2ms, n)
        te = self.echo_times_ms
        if any(b <= a for a, b in zip(te, te[1:], strict=False)):
            raise ValueError(f"GreReadout te_ms must increase; got {te}.")
        shortest = float(tr.min())
        if shortest <= te[-1]:
            raise ValueError(
                f"GreReadout tr_ms ({shortest}) must exceed the last echo time te_ms ({te[-1]})."
            )
        object.__setattr__(self, "n_pulses", n)

    @property
    def echo_times_ms(self) -> list[float]:
        """The echo times after each pulse, ms."""
        te = self.te_ms
        values = (
            [te]
            if isinstance(te, int | float)
            else list(torch.as_tensor(te, dtype=torch.float64).reshape(-1))
        )
        if not values:
            raise ValueError("GreReadout te_ms must hold at least one echo time.")
        return [_time("GreReadout te_ms", v) for v in values]

    def phases_deg(self) -> torch.Tensor:
        """RF phase of every pulse, degrees (float64; reduced modulo 360 later)."""
        assert self.n_pulses is not None
        n = torch.arange(self.n_pulses, dtype=torch.float64)
        if self.spoiling == "rf":
            return n * (n + 1) / 2 * self.rf_increment_deg
        if self.spoiling == "balanced":
            return n * self.phase_increment_deg
        return torch.zeros(self.n_pulses, dtype=torch.float64)

    def events(self) -> list[tuple[Any, ...]]:
        n = self.n_pulses
        assert n is not None
        flips, _ = _per_pulse("flip_deg", self.flip_deg, n)
        trs, _ = _per_pulse("tr_ms", self.tr_ms, n)
        energy, _ = _per_pulse("b1sq_tau_ut2ms", self.b1sq_tau_ut2ms, n)
        phases = self.phases_deg()
        te = self.echo_times_ms
        shift = 0 if self.spoiling in ("balanced", "ideal") else 1
        ev: list[tuple[Any, ...]] = []
        for j in range(n):
            phase = float(phases[j])
            ev.append(("rf", flips[j], phase, float(energy[j])))
            t = 0.0
            for te_k in te:
                if te_k > t:
                    ev.append(("relax", te_k - t, 0))
                t = te_k
                ev.append(("echo", phase))
            ev.append(("relax", float(trs[j]) - t, shift))
            if self.spoiling == "ideal":
                ev.append(("spoil",))
        return ev


@dataclass(frozen=True)
class FseReadout(Block):
    """A fast spin-echo train: excitation, ESP/2, then per refocusing pulse: pulse, ESP/2,
    echo, ESP/2 (EPG-X ``EPG_TSE`` timing, with the last ESP/2 kept so the block lasts
    (n + ½)·ESP). Refocusing pulses are at 90° to the excitation (CPMG).

    Args:
        refocusing_deg: refocusing flip angle(s), degrees: a number (with ``etl``) or one
            per echo (a tensor keeps its autograd history).
        esp_ms: echo spacing, ms (> 0).
        etl: echo-train length (needed only when ``refocusing_deg`` is a number).
        excitation_deg: excitation flip angle, degrees.
        b1sq_tau_ut2ms: ∫B1² dt of each refocusing pulse, µT²·ms (MT tissue); the
            excitation gets the fraction (excitation/refocusing)².
    """

    refocusing_deg: Any
    esp_ms: float
    etl: int | None = None
    excitation_deg: float = 90.0
    b1sq_tau_ut2ms: float = 0.0

    def __post_init__(self) -> None:
        _time("FseReadout esp_ms", self.esp_ms, positive=True)
        if self.etl is not None and (
            isinstance(self.etl, bool) or not isinstance(self.etl, int) or self.etl < 1
        ):
            raise ValueError(f"FseReadout etl must be an int >= 1; got {self.etl!r}.")
        _, n = _per_pulse("FseReadout refocusing_deg", self.refocusing_deg, self.etl)
        object.__setattr__(self, "etl", n)

    def events(self) -> list[tuple[Any, ...]]:
        refoc, n = _per_pulse("refocusing_deg", self.refocusing_deg, self.etl)
        half = self.esp_ms / 2
        ratio = (self.excitation_deg / 180.0) ** 2
        ev: list[tuple[Any, ...]] = [("rf", self.excitation_deg, 0.0, self.b1sq_tau_ut2ms * ratio)]
        ev.append(("relax", half, 1))
        for j in range(n):
            ev += [("rf", refoc[j], 90.0, self.b1sq_tau_ut2ms), ("relax", half, 1), ("echo", 0.0)]
            ev.append(("relax", half, 1))
        return ev


def duration_ms(blocks: Sequence[Block]) -> float:
    """Time a sequence of blocks takes, ms (pulses and spoilers are instantaneous)."""
    return sum(float(e[1]) for b in blocks for e in b.events() if e[0] == "relax")


def n_readouts(blocks: Sequence[Block]) -> int:
    """Number of readouts (echoes) a sequence records."""
    return sum(1 for b in blocks for e in b.events() if e[0] == "echo")


def simulate(
    tissue: Tissue,
    blocks: Sequence[Block],
    *,
    steady_state: bool = False,
    kmax: int | None = None,
    backend: str = "auto",
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Run a sequence of blocks on every spin of ``tissue``.

    Args:
        tissue: a :class:`~epgx.Tissue` batch (single, BM or MT), starting at equilibrium.
        blocks: the sequence, a list of :class:`Block` objects.
        steady_state: return the periodic steady state of the sequence repeated forever
            (exact, by solving the affine map of one period) instead of its first run
            from equilibrium. The period needs a spoiling block (inversion, saturation, T2
            prep, spoiler, an ideally spoiled readout) or must be balanced (no shifts).
        kmax: None (default) keeps every order that can still refocus: exact readouts.
            An int keeps orders 0..kmax only, as EPG-X's ``kmax`` and :func:`epgx.gre`'s
            (approximate; the state count never exceeds kmax + 1, which also bounds the
            fused kernel's registers).
        backend: ``"triton"`` runs the fused block-sequence kernel
            (:mod:`epgx.kernels.epg_program`, exact first-order derivatives) on CUDA
            tensors, or in Triton's CPU interpreter under ``TRITON_INTERPRET=1``;
            ``"torch"`` the pure-torch engine on any device; ``"auto"`` picks Triton for
            CUDA tensors unless second-order derivatives are taken, torch otherwise.
        chunk_size: spins simulated together by the torch engine (memory/cache trade-off
            only); the kernel takes every spin in one launch unless the per-spin
            propagator tables would exceed ``epg_program.TABLE_BUDGET_BYTES``.

    Returns:
        complex ``[*tissue.shape, n_readouts]``.

    Raises:
        ValueError: an empty sequence or one without readouts, a kmax that is not None or
            an int >= 0, an unknown backend, a steady state asked of a sequence that has
            no spoiler and is not balanced;
            ``backend="triton"`` where it cannot run (no CUDA device or interpreter) or for
            second-order derivatives.
    """
    _check_backend(backend)
    _check_tissue(tissue)
    _dual.decline("block sequences")  # epgx.jacobian takes its generic route, without a wasted run
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")
    if kmax is not None and (isinstance(kmax, bool) or not isinstance(kmax, int) or kmax < 0):
        raise ValueError(f"kmax must be None (exact) or an int >= 0; got {kmax!r}.")
    blocks = list(blocks)
    for b in blocks:
        if not isinstance(b, Block):
            raise TypeError(f"a sequence is a list of epgx.blocks.Block objects; got {type(b).__name__}.")
    events = [e for b in blocks for e in b.events()]
    if not any(e[0] == "echo" for e in events):
        raise ValueError("the sequence records no readout: add a GreReadout or FseReadout block.")
    flat = {k: v.reshape(-1) for k, v in tissue.fields().items()}
    flips = [e[1] for e in events if e[0] == "rf" and isinstance(e[1], torch.Tensor)]
    unsupported = (
        "second-order derivatives (derivatives of derivatives, e.g. a backward through "
        "epgx.jacobian or nested torch.func jvp/grad; the fused kernel's rules are first order)"
        if _derivative_levels([*flat.values(), *flips]) > 1
        else None
    )
    triton = _use_triton(backend, tissue.device, unsupported)
    _log.debug("epgx: block sequence on the %s engine", "fused Triton" if triton else "pure-torch")
    program = _Program(events, tissue, triton, kmax)
    n_spins = flat["t1_ms"].shape[0]
    if triton:
        from epgx.kernels.epg_program import spins_per_launch

        chunk_size = spins_per_launch(program, n_spins, 6 * tissue.n_pools + 1 if steady_state else 1)
    outs = []
    for start in range(0, n_spins, chunk_size):
        chunk = {k: v[start : start + chunk_size] for k, v in flat.items()}
        outs.append(program.steady(chunk) if steady_state else program.run(chunk, None)[0])
    return torch.cat(outs, dim=0).reshape(*tissue.shape, -1)


class _Program:
    """Primitive events with their pulse tensors and state counts, ready to run on chunks."""

    def __init__(
        self, events: list[tuple[Any, ...]], tissue: Tissue, triton: bool = False, kmax: int | None = None
    ) -> None:
        self.triton = triton  # run through the fused kernel (epgx.kernels.epg_program)
        self.kmax = kmax  # orders above kmax dropped (EPG-X truncation); None: exact
        self.kind = tissue.kind
        self.n_pools = tissue.n_pools
        dtype, device = tissue.dtype, tissue.device
        pulses = [e for e in events if e[0] == "rf"]
        self.events = events
        flips = [_to_tensor("flip_deg", e[1], dtype, device).reshape(()) for e in pulses]
        self.flip_rad = (  # [n_pulses], empty for a sequence without pulses
            torch.stack(flips) * (math.pi / 180) if flips else torch.zeros(0, dtype=dtype, device=device)
        )
        phase = torch.tensor([e[2] for e in pulses], dtype=torch.float64, device=device)
        self.phase_rad = torch.remainder(phase, 360.0).to(dtype) * (math.pi / 180)
        self.energy = torch.tensor([float(e[3]) for e in pulses], dtype=dtype, device=device)
        demod = torch.tensor([e[1] for e in events if e[0] == "echo"], dtype=torch.float64, device=device)
        demod = torch.remainder(demod, 360.0) * (math.pi / 180)
        self.demod = (torch.cos(demod).to(dtype), torch.sin(demod).to(dtype))
        self.dtype, self.device = dtype, device

    def sizes(self, events: list[tuple[Any, ...]], prune: bool) -> list[int]:
        """State count over each relaxation event: orders that can still reach 0 at a
        readout or pulse of their segment (segments end at spoiling events), or all grown
        orders; at most ``kmax + 1`` (as :func:`epgx.engine._block_sizes`)."""
        sizes: list[int] = []
        grown = 0
        for e in events:
            if e[0] in ("spoil", "invert"):
                grown = 0
            elif e[0] == "relax":
                sizes.append(grown + e[2] + 1)
                grown += e[2]
        if not prune:
            return self._cap(sizes)
        # Shifts still to come before the segment's last readout or pulse, walking back:
        # an order that reaches 0 at a pulse can become Z₀, which outlives the spoiler.
        remaining, seen_echo, i = 0, False, len(sizes)
        for e in reversed(events):
            if e[0] in ("spoil", "invert"):
                remaining, seen_echo = 0, False
            elif e[0] in ("echo", "rf"):
                seen_echo = True
            elif e[0] == "relax":
                i -= 1
                reach = remaining if seen_echo else -1
                sizes[i] = max(1, min(sizes[i] - 1, reach + e[2]) + 1)
                if seen_echo:
                    remaining += e[2]
        return self._cap(sizes)

    def _cap(self, sizes: list[int]) -> list[int]:
        """Truncate at kmax + 1 states: the counts are those after each shift, so the
        shift drops order kmax + 1 as EPG-X's ``kmax`` does."""
        return sizes if self.kmax is None else [min(n, self.kmax + 1) for n in sizes]

    def run(
        self,
        p: dict[str, torch.Tensor],
        start: torch.Tensor | None,
        events: list[tuple[Any, ...]] | None = None,
        prune: bool = True,
        offsets: tuple[int, int] = (0, 0),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``events`` (default: the whole sequence) on one chunk of spins.

        Args:
            p: flat tissue fields of the chunk, ``[B]`` each.
            start: ``[P, 6, K, B]`` start state, or None for equilibrium.
            events: the events to run (a rotation of the sequence for steady states).
            prune: drop orders that cannot reach a readout (False: keep the full state).
            offsets: sequence-wide index of the first pulse and first readout of ``events``.

        Returns:
            (complex readouts ``[B, n_readouts]``, final state ``[P, 6, K, B]``; the
            fused kernel returns its order 0 only, K = 1).
        """
        if self.triton:
            from epgx.kernels.epg_program import run_program

            return run_program(self, p, start, events, prune, offsets)
        if inplace.plain(*p.values(), self.flip_rad):  # no derivatives: the buffered event loop
            return inplace.run_program(self, p, start, events, prune, offsets)
        events = self.events if events is None else events
        mt = self.kind == "mt"
        b1 = p["b1"]
        relax_kw = _relax_kwargs(self.kind, p)
        m0 = (
            torch.stack([1 - p["f"], p["f"]]) if self.kind != "single" else torch.ones_like(b1).reshape(1, -1)
        )
        state = ops.equilibrium(m0, 1) if start is None else start
        shared_b1 = not ops.differentiated(b1) and bool((b1 == b1[0]).all())
        mats = None
        if shared_b1 and self.flip_rad.shape[0]:
            mats = ops.rf_matrix(self.flip_rad * b1[0], self.phase_rad)  # [n_pulses, 6, 6]
        ops_cache: dict[float, ops.Relaxation] = {}
        sizes = self.sizes(events, prune)
        signals: list[torch.Tensor] = []
        n_rf = self.flip_rad.shape[0]
        n_echo = self.demod[0].shape[0]
        i_rf, i_echo = offsets
        i_relax = 0
        for e in events:
            kind = e[0]
            if kind == "rf":
                j = i_rf % n_rf  # rotated steady-state runs wrap around the period
                i_rf += 1
                m = mats[j] if mats is not None else ops.rf_matrix(self.flip_rad[j] * b1, self.phase_rad[j])
                sat = ops.mt_saturation(self.energy[j], p["mt_lineshape_us"], b1) if mt else None
                state = ops.rf(state, m, bound_only_z=mt, saturation=sat)
            elif kind == "relax":
                dt = float(e[1])
                op = ops_cache.get(dt)
                if op is None:
                    op = ops_cache[dt] = ops.relaxation(dt, **relax_kw)
                state = ops.relax(ops.resize(state, sizes[i_relax]), op, with_recovery=True)
                if e[2]:
                    state = ops.shift(state, e[2])
                i_relax += 1
            elif kind == "echo":
                f0 = state[:1, :2, 0] if mt else state[:, :2, 0]  # [P, 2, B]
                c, s = self.demod[0][i_echo % n_echo], self.demod[1][i_echo % n_echo]
                i_echo += 1
                signals.append(ops.readout(f0[:, 0].sum(0), f0[:, 1].sum(0), c, s))
            elif kind == "spoil":
                state = ops.spoil(ops.resize(state, 1))
            elif kind == "invert":
                state = self._invert(ops.spoil(ops.resize(state, 1)), e[1], e[2], p)
            elif kind == "rotate":
                state = _rotate(state, e[1] * math.pi / 180)
        if not signals:
            return state.new_zeros(state.shape[-1], 0).to(_complex(self.dtype)), state
        return torch.stack(signals, dim=-1), state

    def _invert(
        self, state: torch.Tensor, efficiency: float, energy: float, p: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Adiabatic inversion of the free pools' Z; MT bound pool saturated by its energy."""
        scale = state.new_ones(self.n_pools, 1, 1, state.shape[-1])
        if self.kind == "mt":
            sat = ops.mt_saturation(torch.as_tensor(energy, dtype=self.dtype), p["mt_lineshape_us"], p["b1"])
            scale = torch.cat([scale[:1] * -efficiency, sat.reshape(1, 1, 1, -1)])
        else:
            scale = scale * -efficiency
        return state * scale

    def steady(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Readouts of the periodic steady state for one chunk, ``[B, n_readouts]``."""
        events = self.events
        cut = next((i for i, e in enumerate(events) if e[0] in ("spoil", "invert")), None)
        b = p["t1_ms"].shape[0]
        n_p = self.n_pools
        if cut is not None:
            # Start right after the first spoiling event: the state is Z₀ alone there.
            rotated = events[cut + 1 :] + events[: cut + 1]
            offsets = (
                sum(1 for e in events[: cut + 1] if e[0] == "rf"),
                sum(1 for e in events[: cut + 1] if e[0] == "echo"),
            )
            dims = n_p
            starts = [torch.zeros(n_p, 6, 1, b, dtype=self.dtype, device=self.device)]
            for d in range(dims):
                s = starts[0].clone()
                s[d, ops.Z_RE, 0] = 1.0
                starts.append(s)
            prune = True
        else:
            if any(e[0] == "relax" and e[2] for e in events):
                raise ValueError(
                    "steady_state=True needs a spoiling block (Inversion, Saturation, T2Prep, Spoiler "
                    "or an ideally spoiled readout) in the period, or a balanced sequence without "
                    "gradient shifts; simulate repeated periods instead."
                )
            rotated, offsets = events, (0, 0)
            dims = n_p * 6
            starts = [torch.zeros(n_p, 6, 1, b, dtype=self.dtype, device=self.device)]
            for d in range(dims):
                s = starts[0].clone()
                s[d // 6, d % 6, 0] = 1.0
                starts.append(s)
            prune = False
        n = len(starts)
        big = {k: v.repeat(n) for k, v in p.items()}
        start = torch.cat(starts, dim=-1)  # [P, 6, 1, n·B]: the probes side by side
        echoes, final = self.run(big, start, rotated, prune, offsets)
        echoes = echoes.reshape(n, b, -1)
        if cut is not None:
            z_end = final[:, ops.Z_RE, 0].reshape(n_p, n, b).permute(1, 2, 0)  # [n, B, P]
        else:
            z_end = ops.resize(final, 1)[:, :, 0].reshape(n_p * 6, n, b).permute(1, 2, 0)  # [n, B, 6P]
        offset = z_end[0]  # [B, D]
        a = (z_end[1:] - offset).permute(1, 2, 0)  # [B, D_out, D_in]
        eye = torch.eye(dims, dtype=self.dtype, device=self.device)
        x = torch.linalg.solve(eye - a, offset.unsqueeze(-1)).squeeze(-1)  # [B, D]
        e0 = echoes[0]
        cols = (echoes[1:] - e0).permute(1, 2, 0)  # [B, n_echo, D]
        out = e0 + torch.einsum("bed,bd->be", cols, x.to(cols.dtype))
        if cut is not None:
            head = sum(1 for e in events[: cut + 1] if e[0] == "echo")
            if head:
                out = torch.cat([out[:, -head:], out[:, :-head]], dim=-1)
        return out


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _rotate(state: torch.Tensor, angle_rad: float) -> torch.Tensor:
    """Frame rotation: F+ → F+·e^{−iθ}, stored F- → F-·e^{+iθ}, Z unchanged."""
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    fp_re, fp_im, fm_re, fm_im = (state[:, i] for i in range(4))
    planes = [fp_re * c + fp_im * s, fp_im * c - fp_re * s, fm_re * c - fm_im * s, fm_im * c + fm_re * s]
    return torch.cat([torch.stack(planes, dim=1), state[:, 4:]], dim=1)
