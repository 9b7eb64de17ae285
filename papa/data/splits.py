"""The held-out validation split: 2% of the training set (paper, A.1.1), used to rank members for greedy
soups. It is made once per dataset and seed, written to JSON, and read back by every later step."""

import json
from pathlib import Path

import torch

from papa.errors import PapaError
from papa.io import write_text
from papa.rng import generator


def make_split(n_train: int, val_fraction: float = 0.02, seed: int = 0) -> dict:
    """Hold out round(val_fraction * n_train) items (at least 1, leaving at least 1 to train on): {'train', 'val'
    (sorted indices), 'n', 'fraction', 'seed'}, the same on every machine."""
    if not 0.0 < val_fraction < 1.0:
        raise PapaError(f"validation fraction must be in (0, 1), found {val_fraction}")
    n_val = max(1, round(val_fraction * n_train))
    if n_train - n_val < 1:
        raise PapaError(f"cannot hold out a validation split from {n_train} training items")
    order = torch.randperm(n_train, generator=generator("validation-split", seed))
    return {"train": sorted(order[n_val:].tolist()), "val": sorted(order[:n_val].tolist()), "n": n_train,
            "fraction": val_fraction, "seed": seed}


def save_split(path: str | Path, split: dict, meta: dict) -> None:
    """Write the split atomically as JSON {'meta': ``meta`` and the split's n, fraction, seed, 'train', 'val'}."""
    full_meta = {key: split[key] for key in ("n", "fraction", "seed") if key in split} | dict(meta)
    write_text(path, json.dumps({"meta": full_meta, "train": list(split["train"]), "val": list(split["val"])}))


def _index_list(doc: dict, key: str, path: Path) -> list[int]:
    values = doc.get(key)
    if not isinstance(values, list) or not all(type(v) is int for v in values):  # bools are not indices
        raise PapaError(f"bad split file {path}: {key!r} must be a list of integers")
    return values


def load_split(path: str | Path, expect_n: int | None = None) -> dict:
    """Read and check a split file: {'train', 'val', 'meta'}; ``expect_n``: the training set size it was made for."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise PapaError(f"split file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PapaError(f"bad split file {path}: {e}") from None
    if not isinstance(doc, dict):
        raise PapaError(f"bad split file {path}: expected a JSON object with 'train' and 'val'")
    train, val = _index_list(doc, "train", path), _index_list(doc, "val", path)
    meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
    n = meta.get("n", expect_n)
    if expect_n is not None and n != expect_n:
        raise PapaError(f"split file {path} was made for {n} training items, the dataset has {expect_n}")
    if n is not None and any(i < 0 or i >= n for i in (*train, *val)):
        raise PapaError(f"bad split file {path}: indices outside 0..{n - 1}")
    if len(set(train)) != len(train) or len(set(val)) != len(val):
        raise PapaError(f"bad split file {path}: repeated indices")
    if not set(train).isdisjoint(val):
        raise PapaError(f"bad split file {path}: train and val share indices")
    if not val:
        raise PapaError(f"bad split file {path}: empty validation split")
    return {"train": train, "val": val, "meta": meta}
