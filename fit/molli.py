"""MOLLI T1 mapping: the 3-parameter Look-Locker fit, for every voxel of a volume at once.

Model (Messroghli et al., MRM 2004;52:141–146), per voxel, at the inversion times t::

    S(t) = |A − B·exp(−t / T1*)|,   T1 = T1*·(B/A − 1),

the second being the Look-Locker correction of the apparent T1* (Deichmann & Haase,
JMR 1992;96:608–612). ``correction=`` selects it (``"deichmann-haase"``, the default) or
an alternative (``CORRECTIONS``):

- ``"look-locker"``: the classic relation for a continuous readout of flip angle α every
  τ ms, 1/T1 = 1/T1* + ln(cos α)/τ (Look & Locker, Rev Sci Instrum 1970;41:250–251;
  Kaptein et al., Radiology 1976;120:589). It uses the known readout instead of B/A, so
  it does not assume an ideal inversion (B = A + M0); it is exact for a spoiled-gradient
  Look-Locker train and only approximate for MOLLI's one-image-per-heartbeat bSSFP.
- ``"none"``: T1 = T1*, the apparent (uncorrected) relaxation time.

In the Torch T1 paper's notation (MIDL 2024) S = |C(1 − k e^{−t/T1*})|,
so A = C and B = C·k.

``method="lm"`` (default) is a batched, vectorised fit over all voxels in torch:

1. **Grid + variable projection + polarity restoration.** For each of ``n_grid``
   log-spaced T1* values the linear parameters (A, B) of the signed model
   A − B e^{−t/T1*} have a closed-form least-squares solution. Magnitude data lose the sign
   of the samples before the null, so every polarity candidate is tried: the first m
   samples (in TI order) negated, m = 0..n (as qMRLab's RD-NLS-PR, Barral et al., MRM
   2010;64:1057). Only candidates with A > 0 and B > 0 count (a negated copy of a valid
   curve fits equally well and would otherwise tie); the lowest residual wins, and its
   T1* is refined by a parabola through the residuals at the neighbouring grid points.
   All candidates × grid points of a block of voxels are one matrix product; the
   residuals are compared in float32 (they only choose the start).
2. **Levenberg–Marquardt** on (A, B, T1*) of the magnitude model from that start: the
   3×3 Newton system (JᵀJ plus the second-order terms Σr·∇²r where that is positive
   definite, Gauss–Newton elsewhere; scaled to unit diagonal, Marquardt damping per
   voxel) is solved in closed form; a step is taken when it lowers the cost, the change
   being computed from the step itself (exact where the cost is flat); a voxel stops
   when its step falls below tolerance (``LM_XTOL_FP64``, ``LM_NEWTON_XTOL_FP64``), and
   only unconverged voxels are iterated. Converged fits are the least-squares minimiser
   to ~1e-13 of T1 in float64, so any exact implementation reproduces them to that
   (the fused kernel agrees to ≤ 1e-12). The magnitude model lets the fitted null move
   across a sample if the grid's choice was marginal.

The uncertainty comes from the same JᵀJ at the solution: Cov = σ²(JᵀJ)⁻¹ and
SD(T1) by the delta method, with σ the given ``noise_sd`` or the residual estimate
sqrt(RSS/(n − 3)) of each voxel (few degrees of freedom: a noisy per-voxel estimate;
pass ``noise_sd`` when it is known, e.g. from a background region).

Complex images are fitted phase-sensitively: each voxel's phase φ = ½·arg Σ z² (the
principal axis, blind to the sign of the samples) is removed and the real part fitted
with the signed model; only the overall sign is unknown, and the two candidates go
through the same grid. ``"adam"`` and ``"nelder-mead"`` fit the magnitude of that real
part with the paper's magnitude model.

DICOM/NIfTI input and map output are in :mod:`epgx.fit.io`, the command line is
``epgx fit-molli``. ``backend="triton"`` runs steps 1–2 of ``"lm"`` for all voxels in one
fused kernel launch (:mod:`epgx.kernels.molli`, the same algorithm to rounding; ``"auto"``
takes it for CUDA tensors). The fit is not differentiable: inputs are detached.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from epgx.engine import require_triton

_log = logging.getLogger("epgx")

__all__ = ["CORRECTIONS", "METHODS", "MolliFit", "molli"]

METHODS = ("lm", "adam", "nelder-mead")
CORRECTIONS = ("deichmann-haase", "look-locker", "none")
BACKENDS = ("auto", "torch", "triton")

# Three parameters plus at least one residual degree of freedom for the noise estimate.
MIN_TIS = 4
# Default iteration limits: LM converges in ~3–5 steps from the grid; Adam at lr 3e-4 moves
# each parameter by ~3e-4 per step, so it needs thousands (the Torch T1 paper's slow path).
DEFAULT_MAX_ITER = {"lm": 50, "adam": 1000, "nelder-mead": 600}
# Convergence of LM (fp64; fp32 scales both to 10 eps): a voxel stops when its step is below
# LM_XTOL_FP64 of every parameter, or when a step taken was a Newton step below
# LM_NEWTON_XTOL_FP64 of them: Newton converges quadratically, so the iterate after it is at
# the minimiser to ~1e-13 (measured ≤ 2e-13 of T1 from a long-double minimiser over 1080
# noisy voxels at SNR 20–50; 1e-7 left 3e-11, 1e-6 1.4e-10). There is no cost-decrease
# test: the cost is flat at the minimum, so the former 1e-10 relative decrease left T1 up
# to 6e-6 from it.
LM_XTOL_FP64 = 1e-10
LM_NEWTON_XTOL_FP64 = 1e-8
# Marquardt damping: start, and the cap at which no step lowers the cost any more (a
# stationary point to the arithmetic's precision: counted as converged).
LM_LAMBDA0 = 1e-3
LM_LAMBDA_MAX = 1e12
# Elements per [voxels, candidates, grid] block of the grid search: ~1 MB of float32 keeps
# its temporaries in L2 (measured fastest on one core; 4x larger blocks run ~1.5x slower).
GRID_CHUNK_ELEMENTS = 2**18
# A runner-up sign pattern is refined too when its grid residual is within this factor of
# the best one, or below this fraction of Σy²: at the grid's resolution a sample near the
# null can favour either side (noiseless T1 150 ms, a TI 2 ms before the null: 4e-7 for
# the wrong side, 9e-7 for the right one, which the LM takes to 0). The grid + parabola
# leaves at most ~2e-7·Σy² of residual on the right pattern of noiseless data (all three
# schemes, T1 40–9000 ms); noisy data at MOLLI's SNR sit far above the floor.
AMBIGUOUS_RSS_RATIO = 10.0
AMBIGUOUS_RSS_FLOOR = 1e-5
# Voxels per block of the CPU "lm" path: its [n, block] arrays stay in L2 (100k voxels:
# 16k-voxel blocks measured ~20 % faster than one block of all).
LM_BLOCK_CPU = 16384
ADAM_LR = 3e-4  # the Torch T1 paper's learning rate


@dataclass(frozen=True)
class MolliFit:
    """Maps of a MOLLI fit, each of shape ``images.shape[:-1]``.

    Every floating map is NaN where ``ok`` is False (masked-out voxels included), so a
    map holds a number exactly where the fit is valid.

    Attributes:
        t1_ms: Look-Locker-corrected T1, ms: T1*·(B/A − 1) by default (``correction``).
        t1_star_ms: apparent T1*, ms.
        a, b: A and B of S(t) = |A − B e^{−t/T1*}| (image units); A = C, B = C·k.
        r2: coefficient of determination of the fit to the (magnitude or phase-aligned)
            data.
        t1_sd_ms: SD of T1 from σ²(JᵀJ)⁻¹ at the solution (delta method), with σ the
            given ``noise_sd`` or the per-voxel residual estimate.
        ok: bool; converged (Adam: always, it runs a fixed count), finite, A > 0, B > A,
            T1 and T1* inside ``t1_bounds_ms``.
        n_iter: int64 iterations used (LM/Adam steps, Nelder–Mead iterations; 0 masked).
        polarity: int64 number of leading samples (in TI order) that lie before the null
            of the fitted curve, i.e. the sign flip chosen; −1 where not ok.
        method: the method used.
        backend: the backend that ran (``"torch"``, ``"triton"`` for the fused ``"lm"`` kernel,
            or ``"scipy"`` for Nelder–Mead).
        correction: the Look-Locker correction that gave ``t1_ms`` (``CORRECTIONS``).
    """

    t1_ms: torch.Tensor
    t1_star_ms: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    r2: torch.Tensor
    t1_sd_ms: torch.Tensor
    ok: torch.Tensor
    n_iter: torch.Tensor
    polarity: torch.Tensor
    method: str
    backend: str
    correction: str = "deichmann-haase"


def molli(
    images: Any,
    ti_ms: Any,
    mask: Any = None,
    method: str = "lm",
    backend: str = "auto",
    noise_sd: Any = None,
    *,
    max_iter: int | None = None,
    n_grid: int = 64,
    grid_t1_star_ms: tuple[float, float] = (50.0, 5000.0),
    t1_bounds_ms: tuple[float, float] = (10.0, 10000.0),
    correction: str = "deichmann-haase",
    flip_deg: float | None = None,
    tr_ms: float | None = None,
) -> MolliFit:
    """Fit the 3-parameter MOLLI model to every voxel (see the module docstring).

    Args:
        images: ``[..., n]`` images with the TI axis last: magnitude (real, >= 0) or
            complex (fitted phase-sensitively by ``"lm"``). Integer data become float64;
            the fit runs in the input's floating dtype (float64 recommended on the CPU).
        ti_ms: ``[n]`` or ``[..., n]`` (broadcasting to ``images``) inversion times, ms,
            >= 0, distinct, in any order: they are sorted, with the images.
        mask: optional bool ``[...]`` (broadcasting to ``images.shape[:-1]``); voxels
            outside it are not fitted (no cost) and get NaN maps. Non-finite images are
            allowed there.
        method: ``"lm"`` (grid + batched Levenberg–Marquardt), ``"adam"`` (the Torch T1
            paper's Adam, lr 3e-4, for reproduction) or ``"nelder-mead"`` (scipy,
            per voxel, the paper's baseline; slow, for comparison only).
        backend: ``"torch"`` (the torch path, on the images' device), ``"triton"`` (``"lm"``
            only: the fused kernel :mod:`epgx.kernels.molli`, on CUDA tensors, or on the
            CPU in Triton's interpreter with ``TRITON_INTERPRET=1``) or ``"auto"`` (Triton
            for ``"lm"`` on CUDA tensors, torch otherwise).
        noise_sd: noise SD per channel in image units (a number, or a tensor
            broadcasting to ``images.shape[:-1]``) for ``t1_sd_ms``; None estimates it
            per voxel from the residuals.
        max_iter: iteration limit (LM steps, Adam steps — a fixed count —, Nelder–Mead
            iterations); default 50, 1000, 600.
        n_grid: number of T1* grid values of the ``"lm"`` start.
        grid_t1_star_ms: (min, max) of the log-spaced T1* grid, ms.
        t1_bounds_ms: (min, max) of T1 and T1* for ``ok``, ms; also Nelder–Mead's T1*
            bounds.
        correction: how T1 follows from the fit (module docstring): ``"deichmann-haase"``
            T1 = T1*·(B/A − 1); ``"look-locker"`` 1/T1 = 1/T1* + ln(cos α)/τ, which needs
            ``flip_deg`` and ``tr_ms``; ``"none"`` T1 = T1*. ``t1_sd_ms`` follows it.
        flip_deg: readout flip angle α, degrees, in (0, 90) (``"look-locker"`` only).
        tr_ms: spacing τ of the readout pulses, ms, > 0 (``"look-locker"`` only).

    Returns:
        A :class:`MolliFit`.

    Raises:
        ValueError: NaN/inf images inside the mask, negative magnitude values, fewer than
            4 TIs, duplicate or negative or non-finite TIs, shapes that do not match, an
            unknown method or backend, ``backend="triton"`` where the kernel cannot run
            (another method, no CUDA device or interpreter, no triton), bad options, an unknown
            correction, ``flip_deg``/``tr_ms`` missing for ``"look-locker"`` or given
            for another correction.

    Example::

        ph = epgx.fit.molli_phantom("5(3)3", snr=100)
        res = epgx.fit.molli(ph.images, ph.ti_ms, mask=ph.labels > 0)
        res.t1_ms[ph.labels == 3].mean()   # myocardium, ≈ 1000 ms
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
    if backend == "triton" and method != "lm":
        raise ValueError(
            f"backend='triton' runs method='lm' only (the fused kernel); got method={method!r}: "
            "use backend='torch' or 'auto'."
        )
    if max_iter is None:
        max_iter = DEFAULT_MAX_ITER[method]
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int; got {max_iter!r}.")
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 2:
        raise ValueError(f"n_grid must be an int >= 2; got {n_grid!r}.")
    for name, (lo, hi) in (("grid_t1_star_ms", grid_t1_star_ms), ("t1_bounds_ms", t1_bounds_ms)):
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
            raise ValueError(f"{name} must be (min, max) with 0 < min < max, finite; got {(lo, hi)!r}.")

    corr = (correction, _readout_rate_per_ms(correction, flip_deg, tr_ms))
    data = _prepare(images, ti_ms, mask, noise_sd)
    triton_lm = method == "lm" and _use_triton(backend, data.y.device)
    used = "scipy" if method == "nelder-mead" else "triton" if triton_lm else "torch"
    _log.debug("epgx.fit.molli: method=%s, backend=%s (%d voxels)", method, used, data.y.shape[0])

    y, t, signed, sigma = data.y, data.t, data.signed, data.sigma
    if method == "lm":
        # CPU: blocks of voxels whose [n, block] working arrays stay in cache
        v = y.shape[0]
        block = LM_BLOCK_CPU if y.device.type == "cpu" and not triton_lm else max(v, 1)
        fit_lm = _fit_lm_triton if triton_lm else _fit_lm
        parts = []
        for lo in range(0, max(v, 1), block):  # one (possibly empty) block at least
            sl = slice(lo, lo + block)
            t_b = t if t.shape[0] == 1 else t[sl]
            p, converged, n_iter, y_b = fit_lm(y[sl], t_b, signed, n_grid, grid_t1_star_ms, max_iter)
            s_b = None if sigma is None else sigma[sl]
            parts.append((_maps(y_b, t_b, signed, p, converged, s_b, t1_bounds_ms, corr), n_iter))
        if len(parts) == 1:
            maps, n_iter = parts[0]
        else:
            maps = {key: torch.cat([m[key] for m, _ in parts]) for key in parts[0][0]}
            n_iter = torch.cat([it for _, it in parts])
    else:
        y, signed = y.abs(), False  # the paper's magnitude model
        if method == "adam":
            p, converged, n_iter = _fit_adam(y, t, max_iter)
        else:
            p, converged, n_iter = _fit_nelder_mead(y, t, max_iter, t1_bounds_ms)
        maps = _maps(y, t, signed, p, converged, sigma, t1_bounds_ms, corr)
    return _scatter(data, maps, n_iter, method, used, correction)


# ---------------------------------------------------------------- input


@dataclass
class _Data:
    y: torch.Tensor  # [V, n] fitted voxels: magnitude, or phase-aligned real part; / scale
    t: torch.Tensor  # [V, n] or [1, n] sorted TIs, ms
    scale: torch.Tensor  # [V] per-voxel max |y| (1 where that is 0)
    sigma: torch.Tensor | None  # [V] noise SD / scale, or None (estimate)
    signed: bool
    sel: torch.Tensor  # [...] bool: voxels fitted
    shape: tuple[int, ...]


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    try:
        return torch.as_tensor(x).detach()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be array-like numbers; got {type(x).__name__}: {exc}") from None


def _prepare(images: Any, ti_ms: Any, mask: Any, noise_sd: Any) -> _Data:
    img = _as_tensor(images, "images")
    if img.ndim < 1:
        raise ValueError(
            f"images must be [..., n_TI] with the TIs on the last axis; got shape {tuple(img.shape)}."
        )
    signed = img.is_complex()
    if not signed and not img.is_floating_point():
        img = img.to(torch.float64)
    if img.dtype in (torch.float16, torch.bfloat16):
        img = img.float()
    real_dtype = img.real.dtype if signed else img.dtype
    n = img.shape[-1]
    vshape = tuple(img.shape[:-1])

    ti = _as_tensor(ti_ms, "ti_ms")
    if ti.is_complex() or ti.dtype == torch.bool:
        raise ValueError(f"ti_ms must be real numbers in ms; got dtype {ti.dtype}.")
    ti = ti.to(device=img.device, dtype=real_dtype)
    if ti.ndim < 1 or ti.shape[-1] != n:
        raise ValueError(
            f"shape mismatch: ti_ms has shape {tuple(ti.shape)}, its last axis must match the "
            f"{n} images on the last axis of images (shape {tuple(img.shape)})."
        )
    if n < MIN_TIS:
        raise ValueError(
            f"MOLLI fitting needs at least {MIN_TIS} TIs (3 parameters + 1 for the noise); got {n}."
        )
    try:
        lead = torch.broadcast_shapes(ti.shape[:-1], vshape)
    except RuntimeError:
        lead = None
    if lead != vshape:
        raise ValueError(
            f"shape mismatch: ti_ms of shape {tuple(ti.shape)} does not broadcast to images of "
            f"shape {tuple(img.shape)} (TIs [n] or [..., n] matching the voxel axes)."
        )
    if not bool(torch.isfinite(ti).all()):
        raise ValueError(
            f"ti_ms must be finite; got {ti.flatten()[~torch.isfinite(ti.flatten())][:3].tolist()}."
        )
    if bool((ti < 0).any()):
        raise ValueError(f"negative TIs: ti_ms must be >= 0 ms; got min {ti.min().item()!r}.")
    ti_sorted, order = torch.sort(ti, dim=-1)
    if bool((ti_sorted.diff(dim=-1) == 0).any()):
        dup = ti_sorted[..., 1:][ti_sorted.diff(dim=-1) == 0]
        raise ValueError(f"duplicate TIs: each TI must appear once; {dup[:3].tolist()} repeat.")

    if mask is None:
        sel = torch.ones(vshape, dtype=torch.bool, device=img.device)
    else:
        m = _as_tensor(mask, "mask").to(img.device)
        try:
            sel = torch.broadcast_to(m != 0, vshape)
        except RuntimeError:
            raise ValueError(
                f"shape mismatch: mask of shape {tuple(m.shape)} does not broadcast to the voxel "
                f"shape {vshape} (images.shape[:-1])."
            ) from None

    z = img[sel]  # [V, n]: only the voxels to fit are touched from here on
    if ti.ndim == 1:
        z = z[:, order]
        t = ti_sorted[None, :]  # [1, n]
    else:
        t = torch.broadcast_to(ti_sorted, img.shape)[sel]  # [V, n]
        z = torch.gather(z, -1, torch.broadcast_to(order, img.shape)[sel])
    bad = ~torch.isfinite(z)
    if bool(bad.any()):
        raise ValueError(
            f"images contain {int(bad.sum())} NaN/inf values in the voxels to fit; mask those "
            f"voxels out (mask=...) or replace the values."
        )
    if signed:
        phase = 0.5 * torch.angle((z * z).sum(-1, keepdim=True))
        y = (z * torch.exp(-1j * phase)).real
    else:
        if bool((z < 0).any()):
            raise ValueError(
                f"images are real with negative values (min {z.min().item():.4g}): magnitude images "
                f"must be >= 0; pass complex images for a phase-sensitive fit."
            )
        y = z
    scale = y.abs().amax(-1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = y / scale[:, None]

    sigma = None
    if noise_sd is not None:
        s = _as_tensor(noise_sd, "noise_sd").to(device=img.device, dtype=real_dtype)
        try:
            s = torch.broadcast_to(s, vshape)
        except RuntimeError:
            raise ValueError(
                f"shape mismatch: noise_sd of shape {tuple(s.shape)} does not broadcast to the "
                f"voxel shape {vshape}."
            ) from None
        s = s[sel]
        if not bool((torch.isfinite(s) & (s > 0)).all()):
            raise ValueError(
                f"noise_sd must be finite and > 0; got min {s.min().item() if s.numel() else s!r}."
            )
        sigma = s / scale
    return _Data(y, t, scale, sigma, signed, sel, vshape)


# ---------------------------------------------------------------- method "lm"


def _candidates(n: int, signed: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Sign patterns [K, n]: magnitude, the first m samples negated (m = 0..n); signed, ±1.

    The last pattern (all negated) is always the negation of the first.
    """
    if signed:
        return torch.tensor([[1.0], [-1.0]], dtype=dtype, device=device).expand(2, n)
    idx = torch.arange(n, device=device)
    m = torch.arange(n + 1, device=device)
    return (1.0 - 2.0 * (idx[None, :] < m[:, None])).to(dtype)


def _grid_search(
    y: torch.Tensor,
    t: torch.Tensor,
    flips: torch.Tensor,
    grid: torch.Tensor,
    log_step: float,
    constrained: bool,
    n_best: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best T1* and sign-pattern index, [V, n_best] each, over ``grid`` × ``flips`` (variable
    projection): the best pattern and, with ``n_best=2``, the runner-up pattern.

    At a fixed T1*, least squares of the signed data y on the basis (1, E), E = e^{−t/T1*},
    in its orthonormal form (1/√n, Q), Q = (E − Ē)/‖E − Ē‖, leaves the residual
    Σy² − (Σy)²/n − u², u = Σ y·Q: the best T1* maximises u² and the best pattern
    (Σy)²/n + u². The fit is A − B·E with B = −u/‖E − Ē‖ and A = Σy/n − B·Ē, so B > 0
    ⇔ u < 0 and A > 0 ⇔ Σy/n + u·Ē/‖E − Ē‖ > 0 (``constrained`` keeps only those). The
    T1* of each pattern returned is refined by a parabola through u² at its grid
    neighbours, in log T1*.

    The scores run in float32 (they only choose the start; Q and the inputs are formed
    in the data's precision), as a [voxels, patterns, grid] block per chunk.
    """
    v, n = y.shape
    k, g = flips.shape[0], grid.shape[0]
    chunk = max(1, GRID_CHUNK_ELEMENTS // (k * g))
    shared = t.shape[0] == 1
    sdt = torch.float32 if y.dtype == torch.float64 else y.dtype
    best_ts = torch.empty(v, n_best, dtype=y.dtype, device=y.device)
    best_k = torch.empty(v, n_best, dtype=torch.long, device=y.device)
    rows_all = torch.arange(min(chunk, v), device=y.device)
    # one reused block: fresh MB-sized allocations per chunk cost more than the arithmetic
    u_buf = torch.empty(min(chunk, v), k * g, dtype=sdt, device=y.device)
    y_s = y.to(sdt)
    f_s = flips.to(sdt)
    a_all = y_s @ f_s.T  # [V, K]: Σy of each pattern
    if shared:
        # u[c, k, g] = Σ_i y[c, i]·flips[k, i]·Q[i, g]: one product with W = flips ⊙ Q, [n, K·G]
        q_t, slope = _grid_basis(t, grid, sdt)
        w = (f_s.T[:, :, None] * q_t[0][:, None, :]).reshape(n, k * g)
    for lo in range(0, v, chunk):
        c_v = min(chunk, v - lo)
        u = u_buf[:c_v].view(c_v, k, g)
        a = a_all[lo : lo + c_v]
        if shared:
            torch.mm(y_s[lo : lo + c_v], w, out=u_buf[:c_v])
        else:
            q_t, slope = _grid_basis(t[lo : lo + c_v], grid, sdt)
            torch.bmm(y_s[lo : lo + c_v, None, :] * f_s, q_t, out=u)
        invalid = (u >= 0) | (u * slope <= -(a / n)[:, :, None]) if constrained else None
        score = u.mul_(u)
        if invalid is not None:
            score.masked_fill_(invalid, -math.inf)
        # amax, then the index on the winning rows only: max(-1) with indices is ~10x slower
        kks = (score.amax(-1) + a * a / n).topk(n_best, -1).indices  # [C, R]
        rows = rows_all[:c_v]
        for r in range(n_best):
            kk = kks[:, r]
            row = score.view(c_v * k, g).index_select(0, rows * k + kk)  # [C, G]
            gg = row.max(-1).indices
            s_m = row[rows, (gg - 1).clamp_min(0)]
            s_0 = row[rows, gg]
            s_p = row[rows, (gg + 1).clamp_max(g - 1)]
            curv = s_m - 2.0 * s_0 + s_p
            shift = (0.5 * (s_m - s_p) / curv).nan_to_num_(0.0, 0.0, 0.0).clamp_(-1.0, 1.0)
            shift = shift * ((gg > 0) & (gg < g - 1) & (curv < 0))
            best_ts[lo : lo + c_v, r] = grid[gg] * torch.exp(shift.to(y.dtype) * log_step)
            best_k[lo : lo + c_v, r] = kk
    return best_ts, best_k


def _grid_basis(t: torch.Tensor, grid: torch.Tensor, sdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Q = (E − Ē)/‖E − Ē‖ as [1 | C, n, G] and Ē/‖E − Ē‖ as [1 | C, 1, G], cast to ``sdt``."""
    e = torch.exp(-t[:, None, :] / grid[:, None])  # [1 | C, G, n]
    mean_e = e.mean(-1, keepdim=True)
    ec = e - mean_e
    norm = torch.sqrt((ec * ec).sum(-1, keepdim=True))
    q = torch.where(norm > 0, ec / norm, 0.0)  # an all-underflowed E explains nothing
    return q.transpose(1, 2).contiguous().to(sdt), (mean_e / norm).transpose(1, 2).to(sdt)


def _grid_start(
    y: torch.Tensor, t: torch.Tensor, signed: bool, n_grid: int, grid_ms: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Starts for the LM from the T1* grid × sign candidates, keeping A, B > 0.

    Returns ``(p [V, 3], pattern [V, n], p2 [V, 3], ambiguous [V])``: the lowest-residual
    start and its sign pattern, and the runner-up pattern's start with the voxels where
    it is valid and its residual close to the best (``AMBIGUOUS_RSS_*``: a sample near the
    null, where the grid's resolution cannot decide; both are refined).

    The unconstrained search over all candidates but the last (the negation of the first)
    finds the constrained optimum whenever its winner has A, B > 0, or A, B < 0 with the
    first pattern (then the negated, last pattern is valid with the same residual); only
    the remaining voxels (noise, odd data) need the search with the constraint.
    """
    grid = torch.logspace(
        math.log10(grid_ms[0]), math.log10(grid_ms[1]), n_grid, dtype=y.dtype, device=y.device
    )
    flips = _candidates(y.shape[-1], signed, y.dtype, y.device)
    log_step = math.log(grid_ms[1] / grid_ms[0]) / (n_grid - 1)
    n_best = 1 if signed else 2  # signed data: one pattern (and its negation) only
    ts, k = _grid_search(y, t, flips[:-1], grid, log_step, constrained=False, n_best=n_best)
    p, rss = _linear_fit(y * flips[k[:, 0]], t, ts[:, 0])
    negated = (k[:, 0] == 0) & (p[:, 0] < 0) & (p[:, 1] < 0)
    p[:, :2] *= 1.0 - 2.0 * negated[:, None].to(p.dtype)
    k0 = torch.where(negated, flips.shape[0] - 1, k[:, 0])
    bad = ~((p[:, 0] > 0) & (p[:, 1] > 0))
    if bool(bad.any()):
        sub = bad.nonzero()[:, 0]
        t_sub = t if t.shape[0] == 1 else t[sub]
        ts_sub, k_sub = _grid_search(y[sub], t_sub, flips, grid, log_step, constrained=True)
        p[sub], rss[sub] = _linear_fit(y[sub] * flips[k_sub[:, 0]], t_sub, ts_sub[:, 0])
        k0[sub] = k_sub[:, 0]
    if n_best == 1:
        return p, flips[k0], p, torch.zeros_like(bad)
    p2, rss2 = _linear_fit(y * flips[k[:, 1]], t, ts[:, 1])
    p2[:, :2] *= torch.where(p2[:, :1] < 0, -1.0, 1.0)  # |A − B·E| = |−A + B·E|
    close = rss2 <= AMBIGUOUS_RSS_RATIO * rss + AMBIGUOUS_RSS_FLOOR * (y * y).sum(-1)
    ambiguous = ~bad & (p2[:, 0] > 0) & (p2[:, 1] > 0) & close
    return p, flips[k0], p2, ambiguous


def _linear_fit(ys: torch.Tensor, t: torch.Tensor, ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B by linear least squares for signed data ``ys`` [V, n] at T1* ``ts`` [V].

    Returns ``((A, B, T1*) [V, 3], residual sum of squares [V])``.
    """
    n = ys.shape[-1]
    e = torch.exp(-t / ts[:, None])
    s1, s2, a, c = e.sum(-1), (e * e).sum(-1), ys.sum(-1), (ys * e).sum(-1)
    det = n * s2 - s1 * s1
    p = torch.stack([(s2 * a - s1 * c) / det, (s1 * a - n * c) / det, ts], -1)
    r = p[:, :1] - p[:, 1:2] * e - ys
    return p, (r * r).sum(-1)


def _residual(
    y: torch.Tensor, t: torch.Tensor, signed: bool, p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E = e^{−t/T1*}, f = A − B·E and w = sgn(f)·r ([n, V] each; |w| = |r|, r the residual).

    Layout is TI-major ([n, V]): reductions over the TIs are then sums of contiguous rows.
    Magnitude: r = |f| − y, so sgn(f)·r = f − sgn(f)·y; signed: r = w = f − y.
    """
    e = torch.exp(t * (-1.0 / p[2]))
    f = torch.addcmul(p[0], p[1], e, value=-1.0)
    w = f - y if signed else f - torch.copysign(y, f)
    return e, f, w


def _normal_equations(
    t: torch.Tensor, p: torch.Tensor, e: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cost Σr² [V], JᵀJ [6, V] (h00 h01 h02 h11 h12 h22), Jᵀr [3, V] and the second-order
    terms S [2, V] (s12 s22) at ``p`` [3, V], from E and w of :func:`_residual` there.

    J = sgn(f)·(1, −E, −q·E·t) with q = B/T1*²; the sign squares away in JᵀJ. The Hessian
    of ½Σr² is JᵀJ + S, S = Σ r·∇²r = Σ w·∇²f, whose only nonzero second derivatives of f
    are ∂²f/∂B∂T1* = −E·t/T1*² and ∂²f/∂T1*² = −q·E·t·(t − 2T1*)/T1*².
    """
    cost = (w * w).sum(0)
    et = e * t
    ts = p[2]
    q = p[1] / (ts * ts)
    wet = w * et
    s_e, s_et, s_wet = e.sum(0), et.sum(0), wet.sum(0)
    h = torch.stack(
        [
            torch.full_like(s_e, e.shape[0]),
            -s_e,
            -q * s_et,
            (e * e).sum(0),
            q * (e * et).sum(0),
            q * q * (et * et).sum(0),
        ]
    )
    g = torch.stack([w.sum(0), -(w * e).sum(0), -q * s_wet])
    s12 = -s_wet / (ts * ts)
    s22 = (2.0 * q / ts) * s_wet - (q / (ts * ts)) * (wet * t).sum(0)
    return cost, h, g, torch.stack([s12, s22])


def _solve_sym3(
    h: torch.Tensor, rhs: torch.Tensor, lam: torch.Tensor | None, s: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + λ·diag H)⁻¹·rhs for symmetric H [6, V] and rhs [3, V], by the adjugate (Cramer).

    Solved as D⁻¹(H̃ + λI)⁻¹D⁻¹·rhs with H̃ = D⁻¹HD⁻¹ of unit diagonal, D = √diag H, so the
    closed form works on a well-scaled matrix. With the second-order terms ``s`` [2, V]
    (s12, s22 of :func:`_normal_equations`) the matrix is H + S (Newton) wherever
    D⁻¹(H + S)D⁻¹ + λI is positive definite, so that the step descends; H (Gauss–Newton)
    elsewhere. Returns (the solution [3, V], where it is the Newton one [V]).
    """
    d = torch.sqrt(h[[0, 3, 5]]).clamp_min_(torch.finfo(h.dtype).tiny ** 0.5)  # [3, V]
    m01 = h[1] / (d[0] * d[1])
    m02 = h[2] / (d[0] * d[2])
    m12 = h[4] / (d[1] * d[2])
    m00 = m11 = m22 = 1.0 + (lam if lam is not None else 0.0)
    newton = torch.zeros_like(m01, dtype=torch.bool)
    if s is not None:
        n12 = m12 + s[0] / (d[1] * d[2])
        n22 = m22 + s[1] / (d[2] * d[2])
        # Sylvester: the leading minors 1 + λ and (1 + λ)² − m01² are those of H̃ + λI (> 0,
        # |m01| ≤ 1 by Cauchy–Schwarz), so the determinant decides
        det_n = m00 * (m11 * n22 - n12 * n12) - m01 * (m01 * n22 - n12 * m02) + m02 * (m01 * n12 - m11 * m02)
        newton = det_n > 0
        m12 = torch.where(newton, n12, m12)
        m22 = torch.where(newton, n22, m22)
    v = rhs / d
    c00 = m11 * m22 - m12 * m12
    c01 = m02 * m12 - m01 * m22
    c02 = m01 * m12 - m02 * m11
    c11 = m00 * m22 - m02 * m02
    c12 = m01 * m02 - m00 * m12
    c22 = m00 * m11 - m01 * m01
    det = m00 * c00 + m01 * c01 + m02 * c02
    x0 = c00 * v[0] + c01 * v[1] + c02 * v[2]
    x1 = c01 * v[0] + c11 * v[1] + c12 * v[2]
    x2 = c02 * v[0] + c12 * v[1] + c22 * v[2]
    return torch.stack([x0, x1, x2]) / (det * d), newton


def _fit_lm(
    y: torch.Tensor,
    t: torch.Tensor,
    signed: bool,
    n_grid: int,
    grid_ms: tuple[float, float],
    max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grid start, then batched Levenberg–Marquardt.

    Voxels whose grid cannot tell two sign patterns apart are fitted from both starts
    (in the same batch) and keep the lower final cost.

    Returns (p [V, 3], converged [V], n_iter [V], the data fitted [V, n]: ``y``, or for
    signed data ``y`` with the overall sign the grid chose).
    """
    v = y.shape[0]
    p_start, pattern, p2, ambiguous = _grid_start(y, t, signed, n_grid, grid_ms)
    if signed:
        y = y * pattern  # the overall sign chosen by the grid (the magnitude model needs none)
    amb = ambiguous.nonzero()[:, 0]
    shared = t.shape[0] == 1
    y_lm = torch.cat([y, y[amb]])
    t_lm = t if shared else torch.cat([t, t[amb]])
    p, converged, n_iter, cost = _lm(y_lm, t_lm, signed, torch.cat([p_start, p2[amb]]), max_iter)
    second = v + torch.arange(amb.numel(), device=y.device)
    better = cost[second] < cost[amb]
    take = amb[better]
    p[take], converged[take] = p[second[better]], converged[second[better]]
    n_iter[amb] += n_iter[second]
    return p[:v], converged[:v], n_iter[:v], y


def _lm(
    y: torch.Tensor, t: torch.Tensor, signed: bool, p_start: torch.Tensor, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched Levenberg–Marquardt from ``p_start`` [V, 3].

    Each step solves the Marquardt-damped Newton system (Gauss–Newton where the Hessian
    is not positive definite, :func:`_solve_sym3`); a step is taken when it lowers the
    cost, measured by :func:`_cost_change` (exact to rounding of the change itself, where
    the difference of two costs loses it at ~eps·cost). A voxel stops when its step is
    below ``LM_XTOL_FP64`` of every parameter, or a Newton step taken below
    ``LM_NEWTON_XTOL_FP64`` (each 10 eps in float32), λ exceeds ``LM_LAMBDA_MAX`` or the
    cost is 0.

    Returns (p [V, 3], converged [V], n_iter [V], final cost [V]). Only unconverged
    voxels are iterated: the working set is compacted whenever half of it has converged.
    """
    v = y.shape[0]
    eps = torch.finfo(y.dtype).eps
    xtol, xtol_newton = max(LM_XTOL_FP64, 10 * eps), max(LM_NEWTON_XTOL_FP64, 10 * eps)
    p_all = p_start.T.contiguous()  # [3, V]
    shared = t.shape[0] == 1
    y_all = y.T.contiguous()  # [n, V]
    t_all = t.T.contiguous()  # [n, 1 | V]
    converged = torch.zeros(v, dtype=torch.bool, device=y.device)
    n_iter_all = torch.zeros(v, dtype=torch.long, device=y.device)
    idx = torch.arange(v, device=y.device)
    yw, tw, p = y_all, t_all, p_all.clone()
    lam = torch.full((v,), LM_LAMBDA0, dtype=y.dtype, device=y.device)
    active = torch.ones(v, dtype=torch.bool, device=y.device)
    n_iter = torch.zeros(v, dtype=torch.long, device=y.device)
    for _ in range(max_iter):
        n_active = int(active.sum())
        if n_active == 0:
            break
        if n_active <= idx.numel() // 2:
            p_all[:, idx], n_iter_all[idx], converged[idx] = p, n_iter, ~active
            keep = active.nonzero()[:, 0]
            idx, lam, active, n_iter = idx[keep], lam[keep], active[keep], n_iter[keep]
            yw, p, tw = yw[:, keep], p[:, keep], (tw if shared else tw[:, keep])
        e, f, w = _residual(yw, tw, signed, p)
        cost, h, g, s = _normal_equations(tw, p, e, w)
        step, newton = _solve_sym3(h, g, lam, s)
        step = torch.nan_to_num_(step.neg_(), nan=0.0, posinf=0.0, neginf=0.0)
        trial = p + step
        accept = (_cost_change(yw, tw, signed, p, step, e, f, w) < 0) & (trial[2] > 0) & active
        small_step = (step.abs() <= xtol * (p.abs() + xtol)).all(0)
        small_step |= accept & newton & (step.abs() <= xtol_newton * (p.abs() + xtol_newton)).all(0)
        acc = accept.to(p.dtype)
        p = p.lerp_(trial, acc)
        lam = lam * (10.0 - 9.9 * acc)  # ×0.1 on success, ×10 on failure
        n_iter += active
        done = small_step | (lam > LM_LAMBDA_MAX) | (cost == 0)
        active = active & ~done
    p_all[:, idx], n_iter_all[idx], converged[idx] = p, n_iter, ~active
    _, _, w = _residual(y_all, t_all, signed, p_all)
    return p_all.T, converged, n_iter_all, (w * w).sum(0)


def _cost_change(
    y: torch.Tensor,
    t: torch.Tensor,
    signed: bool,
    p: torch.Tensor,
    step: torch.Tensor,
    e: torch.Tensor,
    f: torch.Tensor,
    w: torch.Tensor,
) -> torch.Tensor:
    """Σr² at ``p + step`` minus Σr² at ``p`` [V], from E, f, w of :func:`_residual` at ``p``.

    E' − E = E·expm1(t·δT1*/(T1*·T1*')) and Δf = δA − δB·E − (B + δB)·(E' − E) come from the
    step (primes at ``p + step``), so the change is exact to its own rounding even far
    below eps·Σr²: near the minimum the cost is flat, and the plain difference of the two
    sums stops the iteration ~1e-8 of T1 short of it. Where f keeps its sign (signed
    data: always) r' − r = sgn(f)·Δf, so r'² − r² = Δf·(2w + Δf); a sample whose f
    changes sign has r'² = (|f'| − y)² instead of (|f'| + y)²: 4·y·|f'| less.
    """
    de = e * torch.expm1(t * (step[2] / (p[2] * (p[2] + step[2]))))  # E' − E
    df = step[0] - step[1] * e - (p[1] + step[1]) * de
    change = (df * torch.add(df, w, alpha=2.0)).sum(0)
    if signed:
        return change
    f_new = f + df
    flip = f * f_new < 0
    if bool(flip.any()):  # rare: a sample crosses the null of the fitted curve
        change = change - 4.0 * (flip * y * f_new.abs()).sum(0)
    return change


def _use_triton(backend: str, device: torch.device) -> bool:
    """Resolve ``backend`` for ``method="lm"``: True runs the fused kernel (as epgx.engine).

    ``auto`` picks Triton for CUDA tensors and torch elsewhere; ``triton`` raises where it
    cannot run.
    """
    if backend == "torch":
        return False
    cuda = device.type == "cuda"
    if backend == "auto":
        use = cuda and importlib.util.find_spec("triton") is not None
        _log.debug("epgx.fit.molli: backend='auto' runs the %s lm (%s)", "Triton" if use else "torch", device)
        return use
    require_triton(device, "images", "molli")
    return True


def _fit_lm_triton(
    y: torch.Tensor,
    t: torch.Tensor,
    signed: bool,
    n_grid: int,
    grid_ms: tuple[float, float],
    max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_fit_lm` in one fused kernel launch (:mod:`epgx.kernels.molli`); same returns."""
    from epgx.kernels import molli as kernel

    out = kernel.molli_fit(y, t, signed=signed, n_grid=n_grid, grid_t1_star_ms=grid_ms, max_iter=max_iter)
    if signed:  # the overall sign the grid chose: pattern n (all negated) or 0
        y = torch.where(out[kernel.ROW_PATTERN, :, None] > 0, -y, y)
    p = out[[kernel.ROW_A, kernel.ROW_B, kernel.ROW_T1_STAR]].T
    return p, out[kernel.ROW_CONVERGED] > 0, out[kernel.ROW_N_ITER].long(), y


# ---------------------------------------------------------------- method "adam"


def _fit_adam(
    y: torch.Tensor, t: torch.Tensor, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Torch T1 paper's method: Adam (lr 3e-4) on S = |C(1 − k e^{−t/T1*})| for all voxels.

    Units and start are this implementation's choices: the data are each voxel's
    magnitude / its maximum, time is in seconds (T1* ~ 1), and every voxel starts at
    C = its value at the longest TI, k = 2, T1* = 1 s. The loss is the sum over voxels of
    the squared residuals (voxels are independent: Adam scales each coordinate). There
    is no convergence test: every voxel runs ``max_iter`` steps.
    """
    t_s = t / 1000.0
    c = y[:, -1].clone().requires_grad_(True)
    k = torch.full_like(c, 2.0).requires_grad_(True)
    ts = torch.ones_like(c).requires_grad_(True)
    opt = torch.optim.Adam([c, k, ts], lr=ADAM_LR)
    with torch.enable_grad():
        for _ in range(max_iter):
            opt.zero_grad(set_to_none=True)
            model = (c[:, None] * (1.0 - k[:, None] * torch.exp(-t_s / ts[:, None]))).abs()
            loss = ((model - y) ** 2).sum()
            loss.backward()
            opt.step()
    c, k, ts = c.detach(), k.detach(), ts.detach()
    p = torch.stack([c, c * k, ts * 1000.0], -1)
    v = y.shape[0]
    return p, torch.ones(v, dtype=torch.bool, device=y.device), torch.full((v,), max_iter, device=y.device)


# ---------------------------------------------------------------- method "nelder-mead"


def _fit_nelder_mead(
    y: torch.Tensor, t: torch.Tensor, max_iter: int, bounds_ms: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scipy's bounded Nelder–Mead per voxel on |C(1 − k e^{−t/T1*})| (the paper's baseline).

    Data are each voxel's magnitude / its maximum, time in seconds; start C = the value
    at the longest TI, k = 2, T1* = 1 s; bounds C ∈ [0, 10], k ∈ [0, 100], T1* in
    ``bounds_ms``; scipy's default tolerances.
    """
    try:
        from scipy.optimize import minimize
    except ImportError:
        raise ValueError("method='nelder-mead' needs scipy: pip install scipy.") from None

    y_np = y.abs().detach().cpu().numpy().astype(np.float64)
    t_np = np.broadcast_to((t / 1000.0).detach().cpu().numpy().astype(np.float64), y_np.shape)
    bounds = [(0.0, 10.0), (0.0, 100.0), (bounds_ms[0] / 1000.0, bounds_ms[1] / 1000.0)]
    out = np.full((y_np.shape[0], 3), np.nan)
    success = np.zeros(y_np.shape[0], dtype=bool)
    nit = np.zeros(y_np.shape[0], dtype=np.int64)
    for i in range(y_np.shape[0]):
        yi, ti = y_np[i], t_np[i]

        def cost(x: np.ndarray, yi: np.ndarray = yi, ti: np.ndarray = ti) -> float:
            r = np.abs(x[0] * (1.0 - x[1] * np.exp(-ti / x[2]))) - yi
            return float(r @ r)

        res = minimize(
            cost,
            np.array([yi[-1], 2.0, 1.0]),
            method="Nelder-Mead",
            bounds=bounds,
            options={"maxiter": max_iter},
        )
        out[i] = (res.x[0], res.x[0] * res.x[1], res.x[2] * 1000.0)
        success[i], nit[i] = res.success, res.nit
    dev = y.device
    return (
        torch.as_tensor(out, dtype=y.dtype, device=dev),
        torch.as_tensor(success, device=dev),
        torch.as_tensor(nit, device=dev),
    )


# ---------------------------------------------------------------- maps


def _maps(
    y: torch.Tensor,
    t: torch.Tensor,
    signed: bool,
    p: torch.Tensor,
    converged: torch.Tensor,
    sigma: torch.Tensor | None,
    bounds_ms: tuple[float, float],
    correction: tuple[str, float] = ("deichmann-haase", 0.0),
) -> dict[str, torch.Tensor]:
    """Maps of the fitted voxels (normalised A, B) with the CRLB/covariance SD of T1."""
    n = y.shape[-1]
    yt, tt, pt = y.T.contiguous(), t.T.contiguous(), p.T.contiguous()  # TI-major, as the LM
    e, f, w = _residual(yt, tt, signed, pt)
    cost, h, _, _ = _normal_equations(tt, pt, e, w)
    a, b, ts = pt.unbind(0)
    t1, grad = _corrected_t1(a, b, ts, correction)
    var_unit = (grad * _solve_sym3(h, grad, None)[0]).sum(0)  # gᵀ(JᵀJ)⁻¹g
    s2 = sigma * sigma if sigma is not None else cost / (n - 3)
    t1_sd = torch.sqrt(s2 * var_unit)
    yc = y - y.mean(-1, keepdim=True)
    r2 = 1.0 - cost / (yc * yc).sum(-1)
    polarity = (f < 0).sum(0)
    lo, hi = bounds_ms
    finite = torch.isfinite(torch.stack([a, b, ts, t1, t1_sd, r2], -1)).all(-1)
    ok = (
        converged
        & finite
        & (a > 0)
        & (b > a)
        & (ts >= lo)
        & (ts <= hi)
        & (t1 >= lo)
        & (t1 <= hi)
        & (var_unit > 0)
    )
    return {
        "t1_ms": t1,
        "t1_star_ms": ts,
        "a": a,
        "b": b,
        "r2": r2,
        "t1_sd_ms": t1_sd,
        "ok": ok,
        "polarity": polarity,
    }


def _readout_rate_per_ms(correction: str, flip_deg: float | None, tr_ms: float | None) -> float:
    """Validate the correction's arguments; return −ln(cos α)/τ (ms⁻¹) for ``"look-locker"``, else 0."""
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}; got {correction!r}.")
    if correction != "look-locker":
        if flip_deg is not None or tr_ms is not None:
            raise ValueError(
                f"flip_deg and tr_ms are used by correction='look-locker' only; got flip_deg="
                f"{flip_deg!r}, tr_ms={tr_ms!r} with correction={correction!r}."
            )
        return 0.0
    if flip_deg is None or tr_ms is None:
        raise ValueError(
            f"correction='look-locker' needs the readout's flip_deg and tr_ms; got flip_deg="
            f"{flip_deg!r}, tr_ms={tr_ms!r}."
        )
    numbers = [isinstance(x, (int, float)) and not isinstance(x, bool) for x in (flip_deg, tr_ms)]
    if not (numbers[0] and 0 < flip_deg < 90):
        raise ValueError(f"flip_deg must be a number in (0, 90) degrees; got {flip_deg!r}.")
    if not (numbers[1] and math.isfinite(tr_ms) and tr_ms > 0):
        raise ValueError(f"tr_ms must be a finite number > 0 ms; got {tr_ms!r}.")
    return -math.log(math.cos(math.radians(flip_deg))) / tr_ms


def _corrected_t1(
    a: torch.Tensor, b: torch.Tensor, ts: torch.Tensor, correction: tuple[str, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """T1 [V] from the fitted A, B, T1* [V] and ∂T1/∂(A, B, T1*) [3, V] (for the delta method)."""
    kind, rate_per_ms = correction
    if kind == "deichmann-haase":  # T1 = T1*·(B/A − 1)
        return ts * (b / a - 1.0), torch.stack([-ts * b / (a * a), ts / a, b / a - 1.0])
    zero = torch.zeros_like(ts)
    if kind == "none":
        return ts.clone(), torch.stack([zero, zero, torch.ones_like(ts)])
    # look-locker: 1/T1 = 1/T1* − rate, T1 = T1*/(1 − rate·T1*), ∂T1/∂T1* = (T1/T1*)²
    denom = 1.0 - rate_per_ms * ts
    return ts / denom, torch.stack([zero, zero, 1.0 / (denom * denom)])


def _scatter(
    data: _Data,
    maps: dict[str, torch.Tensor],
    n_iter: torch.Tensor,
    method: str,
    used: str,
    correction: str = "deichmann-haase",
) -> MolliFit:
    ok = maps["ok"]
    sel = data.sel
    dtype, dev = data.y.dtype, data.y.device
    out: dict[str, torch.Tensor] = {}
    for name in ("t1_ms", "t1_star_ms", "a", "b", "r2", "t1_sd_ms"):
        val = maps[name]
        if name in ("a", "b"):
            val = val * data.scale  # back to image units; T1, T1* and SD(T1) are scale-free
        full = torch.full(data.shape, math.nan, dtype=dtype, device=dev)
        full[sel] = torch.where(ok, val, torch.full_like(val, math.nan))
        out[name] = full
    ok_full = torch.zeros(data.shape, dtype=torch.bool, device=dev)
    ok_full[sel] = ok
    it = torch.zeros(data.shape, dtype=torch.long, device=dev)
    it[sel] = n_iter.to(torch.long)
    pol = torch.full(data.shape, -1, dtype=torch.long, device=dev)
    pol[sel] = torch.where(ok, maps["polarity"], -1)
    return MolliFit(
        **out, ok=ok_full, n_iter=it, polarity=pol, method=method, backend=used, correction=correction
    )
