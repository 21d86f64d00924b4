"""epgx.jacobian cost as a multiple of one forward pass (issue 6 target: <= 3x), CPU.

The benchmark FSE (32 echoes, ESP 10 ms, 90° + 120° refocusing, where the echoes depend
on T1 through stimulated echoes; under 180° its derivative is exactly 0), two-pool BM tissue
T1 1000/500 ms, T2 100/20 ms, f 0.2, k_ab 10 s⁻¹, distinct T2 per spin, float32; the
Jacobian w.r.t. four parameters (t1_ms, t2_ms, f, k_ab_per_s) by forward mode, on the
route ``epgx.jacobian`` picks for this model: the dual-state engine (``epgx/_dual.py``:
the four tangent states carried beside the state in one pass; the test checks the route
was taken). The Jacobian is validated against central differences of a float64 run
before it is timed; the forward pass is the median of three ``epgx.fse`` calls in the
same test. 100 000 spins take about a minute. Run::

    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_jacobian.py --benchmark-only \\
        --benchmark-columns=median,iqr,min,max,rounds
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

import epgx
from epgx import _dual

ETL = 32
ESP_MS = 10.0
REFOCUS_DEG = 120.0
WRT = ("t1_ms", "t2_ms", "f", "k_ab_per_s")
# float32 forward mode vs float64 central differences, relative to each column's largest
# derivative: float32 rounding over 64 intervals
FLOAT32_RTOL = 1e-3


def _tissue(n: int, dtype: torch.dtype) -> epgx.Tissue:
    jitter = torch.linspace(0.0, 1.0, n, dtype=dtype)
    return epgx.Tissue.bm(
        t1_ms=(1000.0, 500.0), t2_ms=(100.0 + jitter, 20.0), f=0.2, k_ab_per_s=10.0, dtype=dtype
    )


def _model(tissue: epgx.Tissue) -> torch.Tensor:
    return epgx.fse(tissue, [90.0] + [REFOCUS_DEG] * ETL, ESP_MS, backend="torch")


def _validate(jac32: torch.Tensor) -> None:
    one = _tissue(1, torch.float64)
    cols = []
    for name in WRT:
        x = getattr(one, name)
        h = 1e-6 * x
        up, down = _model(one.replace(**{name: x + h})), _model(one.replace(**{name: x - h}))
        cols.append((up - down) / (2 * h))
    fd = torch.stack(cols, dim=-1)[0]
    err = (jac32[0].to(torch.complex128) - fd).abs().amax(0) / fd.abs().amax(0)
    assert bool((err < FLOAT32_RTOL).all()), err


@pytest.mark.parametrize("n_spins", [1000, 10000, 100000])
def test_bm_fse_jacobian_cpu(benchmark, machine_info, n_spins: int) -> None:
    assert _dual.jacobian(_model, _tissue(2, torch.float32), WRT) is not None, "not the dual-state route"
    tissue = _tissue(n_spins, torch.float32)
    jac = epgx.jacobian(_model, tissue, wrt=WRT)
    assert jac.shape == (n_spins, ETL, len(WRT))
    _validate(jac)

    forward = []
    for _ in range(4):
        start = time.perf_counter()
        _model(tissue)
        forward.append(time.perf_counter() - start)
    forward_median = statistics.median(forward[1:])

    benchmark.extra_info.update(machine_info)
    benchmark.pedantic(epgx.jacobian, args=(_model, tissue, WRT), rounds=3, iterations=1, warmup_rounds=1)
    ratio = benchmark.stats.stats.median / forward_median
    benchmark.extra_info.update(
        forward_median_s=forward_median, jacobian_over_forward=ratio, route="dual-state"
    )
    print(f"\n{n_spins} spins: forward {forward_median:.3f} s; jacobian ({len(WRT)} params) {ratio:.1f}x")
