"""Every run's metrics.json (and similarity.json) as one tidy frame: one row per experiment x variant x seed x
metric (docs/interfaces.md). Each numeric scalar is a row, a nested mapping of numbers gives dotted metrics
(``between_networks.layer1``), and every row carries its file's ``code`` version (papa.provenance.describe)."""

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
    return Path(results) / experiment / variant / f"seed{seed}"


def run_of(path: str | Path) -> tuple[str, str, int] | None:
    """(experiment, variant, seed) of a file in a run directory, from its path; None if not one."""
    parts = Path(path).parent.parts
    if len(parts) < 3 or not parts[-1].startswith("seed") or not parts[-1][4:].isdigit():
        return None
    return parts[-3], parts[-2], int(parts[-1][4:])


def _identity(path: Path, data: dict) -> tuple[str, str, int]:
    """(experiment, variant, seed) from the JSON keys, else from the run directory's path."""
    keys = ("experiment", "variant", "seed")
    ident = tuple(data.get(k, default) for k, default in zip(keys, run_of(path) or (None,) * 3, strict=True))
    if None in ident:
        raise PapaError(f"{path}: cannot tell experiment/variant/seed (not in the file nor its path)")
    for key, value, kind in zip(keys, ident, (str, str, int), strict=True):
        if not isinstance(value, kind) or isinstance(value, bool):
            raise PapaError(f"{path}: {key}: {value!r} is not {'an integer' if kind is int else 'a string'}")
    return ident


def _text(path: Path, missing: str) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PapaError(f"{path}: {missing}") from None
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise PapaError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None


def read_metrics(path: str | Path) -> pd.DataFrame:
    """The tidy rows of one metrics.json."""
    path = Path(path)
    try:
        data = json.loads(_text(path, "metrics file not found"))
    except json.JSONDecodeError as e:
        raise PapaError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        found = {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(type(data), "a number")
        raise PapaError(f"{path}: expected a JSON object of metrics, found {found}")
    ident = _identity(path, data)
    code = describe(data.get("code"))
    flat = {}
    for key, value in data.items():
        flat |= {f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value}
    rows = [(*ident, key, float(value), code) for key, value in flat.items()
            if key != "seed" and isinstance(value, int | float) and not isinstance(value, bool)]
    return pd.DataFrame(rows, columns=COLUMNS)


def aggregate(paths: Iterable[str | Path]) -> pd.DataFrame:
    """The tidy frame of many metrics.json files, sorted."""
    frames = [read_metrics(p) for p in paths]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    frame = pd.concat(frames, ignore_index=True)
    if (dup := frame.duplicated(COLUMNS[:4])).any():
        e, v, s = frame[dup].iloc[0][COLUMNS[:3]]
        raise PapaError(f"two metrics files for experiment {e!r}, variant {v!r}, seed {s}")
    return frame.sort_values(COLUMNS[:4], ignore_index=True)


def find_metrics(results: str | Path) -> list[Path]:
    return sorted(p for name in ("metrics.json", "similarity.json") for p in Path(results).glob(f"*/*/seed*/{name}"))


def over_seeds(values) -> dict:
    """Stats over seeds, NaN where undefined; the std is the sample one: seeds sample the runs one could make."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    return {"n": n, "mean": values.mean() if n else np.nan, "std": values.std(ddof=1) if n > 1 else np.nan,
            "min": values.min() if n else np.nan, "max": values.max() if n else np.nan}


def write(frame: pd.DataFrame, out: str | Path) -> Path:
    """``frame`` as CSV, atomically: a failed write (a full disk) leaves an earlier file whole."""
    write_text(out, frame.to_csv(index=False))
    return Path(out)


def load(path: str | Path) -> pd.DataFrame:
    """Read an aggregated CSV back (seed as int, value as float, code "" where an older file has none)."""
    kinds = {"experiment": str, "variant": str, "seed": int, "metric": str, "value": float}
    frame = read_csv(path, kinds, "aggregated metrics", "not found (run `papa aggregate` first)", rows=False)
    return frame.assign(code=frame["code"].astype(object).fillna("").astype(str) if "code" in frame else "")


def read_csv(path: str | Path, kinds: dict[str, type], what: str, missing: str, rows: bool = True) -> pd.DataFrame:
    """A CSV file papa wrote (metrics.csv, history.csv), checked first, each problem one PapaError line. ``kinds``:
    {column: int, float or str} (an empty float is NaN); ``missing``: what to say when the file is not there."""
    path = Path(path)
    text = _text(path, f"{what} {missing}")
    if not text.strip():
        raise PapaError(f"{path}: empty file, expected {what} (CSV)")
    if not text.endswith("\n"):
        raise PapaError(f"{path}: cut short: its last line is incomplete (a copy or write stopped part-way)")
    header, *body = csv.reader(io.StringIO(text))
    if absent := [c for c in kinds if c not in header]:
        raise PapaError(f"{path}: not {what}: no column {', '.join(map(repr, absent))} (found "
                        f"{', '.join(map(repr, header))})")
    if rows and not body:
        raise PapaError(f"{path}: no rows, only a header")
    numeric = {c: k for c, k in kinds.items() if k is not str}
    for line, row in enumerate(body, 2):
        if len(row) != len(header):
            raise PapaError(f"{path}: line {line} has {len(row)} fields, the header {len(header)}")
        for column, kind in numeric.items():
            value = row[header.index(column)]
            try:
                if not (kind is float and value == ""):
                    kind(value)
            except ValueError:
                raise PapaError(f"{path}: line {line}: {column}: {value!r} is not "
                                f"{'an integer' if kind is int else 'a number'}") from None
    return pd.read_csv(io.StringIO(text), dtype={c: str for c in kinds if c not in numeric}).astype(numeric)
