"""Gallery: every signal model of :mod:`epgx.models` for white matter, grey matter and CSF.

One panel per model of ``epgx.models.MODELS``, each run with its default protocol on three
single-pool tissues at 3 T, |signal| (M0 = 1) against what the protocol varies: readout
time after the inversion (MPRAGE, MP2RAGE, MEMPRAGE), echo time (FSE, MESE), TI (IR,
MOLLI), flip angle (VFA), RF phase increment (bSSFP), pulse or readout index (SPGR, MRF,
T1-T2 shuffling). Dense sweeps (VFA, bSSFP, IR) are the same model called with the swept
parameter; the default protocol's points are marked. A model added to ``MODELS`` without
a panel of its own here is still drawn, against readout index.

Run (a few seconds on one CPU core)::

    python examples/gallery.py

It writes ``examples/gallery.png``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import epgx
from epgx import fit
from epgx import models as M

# Relaxation times at 3 T, ms (T1, T2), rounded. WM, GM: Wansapura et al., JMRI 1999;9:531
# (WM 832 / 79.6, GM 1331 / 110). CSF: T1 ≈ 4.2 s (Lu et al., JMRI 2005;22:13), T2 ≈ 2 s
# (Spijkerman et al., MAGMA 2018;31:415).
TISSUES = {"WM": (830.0, 80.0), "GM": (1330.0, 110.0), "CSF": (4000.0, 2000.0)}
COLORS = {"WM": "tab:blue", "GM": "tab:orange", "CSF": "tab:green"}
MARKER = dict(marker="o", ms=4, ls="none")
NOTES = (
    "Single-pool tissue, M0 = 1, B1 = 1, on resonance.\n"
    "T1/T2 at 3 T: WM, GM Wansapura et al. 1999;\n"
    "CSF Lu et al. 2005 (T1), Spijkerman et al. 2018 (T2).\n\n"
    "Markers: the default protocol's points;\n"
    "solid lines through them: the same model, swept.\n"
    "Grey dotted (right axis): flip-angle schedules.\n"
    "Dashed vertical lines: TI (k-space centre)."
)

Panel = Callable[[Any, epgx.Tissue, int, int], torch.Tensor]


def default(model: Callable[..., Any], name: str) -> Any:
    """A model's default value of one protocol argument (titles follow the code)."""
    return inspect.signature(model).parameters[name].default


def tissues(dtype: torch.dtype = torch.float64) -> epgx.Tissue:
    t1, t2 = zip(*TISSUES.values(), strict=True)
    return epgx.Tissue(t1_ms=torch.tensor(t1, dtype=dtype), t2_ms=torch.tensor(t2, dtype=dtype))


def lines(ax: Any, x: Any, y: torch.Tensor, **kw: Any) -> None:
    """One line per tissue (y ``[3, n]``), coloured by tissue."""
    for name, row in zip(TISSUES, y, strict=True):
        ax.plot(x, row.numpy(), color=COLORS[name], **kw)


