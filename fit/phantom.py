"""Synthetic MOLLI data: inversion-time schemes, tissue T1s, the 3-parameter signal, Rician noise.

The signal is the Look-Locker inversion-recovery model that MOLLI fitting inverts
(Messroghli et al., MRM 2004;52:141–146; Deichmann & Haase, JMR 1992;96:608–612)::

    S(t) = A − B·exp(−t / T1*),   |S| is what a magnitude image holds,

with an ideal inversion and a readout that shortens the apparent relaxation time:

    1/T1* = 1/T1 + 1/T1_readout,   A = M0·T1*/T1,   B = A + M0,

so that S(0) = −M0, S(∞) = A (the readout's apparent steady state) and the Look-Locker
correction T1 = T1*·(B/A − 1) returns T1 exactly. Without readout perturbation
(T1_readout → ∞) this is T1* = T1 and B = 2A; with it B/A = 1 + T1/T1* > 2. The single
constant ``t1_readout_ms`` is a first-order stand-in for the readout's saturation
(Deichmann & Haase's 1/T1* = 1/T1 − ln(cos α)/τ); 3000 ms gives T1*/T1 ≈ 0.75 for native
myocardium, typical of bSSFP MOLLI. Every inversion is assumed to start from full
recovery (the assumption behind pooling all TIs into one curve); the pauses of a scheme
are where that recovery happens and do not enter the TIs.

Not simulated: incomplete recovery between inversions, imperfect inversion efficiency,
T2 and off-resonance effects of the bSSFP readout, motion.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "MOLLI_SCHEMES",
    "TISSUE_T1_MS",
    "MolliPhantom",
    "add_rician_noise",
    "molli_phantom",
    "molli_signal",
    "molli_ti_ms",
]

# Native 5(3)3 and post-contrast 4(1)3(1)2: Kellman & Hansen, JCMR 2014;16:2. The original
# 3(3)3(3)5: Messroghli et al., MRM 2004;52:141. "a(b)c": a images after an inversion,
# b heartbeats of recovery, c images after the next inversion.
MOLLI_SCHEMES = ("5(3)3", "4(1)3(1)2", "3(3)3(3)5")

# Representative 1.5 T T1 values (ms), rounded; not reference ranges for a scanner.
# Myocardium and blood, native and ~15 min after 0.15–0.2 mmol/kg gadolinium: the ranges
# reviewed by Kellman & Hansen, JCMR 2014;16:2 (native myocardium ~950–1050 ms, blood
# ~1500–1600 ms). Liver and subcutaneous fat: de Bazelaire et al., Radiology
# 2004;230:652–659 (586 ms and 343 ms at 1.5 T).
TISSUE_T1_MS = {
    "myocardium": 1000.0,
    "blood": 1550.0,
    "myocardium_post": 450.0,
    "blood_post": 300.0,
    "liver": 586.0,
    "fat": 343.0,
}


def _parse_scheme(scheme: str) -> list[int]:
    """Image counts per inversion of a MOLLI scheme string like ``"5(3)3"``."""
    if not isinstance(scheme, str) or not re.fullmatch(r"\d+(\(\d+\)\d+)*", scheme):
        raise ValueError(
            f"scheme must look like '5(3)3' (images per inversion, recovery heartbeats in "
            f"parentheses); got {scheme!r}. Known schemes: {', '.join(MOLLI_SCHEMES)}."
        )
    counts = [int(c) for c in re.sub(r"\(\d+\)", " ", scheme).split()]
    if any(c < 1 for c in counts):
        raise ValueError(f"every inversion of scheme {scheme!r} needs at least one image.")
    return counts


def molli_ti_ms(
    scheme: str = "5(3)3",
    heart_rate_bpm: float = 60.0,
    ti0_ms: float = 100.0,
    delta_ti_ms: float = 80.0,
) -> torch.Tensor:
    """Inversion times of a MOLLI scheme, sorted ascending (float64, ms).

    Construction (Messroghli et al. 2004; Kellman & Hansen 2014): inversion j = 0, 1, ...
    of the scheme acquires its images one R-R interval apart, the first at
    ``ti0_ms + j·delta_ti_ms`` after that inversion, so image i of inversion j is at

        TI = ti0_ms + j·delta_ti_ms + i·RR,   RR = 60000 / heart_rate_bpm ms.

    The recovery heartbeats in parentheses do not change the TIs. At 60 bpm with the
    defaults, 5(3)3 gives 100, 180, 1100, 1180, 2100, 2180, 3100, 4100 ms.

    Args:
        scheme: ``"5(3)3"`` (native), ``"4(1)3(1)2"`` (post-contrast), ``"3(3)3(3)5"``
            (original MOLLI), or any string of that form.
        heart_rate_bpm: heart rate, beats per minute (> 0).
        ti0_ms: first TI after the first inversion, ms (>= 0).
        delta_ti_ms: increment of the first TI from one inversion to the next, ms (> 0).

    Returns:
        ``[n_images]`` float64 tensor of TIs in ms.

    Raises:
        ValueError: malformed scheme, non-positive heart rate or increment, negative TI0.
    """
    counts = _parse_scheme(scheme)
    if not (math.isfinite(heart_rate_bpm) and heart_rate_bpm > 0):
        raise ValueError(f"heart_rate_bpm must be a finite number > 0; got {heart_rate_bpm!r}.")
    if not (math.isfinite(ti0_ms) and ti0_ms >= 0):
        raise ValueError(f"ti0_ms must be a finite number >= 0; got {ti0_ms!r}.")
    if not (math.isfinite(delta_ti_ms) and delta_ti_ms > 0):
        raise ValueError(f"delta_ti_ms must be a finite number > 0; got {delta_ti_ms!r}.")
    rr_ms = 60000.0 / heart_rate_bpm
    tis = [ti0_ms + j * delta_ti_ms + i * rr_ms for j, c in enumerate(counts) for i in range(c)]
    out = torch.tensor(sorted(tis), dtype=torch.float64)
    if bool((out.diff() == 0).any()):
        raise ValueError(
            f"scheme {scheme!r} at {heart_rate_bpm} bpm with delta_ti_ms={delta_ti_ms} gives "
            f"duplicate TIs: {out.tolist()}."
        )
    return out


def molli_signal(
    t1_ms: torch.Tensor | float,
    ti_ms: torch.Tensor | Sequence[float],
    m0: torch.Tensor | float = 1.0,
    t1_readout_ms: float = 3000.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signed 3-parameter MOLLI signal S(t) = A − B·exp(−t/T1*) (see the module docstring).

    Args:
        t1_ms: true T1, ms (> 0); any shape.
        ti_ms: ``[n]`` inversion times, ms.
        m0: equilibrium magnetisation (broadcasts with ``t1_ms``).
        t1_readout_ms: apparent relaxation time of the readout's saturation, ms (> 0).

    Returns:
        ``(signal [..., n], a [...], b [...], t1_star_ms [...])`` in float64 unless
        ``t1_ms`` is another floating dtype. Take ``signal.abs()`` for magnitude images.
    """
    t1 = torch.as_tensor(t1_ms)
    if not t1.is_floating_point():
        t1 = t1.to(torch.float64)
    ti = torch.as_tensor(ti_ms, dtype=t1.dtype)
    m0_t = torch.as_tensor(m0, dtype=t1.dtype)
    t1_star = 1.0 / (1.0 / t1 + 1.0 / t1_readout_ms)
    a = m0_t * t1_star / t1
    b = a + m0_t
    signal = a[..., None] - b[..., None] * torch.exp(-ti / t1_star[..., None])
    return signal, a, b, t1_star


