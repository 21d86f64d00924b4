"""Ready sequences (signal models), each a function of ``(tissue, **protocol)``.

Every model takes a :class:`~epgx.Tissue` batch of any shape and kind (single pool, BM,
MT; B1 and off-resonance maps through ``tissue.b1`` / ``tissue.df_hz``) and returns the
complex signal ``[*tissue.shape, n_readouts]`` (i·F₀ at each readout, M0 = 1). Defaults
follow the cited paper's protocol; where a paper does not tabulate its schedule, the
docstring says what is reconstructed. Timings are in ms, angles in degrees.

Trains that are a plain FSE/GRE (``fse``, ``mese``, ``spgr`` with TE = 0) run on the
general engines and so on the fused whole-train kernel on CUDA (``backend``); the others
are block sequences (:mod:`epgx.blocks`), which run in the fused block-sequence kernel
(:mod:`epgx.kernels.epg_program`) on CUDA and on the pure-torch engine otherwise or when
derivatives are taken.

``MODELS`` maps each model's name to its function (for :mod:`epgx.dictionary` and the CLI).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from epgx import engine
from epgx.blocks import (
    Block,
    Delay,
    FseReadout,
    GreReadout,
    Inversion,
    Spoiler,
    _time,
    hard_pulse_b1sq_tau_ut2ms,
    simulate,
)
from epgx.engine import _check_tissue
from epgx.tissue import Tissue

# Rectangular-pulse durations used only to give MT tissue its bound-pool saturation.
GRE_PULSE_MS = 0.5
FSE_PULSE_MS = 1.0


def _energy(flip_deg: Any, pulse_ms: float) -> Any:
    """∫B1² dt of hard pulses of ``flip_deg`` (detached: saturation is not differentiated)."""
    flips = flip_deg.detach() if isinstance(flip_deg, torch.Tensor) else flip_deg
    e = hard_pulse_b1sq_tau_ut2ms(flips, pulse_ms)
    return float(e) if e.ndim == 0 else e


def _flips(name: str, value: Any) -> Any:
    """Flip angles as given (tensors keep autograd history), checked finite and >= 0."""
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float64)
    values = t.detach()
    if values.ndim > 1 or values.numel() == 0:
        raise ValueError(f"{name} must be a number or a 1-D sequence; got shape {tuple(values.shape)}.")
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0 degrees; got {values.tolist()}.")
    return value


def _count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}.")
    return value


def _ms(name: str, value: Any, *, positive: bool = True) -> float:
    """A timing argument in ms, finite and > 0 (``positive=False``: >= 0)."""
    return _time(name, value, positive=positive)


def _times(name: str, value: Any) -> list[float]:
    values = torch.as_tensor(value, dtype=torch.float64).reshape(-1).tolist()
    if not values:
        raise ValueError(f"{name} must hold at least one time.")
    return [_ms(name, v, positive=False) for v in values]


# ---------------------------------------------------------------------------------------
# Spoiled and balanced gradient echo
# ---------------------------------------------------------------------------------------


def spgr(
    tissue: Tissue,
    *,
    flip_deg: Any = 15.0,
    tr_ms: float = 10.0,
    te_ms: float = 0.0,
    n_pulses: int = 200,
    spoiling: str = "rf",
    rf_increment_deg: float = 117.0,
    kmax: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Spoiled gradient echo (SPGR/FLASH) train from equilibrium, every pulse read out.

    RF spoiling with the 117° quadratic increment (Zur et al., MRM 1991;21:251); with
    ``spoiling="ideal"`` the train approaches the Ernst steady state
    sin α (1 − E1) / (1 − cos α E1) (times exp(−TE/T2)).

    Args:
        tissue: the tissue batch.
        flip_deg: flip angle, degrees, or one per pulse.
        tr_ms: repetition time, ms.
        te_ms: echo time after each pulse, ms (< TR). TE = 0 with RF or FISP spoiling
            runs on :func:`epgx.gre` (and the fused kernel on CUDA).
        n_pulses: pulses when ``flip_deg`` is a number.
        spoiling: ``"rf"``, ``"fisp"``, ``"ideal"`` (see :class:`~epgx.blocks.GreReadout`).
        rf_increment_deg: RF-spoiling increment, degrees.
        kmax: None keeps every order that can still refocus (exact); an int keeps
            orders 0..kmax (EPG-X's ``kmax``, approximate).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (TE = 0, RF/FISP spoiling only).

    Returns:
        complex ``[*tissue.shape, n_pulses]``.
    """
    _check_tissue(tissue)
    flip_deg = _flips("flip_deg", flip_deg)
    n = _count("n_pulses", n_pulses)
    te = _ms("te_ms", te_ms, positive=False)
    if spoiling not in ("rf", "fisp", "ideal"):
        raise ValueError(f"spgr spoiling must be 'rf', 'fisp' or 'ideal'; got {spoiling!r}.")
    flips = flip_deg if torch.as_tensor(flip_deg).ndim == 1 else torch.as_tensor(flip_deg).expand(n)
    if te == 0 and spoiling != "ideal":
        phases = engine.rf_spoiling_phases_deg(flips.shape[0], rf_increment_deg) if spoiling == "rf" else 0.0
        energy = _energy(flips, GRE_PULSE_MS) if tissue.kind == "mt" else None
        return cast(
            torch.Tensor, engine.gre(tissue, flips, tr_ms, phases, energy, kmax=kmax, backend=backend)
        )
    readout = GreReadout(
        flip_deg=flips,
        tr_ms=tr_ms,
        te_ms=te,
        spoiling=spoiling,
        rf_increment_deg=rf_increment_deg,
        b1sq_tau_ut2ms=_energy(flips, GRE_PULSE_MS),
    )
    return simulate(tissue, [readout], kmax=kmax, backend=backend)


