"""Datasets by name: ``load_dataset(name, root, **options)`` returns the train and test sets, small ones in memory as
uint8 tensors (``ArrayDataset``, augmented on the accelerator), ImageNet as an ImageFolder tree (``FolderDataset``).
Nothing here downloads: a missing dataset is a ``PapaError`` naming the path that was expected."""

import functools
import gzip
import importlib.util
import inspect
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from papa import catalog
from papa.data.augment import autoaugment_policy, randaugment_transform
from papa.errors import PapaError
from papa.io import file_digest

# the authors' (data/cifar10.py:8-10 as 8-bit values / 255, cifar100.py:8-9, imagenet.py:8-9); CIFAR-10's std is not
# the std of its pixels (0.247, 0.243, 0.262) but the widely copied value their scripts used
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ArrayDataset:
    """Images held in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,); ``mean``/``std`` per channel
    in [0, 1] pixel units; ``image_size``: the side streams resize batches to on the device (None keeps H x W)."""
    images: Tensor
    labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    classes: tuple[str, ...] = ()
    image_size: int | None = None
    resize: str = "bilinear"  # how batches are resized to image_size (papa.data.augment.RESIZE_MODES)
    resize_pixels: bool = False  # resized as PIL resizes uint8 pixels (augment.eval_transform's ``pixels``)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"{self.name}: {len(self.images)} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class FolderDataset:
    """An ImageFolder tree read from disk; ``folder`` has no transform (streams attach their own)."""
    folder: object  # torchvision.datasets.ImageFolder, imported lazily
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    image_size: int
    labels: Tensor = field(init=False)

    def __post_init__(self):
        self.labels = torch.tensor(self.folder.targets, dtype=torch.int64)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.folder.classes)

    def __len__(self) -> int:
        return len(self.folder.samples)


@dataclass
class Splits:
    """A dataset's train and test sets and what a model needs to know about them. ``fixed_split``: its own
    validation split ({'train', 'val'} indices into ``train``), which papa prepare writes instead of a random one."""
    name: str
    train: ArrayDataset | FolderDataset
    test: ArrayDataset | FolderDataset
    num_classes: int
    in_channels: int
    image_size: int
    kind: str  # 'array', 'folder' or 'segmentation' (papa.data.vaihingen.TileDataset)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fixed_split: dict | None = None
    source: str = ""  # what the data are, in words (metrics.json's ``data``)


LOADERS: dict[str, Callable[..., Splits]] = {}  # loader(root, a path or None for its default, **options)


def register(name: str):
    """Register a loader under ``name``, a dataset declared in papa.catalog (refused otherwise)."""
    if name not in catalog.DATASETS:
        raise LookupError(f"dataset {name!r} is not declared in papa/catalog.py (what its loader reads, which "
                          "the workflow checks before any job starts)")

    def add(loader: Callable[..., Splits]) -> Callable[..., Splits]:
        LOADERS[name] = loader
        return loader
    return add


def load_dataset(name: str, root: str | Path | None = None, **options) -> Splits:
    """Load a registered dataset; unknown names and options are PapaErrors listing what is accepted."""
    if name not in LOADERS:
        raise PapaError(f"unknown dataset {name!r}; expected one of {', '.join(sorted(LOADERS))}")
    accepted = [p for p in inspect.signature(LOADERS[name]).parameters if p != "root"]
    if unknown := sorted(set(options) - set(accepted)):
        raise PapaError(f"dataset {name!r} has no option {unknown[0]!r}; options: {', '.join(accepted) or 'none'}")
    return LOADERS[name](root, **options)


def _array_splits(name: str, train: ArrayDataset, test: ArrayDataset, image_size: int | None = None) -> Splits:
    _, c, h, _ = train.images.shape
    if image_size is not None and (int(image_size) != image_size or image_size < 1):
        raise PapaError(f"{name}: image_size must be a positive integer, found {image_size!r}")
    train.image_size = test.image_size = image_size
    return Splits(name, train, test, train.num_classes, c, image_size or h, "array", train.mean, train.std)


# digits (scikit-learn's bundled copy) and UCI optdigits (its own files) ------------------------------------
DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED = 0.2, 0
SCALINGS = ("standardize", "raw")
OPTDIGITS_FILES = catalog.DATASETS["optdigits"].paths  # UCI's training (30 writers) and test (13 others) files


