"""FSE benchmark of the Torch-EPG-X abstract, CPU: 32 echoes, ESP 10 ms, 1 ... 100k spins.

Two-pool BM tissue T1 1000/500 ms, T2 100/20 ms, f 0.2, k_ab 10 s⁻¹ (and the single-pool
T1 1000 / T2 100 ms case), refocusing 180° and 120°, float32. Every size is validated
against a float64 run of one spin before it is timed. Run::

    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_fse.py --benchmark-only \\
        --benchmark-columns=median,iqr,min,max,rounds
"""

from __future__ import annotations

import pytest
import torch
from conftest import BATCH_SIZES

import epgx

ETL = 32
ESP_MS = 10.0
# float32 vs float64 echoes: rounding over 64 intervals stays far below this.
FLOAT32_ATOL = 1e-5
# each spin-step = one RF pulse or one ESP/2 relax-shift interval of one spin
STEPS = (ETL + 1) + 2 * ETL


def _tissue(kind: str, n: int, dtype: torch.dtype) -> epgx.Tissue:
    # distinct T2 per spin so nothing could be deduplicated
    jitter = torch.linspace(0.0, 1.0, n, dtype=dtype)
    if kind == "bm":
        return epgx.Tissue.bm(
            t1_ms=(1000.0, 500.0), t2_ms=(100.0 + jitter, 20.0), f=0.2, k_ab_per_s=10.0, dtype=dtype
        )
    return epgx.Tissue(t1_ms=1000.0, t2_ms=100.0 + jitter, dtype=dtype)


@pytest.mark.parametrize("n_spins", BATCH_SIZES)
@pytest.mark.parametrize("refocus_deg", [180.0, 120.0])
@pytest.mark.parametrize("kind", ["bm", "single"])
def test_fse_cpu(benchmark, machine_info, kind: str, refocus_deg: float, n_spins: int) -> None:
    flips = [90.0] + [refocus_deg] * ETL
    tissue = _tissue(kind, n_spins, torch.float32)
    echoes = epgx.fse(tissue, flips, ESP_MS)
    assert echoes.shape == (n_spins, ETL)
    one = _tissue(kind, 1, torch.float64)
    ref = epgx.fse(one, flips, ESP_MS)[0]
    assert (echoes[0].to(torch.complex128) - ref).abs().max().item() < FLOAT32_ATOL

    benchmark.extra_info.update(machine_info)
    benchmark.pedantic(epgx.fse, args=(tissue, flips, ESP_MS), rounds=3, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["spin_steps_per_s"] = n_spins * STEPS / median
