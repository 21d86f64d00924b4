"""The two general EPG-X engines, ``fse`` and ``gre``, with EPG-X semantics.

Both run a batched, differentiable pure-torch simulation (:mod:`epgx.ops`) over every
spin of a :class:`~epgx.Tissue` batch. Per interval the operator order is EPG-X's:
relaxation/exchange (with diffusion attenuation), then the shift, then recovery on Z₀.

States that can no longer reach order 0 before the last readout are pruned (exact for
the signal), so the state count grows and shrinks with the train; ``kmax`` truncates
instead (approximate, as EPG-X's ``kmax`` option).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

from epgx import _dual, inplace, ops
from epgx.tissue import Tissue

_log = logging.getLogger("epgx")

BACKENDS = ("auto", "torch", "triton")

# Spins per chunk: the working set of one chunk (P·6·K·chunk floats) stays in cache.
DEFAULT_CHUNK = 2048


@dataclass(frozen=True)
class Diffusion:
    """Gradient waveform of every shift interval, and the diffusion coefficient.

    The waveform is piecewise constant: ``grad_mt_per_m[j]`` for ``tau_ms[j]``; its
    total moment is one EPG order. It repeats in every interval (ESP/2 for ``fse``,
    TR for ``gre``), as EPG-X's ``diff`` struct.

    Args:
        grad_mt_per_m: gradient amplitudes, mT/m.
        tau_ms: durations of the segments, ms (> 0).
        d_um2_per_ms: diffusion coefficient, µm²/ms (1 µm²/ms = 1e-9 m²/s); a number or
            a tensor that broadcasts with the tissue batch.
        negative_orders: ``"physical"`` (default) attenuates F₋ₙ states by their own
            b-value; ``"epgx"`` reproduces EPG-X, which uses the +n value for them.
    """

    grad_mt_per_m: Any
    tau_ms: Any
    d_um2_per_ms: Any
    negative_orders: str = "physical"


@dataclass(frozen=True)
class Prep:
    """A preparation before a GRE train (EPG-X ``prep``): pulse, spoil, free recovery.

    Z of the free pool (and of pool b for BM) is multiplied by cos(b1·flip); the MT
    bound pool is saturated by exp(−W·T) of ``b1sq_tau_ut2ms``; transverse
    magnetisation is spoiled; then Z relaxes (T1 and exchange only) for ``delay_ms``.

    Args:
        flip_deg: preparation flip angle, degrees (180 = inversion, 90 = saturation).
        delay_ms: delay from the preparation to the first pulse, ms (>= 0).
        b1sq_tau_ut2ms: ∫B1² dt of the preparation pulse, µT²·ms (MT tissue only).
    """

    flip_deg: float = 180.0
    delay_ms: float = 0.0
    b1sq_tau_ut2ms: float = 0.0


@dataclass(frozen=True)
class States:
    """Full EPG states recorded at every readout (``return_states=True``).

    Attributes:
        fp: ``[*batch, P, K, n]`` complex F+ₙ.
        fm: ``[*batch, P, K, n]`` complex F-ₙ as stored (conj F₋ₙ).
        z: ``[*batch, P, K, n]`` complex Zₙ.
    """

    fp: torch.Tensor
    fm: torch.Tensor
    z: torch.Tensor


def rf_spoiling_phases_deg(n_pulses: int, increment_deg: float = 117.0) -> torch.Tensor:
    """Quadratic RF-spoiling phases φₙ = n(n−1)/2 · increment, n = 1..N (degrees).

    Same schedule as EPG-X's ``RF_phase_cycle(N, phi0)``; 117° is the classic value
    (Zur et al., MRM 1991). Returned in float64 to keep the large phases exact.
    """
    if not isinstance(n_pulses, int) or n_pulses < 1:
        raise ValueError(f"n_pulses must be a positive int, got {n_pulses!r}.")
    n = torch.arange(1, n_pulses + 1, dtype=torch.float64)
    return n * (n - 1) / 2 * increment_deg


def balanced_phases_deg(n_pulses: int) -> torch.Tensor:
    """Alternating phases 0°, 180°, 0°, … of a balanced SSFP train."""
    if not isinstance(n_pulses, int) or n_pulses < 1:
        raise ValueError(f"n_pulses must be a positive int, got {n_pulses!r}.")
    return (torch.arange(n_pulses, dtype=torch.float64) % 2) * 180.0


def fse(
    tissue: Tissue,
    flip_deg: Any,
    esp_ms: Any,
    phase_deg: Any = 0.0,
    b1sq_tau_ut2ms: Any = None,
    diffusion: Diffusion | None = None,
    *,
    kmax: int | None = None,
    z_init: Any = None,
    backend: str = "auto",
    chunk_size: int = DEFAULT_CHUNK,
    return_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, States]:
    """Fast/turbo spin-echo (CPMG or any refocusing train) echoes, EPG-X semantics.

    Timeline (EPG-X ``EPG_TSE``): excitation, ESP/2, then for each refocusing pulse:
    pulse, ESP/2, echo, ESP/2. The CPMG 90° is added to the phase of every refocusing
    pulse, so ``phase_deg=0`` gives a CPMG train. Echo n is at t = n·ESP.

    Args:
        tissue: a :class:`~epgx.Tissue` batch (single, BM or MT).
        flip_deg: ``[n_pulses]`` flip angles in degrees; ``flip_deg[0]`` is the
            excitation, the rest refocusing pulses (B1 scales all of them).
        esp_ms: echo spacing, ms (> 0).
        phase_deg: the user's RF phases in degrees, scalar or ``[n_pulses]``.
        b1sq_tau_ut2ms: ∫B1² dt per pulse, µT²·ms, scalar or ``[n_pulses]`` (the
            excitation included). Required for MT tissue, unused otherwise.
        diffusion: gradient waveform of each ESP/2 interval and D (:class:`Diffusion`).
        kmax: None (default) keeps every order that can still refocus: exact echoes.
            An int keeps orders 0..kmax only (approximate; EPG-X's TSE ``kmax`` = k
            corresponds to ``kmax=k-1`` here).
        z_init: initial Z₀ per pool (number, or ``(z_a, z_b)``) instead of equilibrium;
            recovery still goes towards equilibrium.
        backend: ``"torch"``: this pure-torch engine. ``"triton"``: the fused
            whole-train kernel (:mod:`epgx.kernels.epg_train`) for CUDA tensors or under
            ``TRITON_INTERPRET=1``, with exact first-order derivatives (autograd,
            ``torch.func`` jvp/jacfwd/jacrev/vmap); ``return_states`` runs the one-step
            kernel (:mod:`epgx.kernels.epg_step`) event by event instead; no second-order
            derivatives or diffusion yet (those raise). ``"auto"``: Triton for CUDA
            tensors when the call needs none of those, torch otherwise (logged at DEBUG
            on "epgx").
        chunk_size: spins simulated together by the torch engine (memory/cache
            trade-off only; the Triton kernel takes every spin in one launch).
        return_states: also return every state at every echo (disables pruning).

    Returns:
        complex ``[*tissue.shape, n_pulses − 1]``: i·F₀ at each echo, summed over pools
        (BM) or of the free pool (MT, not divided by 1 − f). With ``return_states``, a
        tuple ``(echoes, States)``.

    Raises:
        ValueError: bad sequence values (the message names the value and what is
            accepted), an MT tissue without ``b1sq_tau_ut2ms``, an unavailable backend.
    """
    _check_backend(backend)
    _check_tissue(tissue)
    dtype, device = tissue.dtype, tissue.device
    flip = _vector("flip_deg", flip_deg, dtype, device, min_len=2)
    n_pulses = flip.shape[0]
    phase = _phases(phase_deg, n_pulses, dtype, device)
    esp = _positive_scalar("esp_ms", esp_ms, dtype, device)
    phase = phase + torch.cat([phase.new_zeros(1), phase.new_full((n_pulses - 1,), 90.0)])
    # events: ("rf", j) | ("relax",) | ("echo",)
    events: list[tuple[Any, ...]] = [("rf", 0), ("relax",)]
    for j in range(1, n_pulses):
        events += [("rf", j), ("relax",), ("echo",)]
        if j < n_pulses - 1:
            events.append(("relax",))
    return _simulate(
        tissue,
        events,
        flip,
        phase,
        esp / 2,
        b1sq_tau_ut2ms,
        diffusion,
        kmax=kmax,
        z_init=z_init,
        prep=None,
        gre=False,
        backend=backend,
        chunk_size=chunk_size,
        return_states=return_states,
    )


def gre(
    tissue: Tissue,
    flip_deg: Any,
    tr_ms: Any,
    phase_deg: Any = 0.0,
    b1sq_tau_ut2ms: Any = None,
    diffusion: Diffusion | None = None,
    *,
    prep: Prep | None = None,
    kmax: int | None = None,
    backend: str = "auto",
    chunk_size: int = DEFAULT_CHUNK,
    return_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, States]:
    """Gradient-echo train (RF-spoiled, unbalanced/FISP or balanced), EPG-X semantics.

    Per TR (EPG-X ``EPG_GRE``): pulse, readout right after it (TE = 0), then relaxation
    over TR and one shift (the unbalanced gradient of the TR). RF spoiling or balanced
    trains come from ``phase_deg`` (see :func:`rf_spoiling_phases_deg`,
    :func:`balanced_phases_deg`); the readout is demodulated by the pulse phase.

    Args:
        tissue: a :class:`~epgx.Tissue` batch.
        flip_deg: ``[n_pulses]`` flip angles, degrees.
        tr_ms: repetition time, ms (> 0).
        phase_deg: RF phases, degrees, scalar or ``[n_pulses]``.
        b1sq_tau_ut2ms: ∫B1² dt per pulse, µT²·ms (required for MT tissue).
        diffusion: gradient waveform of each TR and D (:class:`Diffusion`).
        prep: optional :class:`Prep` (inversion or saturation and a delay).
        kmax, backend, chunk_size, return_states: as for :func:`fse`
            (EPG-X's GRE ``kmax`` = k is ``kmax=k`` here).

    Returns:
        complex ``[*tissue.shape, n_pulses]``: i·e^{−iφₙ}·F₀ right after pulse n,
        summed over pools (BM) or of the free pool (MT).
    """
    _check_backend(backend)
    _check_tissue(tissue)
    dtype, device = tissue.dtype, tissue.device
    flip = _vector("flip_deg", flip_deg, dtype, device, min_len=1)
    n_pulses = flip.shape[0]
    phase = _phases(phase_deg, n_pulses, dtype, device)
    tr = _positive_scalar("tr_ms", tr_ms, dtype, device)
    if prep is not None:
        if not isinstance(prep, Prep):
            raise TypeError(f"prep must be an epgx.Prep or None, got {type(prep).__name__}.")
        if not (math.isfinite(prep.delay_ms) and prep.delay_ms >= 0):
            raise ValueError(f"prep.delay_ms must be finite and >= 0; got {prep.delay_ms!r}.")
        if not (math.isfinite(prep.b1sq_tau_ut2ms) and prep.b1sq_tau_ut2ms >= 0):
            raise ValueError(f"prep.b1sq_tau_ut2ms must be finite and >= 0; got {prep.b1sq_tau_ut2ms!r}.")
        if not math.isfinite(prep.flip_deg):
            raise ValueError(f"prep.flip_deg must be finite; got {prep.flip_deg!r}.")
    events: list[tuple[Any, ...]] = []
    for j in range(n_pulses):
        events += [("rf", j), ("echo", j)]
        if j < n_pulses - 1:
            events.append(("relax",))
    return _simulate(
        tissue,
        events,
        flip,
        phase,
        tr,
        b1sq_tau_ut2ms,
        diffusion,
        kmax=kmax,
        z_init=None,
        prep=prep,
        gre=True,
        backend=backend,
        chunk_size=chunk_size,
        return_states=return_states,
    )


def _check_tissue(tissue: Any) -> None:
    if not isinstance(tissue, Tissue):
        raise TypeError(f"tissue must be an epgx.Tissue, got {type(tissue).__name__}.")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")


def _traced(t: torch.Tensor) -> bool:
    """Derivatives will be taken through ``t``: autograd, forward-mode AD or torch.func."""
    if t.requires_grad:
        return torch.is_grad_enabled()
    return ops.differentiated(t)


def _derivative_levels(tensors: Any) -> int:
    """How many nested derivative transforms act on ``tensors`` together.

    Counted: autograd (an input that requires grad, grad mode on), plain forward-mode AD
    (a dual tensor) and each ``torch.func`` jvp/grad level; ``vmap`` levels are not
    derivatives. Two or more means derivatives of derivatives (e.g. ``jacobian`` taken
    while the flip angles require grad).
    """
    levels: set[Any] = set()
    for t in tensors:
        while ops.is_transformed(t):
            if not torch._C._functorch.is_batchedtensor(t):
                levels.add(torch._C._functorch.maybe_get_level(t))
            t = torch._C._functorch.get_unwrapped(t)
        if t.requires_grad and torch.is_grad_enabled():
            levels.add("autograd")
        if fwAD.unpack_dual(t).tangent is not None:
            levels.add("forward_ad")
    return len(levels)


def _use_triton(backend: str, device: torch.device, unsupported: str | None) -> bool:
    """Resolve ``backend`` for one call: True runs the fused Triton kernel.

    ``auto`` picks Triton for CUDA tensors when the kernel covers the call (named by
    ``unsupported`` otherwise) and torch elsewhere; ``triton`` raises where it cannot run.
    """
    if backend == "torch":
        _log.debug("epgx: backend='torch': pure-torch engine")
        return False
    cuda = device.type == "cuda"
    if backend == "auto":
        use = cuda and unsupported is None and importlib.util.find_spec("triton") is not None
        why = "CUDA tensors" if use else (unsupported or f"tensors on {device}")
        _log.debug("epgx: backend='auto' runs the %s engine (%s)", "Triton" if use else "pure-torch", why)
        return use
    if unsupported is not None:
        raise ValueError(f"backend='triton' does not support {unsupported} yet; use backend='torch'.")
    require_triton(device, "tissue", "epg_train")
    _log.debug("epgx: backend='triton': fused whole-train kernel")
    return True


def require_triton(device: torch.device, holder: str, kernel: str) -> None:
    """Raise a ValueError unless the fused kernel module ``epgx.kernels.<kernel>`` can run
    on tensors on ``device``: CUDA, or the CPU under Triton's interpreter (TRITON_INTERPRET=1
    set before the kernels were imported). ``holder`` names the tensors in the message."""
    if importlib.util.find_spec("triton") is None:
        raise ValueError("backend='triton' needs the triton package (pip install triton); use 'torch'.")
    if device.type == "cuda":
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs the {holder} on a CUDA device (got {device}), or "
            "TRITON_INTERPRET=1 set before epgx.kernels is imported to run the kernels in "
            "Triton's CPU interpreter; use backend='torch' (or 'auto') on the CPU."
        )
    if not importlib.import_module(f"epgx.kernels.{kernel}").INTERPRETED:
        raise ValueError(
            "backend='triton' on the CPU: epgx.kernels was imported before "
            "TRITON_INTERPRET=1 was set, so its kernels are compiled for a GPU; set it "
            "before the first import, or use backend='torch'."
        )


def _to_tensor(name: str, value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise ValueError(f"{name} must be real; got a complex tensor (give phases separately).")
        t = value.to(dtype=dtype, device=device)
    else:
        try:
            t = torch.as_tensor(value, dtype=torch.float64).to(dtype=dtype, device=device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(
                f"{name} must be a number, sequence of numbers or tensor; got {value!r}."
            ) from exc
    values = ops.primal(t)
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        raise ValueError(f"{name} must be finite; got {values.reshape(-1)[bad.reshape(-1)][0].item()!r}.")
    return t


def _vector(name: str, value: Any, dtype: torch.dtype, device: torch.device, *, min_len: int) -> torch.Tensor:
    t = _to_tensor(name, value, dtype, device)
    if t.ndim != 1 or t.shape[0] < min_len:
        raise ValueError(
            f"{name} must be a 1-D sequence of at least {min_len} values; got shape {tuple(t.shape)}."
        )
    return t


def _phases(value: Any, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """RF phases, degrees, reduced modulo 360 in float64 before the cast.

    Quadratic RF spoiling reaches 10⁷ degrees within a few hundred pulses; in float32
    those would lose their fractional degrees.
    """
    t = _per_pulse("phase_deg", value, n, torch.float64, device)
    return torch.remainder(t, 360.0).to(dtype)


def _per_pulse(name: str, value: Any, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = _to_tensor(name, value, dtype, device)
    if t.ndim == 0:
        return t.expand(n)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(
            f"{name} must be a scalar or have one value per pulse ({n}); got shape {tuple(t.shape)}."
        )
    return t


def _positive_scalar(name: str, value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = _to_tensor(name, value, dtype, device)
    if t.ndim != 0:
        raise ValueError(f"{name} must be a single number; got shape {tuple(t.shape)}.")
    value = ops.primal(t).min().item()  # under vmap: the smallest of the batch
    if value <= 0:
        raise ValueError(f"{name} must be > 0 ms; got {value!r}.")
    return t


def _block_sizes(events: list[tuple[Any, ...]], limit: int | None, prune: bool) -> tuple[list[int], int]:
    """State count used over each relaxation interval.

    With s shifts done and r still to come before the last readout, an interval needs
    orders 0..min(s+1, r): higher orders can never return to order 0 in time.
    """
    total = sum(1 for e in events if e[0] == "relax")
    last_echo = max(i for i, e in enumerate(events) if e[0] == "echo")
    needed = sum(1 for e in events[:last_echo] if e[0] == "relax")
    sizes, s = [], 0
    for e in events:
        if e[0] != "relax":
            continue
        n = (min(s + 1, needed - s) if prune else s + 1) + 1
        if limit is not None:
            n = min(n, limit)
        sizes.append(max(n, 1))
        s += 1
    full = (total + 1) if limit is None else min(total + 1, limit)
    return sizes, full


def _simulate(
    tissue: Tissue,
    events: list[tuple[Any, ...]],
    flip_deg: torch.Tensor,
    phase_deg: torch.Tensor,
    dt_ms: torch.Tensor,
    b1sq_tau_ut2ms: Any,
    diffusion: Diffusion | None,
    *,
    kmax: int | None,
    z_init: Any,
    prep: Prep | None,
    gre: bool,
    backend: str,
    chunk_size: int,
    return_states: bool,
) -> torch.Tensor | tuple[torch.Tensor, States]:
    if kmax is not None and (isinstance(kmax, bool) or not isinstance(kmax, int) or kmax < 0):
        raise ValueError(f"kmax must be None (exact) or an int >= 0; got {kmax!r}.")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")
    if diffusion is not None and not isinstance(diffusion, Diffusion):
        raise TypeError(f"diffusion must be an epgx.Diffusion or None, got {type(diffusion).__name__}.")
    dtype, device = tissue.dtype, tissue.device
    n_pulses = flip_deg.shape[0]
    mt = tissue.kind == "mt"
    sat_energy = None
    if mt:
        if b1sq_tau_ut2ms is None:
            raise ValueError(
                "MT tissue needs b1sq_tau_ut2ms (∫B1² dt of each pulse, µT²·ms); pass 0 to "
                "simulate without bound-pool saturation."
            )
        sat_energy = _per_pulse("b1sq_tau_ut2ms", b1sq_tau_ut2ms, n_pulses, dtype, device)
        lowest = ops.primal(sat_energy).min().item()
        if lowest < 0:
            raise ValueError(f"b1sq_tau_ut2ms must be >= 0; got {lowest!r}.")
    limit = None if kmax is None else kmax + 1
    sizes, full = _block_sizes(events, limit, prune=not return_states)

    flat = {k: v.reshape(-1) for k, v in tissue.fields().items()}
    n_spins = flat["t1_ms"].shape[0]
    diff_d, waveform = None, None
    if diffusion is not None:
        g = _to_tensor("diffusion.grad_mt_per_m", diffusion.grad_mt_per_m, torch.float64, device).reshape(-1)
        tau = _to_tensor("diffusion.tau_ms", diffusion.tau_ms, torch.float64, device).reshape(-1)
        if g.shape != tau.shape or g.numel() == 0 or bool((ops.primal(tau) <= 0).any()):
            raise ValueError(
                "diffusion needs grad_mt_per_m and tau_ms of the same non-zero length with "
                f"tau_ms > 0; got {ops.primal(g).tolist()} and {ops.primal(tau).tolist()}."
            )
        waveform = (g, tau, diffusion.negative_orders)
        d = _to_tensor("diffusion.d_um2_per_ms", diffusion.d_um2_per_ms, dtype, device)
        lowest = ops.primal(d).min().item()
        if lowest < 0:
            raise ValueError(f"diffusion.d_um2_per_ms must be >= 0; got {lowest!r}.")
        try:
            diff_d = d.expand(tissue.shape).reshape(-1)
        except RuntimeError:
            raise ValueError(
                f"diffusion.d_um2_per_ms of shape {tuple(d.shape)} does not broadcast to the "
                f"tissue batch {tuple(tissue.shape)}."
            ) from None
    z0 = None
    if z_init is not None:
        z0 = _to_tensor("z_init", z_init, dtype, device).reshape(-1)
        if z0.shape[0] != tissue.n_pools:
            raise ValueError(f"z_init needs {tissue.n_pools} value(s) (one per pool); got {z0.shape[0]}.")

    flip_rad = flip_deg * (math.pi / 180)
    phase_rad = phase_deg * (math.pi / 180)
    inputs = (*flat.values(), flip_deg, phase_deg, dt_ms, sat_energy, z0)
    unsupported = (
        "second-order derivatives (derivatives of derivatives, e.g. a backward through "
        "epgx.jacobian or nested torch.func jvp/grad; the fused kernel's rules are first order)"
        if _derivative_levels(t for t in inputs if t is not None) > 1
        else "diffusion"
        if diffusion is not None
        else None
    )
    triton = _use_triton(backend, device, unsupported)
    if _dual.probing():  # epgx.jacobian's dual-state route (epgx/_dual.py) claims or declines
        return _dual.simulate(
            tissue,
            triton,
            return_states,
            chunk_size,
            flat,
            events,
            sizes,
            flip_rad,
            phase_rad,
            dt_ms,
            sat_energy,
            waveform,
            diff_d,
            z0,
            prep,
            gre,
        )
    # return_states on Triton: the one-step kernel, event by event (epgx.kernels.epg_step)
    steps = triton and return_states
    if triton and not steps:
        signal = _run_triton(
            tissue.kind, flat, max(sizes), flip_rad, phase_rad, dt_ms, sat_energy, z0, prep, gre
        )
        return signal.reshape(*tissue.shape, -1)
    outs: list[torch.Tensor] = []
    states: list[torch.Tensor] = []
    for start in range(0, n_spins, chunk_size):
        sl = slice(start, min(start + chunk_size, n_spins))
        chunk = {k: v[sl] for k, v in flat.items()}
        res = _run_chunk(
            tissue.kind,
            chunk,
            events,
            sizes,
            full,
            flip_rad,
            phase_rad,
            dt_ms,
            sat_energy,
            waveform,
            None if diff_d is None else diff_d[sl],
            z0,
            prep,
            gre,
            return_states,
            steps=steps,
        )
        outs.append(res[0])
        if res[1] is not None:
            states.append(res[1])
    signal = torch.cat(outs, dim=0).reshape(*tissue.shape, -1)
    if not return_states:
        return signal
    st = torch.cat(states, dim=0)  # [B, P, 3, K, n] complex
    st = st.reshape(*tissue.shape, *st.shape[1:])
    return signal, States(fp=st[..., 0, :, :], fm=st[..., 1, :, :], z=st[..., 2, :, :])


def _run_chunk(
    kind: str,
    p: dict[str, torch.Tensor],
    events: list[tuple[Any, ...]],
    sizes: list[int],
    full: int,
    flip_rad: torch.Tensor,
    phase_rad: torch.Tensor,
    dt_ms: torch.Tensor,
    sat_energy: torch.Tensor | None,
    waveform: tuple[torch.Tensor, torch.Tensor, str] | None,
    diff_d: torch.Tensor | None,
    z0: torch.Tensor | None,
    prep: Prep | None,
    gre: bool,
    return_states: bool,
    steps: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk of spins through the events: pure torch, or with ``steps`` one launch of
    the fused step kernel per pulse + interval (a pulse right before a readout alone)."""
    mt = kind == "mt"
    b1 = p["b1"]
    relax_kw = _relax_kwargs(kind, p)
    op = ops.relaxation(dt_ms, **relax_kw)

    # one shared RF matrix per pulse unless B1 varies over spins (or is differentiated)
    shared_b1 = not ops.differentiated(b1) and bool((b1 == b1[0]).all())
    if shared_b1:
        mats = ops.rf_matrix(flip_rad * b1[0], phase_rad)  # [n_pulses, 6, 6]
    sat = None
    if mt:
        assert sat_energy is not None
        sat = ops.mt_saturation(sat_energy.reshape(-1, 1), p["mt_lineshape_us"], b1)  # [n, B]

    state = _start_state(kind, p, relax_kw, z0, prep)
    if waveform is None and not return_states and inplace.plain(*p.values(), flip_rad, phase_rad, dt_ms, z0):
        # no derivatives: the buffered event loop (same operators, no per-event allocation)
        sig = inplace.run_engine_chunk(kind, state, events, sizes, op, flip_rad, phase_rad, b1, sat, gre)
        return sig, None

    weights = None
    if waveform is not None:
        assert diff_d is not None
        g, tau, negative_orders = waveform
        weights = ops.diffusion_weights(
            g, tau, diff_d, max(sizes, default=1), negative_orders=negative_orders
        )

    def step(state: torch.Tensor, relaxation: ops.Relaxation | None, j: int | None) -> torch.Tensor:
        from epgx.kernels.epg_step import epg_step

        if j is None:
            return epg_step(state, relaxation, b1, None, kind=kind)
        mt_kw = {}
        if mt:
            assert sat_energy is not None
            mt_kw = dict(mt_lineshape_us=p["mt_lineshape_us"], b1sq_tau_ut2ms=sat_energy[j])
        return epg_step(state, relaxation, b1, flip_rad[j], phase_rad[j], kind=kind, **mt_kw)

    signals, recorded = [], []
    i_relax = 0
    pending = None  # steps: the pulse waiting to be fused with the next interval
    for ev in events:
        if steps and ev[0] == "rf":
            pending = ev[1]
        elif steps and ev[0] == "relax":
            state = step(ops.resize(state, sizes[i_relax]), op, pending)
            i_relax, pending = i_relax + 1, None
        elif ev[0] == "rf":
            j = ev[1]
            m = mats[j] if shared_b1 else ops.rf_matrix(flip_rad[j] * b1, phase_rad[j])
            state = ops.rf(state, m, bound_only_z=mt, saturation=None if sat is None else sat[j])
        elif ev[0] == "relax":
            n = sizes[i_relax]
            i_relax += 1
            state = ops.resize(state, n)
            w = None if weights is None else tuple(x[:n] for x in weights)
            state = ops.shift(ops.relax(state, op, w, with_recovery=True), 1)
        else:
            if pending is not None:
                state, pending = step(state, None, pending), None
            f0 = state[:, :2, 0]  # [P, 2, B]
            f0 = f0[:1] if mt else f0
            ph = phase_rad[ev[1]] if gre else None
            cos_sin = (None, None) if ph is None else (torch.cos(ph), torch.sin(ph))
            signals.append(ops.readout(f0[:, 0].sum(0), f0[:, 1].sum(0), *cos_sin))
            if return_states:
                st = ops.resize(state, full)
                cplx = torch.complex(st[:, 0::2], st[:, 1::2])  # [P, 3, K, B]
                recorded.append(cplx.permute(3, 0, 1, 2))
    signal = torch.stack(signals, dim=-1)
    return signal, (torch.stack(recorded, dim=-1) if return_states else None)


