"""Figures (PNG, matplotlib without a display): accuracy curves with the jumps at each averaging (the paper's
Figure 2) and a per-variant comparison of the population, its ensemble and its soups. The accuracy axis spans where
the values differ (``focus``): a soup at chance beside members at 97-99% is marked on its bottom edge instead."""

from itertools import groupby
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

from papa.errors import PapaError
from papa.io import write_atomic
from papa.report.aggregate import over_seeds, read_csv
from papa.variants import VARIANTS

# the measures of a ``variants`` figure, in the tables' order: (legend label, colour)
COMPARED = {"mean": ("Population mean", "C0"), "ensemble": ("Ensemble", "C1"), "avg_soup": ("Average soup", "C2"),
            "greedy_soup": ("Greedy soup", "C3")}
ZOOM_NOTE = "axis zoomed to where the values differ; \u25bc: a value below it"


def trajectory(history: pd.DataFrame, metric: str = "test_accuracy") -> pd.DataFrame:
    """Population mean of ``metric`` along training (columns epoch, phase, value): one point per epoch, two
    (``before_avg``, ``after_avg``) at an averaging, a last ``swa`` one where the members became their SWA averages."""
    mean = history.groupby(["epoch", "phase"], sort=True)[metric].mean()
    points = []
    for epoch, phases in mean.groupby(level="epoch"):
        phases = phases.droplevel("epoch")
        order = ("before_avg", "after_avg", "swa") if "after_avg" in phases else ("end", "swa")
        points += [(epoch, phase, phases[phase]) for phase in order if phase in phases]
    return pd.DataFrame(points, columns=["epoch", "phase", "value"])


def curves(figure: dict, histories: dict[tuple[str, int], Path], out: str | Path) -> None:
    _save(curves_figure(figure, histories), out)


def curve_keys(figure: dict, variants: list[str]) -> dict[str, tuple[str, str]]:
    """The curves of a ``curves`` figure: legend label -> (experiment, variant). One experiment's variants, or
    ``lines`` naming runs of different experiments (Figure 2 overlays PAPA-all with and without REPAIR)."""
    if figure.get("lines"):
        return {line["label"]: (line["experiment"], line["variant"]) for line in figure["lines"]}
    shown = figure.get("variants") or variants
    return {VARIANTS[v].label: (figure["experiment"], v) for v in sorted(shown, key=list(VARIANTS).index)}


def curves_figure(figure: dict, histories: dict[tuple[str, int], Path]) -> Figure:
    """Figure 2: per-epoch population mean accuracy of each curve (mean over seeds, shaded spread), and a second
    panel with each averaging's jump (after - before). ``histories``: (curve, seed) -> the run's history.csv, a
    curve being a variant of ``experiment`` or a ``lines`` label."""
    metric = figure.get("metric", "test_accuracy")
    kinds = {"epoch": int, "phase": str, metric: float}  # the columns of history.csv (papa.train.History) it reads
    experiment = figure.get("experiment") or figure.get("caption") or figure["name"]
    named = [line["label"] for line in figure.get("lines") or []]
    keys = named or sorted({v for v, _ in histories}, key=list(VARIANTS).index)  # variants in the tables' order
    colors = {k: f"C{i}" for i, k in enumerate(named)} or {k: v.color for k, v in VARIANTS.items()}
    labels = {k: k for k in named} or {k: v.label for k, v in VARIANTS.items()}
    lines = {}
    for v in keys:
        if not (paths := [p for (key, _), p in histories.items() if key == v]):
            raise PapaError(f"figure {figure['name']!r}: no history for {v!r}")
        both = pd.concat(trajectory(read_csv(p, kinds, "a history", "not found (train this run first)"), metric)
                         for p in paths).groupby(["epoch", "phase"], sort=False)["value"]
        lines[v] = both.mean().reset_index().assign(spread=both.std(ddof=1).fillna(0.0).to_numpy())
    jumps = {v: j for v, t in lines.items() if len(j := _jumps(t))}
    fig = Figure(figsize=(7, 6.8 if jumps else 4.6), layout="constrained")
    axes = fig.subplots(2 if jumps else 1, 1, sharex=True, squeeze=False, height_ratios=[2, 1] if jumps else [2])
    ax = axes[0, 0]
    single = all(len(t) == 1 for t in lines.values())  # a one-epoch run: one point per variant, no curve
    for i, (v, t) in enumerate(lines.items()):
        color = colors[v]
        if len(t) == 1:  # a marker, side by side with the other variants' (equal values would hide each other)
            x = t["epoch"] + (i - (len(lines) - 1) / 2) * 0.06
            ax.errorbar(x, t["value"], yerr=t["spread"], fmt="o", ms=6, capsize=3, color=color, label=labels[v])
        else:
            ax.plot(t["epoch"], t["value"], label=labels[v], lw=1.5, color=color)
            low, high = t["value"] - t["spread"], t["value"] + t["spread"]
            ax.fill_between(t["epoch"], low, high, color=color, alpha=0.15, lw=0)
        for phase, marker, size in (("after_avg", "o", 3.5), ("swa", "s", 5)):
            at = t[t["phase"] == phase]
            ax.plot(at["epoch"], at["value"], marker, ms=size, color=color)
    points = [(x, y, colors[v]) for v, t in lines.items() for x, y in zip(t["epoch"], t["value"], strict=True)]
    zoomed = _focus(ax, [y for _, y, _ in points], points)
    ax.set_ylabel(f"mean {'test' if metric == 'test_accuracy' else 'validation'} accuracy (%)")
    swa = any((t["phase"] == "swa").any() for t in lines.values())
    notes = [note for note, shown in (("dots: right after averaging", jumps), ("squares: the SWA averages", swa),
                                      ("one epoch: one point per variant", single), (ZOOM_NOTE, zoomed)) if shown]
    ax.set_title(f"{experiment}: population mean accuracy" + (f"\n({'; '.join(notes)})" if notes else ""),
                 fontsize="medium")
    ax.grid(alpha=0.3)
    if jumps:
        ax = axes[1, 0]
        for v, j in jumps.items():
            ax.plot(j["epoch"], j["jump"], "o-", ms=3.5, color=colors[v])
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylabel("change after averaging (%)")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("epoch")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    if single:
        epoch = next(iter(lines.values()))["epoch"].iloc[0]
        axes[-1, 0].set_xlim(epoch - 0.5, epoch + 0.5)
        axes[-1, 0].set_xticks([epoch])
    fig.legend(loc="outside upper center", ncols=len(lines), frameon=False)
    return fig


