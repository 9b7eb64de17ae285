"""Collect every run's metrics.json into one tidy frame: one row per experiment x variant x seed x metric.

Runs live at ``<results>/<experiment>/<variant>/seed<S>/`` (see docs/interfaces.md). Every numeric scalar
of a metrics.json becomes a row (``mean``, ``min``, ``max``, ``std``, ``ensemble``, ``avg_soup``,
``greedy_soup``, ``greedy_soup_size``, ``avg_soup_repair``, ``greedy_soup_repair``, ``population``, ...);
lists and identifiers stay in the JSON files. A nested mapping of numbers becomes dotted metrics: the
``between_networks`` of a similarity.json gives ``between_networks.layer1``, ... Every row carries the ``code``
version its file records (papa.provenance.describe; empty for files written before it was recorded).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from papa.errors import PapaError
from papa.io import write_text
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
    for key, value, kind in zip(keys, ident, (str, str, int), strict=True):
        if not isinstance(value, kind) or isinstance(value, bool):
            raise PapaError(f"{path}: {key}: {value!r} is not {'an integer' if kind is int else 'a string'}")
    return ident


def read_metrics(path: str | Path) -> pd.DataFrame:
    """The tidy rows of one metrics.json."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode())
    except FileNotFoundError:
        raise PapaError(f"{path}: metrics file not found") from None
    except UnicodeDecodeError as e:
        raise PapaError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise PapaError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        found = {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(type(data), "a number")
        raise PapaError(f"{path}: expected a JSON object of metrics, found {found}")
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
    """``frame`` as CSV, atomically: a failed write (a full disk) leaves an earlier file whole."""
    write_text(out, frame.to_csv(index=False))
    return Path(out)


def load(path: str | Path) -> pd.DataFrame:
    """Read an aggregated CSV back (seed as int, value as float)."""
    kinds = {"experiment": str, "variant": str, "seed": int, "metric": str, "value": float}
    frame = read_csv(path, kinds, "aggregated metrics", "not found (run `papa aggregate` first)", rows=False)
    # older files have no code column
    frame["code"] = frame["code"].astype(object).fillna("").astype(str) if "code" in frame else ""
    return frame


def read_csv(path: str | Path, kinds: dict[str, type], what: str, missing: str, rows: bool = True) -> pd.DataFrame:
    """A CSV file papa wrote (metrics.csv, history.csv), checked first, each problem one PapaError line: UTF-8 text,
    complete (papa ends every line with a newline: a file cut short is refused, never read up to its cut), a
    header with the columns of ``kinds`` ({column: int, float or str}), data rows unless ``rows`` is False,
    every row as long as the header, and each value of its column's kind (float: a number, or empty for NaN).
    ``missing``: what to say when the file is not there."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PapaError(f"{path}: {what} {missing}") from None
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise PapaError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None
    if not text.strip():
        raise PapaError(f"{path}: empty file, expected {what} (CSV)")
    if not text.endswith("\n"):
        raise PapaError(f"{path}: cut short: its last line is incomplete (a copy or write stopped part-way)")
    header, *body = csv.reader(io.StringIO(text))
    absent = [c for c in kinds if c not in header]
    if absent:
        raise PapaError(f"{path}: not {what}: no column {', '.join(map(repr, absent))} (found "
                        f"{', '.join(map(repr, header))})")
    if rows and not body:
        raise PapaError(f"{path}: no rows, only a header")
    for line, row in enumerate(body, 2):
        if len(row) != len(header):
            raise PapaError(f"{path}: line {line} has {len(row)} fields, the header {len(header)}")
        for column, kind in kinds.items():
            value = row[header.index(column)]
            try:
                if kind is not str and not (kind is float and value == ""):
                    kind(value)
            except ValueError:
                raise PapaError(f"{path}: line {line}: {column}: {value!r} is not "
                                f"{'an integer' if kind is int else 'a number'}") from None
    return pd.read_csv(io.StringIO(text), dtype={c: k for c, k in kinds.items() if k is str}).astype(
        {c: k for c, k in kinds.items() if k is not str})
