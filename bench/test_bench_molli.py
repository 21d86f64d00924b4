"""MOLLI T1 fit benchmark: epgx.fit.molli "lm" and "adam" vs scipy Nelder–Mead per voxel (CPU);
the fused Triton kernel on a 256×256×8 volume (GPU, skipped without CUDA).

Data: native myocardium (T1 1000 ms) from the synthetic phantom's signal model, MOLLI
5(3)3 at 60 bpm, Rician noise at SNR 50 (M0 / σ), a fresh noise draw per voxel, float64.
Every timed fit is first validated against the truth: T1 RMSE within 1.25× the
Cramér–Rao SD (computed here in numpy) and fewer than 1 % of voxels off by > 20 %.
scipy's Nelder–Mead runs on a subset and is scaled per voxel. Run::

    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_molli.py --benchmark-only \\
        --benchmark-columns=median,iqr,min,max,rounds -s

``-s`` shows the summary lines (time per 10k voxels, the ratio to Nelder–Mead). The GPU
cases validate the kernel's maps against the CRLB and against the torch path (on the
GPU, a subset) before timing ``fit.molli(..., backend="triton")`` end to end (input
checks, compaction, one launch, maps) and the kernel launch alone.
"""

from __future__ import annotations

import importlib
import math
import time

import numpy as np
import pytest
import torch

from epgx import fit

T1_MS = 1000.0
SNR = 50.0
SCHEME = "5(3)3"
# issue 8's bar: an efficient estimator reaches 1.0; fewer than 1 % gross failures.
CRLB_RATIO_MAX = 1.25
OUTLIER_REL, OUTLIER_FRACTION = 0.20, 0.01
N_NELDER_MEAD = 50
# GPU: issue 8's volume and its target for the whole fit.
GPU_VOLUME = (256, 256, 8)
GPU_TARGET_S = 5e-3
# The kernel vs the torch path on the GPU, relative T1: float64 both at the least-squares
# minimiser (tests/test_molli_kernel.py GPU_FLOAT64_RTOL); float32 with the GPU's
# approximate exp/division as well as each path's float32 stopping band.
GPU_T1_RTOL = {torch.float64: 1e-10, torch.float32: 1e-3}
GPU_SUBSET_SLICES = 4  # 4 × 256 × 8 = 8192 voxels through the torch path for the comparison


def _voxels(n_vox: int, seed: int = 0, t1_ms: float = T1_MS):
    ti = fit.molli_ti_ms(SCHEME)
    signal, a, b, ts = fit.molli_signal(torch.full((n_vox,), t1_ms, dtype=torch.float64), ti)
    images = fit.add_rician_noise(signal, 1.0 / SNR, torch.Generator().manual_seed(seed))
    return images, ti, (a[0].item(), b[0].item(), ts[0].item())


def _crlb_sd(ti: torch.Tensor, a: float, b: float, ts: float) -> float:
    t = ti.numpy()
    e = np.exp(-t / ts)
    jac = np.stack([np.ones_like(e), -e, -b * e * t / ts**2], axis=1)
    grad = np.array([-ts * b / a**2, ts / a, b / a - 1.0])
    return float(np.sqrt(grad @ np.linalg.solve(jac.T @ jac * SNR**2, grad)))


def _validate(
    res: fit.MolliFit, crlb: float, check_crlb: bool = True, t1_ms: float = T1_MS
) -> dict[str, float]:
    err = res.t1_ms - t1_ms
    good = res.ok & (err.abs() <= OUTLIER_REL * t1_ms)
    rmse = err[res.ok].pow(2).mean().sqrt().item()
    outliers = 1.0 - good.float().mean().item()
    if check_crlb:
        assert outliers < OUTLIER_FRACTION, outliers
        assert rmse <= CRLB_RATIO_MAX * crlb, (rmse, crlb)
    return {"rmse_ms": rmse, "crlb_sd_ms": crlb, "rmse_over_crlb": rmse / crlb, "bad_fraction": outliers}