def shot_times_ms(ti_ms: float, esp_ms: float, n_readouts: int) -> torch.Tensor:
    """Time after the inversion of each pulse of a RAGE block centred on ``ti_ms``."""
    return ti_ms + (torch.arange(n_readouts, dtype=torch.float64) - n_readouts // 2) * esp_ms


def panel_spgr(ax: Any, t: epgx.Tissue, mrf_pulses: int, sweep: int) -> torch.Tensor:
    s = M.spgr(t)
    flip, tr = default(M.spgr, "flip_deg"), default(M.spgr, "tr_ms")
    lines(ax, range(1, s.shape[-1] + 1), s.abs())
    e1 = torch.exp(-tr / t.t1_ms)
    a = math.radians(flip)
    ernst = math.sin(a) * (1 - e1) / (1 - math.cos(a) * e1)
    for name, v in zip(TISSUES, ernst.tolist(), strict=True):
        ax.axhline(v, color=COLORS[name], ls=":", lw=1)
    ax.plot([], [], "k:", lw=1, label="Ernst steady state")
    ax.legend(fontsize=7)
    ax.set(xlabel="pulse", title=f"spgr: RF-spoiled, {flip:g}°, TR {tr:g} ms, {s.shape[-1]} pulses")
    return s


def panel_vfa(ax: Any, t: epgx.Tissue, mrf_pulses: int, sweep: int) -> torch.Tensor:
    s = M.vfa(t)
    flips, tr = default(M.vfa, "flip_deg"), default(M.vfa, "tr_ms")
    dense = torch.linspace(1.0, 40.0, sweep, dtype=torch.float64)
    lines(ax, dense.numpy(), M.vfa(t, flip_deg=dense).abs())
    lines(ax, flips, s.abs(), **MARKER)
    ax.set(
        xlabel="flip angle (°)",
        title=f"vfa: ideal-spoiled steady state, TR {tr:g} ms, {', '.join(f'{a:g}' for a in flips)}°",
    )
    return s


def panel_bssfp(ax: Any, t: epgx.Tissue, mrf_pulses: int, sweep: int) -> torch.Tensor:
    s = M.bssfp(t)
    flip, tr = default(M.bssfp, "flip_deg"), default(M.bssfp, "tr_ms")
    dense = torch.linspace(0.0, 360.0, sweep, dtype=torch.float64)
    lines(ax, dense.numpy(), M.bssfp(t, phase_increment_deg=dense).abs())
    lines(ax, default(M.bssfp, "phase_increment_deg"), s.abs(), **MARKER)
    ax.set(
        xlabel="RF phase increment per TR (°)",
        xticks=range(0, 361, 90),
        title=f"bssfp: steady state, {flip:g}°, TR {tr:g} ms, TE = TR/2",
    )
    return s


def panel_ir(ax: Any, t: epgx.Tissue, mrf_pulses: int, sweep: int) -> torch.Tensor:
    s = M.ir(t)
    tis, tr = default(M.ir, "ti_ms"), default(M.ir, "tr_ms")
    dense = torch.linspace(10.0, tis[-1], sweep, dtype=torch.float64)
    lines(ax, dense.numpy(), M.ir(t, ti_ms=dense).abs())
    lines(ax, tis, s.abs(), **MARKER)
    ax.set(xlabel="TI (ms)", title=f"ir: TR {tr:g} ms, 90°, TI {', '.join(f'{x:g}' for x in tis)} ms")
    return s


def panel_mprage(ax: Any, t: epgx.Tissue, mrf_pulses: int, sweep: int) -> torch.Tensor:
    s = M.mprage(t)
    d = {k: default(M.mprage, k) for k in ("ti_ms", "tr_ms", "flip_deg", "esp_ms", "n_readouts")}
    lines(ax, shot_times_ms(d["ti_ms"], d["esp_ms"], d["n_readouts"]).numpy(), s.abs())
    ax.axvline(d["ti_ms"], color="grey", ls="--", lw=1, label="TI (k-space centre)")
    ax.legend(fontsize=7)
    ax.set(
        xlabel="time after inversion (ms)",
        title=f"mprage: TR {d['tr_ms']:g}, TI {d['ti_ms']:g} ms, {d['flip_deg']:g}°, "
        f"{d['n_readouts']} × {d['esp_ms']:g} ms",
    )
    return s


def panel_mp2rage(ax: Any, t: epgx.Tissue, mrf_pulses: int, sweep: int) -> torch.Tensor:
    s = M.mp2rage(t)
    d = {k: default(M.mp2rage, k) for k in ("ti_ms", "tr_ms", "flip_deg", "esp_ms", "n_readouts")}
    n = d["n_readouts"]
    uni = M.mp2rage_uni(s, n)
    for i, ti in enumerate(d["ti_ms"]):
        x = shot_times_ms(ti, d["esp_ms"], n).numpy()
        for j, name in enumerate(TISSUES):
            label = f"{name}: UNI {uni[j].item():+.2f}" if i == 0 else None
            ax.plot(x, s[j, i * n : (i + 1) * n].abs().numpy(), color=COLORS[name], label=label)
        ax.axvline(ti, color="grey", ls="--", lw=1)
    ax.legend(fontsize=7)
    ax.set(
        xlabel="time after inversion (ms)",
        title=f"mp2rage: TR {d['tr_ms']:g}, TI {'/'.join(f'{x:g}' for x in d['ti_ms'])} ms, "
        f"{'/'.join(f'{x:g}' for x in d['flip_deg'])}°, {n} × {d['esp_ms']:g} ms",
    )
    return s


def panel_memprage(ax: Any, t: epgx.Tissue, mrf_pulses: int, sweep: int) -> torch.Tensor:
    s = M.memprage(t)
    d = {k: default(M.memprage, k) for k in ("ti_ms", "tr_ms", "flip_deg", "esp_ms", "n_readouts", "te_ms")}
    tes = d["te_ms"]
    echoes = s.abs().reshape(s.shape[0], d["n_readouts"], len(tes))  # [3, readouts, echoes]
    x = shot_times_ms(d["ti_ms"], d["esp_ms"], d["n_readouts"]).numpy()
    lines(ax, x, echoes[..., 0])
    lines(ax, x, echoes[..., -1], ls="--")
    ax.plot([], [], "k-", label=f"TE {tes[0]:g} ms")
    ax.plot([], [], "k--", label=f"TE {tes[-1]:g} ms (T2* = T2)")
    ax.axvline(d["ti_ms"], color="grey", ls="--", lw=1)
    ax.legend(fontsize=7)
    ax.set(
        xlabel="time after inversion (ms)",
        title=f"memprage: TR {d['tr_ms']:g}, TI {d['ti_ms']:g} ms, {d['flip_deg']:g}°, {len(tes)} echoes",
    )
    return s


def panel_fse(ax: Any, t: epgx.Tissue, mrf_pulses: int, sweep: int) -> torch.Tensor:
    s = M.fse(t)
    etl, esp = default(M.fse, "etl"), default(M.fse, "esp_ms")
    te = esp * torch.arange(1, etl + 1, dtype=torch.float64)
    lines(ax, te.numpy(), s.abs())
    flips = M.t2w_vfa_schedule_deg(etl)
    twin = ax.twinx()
    twin.plot(te.numpy(), flips.numpy(), color="grey", lw=1, ls=":")
    twin.set(ylabel="refocusing flip (°, dotted)", ylim=(0, 190))
    ax.set(
        xlabel="echo time (ms)",
        title=f"fse: VFA T2w, ETL {etl}, ESP {esp:g} ms, {flips.min():.0f}–{flips.max():.0f}°",
    )
    return s


def panel_mese(ax: Any, t: epgx.Tissue, mrf_pulses: int, sweep: int) -> torch.Tensor:
    s = M.mese(t)
    etl, esp = default(M.mese, "etl"), default(M.mese, "esp_ms")
    refoc = default(M.mese, "refocusing_deg")
    lines(ax, (esp * torch.arange(1, etl + 1, dtype=torch.float64)).numpy(), s.abs(), marker=".", ms=3)
    ax.set(xlabel="echo time (ms)", title=f"mese: CPMG, {etl} × {refoc:g}°, ESP {esp:g} ms")
    return s


def panel_t1t2_shuffling(ax: Any, t: epgx.Tissue, mrf_pulses: int, sweep: int) -> torch.Tensor:
    s = M.t1t2_shuffling(t)
    recs, etl = default(M.t1t2_shuffling, "recovery_ms"), default(M.t1t2_shuffling, "etl")
    esp = default(M.t1t2_shuffling, "esp_ms")
    lines(ax, range(s.shape[-1]), s.abs())
    for i, rec in enumerate(recs):
        ax.axvline(i * etl, color="grey", lw=0.8)
        ax.text(
            i * etl + 2, 0.97, f"then {rec:g} ms", transform=ax.get_xaxis_transform(), fontsize=7, va="top"
        )
    ax.set(
        xlabel="readout (train by train)",
        title=f"t1t2_shuffling: {len(recs)} × ETL {etl}, ESP {esp:g} ms, steady state",
    )
    return s


def mrf_panel(ax: Any, s: torch.Tensor, flips: torch.Tensor, title: str) -> torch.Tensor:
    x = range(1, s.shape[-1] + 1)
    for name, row in reversed(list(zip(TISSUES, s.abs(), strict=True))):  # CSF, the largest, below
        ax.plot(x, row.numpy(), color=COLORS[name], lw=0.7)
    twin = ax.twinx()
    twin.plot(range(1, flips.shape[0] + 1), flips.numpy(), color="grey", lw=0.6, ls=":")
    twin.set(ylabel="flip angle (°, dotted)", ylim=(0, 3 * float(flips.max())))
    ax.set(xlabel="pulse", title=title)
    return s


def panel_fisp_mrf(ax: Any, t: epgx.Tissue, mrf_pulses: int, sweep: int) -> torch.Tensor:
    flips, trs = M.fisp_mrf_schedule(mrf_pulses)
    s = M.fisp_mrf(t, flip_deg=flips, tr_ms=trs)
    ti, te = default(M.fisp_mrf, "ti_ms"), default(M.fisp_mrf, "te_ms")
    title = f"fisp_mrf: {mrf_pulses} pulses, TR {trs.min():.1f}–{trs.max():.1f} ms, TE {te:g}, TI {ti:g} ms"
    return mrf_panel(ax, s, flips, title)


def panel_bssfp_mrf(ax: Any, t: epgx.Tissue, mrf_pulses: int, sweep: int) -> torch.Tensor:
    flips, trs = M.bssfp_mrf_schedule(mrf_pulses)
    s = M.bssfp_mrf(t, flip_deg=flips, tr_ms=trs)
    title = (
        f"bssfp_mrf: {mrf_pulses} pulses, TR {trs.min():.1f}–{trs.max():.1f} ms, "
        f"TI {default(M.bssfp_mrf, 'ti_ms'):g} ms"
    )
    return mrf_panel(ax, s, flips, title)


def panel_molli(ax: Any, t: epgx.Tissue, mrf_pulses: int, sweep: int) -> torch.Tensor:
    s = M.molli(t)
    d = {k: default(M.molli, k) for k in ("scheme", "heart_rate_bpm", "ti0_ms", "delta_ti_ms", "flip_deg")}
    ti = fit.molli_ti_ms(d["scheme"], d["heart_rate_bpm"], d["ti0_ms"], d["delta_ti_ms"])
    res = fit.molli(s.abs(), ti)
    dense = torch.linspace(0.0, float(ti[-1]), 200, dtype=torch.float64)
    for j, name in enumerate(TISSUES):
        ax.plot(ti.numpy(), s[j].abs().numpy(), color=COLORS[name], **MARKER)
        curve = (res.a[j] - res.b[j] * torch.exp(-dense / res.t1_star_ms[j])).abs()
        label = f"{name}: fitted T1 {res.t1_ms[j].item():.0f} ms"
        ax.plot(dense.numpy(), curve.numpy(), color=COLORS[name], lw=1, ls="--", label=label)
    ax.legend(fontsize=7, title="3-parameter fit (dashed)", title_fontsize=7)
    ax.set(
        xlabel="TI (ms)",
        title=f"molli: {d['scheme']} at {d['heart_rate_bpm']:g} bpm, bSSFP {d['flip_deg']:g}°",
    )
    return s


def panel_generic(model: Callable[..., torch.Tensor]) -> Panel:
    """Fallback for a model without its own panel: |signal| against readout index."""

    def panel(ax: Any, t: epgx.Tissue, mrf_pulses: int, sweep: int) -> torch.Tensor:
        s = model(t)
        lines(ax, range(1, s.shape[-1] + 1), s.abs())
        ax.set(xlabel="readout", title=f"{model.__name__}: default protocol")
        return s

    return panel


PANELS: dict[str, Panel] = {
    "mprage": panel_mprage,
    "mp2rage": panel_mp2rage,
    "memprage": panel_memprage,
    "fse": panel_fse,
    "mese": panel_mese,
    "t1t2_shuffling": panel_t1t2_shuffling,
    "spgr": panel_spgr,
    "vfa": panel_vfa,
    "bssfp": panel_bssfp,
    "ir": panel_ir,
    "molli": panel_molli,
    "fisp_mrf": panel_fisp_mrf,
    "bssfp_mrf": panel_bssfp_mrf,
}


def render(
    path: Path, *, mrf_pulses: int = 1000, sweep_points: int = 61, dpi: int = 80
) -> dict[str, torch.Tensor]:
    """Draw one panel per model of ``epgx.models.MODELS`` into the PNG ``path``.

    Args:
        path: where to write the PNG.
        mrf_pulses: pulses of the two MRF schedules (the models' default is 1000).
        sweep_points: points of the dense VFA, bSSFP and IR sweeps.
        dpi: resolution of the PNG.

    Returns:
        each model's default-protocol signal, complex ``[3, n_readouts]`` (WM, GM, CSF).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in PANELS if n in M.MODELS] + sorted(set(M.MODELS) - set(PANELS))
    ncols = 4
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows), squeeze=False)
    t = tissues()
    signals = {}
    for ax, name in zip(axes.flat, names, strict=False):
        panel = PANELS.get(name) or panel_generic(M.MODELS[name])
        signals[name] = panel(ax, t, mrf_pulses, sweep_points)
        ax.set_ylabel("|signal| (M0 = 1)")
        ax.set_ylim(bottom=0)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    if len(names) < axes.size:
        axes.flat[len(names)].text(0, 1, NOTES, va="top", fontsize=10, wrap=True)
    handles = [
        plt.Line2D([], [], color=COLORS[n], label=f"{n} (T1 {t1:g} ms, T2 {t2:g} ms)")
        for n, (t1, t2) in TISSUES.items()
    ]
    fig.suptitle("epgx.models at their default protocols: single-pool brain tissue at 3 T", y=0.997)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.975), ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return signals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".png"), help="PNG path")
    parser.add_argument("--dpi", type=int, default=80, help="PNG resolution (default 80)")
    args = parser.parse_args()
    start = time.perf_counter()
    render(args.out, dpi=args.dpi)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