def vfa(
    tissue: Tissue,
    *,
    flip_deg: Sequence[float] = (2.0, 5.0, 10.0, 15.0, 20.0),
    tr_ms: float = 15.0,
    te_ms: float = 0.0,
    spoiling: str = "ideal",
    n_dummy: int = 500,
    backend: str = "auto",
) -> torch.Tensor:
    """Variable-flip-angle SPGR (DESPOT1; Deoni et al., MRM 2003;49:515): the steady state
    at each flip angle.

    ``spoiling="ideal"`` gives the exact Ernst steady state (solved, no dummy pulses);
    ``"rf"`` runs ``n_dummy`` RF-spoiled pulses per angle and reads the last (RF spoiling
    has no exact periodic steady state).

    Returns:
        complex ``[*tissue.shape, n_flips]``.
    """
    _check_tissue(tissue)
    angles = torch.as_tensor(_flips("flip_deg", flip_deg), dtype=torch.float64).reshape(-1)
    _ms("tr_ms", tr_ms)
    te = _ms("te_ms", te_ms, positive=False)
    if spoiling not in ("rf", "ideal"):
        raise ValueError(f"vfa spoiling must be 'rf' or 'ideal'; got {spoiling!r}.")
    out = []
    for i in range(angles.shape[0]):
        a = flip_deg[i] if isinstance(flip_deg, torch.Tensor) else float(angles[i])
        if spoiling == "ideal":
            readout = GreReadout(
                flip_deg=a,
                tr_ms=tr_ms,
                n_pulses=1,
                te_ms=te,
                spoiling="ideal",
                b1sq_tau_ut2ms=_energy(a, GRE_PULSE_MS),
            )
            out.append(simulate(tissue, [readout], steady_state=True, backend=backend)[..., 0])
        else:
            n = _count("n_dummy", n_dummy)
            train = spgr(
                tissue, flip_deg=a, tr_ms=tr_ms, te_ms=te, n_pulses=n, spoiling="rf", backend=backend
            )
            out.append(train[..., -1])
    return torch.stack(out, dim=-1)


@dataclass(frozen=True)
class _BalancedPeriod(Block):
    """One TR of a phase-cycled bSSFP in the frame that follows the RF phase: pulse at 0°,
    echo at TE, free precession to TR, then the frame turns by the phase increment."""

    flip_deg: Any
    tr_ms: float
    te_ms: float
    increment_deg: float
    b1sq_tau_ut2ms: float

    def events(self) -> list[tuple[Any, ...]]:
        ev: list[tuple[Any, ...]] = [("rf", self.flip_deg, 0.0, self.b1sq_tau_ut2ms)]
        if self.te_ms > 0:
            ev.append(("relax", self.te_ms, 0))
        ev += [("echo", 0.0), ("relax", self.tr_ms - self.te_ms, 0), ("rotate", self.increment_deg)]
        return ev


