"""Every dataset papa reads, declared once and without torch (the workflow checks the data before any job starts).
Its loader (papa/data/), ``papa fake-data`` (papa.fakedata.WRITERS) and the schema's ``data.dataset`` must agree
(tests/unit/test_missing_data.py; docs/architecture.md has the checklist)."""

from dataclasses import dataclass
from pathlib import Path

from papa.errors import PapaError


@dataclass(frozen=True)
class Dataset:
    name: str
    paths: tuple[str, ...] = ()  # read under data.root, in order: folders, and files (names with a suffix)
    missing: str = ""  # the loader's message when one is not there: {path} where, {name} which
    patch_size: int | None = None  # the loader draws training patches (options patch_size, epoch_size): default side


DATASETS = {d.name: d for d in (
    Dataset("digits"),  # shipped with scikit-learn
    Dataset("optdigits", ("optdigits.tra", "optdigits.tes"),
            "UCI optdigits not found: expected the file {path} (UCI's comma-separated .tra and .tes files)"),
    Dataset("cifar10", ("cifar-10-batches-py",),
            "CIFAR-10 not found: expected {path} (python version archive, extracted)"),
    Dataset("cifar100", ("cifar-100-python",),
            "CIFAR-100 not found: expected {path} (python version archive, extracted)"),
    Dataset("imagenet", ("train", "val"),
            "ImageNet {name} not found: expected an image folder tree at {path} (<class>/<image>)"),
    Dataset("vaihingen", ("top",), "Vaihingen not found: expected the tile folder {path}", patch_size=256),
)}


def missing(name: str, root: str | Path) -> str | None:
    """Why dataset ``name`` cannot be read under ``root``: the message for its first missing path, or None."""
    d = DATASETS[name]
    for part in d.paths:
        path = Path(root) / part
        if not (path.is_file() if Path(part).suffix else path.is_dir()):
            return d.missing.format(path=path, name=part)
    return None


def require(name: str, root: str | Path) -> Path:
    """``root`` as a Path, once dataset ``name``'s paths are there; a PapaError saying which is not."""
    if (problem := missing(name, root)) is not None:
        raise PapaError(problem)
    return Path(root)
