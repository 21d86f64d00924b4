"""Random tissue batches and pulse trains shared by the kernel tests (interpreter lane)."""

from __future__ import annotations

import torch

import epgx


def random_tissue(
    kind: str, n: int, dtype: torch.dtype, seed: int = 0, *, t2b_min_ms: float = 5.0
) -> epgx.Tissue:
    """``n`` random spins of ``kind`` with B1, df and (BM) df_b varying per spin.

    Drawn in float64 from one seeded generator, then cast, so every dtype sees the same
    spins; ``t2b_min_ms`` is the shortest pool-b T2 of BM tissue.
    """
    g = torch.Generator().manual_seed(seed)

    def u(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)

    common = dict(b1=u(0.7, 1.2), df_hz=u(-30, 30))
    if kind == "single":
        return epgx.Tissue(u(500, 1500), u(40, 120), **common)
    if kind == "bm":
        return epgx.Tissue.bm(
            (u(600, 1500), u(200, 600)),
            (u(50, 120), u(t2b_min_ms, 40)),
            u(0.05, 0.4),
            u(0, 50),
            u(-100, 100),
            **common,
        )
    return epgx.Tissue.mt(
        (u(600, 1500), u(200, 1600)), u(50, 120), u(0.05, 0.3), u(0, 50), u(5, 20), **common
    )


def random_train(n_pulses: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> dict[str, torch.Tensor]:
    """A random train of ``n_pulses``: flip (deg), phase (deg) and ∫B1² dt (µT²·ms) per pulse,
    drawn in float64 from one seeded generator, then cast (as :func:`random_tissue`)."""
    g = torch.Generator().manual_seed(seed)

    def u(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n_pulses, generator=g, dtype=torch.float64)).to(dtype)

    return dict(flip_deg=u(20, 170), phase_deg=u(-180, 180), b1sq_tau_ut2ms=u(0.5, 2.0))
