"""Every dataset papa reads, declared once and without torch (the workflow checks the data before any job
starts, and smoke scale shrinks configs, in processes that never import torch): what its loader reads under
``data.root`` and says when that is not there, and the default side of the patches it draws.

A dataset's loader (papa/data/) is registered under the same name (papa.data.datasets.register refuses an
undeclared name at import), ``papa fake-data`` writes its folders (papa.fakedata.WRITERS) and the experiment
schema's ``data.dataset`` lists it: tests/unit/test_missing_data.py fails until all four agree.
docs/architecture.md has the checklist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from papa.errors import PapaError


@dataclass(frozen=True)
class Dataset:
    name: str
    folders: tuple[str, ...] = ()  # read under data.root, in this order; none for data a package ships
    missing: str = ""  # the loader's message when one is not there: {path} the folder, {folder} its name
    patch_size: int | None = None  # the loader draws training patches (options patch_size, epoch_size): default side


DATASETS = {d.name: d for d in (
    Dataset("digits"),  # scikit-learn's
    Dataset("cifar10", ("cifar-10-batches-py",),
            "CIFAR-10 not found: expected {path} (python version archive, extracted)"),
    Dataset("cifar100", ("cifar-100-python",),
            "CIFAR-100 not found: expected {path} (python version archive, extracted)"),
    Dataset("imagenet", ("train", "val"),
            "ImageNet {folder} not found: expected an image folder tree at {path} (<class>/<image>)"),
    Dataset("vaihingen", ("top",), "Vaihingen not found: expected the tile folder {path}", patch_size=256),
)}


def missing(name: str, root: str | Path) -> str | None:
    """Why dataset ``name`` cannot be read under ``root``: its message for the first of its folders that is not
    there; None when all are."""
    d = DATASETS[name]
    for folder in d.folders:
        path = Path(root) / folder
        if not path.is_dir():
            return d.missing.format(path=path, folder=folder)
    return None


def require(name: str, root: str | Path) -> Path:
    """``root`` as a Path, once dataset ``name``'s folders are there; a PapaError saying which is not."""
    problem = missing(name, root)
    if problem is not None:
        raise PapaError(problem)
    return Path(root)
