"""Optimise the refocusing flip angles of T1-T2 shuffling for T1 and T2 precision (CRLB).

The sequence: :func:`epgx.models.t1t2_shuffling`, three FSE trains of 16 echoes (ESP
5.6 ms, CPMG, one refocusing train shared by all three), each followed by a spoiler and
a recovery time of 400, 800 or 1600 ms, in the periodic steady state of the cycle. The
tissue set: white-matter-like (T1 830 ms, T2 80 ms) and grey-matter-like (1330 / 110 ms).

Estimated parameters: T1 and T2. Nuisance parameters: M0 and the phase of the complex
data. Noise: Gaussian with σ = 0.01 (M0 = 1) on the real and imaginary parts of every
echo.

Objective, minimised with Adam over the 16 refocusing angles::

    Σ_tissues [CRLB(T1)/T1² + CRLB(T2)/T2²]  +  λ · mean((α / 180°)²)

the summed squared coefficients of variation of T1 and T2 plus the SAR-like penalty of
``examples/optimize_fse_crlb.py`` (whose flip bounds, sigmoid map, noise level and
penalty this script imports): flips stay in [20°, 180°] through
α = 20° + 160°·sigmoid(u). λ is smaller than there because the bounds of this 48-echo,
T1-sensitised protocol are smaller. The gradient w.r.t. the angles comes from autograd
through epgx.crlb and epgx.jacobian on the torch engine.

Run (about a minute on one CPU core)::

    python examples/optimize_shuffling_crlb.py

It prints the loss and the bounds before and after and writes
``examples/optimize_shuffling_crlb.png`` (loss curve, flip-angle trains, the signal of
the WM-like tissue before and after).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import epgx


def _load_fse_example():
    path = Path(__file__).resolve().with_name("optimize_fse_crlb.py")
    spec = importlib.util.spec_from_file_location("optimize_fse_crlb", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_fse = _load_fse_example()
flips_from, unconstrained, sar = _fse.flips_from, _fse.unconstrained, _fse.sar
NOISE_SD = _fse.NOISE_SD

ETL = 16
ESP_MS = 5.6
RECOVERY_MS = (400.0, 800.0, 1600.0)
SAR_WEIGHT = 0.001
INITIAL_DEG = 120.0  # a constant low-SAR train, the starting point
TISSUES = {"WM-like": (830.0, 80.0), "GM-like": (1330.0, 110.0)}


def signal_of(
    tissue: epgx.Tissue, refocus_deg: torch.Tensor, recovery_ms: Sequence[float], esp_ms: float
) -> torch.Tensor:
    return epgx.models.t1t2_shuffling(
        tissue,
        recovery_ms=recovery_ms,
        etl=refocus_deg.shape[-1],
        esp_ms=esp_ms,
        refocusing_deg=refocus_deg,
        backend="torch",
    )


def relative_crlb(
    refocus_deg: torch.Tensor,
    tissue: epgx.Tissue,
    recovery_ms: Sequence[float] = RECOVERY_MS,
    esp_ms: float = ESP_MS,
) -> torch.Tensor:
    """``[n_tissues, 2]``: CRLB / value² of (T1, T2), with M0 and phase as nuisance."""

    def shuffling(t: epgx.Tissue) -> torch.Tensor:
        return signal_of(t, refocus_deg, recovery_ms, esp_ms)

    signal, jac = epgx.jacobian(shuffling, tissue, wrt=("t1_ms", "t2_ms"), return_signal=True)
    var = epgx.crlb(jac, NOISE_SD, signal, nuisance=("m0", "phase"))  # ms²
    return var / torch.stack([tissue.t1_ms, tissue.t2_ms], dim=-1) ** 2


def objective(
    refocus_deg: torch.Tensor, tissue: epgx.Tissue, **protocol
) -> tuple[torch.Tensor, torch.Tensor]:
    crlb_term = relative_crlb(refocus_deg, tissue, **protocol).sum()
    return crlb_term + SAR_WEIGHT * sar(refocus_deg), crlb_term


def report(name: str, refocus_deg: torch.Tensor, tissue: epgx.Tissue, **protocol) -> torch.Tensor:
    with torch.no_grad():
        rel = relative_crlb(refocus_deg, tissue, **protocol)
    cv = rel.sqrt().tolist()
    per_tissue = "; ".join(
        f"{k} CV(T1) {100 * c[0]:.2f} %, CV(T2) {100 * c[1]:.2f} %" for k, c in zip(TISSUES, cv, strict=True)
    )
    print(
        f"{name:>22}: Σ CRLB(T1)/T1² {rel[:, 0].sum().item():.3e}, "
        f"Σ CRLB(T2)/T2² {rel[:, 1].sum().item():.3e}; "
        f"SAR {sar(refocus_deg).item():.3f} of 180°; {per_tissue}"
    )
    return rel.sum(dim=0)


def plot(
    path: Path,
    history: list[tuple[float, float]],
    flips: dict[str, torch.Tensor],
    tissue: epgx.Tissue,
    recovery_ms: Sequence[float],
    esp_ms: float,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    loss, crlb_term = zip(*history, strict=True)
    ax[0].semilogy(loss, label="loss")
    ax[0].semilogy(crlb_term, "--", label="Σ CRLB(T1)/T1² + CRLB(T2)/T2²")
    ax[0].set(xlabel="Adam iteration", title="objective")
    ax[0].legend()
    etl = next(iter(flips.values())).shape[-1]
    for (name, f), style in zip(flips.items(), ("o-", "s-"), strict=True):
        ax[1].plot(torch.arange(1, etl + 1).numpy(), f.numpy(), style, ms=3, label=name)
        with torch.no_grad():
            sig = signal_of(tissue, f, recovery_ms, esp_ms).abs()[0]
        ax[2].plot(
            torch.arange(1, sig.numel() + 1).numpy(), sig.numpy(), style, ms=3, label=f"{name}, WM-like"
        )
    for k in range(1, len(recovery_ms)):
        ax[2].axvline(k * etl + 0.5, color="0.8", lw=0.8)
    ax[1].set(
        xlabel="refocusing pulse", ylabel="flip angle (°)", ylim=(0, 185), title="flip-angle train (shared)"
    )
    ax[1].legend()
    rec = ", ".join(f"{r:g}" for r in recovery_ms)
    ax[2].set(xlabel="echo (train by train)", ylabel="|echo| (M0 = 1)", title=f"signal, recovery {rec} ms")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def optimise(
    iters: int,
    lr: float = 0.1,
    *,
    etl: int = ETL,
    recovery_ms: Sequence[float] = RECOVERY_MS,
    esp_ms: float = ESP_MS,
    device: torch.device | None = None,
    log_every: int = 20,
) -> tuple[torch.Tensor, torch.Tensor, epgx.Tissue, list[tuple[float, float]]]:
    """Adam over the shared refocusing train; returns (initial, final, tissue, history)."""
    device = device or torch.device("cpu")
    t1, t2 = zip(*TISSUES.values(), strict=True)
    as64 = dict(dtype=torch.float64, device=device)
    tissue = epgx.Tissue(t1_ms=torch.tensor(t1, **as64), t2_ms=torch.tensor(t2, **as64))
    initial = torch.full((etl,), INITIAL_DEG, **as64)
    u = unconstrained(initial).requires_grad_(True)
    opt = torch.optim.Adam([u], lr=lr)
    history: list[tuple[float, float]] = []
    for it in range(iters):
        loss, crlb_term = objective(flips_from(u), tissue, recovery_ms=recovery_ms, esp_ms=esp_ms)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((loss.item(), crlb_term.item()))
        if log_every and (it % log_every == 0 or it == iters - 1):
            print(f"iter {it:4d}  loss {loss.item():.4e}  Σ CRLB/value² {crlb_term.item():.4e}")
    return initial, flips_from(u).detach(), tissue, history


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=80, help="Adam iterations (default 80)")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam learning rate on the logits")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".png"), help="PNG path")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    initial, final, tissue, history = optimise(args.iters, args.lr, device=device)
    print(f"{args.iters} Adam iterations in {time.perf_counter() - start:.1f} s on {device}\n")

    before = report(f"constant {INITIAL_DEG:.0f}° (start)", initial, tissue)
    after = report("optimised", final, tissue)
    b, a = before.tolist(), after.tolist()
    print(
        f"\noptimised vs start: Σ CRLB(T1)/T1² {b[0] / a[0]:.2f}x lower, "
        f"Σ CRLB(T2)/T2² {b[1] / a[1]:.2f}x lower, "
        f"at {100 * sar(final).item() / sar(initial).item():.0f} % of the start's RF energy"
    )
    print("optimised flips (deg):", [round(v, 1) for v in final.cpu().tolist()])
    flips = {f"start ({INITIAL_DEG:.0f}°)": initial.cpu(), "optimised": final.cpu()}
    plot(args.out, history, flips, tissue.to("cpu"), RECOVERY_MS, ESP_MS)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