def stratified_holdout(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Sorted (train, test) indices holding out round(fraction * n_c) items of every class c."""
    g = torch.Generator().manual_seed(seed)
    members = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels).tolist()]
    test = torch.cat([m[torch.randperm(len(m), generator=g)[:round(fraction * len(m))]] for m in members]).sort().values
    return torch.nonzero(~torch.isin(torch.arange(len(labels)), test)).flatten(), test


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) valued 0-16, labels) from the CSV scikit-learn ships, read directly because importing
    sklearn.datasets (and scipy) costs seconds per step; sklearn's loader is the fallback should the file move."""
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if csv is not None and csv.is_file():
        with gzip.open(csv, "rt") as f:
            table = np.loadtxt(f, delimiter=",")
        if table.shape == (1797, 65):
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sk_digits
    raw = sk_digits()
    return raw.images, raw.target.astype(np.int64)


def _check_scaling(scaling: str) -> None:
    if scaling not in SCALINGS:
        raise PapaError(f"scaling must be one of {', '.join(SCALINGS)}, found {scaling!r}")


def _digit_images(values: np.ndarray, scaling: str) -> Tensor:
    """uint8 (N, 1, 8, 8) images of counts 0-16: ``standardize`` stores rint(v x 255 / 16) (normalized with the
    training pixels' mean/std), ``raw`` the counts, which normalization with mean 0 and std 1/255 leaves unchanged."""
    scaled = np.rint(values * (255.0 / 16.0)) if scaling == "standardize" else values
    return torch.from_numpy(scaled.astype(np.uint8)).unsqueeze(1)


def _digit_splits(name: str, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], scaling: str,
                  image_size: int | None, source: str) -> Splits:
    if scaling == "standardize":
        pixels = train[0].double() / 255.0
        mean, std = (pixels.mean().item(),), (pixels.std().item(),)
    else:
        mean, std = (0.0,), (1.0 / 255.0,)
    sets = [ArrayDataset(images, labels, 10, mean, std, name, tuple("0123456789")) for images, labels in (train, test)]
    splits = _array_splits(name, *sets, image_size)
    splits.source = f"{source}; inputs {'standardized (training mean/std)' if scaling == 'standardize' else 'raw 0-16'}"
    return splits


@register("digits")
def load_digits(root=None, image_size: int | None = None, scaling: str = "standardize",
                test_split_seed: int = DIGITS_SPLIT_SEED) -> Splits:
    """scikit-learn's bundled 8x8 digits (UCI optdigits' 1,797 test images, 13 writers). The test set is fixed
    whatever the run seed: 20% of every class drawn with ``test_split_seed`` (sharing writers with training)."""
    _check_scaling(scaling)
    if int(test_split_seed) != test_split_seed or test_split_seed < 0:
        raise PapaError(f"digits: test_split_seed must be an integer >= 0, found {test_split_seed!r}")
    values, targets = _digits_arrays()
    images, labels = _digit_images(values, scaling), torch.from_numpy(targets)
    train_idx, test_idx = stratified_holdout(labels, DIGITS_TEST_FRACTION, int(test_split_seed))
    source = (f"scikit-learn's bundled digits (UCI optdigits' 1,797 test images), a random stratified "
              f"{DIGITS_TEST_FRACTION:.0%} test split (seed {test_split_seed})")
    return _digit_splits("digits", (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx]),
                         scaling, image_size, source)


def read_optdigits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(counts (N, 8, 8) valued 0-16, labels (N,)) of one UCI optdigits file: one image per line, 64
    comma-separated integers 0-16 (the 8x8 block counts, row by row), then the class 0-9."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PapaError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split(",")
        try:
            row = [int(f) for f in fields]
        except ValueError:
            bad = next(f for f in fields if not f.strip().lstrip("-").isdigit())
            raise PapaError(f"{path}: line {n}: {bad.strip()!r} is not an integer (expected 64 pixel counts 0-16 "
                            "and the class 0-9, comma-separated)") from None
        if len(row) != 65:
            raise PapaError(f"{path}: line {n}: expected 65 comma-separated integers (64 pixel counts 0-16, then "
                            f"the class 0-9), found {len(row)}")
        if min(row[:64]) < 0 or max(row[:64]) > 16 or not 0 <= row[64] <= 9:
            raise PapaError(f"{path}: line {n}: a pixel count outside 0-16 or a class outside 0-9")
        rows.append(row)
    if not rows:
        raise PapaError(f"{path}: no images")
    table = np.array(rows, dtype=np.int64)
    return table[:, :64].reshape(-1, 8, 8), table[:, 64]