def focus(values) -> tuple[float, float] | None:
    """The value range worth an axis: without the few values (fewer than half) far below the rest, cut where the gap
    relative to the spread above it is largest and exceeds 1; None to keep every value."""
    v = np.sort(np.asarray([x for x in values if np.isfinite(x)], dtype=float))
    ratios = {k: (v[k] - v[k - 1]) / max(v[-1] - v[k], 1e-9) for k in range(1, (len(v) + 1) // 2)}
    cut = max(ratios, key=ratios.get, default=None)  # the first of the largest
    return None if cut is None or ratios[cut] <= 1 else (float(v[cut]), float(v[-1]))


def _focus(ax, values, points) -> bool:
    """Limit the y-axis of ``ax`` to ``focus(values)`` (padded) and mark the points (x, y, colour) below it
    with a triangle on the bottom edge and their value; whether it zoomed."""
    if (kept := focus(values)) is None:
        return False
    lo, hi = kept
    pad = max(0.12 * (hi - lo), 0.25)
    ax.set_ylim(lo - pad, hi + pad)
    edge = blended_transform_factory(ax.transData, ax.transAxes)
    below = sorted((x, y, c) for x, y, c in points if np.isfinite(y) and y < lo - pad)
    for _, group in groupby(below, key=lambda p: p[0]):
        for k, (x, y, color) in enumerate(group):
            ax.plot([x], [0.0], "v", ms=7, color=color, transform=edge, clip_on=False)
            ax.annotate(f"{y:.2f}", (x, 0.0), xycoords=edge, xytext=(6, 2 + 11 * k), textcoords="offset points",
                        color=color, fontsize="small")
    return True


def _jumps(t: pd.DataFrame) -> pd.DataFrame:
    wide = t.pivot(index="epoch", columns="phase", values="value").reindex(columns=["before_avg", "after_avg"]).dropna()
    return pd.DataFrame({"epoch": wide.index, "jump": (wide["after_avg"] - wide["before_avg"]).to_numpy()})


def compare(figure: dict, frame: pd.DataFrame, seeds: list[int], variants: list[str], out: str | Path) -> None:
    _save(compare_figure(figure, frame, seeds, variants), out)


def compare_figure(figure: dict, frame: pd.DataFrame, seeds: list[int], variants: list[str]) -> Figure:
    """Population mean, ensemble, average and greedy soup of each variant, one panel per experiment: mean over
    seeds with the standard deviation as error bar, each seed as a small dot."""
    shown = figure.get("variants") or variants
    experiments = figure["experiments"]
    frame = frame[frame.seed.isin(seeds)]
    fig = Figure(figsize=(1.6 + 1.5 * len(shown), 0.6 + 3.6 * len(experiments)), layout="constrained")
    axes = fig.subplots(len(experiments), 1, squeeze=False)[:, 0]
    width = 0.8 / len(COMPARED)
    for ax, experiment in zip(axes, experiments, strict=True):
        values, points = [], []
        for k, (metric, (label, color)) in enumerate(COMPARED.items()):
            x = np.arange(len(shown)) + (k - (len(COMPARED) - 1) / 2) * width
            here = frame[(frame.experiment == experiment) & (frame.metric == metric)]
            seeds_of = [here[here.variant == v]["value"].to_numpy() for v in shown]
            if not any(len(vals) for vals in seeds_of):
                raise PapaError(f"figure {figure['name']!r}: no {metric!r} results for experiment {experiment!r}")
            mean, std = np.array([(s["mean"], s["std"] if s["n"] > 1 else 0.0) for s in map(over_seeds, seeds_of)]).T
            ax.errorbar(x, mean, yerr=std, fmt="o", ms=6, capsize=3, label=label, color=color)
            for xi, vals in zip(x, seeds_of, strict=True):
                ax.plot([xi] * len(vals), vals, ".", ms=3, color=color, alpha=0.5)
            values += [*mean, *(mean - std), *(mean + std), *np.concatenate(seeds_of)]
            points += [(xi, m, color) for xi, m in zip(x, mean, strict=True)]
        zoomed = _focus(ax, values, points)
        ax.set_xticks(np.arange(len(shown)), [VARIANTS[v].label for v in shown])
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(experiment + (f" ({ZOOM_NOTE})" if zoomed else ""), fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncols=len(COMPARED), frameon=False)
    return fig


def _save(fig: Figure, out: str | Path) -> None:
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=150, format=Path(out).suffix.lstrip(".") or "png"))
