"""``kmax`` truncation of block sequences (:func:`epgx.blocks.simulate` and the GRE models).

Oracles: the general GRE engine :func:`epgx.gre` with the same ``kmax`` (tested against
EPG-X, and sharing with the block engine only :mod:`epgx.ops`), the untruncated block
engine, and (interpreter lane) the pure-torch block engine against the fused kernel.
"""

from __future__ import annotations

import os

import pytest
import torch
from spins import random_tissue

import epgx
from epgx import dictionary as D
from epgx import models
from epgx.blocks import Delay, GreReadout, Inversion, _Program, simulate

# Same float64 operators in a different event bookkeeping (blocks vs engine): rounding only.
ENGINE_ATOL = 1e-12
# Truncation error of the default FISP-MRF schedule's first 300 pulses against kmax
# (float64, T1 300-2000 ms, T2 30-200 ms, M0 = 1; measured 2.1e-2, 2.6e-3, 2.0e-4, 5.0e-6
# for kmax 3, 9, 19, 39): each bound is ~2x the measured value, and each error must shrink.
FISP_TRUNCATION = {3: 4e-2, 9: 5e-3, 19: 4e-4, 39: 1e-5}

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _tissue(kind: str, n: int = 6, dtype: torch.dtype = torch.float64) -> epgx.Tissue:
    return random_tissue(kind, n, dtype, seed=3)


def _fisp_tissue() -> epgx.Tissue:
    t1 = torch.tensor([300.0, 800.0, 2000.0], dtype=torch.float64)
    t2 = torch.tensor([30.0, 80.0, 200.0], dtype=torch.float64)
    return epgx.Tissue(t1.repeat_interleave(3), t2.repeat(3))


@pytest.mark.parametrize("kmax", [0, 1.5, -1, True, "3"])
def test_kmax_validated(kmax: object) -> None:
    seq = [GreReadout(flip_deg=10.0, tr_ms=5.0, n_pulses=3)]
    if kmax == 0:
        assert simulate(_tissue("single"), seq, kmax=0).shape == (6, 3)
        return
    with pytest.raises(ValueError, match=r"kmax must be None \(exact\) or an int >= 0; got"):
        simulate(_tissue("single"), seq, kmax=kmax)  # type: ignore[arg-type]


def test_kmax_none_and_large_are_exact() -> None:
    tissue = _tissue("bm")
    seq = [Inversion(), Delay(30.0), GreReadout(flip_deg=torch.linspace(5, 50, 30), tr_ms=8.0, te_ms=2.0)]
    exact = simulate(tissue, seq, backend="torch")
    assert torch.equal(simulate(tissue, seq, kmax=None, backend="torch"), exact)
    # 30 shifts: no order above 30 ever lives, so kmax 30 keeps everything
    assert torch.equal(simulate(tissue, seq, kmax=30, backend="torch"), exact)
    assert not torch.allclose(simulate(tissue, seq, kmax=3, backend="torch"), exact, atol=1e-6)


def test_sizes_capped_at_kmax_plus_one() -> None:
    tissue = _tissue("single")
    events = [e for b in [Inversion(), GreReadout(flip_deg=20.0, tr_ms=5.0, n_pulses=40)] for e in b.events()]
    exact = _Program(events, tissue).sizes(events, prune=True)
    capped = _Program(events, tissue, kmax=7).sizes(events, prune=True)
    assert max(exact) > 8
    assert capped == [min(n, 8) for n in exact]