def _nelder_mead_per_voxel_s(images: torch.Tensor, ti: torch.Tensor, crlb: float) -> float:
    fit.molli(images[:2], ti, method="nelder-mead")  # import scipy outside the timing
    t0 = time.perf_counter()
    res = fit.molli(images, ti, method="nelder-mead")
    elapsed = time.perf_counter() - t0
    assert res.ok.float().mean() > 0.9
    _validate(res, crlb, check_crlb=False)
    return elapsed / images.shape[0]


@pytest.mark.parametrize("n_vox", [10_000, 100_000])
def test_molli_lm_cpu(benchmark, machine_info, n_vox: int) -> None:
    images, ti, truth = _voxels(n_vox)
    crlb = _crlb_sd(ti, *truth)
    stats = _validate(fit.molli(images, ti), crlb)

    benchmark.extra_info.update(machine_info)
    benchmark.extra_info.update(stats)
    benchmark.pedantic(fit.molli, args=(images, ti), rounds=7 if n_vox <= 10_000 else 3, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["voxels_per_s"] = n_vox / median
    ratio, bad = stats["rmse_over_crlb"], stats["bad_fraction"]
    print(f"\nlm, {n_vox} voxels: median {median * 1e3:.1f} ms; RMSE {stats['rmse_ms']:.2f} ms", end="")
    print(f" = {ratio:.3f} x CRLB SD {crlb:.2f} ms; bad {bad:.4f}")


def test_molli_adam_cpu(benchmark, machine_info) -> None:
    """The paper's Adam (lr 3e-4, 1000 steps) on blood (T1 1550 ms).

    Blood, not myocardium: Adam's fixed start (T1* = 1 s, k = 2) is T1 = 1000 ms, the
    myocardium truth itself. The lr is far too small to get there in 1000 steps; the
    accuracy is recorded, not asserted, with lm on the same data for contrast.
    """
    n_vox, t1 = 10_000, fit.TISSUE_T1_MS["blood"]
    images, ti, truth = _voxels(n_vox, t1_ms=t1)
    crlb = _crlb_sd(ti, *truth)
    lm = _validate(fit.molli(images, ti), crlb, t1_ms=t1)
    res = benchmark.pedantic(fit.molli, args=(images, ti), kwargs={"method": "adam"}, rounds=1, iterations=1)
    stats = _validate(res, crlb, check_crlb=False, t1_ms=t1)
    benchmark.extra_info.update(machine_info)
    benchmark.extra_info.update(stats)
    median = benchmark.stats.stats.median
    ratio, lm_ratio = stats["rmse_over_crlb"], lm["rmse_over_crlb"]
    print(
        f"\nadam (1000 steps), {n_vox} blood voxels: {median:.2f} s; RMSE {stats['rmse_ms']:.1f} ms", end=""
    )
    print(f" = {ratio:.1f} x CRLB SD {crlb:.1f} ms (lm: {lm_ratio:.3f} x)")


def test_molli_nelder_mead_cpu(benchmark, machine_info) -> None:
    images, ti, truth = _voxels(N_NELDER_MEAD, seed=1)
    crlb = _crlb_sd(ti, *truth)
    fit.molli(images[:2], ti, method="nelder-mead")  # import scipy outside the timing
    res = benchmark.pedantic(
        fit.molli, args=(images, ti), kwargs={"method": "nelder-mead"}, rounds=3, iterations=1
    )
    stats = _validate(res, crlb, check_crlb=False)
    benchmark.extra_info.update(machine_info)
    benchmark.extra_info.update(stats)
    per_voxel = benchmark.stats.stats.median / N_NELDER_MEAD
    benchmark.extra_info["per_voxel_s"] = per_voxel
    print(f"\nnelder-mead, {N_NELDER_MEAD} voxels: {per_voxel * 1e3:.2f} ms per voxel", end="")
    print(f" = {per_voxel * 1e4:.1f} s per 10k voxels; RMSE {stats['rmse_ms']:.2f} ms")


def test_molli_speedup_vs_nelder_mead(benchmark, machine_info) -> None:
    """lm on 10k voxels and Nelder–Mead on a 50-voxel subset, measured in one run."""
    images, ti, truth = _voxels(10_000, seed=2)
    crlb = _crlb_sd(ti, *truth)
    stats = _validate(fit.molli(images, ti), crlb)
    nm_per_voxel = _nelder_mead_per_voxel_s(images[:N_NELDER_MEAD], ti, crlb)
    benchmark.pedantic(fit.molli, args=(images, ti), rounds=7, warmup_rounds=1)
    lm_per_voxel = benchmark.stats.stats.median / images.shape[0]
    ratio = nm_per_voxel / lm_per_voxel
    benchmark.extra_info.update(machine_info)
    benchmark.extra_info.update(stats)
    benchmark.extra_info.update(
        {"nm_per_voxel_s": nm_per_voxel, "lm_per_voxel_s": lm_per_voxel, "ratio": ratio}
    )
    assert math.isfinite(ratio)
    nm_s, lm_ms = nm_per_voxel * 1e4, lm_per_voxel * 1e4 * 1e3
    print(f"\nspeed-up: Nelder-Mead {nm_s:.1f} s / 10k voxels, lm {lm_ms:.1f} ms / 10k voxels", end="")
    print(f": {ratio:.0f}x; lm RMSE = {stats['rmse_over_crlb']:.3f} x CRLB SD")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("part", ["fit", "kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_molli_triton_gpu_volume(benchmark, machine_info, dtype: torch.dtype, part: str) -> None:
    """The fused kernel on a 256×256×8 volume (524 288 voxels, 5(3)3: 8 TIs), one launch.

    ``fit``: ``fit.molli(..., backend="triton")`` end to end; ``kernel``: the launch alone on
    the prepared (compacted, sorted, normalised) voxels.
    """
    from epgx.kernels import molli as kernel

    torch_path = importlib.import_module("epgx.fit.molli")
    n_vox = math.prod(GPU_VOLUME)
    images, ti, truth = _voxels(n_vox)
    crlb = _crlb_sd(ti, *truth)
    images = images.reshape(*GPU_VOLUME, -1).to("cuda", dtype)
    ti = ti.to("cuda")
    res = fit.molli(images, ti, backend="triton")
    assert res.backend == "triton" and res.t1_ms.dtype == dtype
    stats = _validate(res, crlb)
    sub = slice(0, GPU_SUBSET_SLICES)
    want = fit.molli(images[sub], ti, backend="torch")
    ok = res.ok[sub] & want.ok
    assert ok.float().mean() > 0.99
    rel = ((res.t1_ms[sub][ok] - want.t1_ms[ok]).abs() / want.t1_ms[ok]).max().item()
    assert rel <= GPU_T1_RTOL[dtype], rel
    stats["t1_rel_vs_torch_path"] = rel

    if part == "fit":

        def run() -> None:
            fit.molli(images, ti, backend="triton")
            torch.cuda.synchronize()

    else:
        data = torch_path._prepare(images, ti, None, None)
        out = torch.empty(kernel.N_ROWS, n_vox, dtype=dtype, device="cuda")
        kw = dict(signed=False, n_grid=64, grid_t1_star_ms=(50.0, 5000.0), max_iter=50, out=out)

        def run() -> None:
            kernel.molli_fit(data.y, data.t, **kw)
            torch.cuda.synchronize()

    benchmark.extra_info.update(machine_info)
    benchmark.extra_info.update(stats)
    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({"voxels_per_s": n_vox / median, "target_s": GPU_TARGET_S})
    print(f"\ntriton {part}, {n_vox} voxels, {dtype}: median {median * 1e3:.2f} ms", end="")
    ratio = stats["rmse_over_crlb"]
    print(f" (target {GPU_TARGET_S * 1e3:.0f} ms); T1 vs torch path {rel:.1e}; RMSE/CRLB {ratio:.3f}")