@register("optdigits")
def load_optdigits(root=None, image_size: int | None = None, scaling: str = "standardize") -> Splits:
    """UCI optdigits from its own files (default root ``data/optdigits``), split by writer as UCI defines: 3,823
    training and 1,797 test images (the copy scikit-learn bundles). ``scaling`` and ``image_size`` as for ``digits``."""
    _check_scaling(scaling)
    base = catalog.require("optdigits", root if root is not None else Path("data") / "optdigits")
    (train_v, train_y), (test_v, test_y) = (read_optdigits(base / name) for name in OPTDIGITS_FILES)
    source = (f"UCI optdigits' own writer-disjoint split ({OPTDIGITS_FILES[0]}: {len(train_y):,} training images; "
              f"{OPTDIGITS_FILES[1]}: {len(test_y):,} test images)")
    return _digit_splits("optdigits", (_digit_images(train_v, scaling), torch.from_numpy(train_y)),
                         (_digit_images(test_v, scaling), torch.from_numpy(test_y)), scaling, image_size, source)


# CIFAR ----------------------------------------------------------------------------------------------------
def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, 'latin1'); nothing else is needed
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], object]:
    core = np._core if hasattr(np, "_core") else np.core
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):  # protocol-5 pickles (Python 3's default) use _frombuffer
        allowed[package + ".multiarray", "_reconstruct"] = core.multiarray._reconstruct
        allowed[package + ".numeric", "_frombuffer"] = core.numeric._frombuffer
    return allowed


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that CIFAR archives never contain."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: nothing we load runs pickled code."""
    allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        if (found := self.allowed.get((module, name))) is None:
            raise ForbiddenGlobal(f"{module}.{name}")
        return found


def safe_unpickle(path: Path) -> dict:
    """Read a CIFAR python archive (Python 2 pickles, hence latin1) without running pickled code: its dict, with
    bytes keys decoded."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PapaError(f"cannot read {path}: {e.strerror}") from None
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except ForbiddenGlobal as e:
        raise PapaError(f"refusing to load {path}: it references {e}, which a CIFAR archive never needs") \
            from None
    except Exception as e:  # a truncated or corrupt pickle raises many types; all mean a bad file
        raise PapaError(f"corrupt archive {path}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise PapaError(f"corrupt archive {path}: expected a dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_unpickle(path)
    if "data" not in batch or label_key not in batch:
        raise PapaError(f"corrupt archive {path}: expected keys 'data' and {label_key!r}, found {sorted(batch)}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise PapaError(f"corrupt archive {path}: expected uint8 data of shape (N, 3072), found {found}")
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError):
        raise PapaError(f"corrupt archive {path}: {label_key!r} is not a list of integers") from None
    if labels.shape != (len(data),):
        raise PapaError(f"corrupt archive {path}: {len(data)} images but {labels.size} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise PapaError(f"corrupt archive {path}: labels outside 0..{num_classes - 1}")
    return data, labels


@dataclass(frozen=True)
class _CifarFormat:
    """One CIFAR "python version" archive as extracted: its files (name, md5) and label keys. The names and
    checksums are torchvision's (a test compares them), written out because importing torchvision costs ~3 s."""
    title: str
    train_list: tuple[tuple[str, str], ...]
    test_list: tuple[tuple[str, str], ...]
    meta: tuple[str, str, str]  # file name, key of the class names, md5
    label_key: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