@pytest.mark.parametrize("kind", ["single", "bm", "mt"])
@pytest.mark.parametrize("spoiling", ["rf", "fisp"])
@pytest.mark.parametrize("kmax", [0, 2, 9])
def test_block_gre_equals_engine_kmax(kind: str, spoiling: str, kmax: int) -> None:
    tissue = _tissue(kind)
    flips = torch.linspace(5.0, 60.0, 40, dtype=torch.float64)
    energy = 1.5
    seq = [GreReadout(flip_deg=flips, tr_ms=7.0, spoiling=spoiling, b1sq_tau_ut2ms=energy)]
    got = simulate(tissue, seq, kmax=kmax, backend="torch")
    phase = epgx.rf_spoiling_phases_deg(40) if spoiling == "rf" else 0.0
    want = epgx.gre(tissue, flips, 7.0, phase, energy, kmax=kmax, backend="torch")
    assert torch.allclose(got, want, rtol=0, atol=ENGINE_ATOL)
    exact = epgx.gre(tissue, flips, 7.0, phase, energy, backend="torch")
    assert not torch.allclose(got, exact, rtol=0, atol=1e-6)  # the truncation did act


def test_fisp_mrf_truncation_error_shrinks_with_kmax() -> None:
    tissue = _fisp_tissue()
    exact = models.fisp_mrf(tissue, n_pulses=300, backend="torch")
    errors = []
    for kmax, bound in FISP_TRUNCATION.items():
        got = models.fisp_mrf(tissue, n_pulses=300, kmax=kmax, backend="torch")
        errors.append(float((got - exact).abs().max()))
        assert errors[-1] < bound, (kmax, errors[-1])
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors


def test_models_and_dictionary_pass_kmax() -> None:
    tissue = _fisp_tissue()
    want = models.fisp_mrf(tissue, n_pulses=30, kmax=4, backend="torch")
    assert not torch.allclose(want, models.fisp_mrf(tissue, n_pulses=30, backend="torch"), atol=1e-6)
    g = D.grid(t1_ms=[300.0, 800.0, 2000.0], t2_ms=[30.0, 80.0, 200.0])
    d = D.generate("fisp_mrf", g, {"n_pulses": 30, "kmax": 4}, dtype=torch.float64, progress=False)
    assert d.protocol["kmax"] == 4
    order = torch.from_numpy(g.values["t1_ms"]), torch.from_numpy(g.values["t2_ms"])
    ref = models.fisp_mrf(epgx.Tissue(*order), n_pulses=30, kmax=4, backend="torch")
    assert torch.allclose(d.atoms, ref, rtol=0, atol=ENGINE_ATOL)
    # balanced MRF: only order 0 lives, kmax changes nothing
    b = models.bssfp_mrf(tissue, n_pulses=20, backend="torch")
    assert torch.equal(models.bssfp_mrf(tissue, n_pulses=20, kmax=0, backend="torch"), b)
    # SPGR: the block path (TE > 0) and the engine path (TE = 0) both truncate
    for te in (0.0, 1.0):
        s = models.spgr(tissue, n_pulses=30, te_ms=te, kmax=2, backend="torch")
        assert not torch.allclose(s, models.spgr(tissue, n_pulses=30, te_ms=te, backend="torch"), atol=1e-6)


@pytest.mark.skipif(not INTERPRETED, reason="Triton interpreter lane: set TRITON_INTERPRET=1 before pytest")
@pytest.mark.parametrize("kind", ["single", "bm", "mt"])
def test_kernel_kmax_equals_torch(kind: str) -> None:
    pytest.importorskip("triton")
    from epgx.kernels import epg_program

    tissue = _tissue(kind, n=16)
    seq = [Inversion(), Delay(20.0), GreReadout(flip_deg=torch.linspace(10, 40, 16), tr_ms=6.0, te_ms=1.0)]
    kmax = 3
    events = [e for b in seq for e in b.events()]
    program = _Program(events, tissue, True, kmax)
    p = {k: v.reshape(-1) for k, v in tissue.fields().items()}
    assert epg_program.tables(program, p, events, True, (0, 0)).n_states == kmax + 1
    got = simulate(tissue, seq, kmax=kmax, backend="triton")
    want = simulate(tissue, seq, kmax=kmax, backend="torch")
    assert torch.allclose(got, want, rtol=0, atol=ENGINE_ATOL)
    assert not torch.allclose(got, simulate(tissue, seq, backend="torch"), rtol=0, atol=1e-6)