def bssfp(
    tissue: Tissue,
    *,
    flip_deg: Any = 50.0,
    tr_ms: float = 5.0,
    te_ms: float | None = None,
    phase_increment_deg: Sequence[float] = (180.0,),
    backend: str = "auto",
) -> torch.Tensor:
    """Balanced SSFP steady state for each RF phase increment (phase-cycled bSSFP).

    The exact steady state of the Bloch(-McConnell) equations with relaxation, exchange
    and off-resonance (``tissue.df_hz``) for ideal instantaneous pulses (Freeman & Hill,
    JMR 1971;4:366; Scheffler & Hennig, MRM 2003;49:395), solved, not approached by dummy
    pulses. Increment 180° is the usual alternating ±α train; 0°, 90°, 270° give the other
    frames of a phase-cycled acquisition. The signal is demodulated by the pulse phase.

    Args:
        flip_deg: flip angle, degrees.
        tr_ms: repetition time, ms.
        te_ms: echo time, ms (default TR/2, the balanced echo), in [0, TR).
        phase_increment_deg: RF phase increments, degrees, one steady state each.

    Returns:
        complex ``[*tissue.shape, n_increments]``.
    """
    _check_tissue(tissue)
    _flips("flip_deg", flip_deg)
    tr = _ms("tr_ms", tr_ms)
    te = tr / 2 if te_ms is None else _ms("te_ms", te_ms, positive=False)
    if te >= tr:
        raise ValueError(f"te_ms ({te}) must be shorter than tr_ms ({tr}).")
    increments = torch.as_tensor(phase_increment_deg, dtype=torch.float64).reshape(-1).tolist()
    if not increments:
        raise ValueError("phase_increment_deg must hold at least one increment.")
    energy = _energy(flip_deg, GRE_PULSE_MS)
    out = [
        simulate(
            tissue,
            [_BalancedPeriod(flip_deg, tr, te, float(inc), energy)],
            steady_state=True,
            backend=backend,
        )[..., 0]
        for inc in increments
    ]
    return torch.stack(out, dim=-1)


