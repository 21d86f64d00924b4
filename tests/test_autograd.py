"""Gradients of the engines w.r.t. tissue and sequence parameters (torch autograd).

Checked with ``torch.autograd.gradcheck`` (finite differences, float64) on small
trains, for every tissue kind and the paths that branch on data: shared vs per-spin
RF matrices (B1), real vs complex transverse propagators (df, df_b), the equal-
eigenvalue limit of the 2×2 exponential, diffusion and preparation.
"""

from __future__ import annotations

import pytest
import torch

import epgx

FLIPS = [90.0, 150.0, 120.0, 160.0, 130.0]
GRE_FLIPS = [20.0, 35.0, 15.0, 50.0, 25.0, 40.0]
GRE_PHASES = [0.0, 117.0, 351.0, 702.0, 1170.0, 1755.0]


def _real(z: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(z)


def _leaf(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_single_pool_tissue_gradients() -> None:
    def f(t1, t2, b1, df):
        tis = epgx.Tissue(t1_ms=t1, t2_ms=t2, b1=b1, df_hz=df)
        return _real(epgx.fse(tis, FLIPS, 10.0)), _real(epgx.gre(tis, GRE_FLIPS, 7.0, GRE_PHASES))

    args = (_leaf(900.0, 1200.0), _leaf(80.0, 45.0), _leaf(0.9, 1.1), _leaf(0.0, 12.0))
    assert torch.autograd.gradcheck(f, args, fast_mode=True)


@pytest.mark.parametrize("df_b", [0.0, 40.0])
def test_bm_tissue_gradients(df_b: float) -> None:
    def f(t1a, t1b, t2a, t2b, frac, k, dfb):
        tis = epgx.Tissue.bm(t1_ms=(t1a, t1b), t2_ms=(t2a, t2b), f=frac, k_ab_per_s=k, df_b_hz=dfb)
        return _real(epgx.fse(tis, FLIPS, 8.0)), _real(epgx.gre(tis, GRE_FLIPS, 6.0, GRE_PHASES))

    args = (_leaf(1000.0), _leaf(500.0), _leaf(100.0), _leaf(20.0), _leaf(0.2), _leaf(10.0), _leaf(df_b))
    assert torch.autograd.gradcheck(f, args, fast_mode=True)


def test_bm_gradient_at_equal_eigenvalues() -> None:
    """Identical pools with k_ab = 0: the 2×2 exponential's degenerate point stays smooth."""

    def f(t1, t2, k):
        tis = epgx.Tissue.bm(t1_ms=(t1, t1), t2_ms=(t2, t2), f=0.3, k_ab_per_s=k)
        return _real(epgx.fse(tis, FLIPS, 8.0))

    args = (_leaf(800.0), _leaf(60.0), _leaf(0.0))
    out = f(*args)
    grads = torch.autograd.grad(out.sum(), args)
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.autograd.gradcheck(lambda t1, t2: f(t1, t2, args[2]), args[:2], fast_mode=True)


def test_mt_tissue_gradients() -> None:
    def f(t1a, t1b, t2, frac, k, g):
        tis = epgx.Tissue.mt(t1_ms=(t1a, t1b), t2_ms=t2, f=frac, k_ab_per_s=k, mt_lineshape_us=g)
        prep = epgx.Prep(flip_deg=180.0, delay_ms=30.0, b1sq_tau_ut2ms=400.0)
        return (
            _real(epgx.fse(tis, FLIPS, 8.0, b1sq_tau_ut2ms=200.0)),
            _real(epgx.gre(tis, GRE_FLIPS, 6.0, GRE_PHASES, b1sq_tau_ut2ms=10.0, prep=prep)),
        )

    args = (_leaf(780.0), _leaf(700.0), _leaf(45.0), _leaf(0.12), _leaf(4.3), _leaf(15.0))
    assert torch.autograd.gradcheck(f, args, fast_mode=True)


def test_sequence_gradients() -> None:
    """Flip angles, phases and timing are differentiable too (sequence optimisation)."""
    tis = epgx.Tissue.bm(
        t1_ms=(1000.0, 500.0), t2_ms=(100.0, 20.0), f=0.2, k_ab_per_s=10.0, dtype=torch.float64
    )

    def f(flips, phases, esp):
        return _real(epgx.fse(tis, flips, esp, phases))

    args = (
        _leaf(*FLIPS),
        _leaf(0.0, 10.0, -5.0, 3.0, 8.0),
        torch.tensor(9.0, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(f, args, fast_mode=True)


def test_diffusion_coefficient_gradient() -> None:
    tis = epgx.Tissue(t1_ms=1000.0, t2_ms=100.0, dtype=torch.float64)

    def f(d):
        diff = epgx.Diffusion(grad_mt_per_m=[0.0, 20.0, 0.0], tau_ms=[1.0, 3.0, 1.0], d_um2_per_ms=d)
        return _real(epgx.fse(tis, FLIPS, 10.0, diffusion=diff))

    d = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (d,), fast_mode=True)
