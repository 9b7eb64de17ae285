"""Figures (PNG, matplotlib without a display): accuracy curves with the jumps at each averaging (the
paper's Figure 2) and a per-variant comparison of the population, its ensemble and its soups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from papa.errors import PapaError
from papa.report.aggregate import over_seeds
from papa.report.tables import VARIANT_NAMES

COLORS = {"baseline": "C0", "papa": "C1", "papa-all": "C2", "papa-2": "C3"}
COMPARED = {
    "mean": "population mean",
    "ensemble": "ensemble",
    "avg_soup": "average soup",
    "greedy_soup": "greedy soup",
}


def read_history(path: str | Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise PapaError(f"{path}: history not found (train this run first)") from None


def trajectory(history: pd.DataFrame, metric: str = "test_accuracy") -> pd.DataFrame:
    """Population mean of ``metric`` along training: one point per epoch, or two (``before_avg`` then
    ``after_avg``) at epochs that end with an averaging, and a last ``swa`` point where the members became
    their SWA averages (train.swa). Columns: epoch, phase, value."""
    mean = history.groupby(["epoch", "phase"], sort=True)[metric].mean()
    points = []
    for epoch, phases in mean.groupby(level="epoch"):
        phases = phases.droplevel("epoch")
        order = ("before_avg", "after_avg", "swa") if "after_avg" in phases else ("end", "swa")
        points += [(epoch, phase, phases[phase]) for phase in order if phase in phases]
    return pd.DataFrame(points, columns=["epoch", "phase", "value"])


def curves(figure: dict, histories: dict[tuple[str, int], Path], out: str | Path) -> None:
    """Figure 2: per-epoch population mean accuracy of each variant (mean over seeds, shaded spread);
    averaging epochs show a vertical jump, and a second panel shows each jump (after - before).
    ``histories`` maps (variant, seed) to the run's history.csv."""
    metric, experiment = figure.get("metric", "test_accuracy"), figure["experiment"]
    lines = {}
    for v in dict.fromkeys(v for v, _ in histories):
        paths = [p for (variant, _), p in histories.items() if variant == v]
        both = pd.concat(trajectory(read_history(p), metric) for p in paths)
        both = both.groupby(["epoch", "phase"], sort=False)["value"]
        spread = both.std(ddof=1).fillna(0.0).to_numpy() if len(paths) > 1 else 0.0
        lines[v] = both.mean().reset_index().assign(spread=spread)
    jumps = {v: _jumps(t) for v, t in lines.items()}
    jumps = {v: j for v, j in jumps.items() if len(j)}
    fig = Figure(figsize=(7, 6.5 if jumps else 4.2), layout="constrained")
    rows = 2 if jumps else 1
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False, height_ratios=[2, 1][:rows])
    ax = axes[0, 0]
    for v, t in lines.items():
        (line,) = ax.plot(t["epoch"], t["value"], label=VARIANT_NAMES[v], lw=1.5, color=COLORS[v])
        low, high = t["value"] - t["spread"], t["value"] + t["spread"]
        ax.fill_between(t["epoch"], low, high, color=line.get_color(), alpha=0.15, lw=0)
        after = t[t["phase"] == "after_avg"]
        ax.plot(after["epoch"], after["value"], "o", ms=3.5, color=line.get_color())
        swa = t[t["phase"] == "swa"]
        ax.plot(swa["epoch"], swa["value"], "s", ms=5, color=line.get_color())
    name = "test" if metric == "test_accuracy" else "validation"
    ax.set_ylabel(f"mean {name} accuracy (%)")
    swa_note = "; squares: the SWA averages" if any((t["phase"] == "swa").any() for t in lines.values()) else ""
    ax.set_title(f"{experiment}: population mean accuracy (dots: right after averaging{swa_note})")
    ax.legend()
    ax.grid(alpha=0.3)
    if jumps:
        ax = axes[1, 0]
        for v, j in jumps.items():
            ax.plot(j["epoch"], j["jump"], "o-", ms=3.5, label=VARIANT_NAMES[v], color=COLORS[v])
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylabel("change after averaging (%)")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("epoch")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, out)


def _jumps(t: pd.DataFrame) -> pd.DataFrame:
    wide = t.pivot(index="epoch", columns="phase", values="value")
    if "after_avg" not in wide:
        return pd.DataFrame(columns=["epoch", "jump"])
    wide = wide.dropna(subset=["after_avg", "before_avg"])
    return pd.DataFrame({"epoch": wide.index, "jump": (wide["after_avg"] - wide["before_avg"]).to_numpy()})


def compare(
    figure: dict, frame: pd.DataFrame, seeds: list[int], variants: list[str], out: str | Path
) -> None:
    """Population mean, ensemble, average and greedy soup of each variant, one panel per experiment:
    mean over seeds with the standard deviation as error bar, each seed as a small dot."""
    shown = figure.get("variants") or variants
    experiments = figure["experiments"]
    frame = frame[frame.seed.isin(seeds)]
    fig = Figure(figsize=(1.6 + 1.5 * len(shown), 3.6 * len(experiments)), layout="constrained")
    axes = fig.subplots(len(experiments), 1, squeeze=False)[:, 0]
    width = 0.8 / len(COMPARED)
    for ax, experiment in zip(axes, experiments, strict=True):
        for k, (metric, label) in enumerate(COMPARED.items()):
            x = np.arange(len(shown)) + (k - (len(COMPARED) - 1) / 2) * width
            here = frame[(frame.experiment == experiment) & (frame.metric == metric)]
            values = [here[here.variant == v]["value"].to_numpy() for v in shown]
            if not any(len(vals) for vals in values):
                name = figure["name"]
                raise PapaError(f"figure {name!r}: no {metric!r} results for experiment {experiment!r}")
            stats = [over_seeds(vals) for vals in values]
            mean = [s["mean"] for s in stats]
            std = [s["std"] if s["n"] > 1 else 0.0 for s in stats]
            bars = ax.errorbar(x, mean, yerr=std, fmt="o", ms=6, capsize=3, label=label)
            for xi, vals in zip(x, values, strict=True):
                ax.plot([xi] * len(vals), vals, ".", ms=3, color=bars[0].get_color(), alpha=0.5)
        ax.set_xticks(np.arange(len(shown)), [VARIANT_NAMES[v] for v in shown])
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(experiment)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small", ncols=2)
    _save(fig, out)


def _save(fig: Figure, out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
