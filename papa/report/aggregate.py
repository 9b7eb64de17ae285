"""Collect every run's metrics.json into one tidy frame: one row per experiment x variant x seed x metric.

Runs live at ``<results>/<experiment>/<variant>/seed<S>/`` (see docs/interfaces.md). Every numeric scalar
of a metrics.json becomes a row (``mean``, ``min``, ``max``, ``std``, ``ensemble``, ``avg_soup``,
``greedy_soup``, ``greedy_soup_size``, ``avg_soup_repair``, ``greedy_soup_repair``, ``population``, ...);
lists and identifiers stay in the JSON files. A nested mapping of numbers becomes dotted metrics: the
``between_networks`` of a similarity.json gives ``between_networks.layer1``, ... Every row carries the ``code``
version its file records (papa.provenance.describe; empty for files written before it was recorded).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from papa.errors import PapaError
from papa.provenance import describe

COLUMNS = ["experiment", "variant", "seed", "metric", "value", "code"]


def run_dir(results: str | Path, experiment: str, variant: str, seed: int) -> Path:
    """The directory of one population run."""
    return Path(results) / experiment / variant / f"seed{seed}"


def run_of(path: str | Path) -> tuple[str, str, int] | None:
    """(experiment, variant, seed) of a file in a run directory, from its path; None if not one."""
    parts = Path(path).parent.parts
    if len(parts) < 3 or not parts[-1].startswith("seed") or not parts[-1][4:].isdigit():
        return None
    return parts[-3], parts[-2], int(parts[-1][4:])


def _identity(path: Path, data: dict) -> tuple[str, str, int]:
    """(experiment, variant, seed) from the JSON keys, else from the run directory's path."""
    from_path = run_of(path) or (None, None, None)
    keys = ("experiment", "variant", "seed")
    ident = tuple(data.get(k, default) for k, default in zip(keys, from_path, strict=True))
    if None in ident:
        raise PapaError(f"{path}: cannot tell experiment/variant/seed (not in the file nor its path)")
    return ident[0], ident[1], int(ident[2])


def read_metrics(path: str | Path) -> pd.DataFrame:
    """The tidy rows of one metrics.json."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PapaError(f"{path}: metrics file not found") from None
    except json.JSONDecodeError as e:
        raise PapaError(f"{path}: malformed JSON ({e})") from None
    experiment, variant, seed = _identity(path, data)
    code = describe(data.get("code"))
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= {f"{key}.{k}": v for k, v in value.items()}
        else:
            flat[key] = value
    rows = [
        (experiment, variant, seed, key, float(value), code)
        for key, value in flat.items()
        if key not in ("seed",) and isinstance(value, int | float) and not isinstance(value, bool)
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def aggregate(paths: Iterable[str | Path]) -> pd.DataFrame:
    """The tidy frame of many metrics.json files, sorted."""
    frames = [read_metrics(p) for p in paths]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    frame = pd.concat(frames, ignore_index=True)
    dup = frame.duplicated(["experiment", "variant", "seed", "metric"])
    if dup.any():
        e, v, s = frame[dup].iloc[0][COLUMNS[:3]]
        raise PapaError(f"two metrics files for experiment {e!r}, variant {v!r}, seed {s}")
    return frame.sort_values(COLUMNS[:4], ignore_index=True)


def find_metrics(results: str | Path) -> list[Path]:
    """Every ``<results>/*/*/seed*/metrics.json`` and ``similarity.json``."""
    return sorted(p for name in ("metrics.json", "similarity.json") for p in Path(results).glob(f"*/*/seed*/{name}"))


def over_seeds(values) -> dict:
    """What the reports show of one metric over seeds: ``n``, ``mean``, ``std`` (the sample standard
    deviation, ddof = 1: the seeds are a sample of the runs one could make; NaN for fewer than two), ``min``
    and ``max`` (NaN when there is no value)."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    return {
        "n": n,
        "mean": values.mean() if n else np.nan,
        "std": values.std(ddof=1) if n > 1 else np.nan,
        "min": values.min() if n else np.nan,
        "max": values.max() if n else np.nan,
    }


def write(frame: pd.DataFrame, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    return out


def load(path: str | Path) -> pd.DataFrame:
    """Read an aggregated CSV back (seed as int, value as float)."""
    try:
        frame = pd.read_csv(path, dtype={"experiment": str, "variant": str, "metric": str, "code": str})
    except FileNotFoundError:
        raise PapaError(f"{path}: aggregated metrics not found (run `papa aggregate` first)") from None
    missing = set(COLUMNS[:5]) - set(frame.columns)
    if missing:
        raise PapaError(f"{path}: not an aggregated metrics file (missing columns {sorted(missing)})")
    frame["seed"] = frame["seed"].astype(int)
    frame["value"] = frame["value"].astype(float)
    frame["code"] = frame["code"].fillna("").astype(str) if "code" in frame else ""
    return frame
