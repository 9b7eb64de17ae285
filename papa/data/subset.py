"""A dataset cut down to some of its items (``data.subset``; smoke scale sets it): evenly spaced over each set, so an
ImageFolder sorted by class keeps items of many classes, and the same items on every machine."""

import copy
import dataclasses

import torch

from papa.data.datasets import ArrayDataset, FolderDataset, Splits
from papa.data.vaihingen import TileDataset


def spaced(n: int, k: int | None) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (the first and the last included); all for None or k >= n."""
    if k is None or k >= n:
        return list(range(n))
    return [0] if k == 1 else [round(i * (n - 1) / (k - 1)) for i in range(k)]


def _take(dataset, indices: list[int]):
    if isinstance(dataset, ArrayDataset):
        idx = torch.tensor(indices, dtype=torch.int64)
        return dataclasses.replace(dataset, images=dataset.images[idx], labels=dataset.labels[idx])
    if isinstance(dataset, FolderDataset):
        folder = copy.copy(dataset.folder)
        folder.samples = folder.imgs = [dataset.folder.samples[i] for i in indices]
        folder.targets = [dataset.folder.targets[i] for i in indices]
        return dataclasses.replace(dataset, folder=folder)
    if isinstance(dataset, TileDataset):
        return dataclasses.replace(dataset, images=[dataset.images[i] for i in indices],
                                   labels=[dataset.labels[i] for i in indices],
                                   tiles=tuple(dataset.tiles[i] for i in indices))
    raise TypeError(f"cannot take a subset of {type(dataset).__name__}")


def subset_splits(splits: Splits, train: int | None = None, val: int | None = None,
                  test: int | None = None) -> Splits:
    """``splits`` with at most ``train`` training items, ``test`` test items and, for a dataset with its own
    validation items (``fixed_split``), ``train`` of its training and ``val`` of its validation items."""
    test_set = _take(splits.test, spaced(len(splits.test), test))
    if splits.fixed_split is None:
        return dataclasses.replace(splits, train=_take(splits.train, spaced(len(splits.train), train)), test=test_set)
    fixed_train, fixed_val = splits.fixed_split["train"], splits.fixed_split["val"]
    keep_train = [fixed_train[i] for i in spaced(len(fixed_train), train)]
    keep_val = [fixed_val[i] for i in spaced(len(fixed_val), val)]
    n = len(keep_train)
    fixed = {"train": list(range(n)), "val": list(range(n, n + len(keep_val)))}
    return dataclasses.replace(splits, train=_take(splits.train, keep_train + keep_val), test=test_set,
                               fixed_split=fixed)