def _relax_kwargs(kind: str, p: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Keyword arguments of :func:`ops.relaxation` for a chunk of tissue fields."""
    relax_kw: dict[str, Any] = dict(t1_ms=p["t1_ms"], t2_ms=p["t2_ms"], df_hz=p["df_hz"])
    if kind != "single":
        relax_kw.update(
            t1b_ms=p["t1b_ms"],
            f=p["f"],
            k_ab_per_ms=p["k_ab_per_s"] * 1e-3,
            transverse_b=kind != "mt",
        )
        if kind != "mt":
            relax_kw.update(t2b_ms=p["t2b_ms"], df_b_hz=p["df_b_hz"])
    return relax_kw


def _start_state(
    kind: str,
    p: dict[str, torch.Tensor],
    relax_kw: dict[str, Any],
    z0: torch.Tensor | None,
    prep: Prep | None,
) -> torch.Tensor:
    """The ``[P, 6, 1, B]`` state before the first pulse: equilibrium or ``z_init``, then ``prep``."""
    b1 = p["b1"]
    m0 = torch.stack([1 - p["f"], p["f"]]) if kind != "single" else torch.ones_like(b1).reshape(1, -1)
    state = ops.equilibrium(m0 if z0 is None else z0.reshape(-1, 1).expand_as(m0), 1)
    if prep is not None:
        state = _prepare(state, prep, p, relax_kw, b1, kind == "mt")
    return state


def _run_triton(
    kind: str,
    p: dict[str, torch.Tensor],
    n_states: int,
    flip_rad: torch.Tensor,
    phase_rad: torch.Tensor,
    dt_ms: torch.Tensor,
    sat_energy: torch.Tensor | None,
    z0: torch.Tensor | None,
    prep: Prep | None,
    gre: bool,
) -> torch.Tensor:
    """All spins through the fused whole-train kernel (:mod:`epgx.kernels.epg_train`).

    One fixed state count for the train (the largest pruned block) gives the same
    echoes as the pruned torch path. Returns complex ``[B, n_echoes]``.
    """
    from epgx.kernels.epg_train import epg_train

    relax_kw = _relax_kwargs(kind, p)
    z_start = _start_state(kind, p, relax_kw, z0, prep)[:, ops.Z_RE, 0]  # [P, B]; Z is real here
    return epg_train(
        ops.relaxation(dt_ms, **relax_kw),
        z_start,
        p["b1"],
        flip_rad,
        phase_rad,
        kind=kind,
        gre=gre,
        n_states=n_states,
        mt_lineshape_us=p.get("mt_lineshape_us"),
        b1sq_tau_ut2ms=sat_energy,
    )


def _prepare(
    state: torch.Tensor,
    prep: Prep,
    p: dict[str, torch.Tensor],
    relax_kw: dict[str, Any],
    b1: torch.Tensor,
    mt: bool,
) -> torch.Tensor:
    """EPG-X's GRE ``prep``: rotate Z by the pulse, spoil, recover over the delay."""
    cos_flip = torch.cos(b1 * (prep.flip_deg * math.pi / 180))  # [B]
    if mt:
        sat = ops.mt_saturation(
            torch.as_tensor(prep.b1sq_tau_ut2ms, dtype=b1.dtype), p["mt_lineshape_us"], b1
        )
        scale = torch.stack([cos_flip, sat])
    else:
        scale = cos_flip.expand(state.shape[0], -1)
    state = ops.spoil(state) * torch.cat(
        [torch.ones_like(scale).unsqueeze(1).expand(-1, 4, -1), scale.unsqueeze(1).expand(-1, 2, -1)], dim=1
    ).unsqueeze(2)
    if prep.delay_ms > 0:
        op = ops.relaxation(prep.delay_ms, **relax_kw)
        state = ops.relax(state, op, with_recovery=True)
    return state