def ir(
    tissue: Tissue,
    *,
    ti_ms: Sequence[float] = (50.0, 400.0, 1100.0, 2500.0),
    tr_ms: float = 2550.0,
    flip_deg: float = 90.0,
    efficiency: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Inversion recovery: adiabatic inversion, TI, a (B1-scaled) excitation read at once,
    spoiling, in the periodic steady state of repetition time ``tr_ms``.

    Defaults: the TIs and TR of the IR reference protocol of Barral et al., MRM
    2010;64:1057. With ideal pulses S = 1 − (1 + eff)·e^{−TI/T1} + eff·e^{−TR/T1}·…
    (exactly: the steady state with Mz = 0 after the 90°).

    Args:
        ti_ms: inversion times, ms (each < ``tr_ms``).
        tr_ms: time from one inversion to the next, ms.
        flip_deg: excitation flip angle, degrees.
        efficiency: inversion efficiency in [0, 1].

    Returns:
        complex ``[*tissue.shape, n_ti]``.
    """
    _check_tissue(tissue)
    tis = _times("ti_ms", ti_ms)
    tr = _ms("tr_ms", tr_ms)
    for ti in tis:
        if ti >= tr:
            raise ValueError(f"every TI must be shorter than tr_ms ({tr}); got TI {ti} ms.")
    out = []
    for ti in tis:
        seq = [
            Inversion(efficiency),
            Delay(ti),
            GreReadout(
                flip_deg=flip_deg,
                tr_ms=tr - ti,
                n_pulses=1,
                spoiling="ideal",
                b1sq_tau_ut2ms=_energy(flip_deg, GRE_PULSE_MS),
            ),
        ]
        out.append(simulate(tissue, seq, steady_state=True, backend=backend)[..., 0])
    return torch.stack(out, dim=-1)


# ---------------------------------------------------------------------------------------
# Magnetisation-prepared rapid gradient echo
# ---------------------------------------------------------------------------------------


def _rage_shot(
    ti_ms: Sequence[float],
    tr_ms: float,
    flips_deg: Sequence[Any],
    esp_ms: float,
    n_readouts: int,
    te_ms: Any,
    efficiency: float,
    spoiling: str,
) -> list[Block]:
    """One MP(2)RAGE shot: inversion, then a GRE block centred (k-space centre = pulse
    n_readouts // 2) at each TI, then recovery to the next inversion."""
    n = _count("n_readouts", n_readouts)
    esp = _ms("esp_ms", esp_ms)
    tr = _ms("tr_ms", tr_ms)
    before = (n // 2) * esp
    blocks: list[Block] = [Inversion(efficiency)]
    t = 0.0
    for ti, flip in zip(ti_ms, flips_deg, strict=True):
        start = _ms("ti_ms", ti) - before
        if start < t - 1e-9:
            raise ValueError(
                f"TI {ti} ms leaves no room for the GRE block before it: it must be >= "
                f"{t + before:.6g} ms (previous block end + {n // 2} readouts x {esp} ms)."
            )
        blocks.append(Delay(max(start - t, 0.0)))
        _flips("flip_deg", flip)
        blocks.append(
            GreReadout(
                flip_deg=flip,
                tr_ms=esp,
                n_pulses=n,
                te_ms=te_ms,
                spoiling=spoiling,
                b1sq_tau_ut2ms=_energy(flip, GRE_PULSE_MS),
            )
        )
        t = start + n * esp
    if t > tr + 1e-9:
        raise ValueError(
            f"tr_ms ({tr}) is shorter than the shot: the last GRE block ends {t:.6g} ms after the inversion."
        )
    blocks.append(Delay(max(tr - t, 0.0)))
    return blocks


def mprage(
    tissue: Tissue,
    *,
    ti_ms: float = 900.0,
    tr_ms: float = 2300.0,
    flip_deg: float = 9.0,
    esp_ms: float = 7.0,
    n_readouts: int = 176,
    te_ms: float = 2.98,
    efficiency: float = 1.0,
    spoiling: str = "rf",
    backend: str = "auto",
) -> torch.Tensor:
    """MPRAGE (Mugler & Brookeman, MRM 1990;15:152) in its periodic steady state.

    Per shot: adiabatic inversion; the RF-spoiled GRE block (``n_readouts`` pulses
    ``esp_ms`` apart) with its centre pulse (index ``n_readouts // 2``, the k-space centre
    of a linear partition order) at ``ti_ms``; recovery to ``tr_ms``. Defaults: the 3 T
    ADNI protocol (Jack et al., JMRI 2008;27:685: TR 2300 ms, TI 900 ms, 9°, TE 2.98 ms;
    176 partitions; echo spacing 7 ms assumed).

    Returns:
        complex ``[*tissue.shape, n_readouts]``: every readout of the steady-state shot.
    """
    _check_tissue(tissue)
    seq = _rage_shot([ti_ms], tr_ms, [flip_deg], esp_ms, n_readouts, te_ms, efficiency, spoiling)
    return simulate(tissue, seq, steady_state=True, backend=backend)


def mp2rage(
    tissue: Tissue,
    *,
    ti_ms: Sequence[float] = (700.0, 2500.0),
    tr_ms: float = 5000.0,
    flip_deg: Sequence[float] = (4.0, 5.0),
    esp_ms: float = 7.0,
    n_readouts: int = 160,
    te_ms: float = 0.0,
    efficiency: float = 0.96,
    spoiling: str = "rf",
    backend: str = "auto",
) -> torch.Tensor:
    """MP2RAGE (Marques et al., NeuroImage 2010;49:1271): two GRE blocks per inversion.

    Defaults: the 3 T protocol of Marques et al. 2010 (MP2RAGE TR 5000 ms, TI 700/2500
    ms, α 4°/5°, inversion efficiency 0.96; 160 partitions, echo spacing 7 ms assumed).
    Combine the two images with :func:`mp2rage_uni`.

    Returns:
        complex ``[*tissue.shape, 2 * n_readouts]``: the first block's readouts, then the
        second's, in the periodic steady state.
    """
    _check_tissue(tissue)
    if len(ti_ms) != 2 or len(flip_deg) != 2:
        raise ValueError(
            f"mp2rage needs two TIs and two flip angles; got ti_ms={ti_ms!r}, flip_deg={flip_deg!r}."
        )
    seq = _rage_shot(ti_ms, tr_ms, flip_deg, esp_ms, n_readouts, te_ms, efficiency, spoiling)
    return simulate(tissue, seq, steady_state=True, backend=backend)


def mp2rage_uni(signal: torch.Tensor, n_readouts: int) -> torch.Tensor:
    """The MP2RAGE uniform image Re(S1* S2)/(|S1|² + |S2|²) at the k-space centres, in
    [−0.5, 0.5] (Marques et al. 2010, eq. 3), from :func:`mp2rage`'s output."""
    if signal.shape[-1] != 2 * n_readouts:
        raise ValueError(
            f"signal has {signal.shape[-1]} readouts; mp2rage gives 2 x n_readouts = {2 * n_readouts}."
        )
    s1, s2 = signal[..., n_readouts // 2], signal[..., n_readouts + n_readouts // 2]
    return (s1.conj() * s2).real / (s1.abs() ** 2 + s2.abs() ** 2)


def memprage(
    tissue: Tissue,
    *,
    te_ms: Sequence[float] = (1.64, 3.5, 5.36, 7.22),
    t2star_ms: Any = None,
    ti_ms: float = 1200.0,
    tr_ms: float = 2530.0,
    flip_deg: float = 7.0,
    esp_ms: float = 9.0,
    n_readouts: int = 176,
    efficiency: float = 1.0,
    spoiling: str = "rf",
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-echo MPRAGE (van der Kouwe et al., NeuroImage 2008;40:559): several gradient
    echoes after every pulse, with T2* decay between them.

    The EPG decays transverse states with T2; the reversible part of T2* is applied to
    each echo as exp(−TE·(1/T2* − 1/T2)), so echo ratios within a TR are exp(−ΔTE/T2*)
    (times the off-resonance phase of ``tissue.df_hz``). Defaults: the paper's 3 T
    protocol (TR 2530 ms, TI 1200 ms, 7°, four echoes 1.64–7.22 ms; 176 partitions, echo
    spacing 9 ms assumed).

    Args:
        te_ms: increasing echo times after each pulse, ms.
        t2star_ms: T2* per tissue (broadcasts with the batch), ms, <= T2 of the free
            pool; None means T2* = T2.

    Returns:
        complex ``[*tissue.shape, n_readouts * n_echoes]``, echo index fastest.
    """
    _check_tissue(tissue)
    tes = _times("te_ms", te_ms)
    seq = _rage_shot([ti_ms], tr_ms, [flip_deg], esp_ms, n_readouts, tes, efficiency, spoiling)
    signal = simulate(tissue, seq, steady_state=True, backend=backend)
    if t2star_ms is None:
        return signal
    t2s = torch.as_tensor(t2star_ms, dtype=tissue.dtype, device=tissue.device)
    t2 = tissue.t2_ms
    if not bool(torch.isfinite(t2s.detach()).all()) or bool((t2s.detach() <= 0).any()):
        raise ValueError(f"t2star_ms must be finite and > 0 ms; got {t2s.detach().tolist()}.")
    if bool((t2s.detach() > t2.detach() * (1 + 1e-12)).any()):
        raise ValueError("t2star_ms must not exceed the tissue's T2 (T2* includes T2).")
    r2prime = (1 / t2s - 1 / t2).unsqueeze(-1)  # [*batch, 1], 1/ms
    te = torch.tensor(tes, dtype=tissue.dtype, device=tissue.device).repeat(n_readouts)
    return signal * torch.exp(-te * r2prime)


# ---------------------------------------------------------------------------------------
# Spin echo
# ---------------------------------------------------------------------------------------


def t2w_vfa_schedule_deg(etl: int = 64, min_deg: float = 60.0, end_deg: float = 120.0) -> torch.Tensor:
    """A variable refocusing flip-angle schedule for long T2-weighted FSE trains.

    TRAPS-like (Hennig et al., MRM 2003;49:527; Busse et al., MRM 2006;55:1030): the
    first pulse at (180° + ``min_deg``)/2 (Alsop's pseudo-steady-state start, MRM
    1997;37:176), a cosine descent to ``min_deg`` over the first quarter of the train, a
    plateau, and a cosine rise to ``end_deg`` over the last quarter. The published
    schedules are signal-prescribed per protocol; this one is of the same form.

    Returns:
        ``[etl]`` float64 flip angles, degrees.
    """
    etl = _count("etl", etl, 4)
    q = max(etl // 4, 1)
    i = torch.arange(etl, dtype=torch.float64)
    start = (180.0 + min_deg) / 2
    flips = torch.full((etl,), float(min_deg), dtype=torch.float64)
    down = i < q
    flips[down] = min_deg + (start - min_deg) * 0.5 * (1 + torch.cos(math.pi * i[down] / q))
    up = i >= etl - q
    frac = (i[up] - (etl - q) + 1) / q
    flips[up] = min_deg + (end_deg - min_deg) * 0.5 * (1 - torch.cos(math.pi * frac))
    return flips


def fse(
    tissue: Tissue,
    *,
    refocusing_deg: Any = None,
    esp_ms: float = 4.0,
    etl: int = 64,
    excitation_deg: float = 90.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Variable-flip-angle T2-weighted fast spin echo (one train from equilibrium).

    Defaults: ETL 64, ESP 4 ms, the :func:`t2w_vfa_schedule_deg` refocusing schedule.
    Runs on :func:`epgx.fse` (and the fused kernel on CUDA).

    Returns:
        complex ``[*tissue.shape, etl]``.
    """
    _check_tissue(tissue)
    refoc = t2w_vfa_schedule_deg(_count("etl", etl, 4)) if refocusing_deg is None else refocusing_deg
    return _fse_train(tissue, refoc, esp_ms, etl if refocusing_deg is None else None, excitation_deg, backend)


def mese(
    tissue: Tissue,
    *,
    esp_ms: float = 10.0,
    etl: int = 32,
    refocusing_deg: Any = 180.0,
    excitation_deg: float = 90.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-echo spin echo (CPMG) for T2 mapping: nominal 180° refocusing whose B1 errors
    feed stimulated echoes (the EPG model of Lebel & Wilman, MRM 2010;64:1005).

    Defaults: 32 echoes, ESP 10 ms. Runs on :func:`epgx.fse` (and the fused kernel).

    Returns:
        complex ``[*tissue.shape, etl]``.
    """
    _check_tissue(tissue)
    return _fse_train(tissue, refocusing_deg, esp_ms, etl, excitation_deg, backend)


def _fse_train(
    tissue: Tissue, refocusing_deg: Any, esp_ms: float, etl: int | None, excitation_deg: float, backend: str
) -> torch.Tensor:
    refoc = _flips("refocusing_deg", refocusing_deg)
    r = refoc if isinstance(refoc, torch.Tensor) else torch.as_tensor(refoc, dtype=torch.float64)
    if r.ndim == 0:
        r = r.expand(_count("etl", etl))
    elif etl is not None and r.shape[0] != etl:
        raise ValueError(f"refocusing_deg has {r.shape[0]} angles but etl is {etl}.")
    flips = torch.cat([torch.as_tensor([float(excitation_deg)], dtype=r.dtype, device=r.device), r])
    energy = _energy(flips, FSE_PULSE_MS) if tissue.kind == "mt" else None
    return cast(torch.Tensor, engine.fse(tissue, flips, esp_ms, 0.0, energy, backend=backend))


def t1t2_shuffling(
    tissue: Tissue,
    *,
    recovery_ms: Sequence[float] = (800.0, 1200.0, 1600.0, 2000.0),
    etl: int = 80,
    esp_ms: float = 5.6,
    refocusing_deg: Any = None,
    backend: str = "auto",
) -> torch.Tensor:
    """T1-T2 shuffling (Tamir et al., T2 shuffling, MRM 2017;77:180, with variable
    recovery times for T1 sensitivity): FSE trains, each followed by a spoiler and its
    own recovery time, in the periodic steady state of the whole cycle.

    Defaults: ETL 80, ESP 5.6 ms, the :func:`t2w_vfa_schedule_deg` schedule, four
    recovery times 800–2000 ms (from the end of a train to the next excitation).

    Returns:
        complex ``[*tissue.shape, n_trains * etl]``, train by train.
    """
    _check_tissue(tissue)
    recs = _times("recovery_ms", recovery_ms)
    etl = _count("etl", etl)
    refoc = t2w_vfa_schedule_deg(etl) if refocusing_deg is None else _flips("refocusing_deg", refocusing_deg)
    energy = _energy(180.0, FSE_PULSE_MS)
    seq: list[Block] = []
    for rec in recs:
        seq += [FseReadout(refoc, esp_ms, etl=etl, b1sq_tau_ut2ms=energy), Spoiler(), Delay(rec)]
    return simulate(tissue, seq, steady_state=True, backend=backend)


# ---------------------------------------------------------------------------------------
# MR fingerprinting
# ---------------------------------------------------------------------------------------


def fisp_mrf_schedule(n_pulses: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """A FISP-MRF schedule of the form of Jiang et al., MRM 2015;74:1621 (Fig. 1).

    Flip angles: consecutive half-sine lobes of 250 pulses peaking at 70°, 40°, 60°, 25°
    (plus a 5° floor); TR: a smooth pseudo-random (sum of incommensurate sines) variation
    in 11.5–14.5 ms. The published schedule is not tabulated; this is of the same form
    and deterministic.

    Returns:
        (flip_deg ``[n_pulses]``, tr_ms ``[n_pulses]``), float64.
    """
    n = _count("n_pulses", n_pulses)
    i = torch.arange(n, dtype=torch.float64)
    lobe = 250
    peaks = torch.tensor([70.0, 40.0, 60.0, 25.0], dtype=torch.float64)
    peak = peaks[(i // lobe).long() % peaks.numel()]
    flips = 5.0 + (peak - 5.0) * torch.sin(math.pi * (i % lobe) / lobe)
    wobble = torch.sin(2 * math.pi * i / 173.0) + 0.5 * torch.sin(2 * math.pi * i / 61.3 + 1.0)
    tr = 13.0 + 1.5 * wobble / 1.5
    return flips, tr


def fisp_mrf(
    tissue: Tissue,
    *,
    flip_deg: Any = None,
    tr_ms: Any = None,
    te_ms: float = 2.0,
    ti_ms: float = 40.0,
    n_pulses: int = 1000,
    kmax: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """FISP MR fingerprinting (Jiang et al., MRM 2015;74:1621): inversion, then an
    unbalanced (one dephasing order per TR) train of varying flip angle and TR.

    Defaults: :func:`fisp_mrf_schedule` (1000 pulses), TE 2 ms, TI 40 ms (inversion to
    the first pulse). ``kmax`` truncates the states at orders 0..kmax (EPG-X's ``kmax``;
    None keeps every order that can still refocus, up to ~500 here): at kmax 39 the
    default schedule's readouts (TE 0) move by ~4e-5 (M0 = 1) and a CPU dictionary is
    ~14x faster (``bench/mrf_dictionary.py``; ``tests/test_kmax_blocks.py`` pins the
    error against kmax).

    Returns:
        complex ``[*tissue.shape, n_pulses]``.
    """
    _check_tissue(tissue)
    if flip_deg is None or tr_ms is None:
        f0, t0 = fisp_mrf_schedule(n_pulses)
        flip_deg = f0 if flip_deg is None else flip_deg
        tr_ms = t0 if tr_ms is None else tr_ms
    readout = GreReadout(
        flip_deg=_flips("flip_deg", flip_deg),
        tr_ms=tr_ms,
        te_ms=te_ms,
        spoiling="fisp",
        b1sq_tau_ut2ms=_energy(flip_deg, GRE_PULSE_MS),
    )
    return simulate(
        tissue,
        [Inversion(), Delay(_ms("ti_ms", ti_ms, positive=False)), readout],
        kmax=kmax,
        backend=backend,
    )


def bssfp_mrf_schedule(n_pulses: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A bSSFP-MRF schedule of the form of Ma et al., Nature 2013;495:187 (Fig. 1).

    Flip angles: sine lobes of 250 pulses (peak 60°, then 30°, alternating) plus
    Gaussian noise of 5° SD, clipped at 0°; TR: uniformly random in 10.5–14 ms. Seeded,
    so reproducible; the published realisation is not tabulated.

    Returns:
        (flip_deg ``[n_pulses]``, tr_ms ``[n_pulses]``), float64.
    """
    n = _count("n_pulses", n_pulses)
    gen = torch.Generator().manual_seed(seed)
    i = torch.arange(n, dtype=torch.float64)
    peak = torch.where((i // 250) % 2 == 0, 60.0, 30.0)
    flips = 10.0 + peak * torch.sin(math.pi * (i % 250) / 250) ** 2
    flips = (flips + 5.0 * torch.randn(n, generator=gen, dtype=torch.float64)).clamp(min=0.0)
    tr = 10.5 + 3.5 * torch.rand(n, generator=gen, dtype=torch.float64)
    return flips, tr


def bssfp_mrf(
    tissue: Tissue,
    *,
    flip_deg: Any = None,
    tr_ms: Any = None,
    ti_ms: float = 18.0,
    n_pulses: int = 1000,
    kmax: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """bSSFP MR fingerprinting (Ma et al., Nature 2013;495:187): inversion, then a
    balanced train (RF phase alternating 0°/180°, TE = TR/2) of varying flip angle and
    TR; off-resonance (``tissue.df_hz``) shapes the fingerprint.

    Defaults: :func:`bssfp_mrf_schedule` (1000 pulses), TI 18 ms. ``kmax`` is accepted
    for a protocol shared with :func:`fisp_mrf` and changes nothing: a balanced train
    has no dephasing, so only order 0 lives.

    Returns:
        complex ``[*tissue.shape, n_pulses]``.
    """
    _check_tissue(tissue)
    if flip_deg is None or tr_ms is None:
        f0, t0 = bssfp_mrf_schedule(n_pulses)
        flip_deg = f0 if flip_deg is None else flip_deg
        tr_ms = t0 if tr_ms is None else tr_ms
    flips = _flips("flip_deg", flip_deg)
    trs = torch.as_tensor(tr_ms, dtype=torch.float64)
    n = torch.as_tensor(flips).reshape(-1).shape[0]
    if trs.ndim == 0:
        trs = trs.expand(n)
    # one readout per pulse at TE = TR/2: a block per pulse keeps each TR's own TE
    seq: list[Block] = [Inversion(), Delay(_ms("ti_ms", ti_ms, positive=False))]
    energy = _energy(flips, GRE_PULSE_MS)
    fl = flips if torch.as_tensor(flips).ndim == 1 else torch.as_tensor(flips).expand(n)
    en = energy if isinstance(energy, torch.Tensor) else torch.full((n,), energy)
    if trs.shape[0] != n:
        raise ValueError(f"tr_ms has {trs.shape[0]} values but flip_deg has {n}.")
    for j in range(n):
        tr = float(trs[j])
        seq.append(_BalancedPulse(fl[j], tr, 180.0 * (j % 2), float(en[j])))
    return simulate(tissue, seq, kmax=kmax, backend=backend)


@dataclass(frozen=True)
class _BalancedPulse(Block):
    """One pulse of a balanced train with its echo at TR/2 (phase given, demodulated)."""

    flip_deg: Any
    tr_ms: float
    phase_deg: float
    b1sq_tau_ut2ms: float

    def events(self) -> list[tuple[Any, ...]]:
        half = _ms("tr_ms", self.tr_ms) / 2
        return [
            ("rf", self.flip_deg, self.phase_deg, self.b1sq_tau_ut2ms),
            ("relax", half, 0),
            ("echo", self.phase_deg),
            ("relax", half, 0),
        ]


# ---------------------------------------------------------------------------------------
# MOLLI
# ---------------------------------------------------------------------------------------


def molli(
    tissue: Tissue,
    *,
    scheme: str = "5(3)3",
    heart_rate_bpm: float = 60.0,
    ti0_ms: float = 100.0,
    delta_ti_ms: float = 80.0,
    flip_deg: float = 35.0,
    tr_ms: float = 2.5,
    n_phase_encodes: int = 60,
    n_ramp: int = 5,
    efficiency: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """MOLLI (Messroghli et al., MRM 2004;52:141) with single-shot bSSFP readouts: the
    signal :func:`epgx.fit.molli` inverts, with the readout's real effect on the
    recovery (which the 3-parameter Look-Locker model only approximates).

    Each inversion j of the scheme (e.g. ``"5(3)3"``: 5 images, 3 rest heartbeats, 3
    images) is followed by one image per heartbeat; image i of inversion j has its
    k-space centre at TI = ``ti0_ms + j·delta_ti_ms + i·RR`` (the TIs of
    :func:`epgx.fit.molli_ti_ms`). Each readout: ``n_ramp`` pulses with linearly rising
    flip angle, then ``n_phase_encodes`` pulses of ``flip_deg``, alternating phase, TR
    ``tr_ms``, TE = TR/2, linear order (centre = the middle phase encode), then a spoiler
    (what is left in the transverse plane dephases before the next heartbeat, as on a
    scanner; without it long-T2 tissue would carry an unphysical echo across beats);
    between readouts the magnetisation relaxes freely. Defaults: a typical 1.5 T native 5(3)3
    protocol (Kellman & Hansen, JCMR 2014;16:2: 35°, TR ~2.5 ms).

    Returns:
        complex ``[*tissue.shape, n_images]``, sorted by TI (as ``molli_ti_ms``).
    """
    _check_tissue(tissue)
    if not isinstance(scheme, str) or not re.fullmatch(r"\d+(\(\d+\)\d+)*", scheme):
        raise ValueError(f"scheme must look like '5(3)3'; got {scheme!r}.")
    counts = [int(c) for c in re.sub(r"\(\d+\)", " ", scheme).split()]
    rests = [int(r) for r in re.findall(r"\((\d+)\)", scheme)]
    if not (math.isfinite(heart_rate_bpm) and heart_rate_bpm > 0):
        raise ValueError(f"heart_rate_bpm must be > 0; got {heart_rate_bpm!r}.")
    rr = 60000.0 / heart_rate_bpm
    tr = _ms("tr_ms", tr_ms)
    n_pe = _count("n_phase_encodes", n_phase_encodes)
    n_ramp = _count("n_ramp", n_ramp, 0)
    _flips("flip_deg", flip_deg)
    centre = n_ramp + n_pe // 2
    lead = centre * tr + tr / 2  # readout start to the centre echo
    window = (n_ramp + n_pe) * tr
    flips = [flip_deg * (k + 1) / (n_ramp + 1) for k in range(n_ramp)] + [flip_deg] * n_pe
    phases = [180.0 * (k % 2) for k in range(n_ramp + n_pe)]
    energies = [float(_energy(a, GRE_PULSE_MS)) for a in flips]

    # timeline: image centres at beat·RR + ti0; inversion j at its first centre − its TI
    events: list[tuple[float, str, int]] = []  # (time, what, image)
    beat, image = 0, 0
    tis = []
    for j, c in enumerate(counts):
        ti_first = _ms("ti0_ms", ti0_ms, positive=False) + j * _ms("delta_ti_ms", delta_ti_ms)
        first_centre = beat * rr + ti0_ms
        events.append((first_centre - ti_first, "invert", -1))
        for i in range(c):
            events.append(((beat + i) * rr + ti0_ms - lead, "readout", image))
            tis.append(ti_first + i * rr)
            image += 1
        beat += c + (rests[j] if j < len(rests) else 0)
    seq: list[Block] = []
    t = 0.0
    for time, what, _ in events:
        if time < t - 1e-9:
            raise ValueError(
                f"MOLLI timing overlaps: an event at {time:.1f} ms comes before the previous one ends "
                f"({t:.1f} ms). Each TI must exceed the readout's lead to its centre ({lead:.1f} ms) "
                "and each inversion must follow the previous readout: raise ti0_ms, shorten the "
                "readout (n_phase_encodes, tr_ms) or add rest heartbeats."
            )
        if time > t:
            seq.append(Delay(time - t))
            t = time
        if what == "invert":
            seq.append(Inversion(efficiency))
        else:
            seq += [_BalancedPulse(a, tr, p, e) for a, p, e in zip(flips, phases, energies, strict=True)]
            seq.append(Spoiler())
            t += window
    signal = simulate(tissue, seq, backend=backend)
    centres = torch.arange(len(tis)) * (n_ramp + n_pe) + centre
    order = torch.argsort(torch.tensor(tis, dtype=torch.float64))
    return signal[..., centres[order].to(signal.device)]


ModelFn = Callable[..., torch.Tensor]

MODELS: dict[str, ModelFn] = {
    "bssfp": bssfp,
    "bssfp_mrf": bssfp_mrf,
    "fisp_mrf": fisp_mrf,
    "fse": fse,
    "ir": ir,
    "memprage": memprage,
    "mese": mese,
    "molli": molli,
    "mp2rage": mp2rage,
    "mprage": mprage,
    "spgr": spgr,
    "t1t2_shuffling": t1t2_shuffling,
    "vfa": vfa,
}