def add_rician_noise(
    signal: torch.Tensor, noise_sd: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Magnitude of ``signal`` plus complex Gaussian noise of SD ``noise_sd`` per channel.

    The result is Rician distributed: |S + σ(n₁ + i n₂)|, n₁, n₂ ~ N(0, 1) independent.
    """
    noise = torch.randn((2, *signal.shape), generator=generator, dtype=signal.dtype)
    return torch.complex(signal + noise_sd * noise[0], noise_sd * noise[1]).abs()


@dataclass(frozen=True)
class MolliPhantom:
    """A synthetic MOLLI slice.

    Attributes:
        images: ``[H, W, n]`` magnitude images (Rician noise when ``snr`` was given).
        ti_ms: ``[n]`` sorted inversion times, ms.
        labels: ``[H, W]`` int64; 0 = background (no signal), i + 1 = ``tissues[i]``.
        tissues: tissue names, in label order.
        t1_ms, t1_star_ms, a, b: ``[H, W]`` true maps (NaN in the background).
        noise_sd: SD of the complex Gaussian noise per channel (0 when noiseless).
    """

    images: torch.Tensor
    ti_ms: torch.Tensor
    labels: torch.Tensor
    tissues: tuple[str, ...]
    t1_ms: torch.Tensor
    t1_star_ms: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    noise_sd: float


def molli_phantom(
    scheme: str = "5(3)3",
    shape: tuple[int, int] = (64, 64),
    tissues: Sequence[str] = ("fat", "liver", "myocardium", "blood"),
    snr: float | None = None,
    *,
    heart_rate_bpm: float = 60.0,
    ti0_ms: float = 100.0,
    delta_ti_ms: float = 80.0,
    t1_readout_ms: float = 3000.0,
    m0: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> MolliPhantom:
    """A 2-D MOLLI phantom of concentric regions, one tissue per region.

    Regions are concentric rings of equal width inside a disc of radius 0.95 (in units
    of half the shorter side), ``tissues[0]`` outermost, the last tissue a central disc;
    outside the disc is background (no signal, noise only). Each voxel's signal is
    :func:`molli_signal` at the TIs of :func:`molli_ti_ms`.

    Args:
        scheme, heart_rate_bpm, ti0_ms, delta_ti_ms: the TI construction of
            :func:`molli_ti_ms`.
        shape: ``(H, W)`` in voxels.
        tissues: names from :data:`TISSUE_T1_MS`.
        snr: ``m0 / noise_sd`` (the fully relaxed magnetisation over the per-channel
            noise SD); ``None`` for noiseless images.
        t1_readout_ms, m0: see :func:`molli_signal`.
        seed: seed of the noise generator (same seed, same images).
        dtype: floating dtype of the images and maps.

    Returns:
        A :class:`MolliPhantom`.

    Raises:
        ValueError: unknown tissue, bad shape, non-positive SNR.
    """
    unknown = [t for t in tissues if t not in TISSUE_T1_MS]
    if unknown or not tissues:
        raise ValueError(f"unknown tissues {unknown or list(tissues)}; known: {sorted(TISSUE_T1_MS)}.")
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (H, W) with H, W >= 1; got {shape!r}.")
    if snr is not None and not (math.isfinite(snr) and snr > 0):
        raise ValueError(f"snr must be a finite number > 0 or None; got {snr!r}.")
    ti = molli_ti_ms(scheme, heart_rate_bpm, ti0_ms, delta_ti_ms).to(dtype)
    h, w = shape
    yy = (torch.arange(h, dtype=torch.float64) - (h - 1) / 2) / (min(h, w) / 2)
    xx = (torch.arange(w, dtype=torch.float64) - (w - 1) / 2) / (min(h, w) / 2)
    radius = torch.sqrt(yy[:, None] ** 2 + xx[None, :] ** 2)
    n_t = len(tissues)
    ring = torch.floor((1.0 - radius / 0.95) * n_t).clamp(max=n_t - 1).to(torch.int64)  # 0 = outermost
    labels = torch.where(radius < 0.95, ring + 1, torch.zeros_like(ring))
    t1_lut = torch.tensor([math.nan] + [TISSUE_T1_MS[t] for t in tissues], dtype=dtype)
    t1 = t1_lut[labels]
    signal, a, b, t1_star = molli_signal(t1, ti, m0=m0, t1_readout_ms=t1_readout_ms)
    signal = torch.nan_to_num(signal, nan=0.0)
    noise_sd = 0.0 if snr is None else m0 / snr
    if snr is None:
        images = signal.abs()
    else:
        images = add_rician_noise(signal, noise_sd, torch.Generator().manual_seed(seed))
    return MolliPhantom(images, ti, labels, tuple(tissues), t1, t1_star, a, b, noise_sd)