CIFAR_FORMATS = {
    "cifar10": _CifarFormat(
        "CIFAR-10",
        (("data_batch_1", "c99cafc152244af753f735de768cd75f"), ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
         ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"), ("data_batch_4", "634d18415352ddfa80567beed471001a"),
         ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
        (("test_batch", "40351d587109b95175f43aff81a1287e"),),
        ("batches.meta", "label_names", "5ff9c542aee3614f3951f8cda6e48888"),
        "labels", 10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": _CifarFormat(
        "CIFAR-100",
        (("train", "16019d7e3df5f24257cddd939b257f8d"),),
        (("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        ("meta", "fine_label_names", "7973b15100ade9c7d40fb424638fde48"),
        "fine_labels", 100, CIFAR100_MEAN, CIFAR100_STD),
}


def _load_cifar(name: str, root=None, verify_md5: bool = False, image_size: int | None = None) -> Splits:
    """CIFAR-10 or CIFAR-100 (fine labels) in papa.catalog's folder under ``root`` (default ``data/<name>``).
    ``verify_md5`` checks every file against torchvision's checksums (off: tests use non-original archives)."""
    fmt = CIFAR_FORMATS[name]
    base = catalog.require(name, root if root is not None else Path("data") / name) / catalog.DATASETS[name].paths[0]
    meta_file, meta_key, meta_md5 = fmt.meta
    for filename, md5 in [*fmt.train_list, *fmt.test_list, (meta_file, meta_md5)]:
        path = base / filename
        if not path.is_file():
            raise PapaError(f"{fmt.title} incomplete: expected file {path}")
        if verify_md5 and file_digest(path, "md5") != md5:
            raise PapaError(f"{fmt.title} checksum mismatch: {path} (expected md5 {md5})")
    meta_path = base / meta_file
    classes = safe_unpickle(meta_path).get(meta_key)
    if not isinstance(classes, list) or len(classes) != fmt.num_classes:
        raise PapaError(f"corrupt archive {meta_path}: expected {fmt.num_classes} names under {meta_key!r}")
    names = tuple(map(str, classes))

    def part(file_list) -> ArrayDataset:
        batches = [_read_batch(base / f, fmt.label_key, fmt.num_classes) for f, _ in file_list]
        images = torch.from_numpy(np.concatenate([d for d, _ in batches]).reshape(-1, 3, 32, 32))
        labels = torch.from_numpy(np.concatenate([lab for _, lab in batches]).astype(np.int64))
        return ArrayDataset(images, labels, fmt.num_classes, fmt.mean, fmt.std, name, names)

    return _array_splits(name, part(fmt.train_list), part(fmt.test_list), image_size)


for _cifar in CIFAR_FORMATS:
    register(_cifar)(functools.partial(_load_cifar, _cifar))


# ImageNet -------------------------------------------------------------------------------------------------
def _image_folder(path: Path, title: str):
    from torchvision.datasets import ImageFolder
    try:
        return ImageFolder(str(path))
    except FileNotFoundError as e:  # no class folder, or a class folder without images
        raise PapaError(f"{title}: no images found under {path} ({str(e).splitlines()[0]})") from None


@register("imagenet")
def load_imagenet(root=None, image_size: int = 224) -> Splits:
    """ImageNet as ImageFolder trees ``<root>/{train,val}/<class>/*`` (default root ``data/imagenet``)."""
    base = catalog.require("imagenet", root if root is not None else Path("data") / "imagenet")
    train, val = (_image_folder(base / part, f"ImageNet {part}") for part in ("train", "val"))
    if train.classes != val.classes:
        raise PapaError(f"ImageNet: {base / 'train'} and {base / 'val'} have different class folders "
                        f"(e.g. {', '.join(sorted(set(train.classes) ^ set(val.classes))[:3])})")
    k = len(train.classes)
    train, val = (FolderDataset(f, k, IMAGENET_MEAN, IMAGENET_STD, "imagenet", image_size) for f in (train, val))
    return Splits("imagenet", train, val, k, 3, image_size, "folder", IMAGENET_MEAN, IMAGENET_STD)


def folder_train_transform(image_size: int, flip: bool = True, autoaugment: str = "", randaugment: str = "",
                           mean=IMAGENET_MEAN):
    """Per-image training transform on PIL images -> uint8 (C, H, W); RandAugment fills with ``mean``."""
    from torchvision.transforms import v2
    steps = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip() if flip else None,
             randaugment_transform(randaugment, image_size, mean) if randaugment else None, v2.PILToTensor(),
             v2.AutoAugment(autoaugment_policy(autoaugment)) if autoaugment else None]
    return v2.Compose([step for step in steps if step is not None])


def folder_eval_transform(image_size: int):
    """Resize to 256/224 of the crop, center crop -> uint8 (C, H, W); normalization happens on the device."""
    from torchvision.transforms import v2
    return v2.Compose([v2.Resize(round(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size),
                       v2.PILToTensor()])
