"""``papa fake-data``: small random datasets in exactly the on-disk formats the loaders read, and random pretrained
weights in the Hugging Face hub cache layout (marked with ``pretrained.FAKE_KEY``: loading one outside smoke scale
warns), where the given configs look for them, to run any config end to end before downloading anything. Images
carry a class-dependent tint under the noise, so networks can learn something."""

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from papa.catalog import DATASETS
from papa.config import experiment, load_config
from papa.data import vaihingen
from papa.data.datasets import CIFAR_FORMATS, OPTDIGITS_FILES
from papa.data.vaihingen import CLASSES, IMAGE_DIR, tile_name
from papa.errors import PapaError
from papa.io import file_digest, write_atomic, write_text
from papa.models.pretrained import FAKE_KEY, HUB_FILE, TIMM_CACHE, timm_pretrained_cfg

FAKE_NOTE = "random weights written by papa fake-data, not pretrained ones"
COMMIT = "fa4e" * 10  # the snapshot revision of every fake hub repository
CIFAR_TRAIN, CIFAR_TEST = 50, 20  # images of each archive
OPTDIGITS_TRAIN, OPTDIGITS_TEST = 60, 30  # lines of optdigits.tra and optdigits.tes
IMAGENET_CLASSES, IMAGENET_TRAIN, IMAGENET_VAL = 10, 4, 2  # classes, images per class
TILE_SIZES = ((64, 80), (72, 64), (80, 72))  # (height, width) of the Vaihingen tiles, in turn


def _images(rng: np.random.Generator, labels: np.ndarray, k: int, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 images (N, *shape) with channels last: a tint per class plus uniform noise."""
    tints = np.random.default_rng(k).integers(40, 216, size=(k, shape[-1]))
    noise = rng.integers(-40, 41, size=(len(labels), *shape))
    tinted = tints[labels].reshape(len(labels), *[1] * (len(shape) - 1), shape[-1]) + noise
    return np.clip(tinted, 0, 255).astype(np.uint8)


def write_optdigits(root: Path) -> str:
    """``<root>/optdigits.tra`` and ``.tes`` (as read_optdigits reads): a pattern per class plus noise."""
    rng = np.random.default_rng(sum(map(ord, "optdigits")))
    patterns = np.random.default_rng(10).integers(0, 17, size=(10, 64))
    for name, n in zip(OPTDIGITS_FILES, (OPTDIGITS_TRAIN, OPTDIGITS_TEST), strict=True):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        counts = np.clip(patterns[labels] + rng.integers(-3, 4, size=(n, 64)), 0, 16)
        lines = [",".join(map(str, [*row, label])) for row, label in zip(counts.tolist(), labels.tolist(), strict=True)]
        write_text(Path(root) / name, "\n".join(lines) + "\n")
    return f"UCI optdigits ({OPTDIGITS_TRAIN} training, {OPTDIGITS_TEST} test images) in {root}"


def write_cifar(root: Path, name: str) -> str:
    """``<root>/cifar-10-batches-py/`` (or ``cifar-100-python/``), as the loader (papa.data.datasets) reads it."""
    fmt = CIFAR_FORMATS[name]
    meta_file, meta_key, _ = fmt.meta
    base = Path(root) / DATASETS[name].paths[0]
    rng = np.random.default_rng(sum(map(ord, name)))
    parts = [(f, CIFAR_TRAIN // len(fmt.train_list)) for f, _ in fmt.train_list]
    parts += [(f, CIFAR_TEST) for f, _ in fmt.test_list]
    for i, (filename, n) in enumerate(parts):
        labels = rng.integers(0, fmt.num_classes, size=n)
        data = _images(rng, labels, fmt.num_classes, (32, 32, 3)).transpose(0, 3, 1, 2).reshape(n, 3072)
        batch = {"batch_label": f"fake batch {i + 1}", fmt.label_key: labels.tolist(), "data": data,
                 "filenames": [f"fake_{i}_{j}.png" for j in range(n)]}
        if name == "cifar100":
            batch["coarse_labels"] = (labels // 5).tolist()
        _write_pickle(base / filename, batch)
    meta = {meta_key: [f"class_{c}" for c in range(fmt.num_classes)]}
    if name == "cifar100":
        meta["coarse_label_names"] = [f"superclass_{c}" for c in range(20)]
    else:
        meta |= {"num_cases_per_batch": parts[0][1], "num_vis": 3072}
    _write_pickle(base / meta_file, meta)
    return f"{fmt.title} ({CIFAR_TRAIN} training, {CIFAR_TEST} test images) in {base}"


def _write_pickle(path: Path, obj) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(pickle.dumps(obj, protocol=2)))


def write_imagenet(root: Path) -> str:
    """``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG`` (an ImageFolder tree)."""
    rng = np.random.default_rng(1)
    wnids = [f"n{10000000 + c:08d}" for c in range(IMAGENET_CLASSES)]
    for part, per_class in (("train", IMAGENET_TRAIN), ("val", IMAGENET_VAL)):
        for c, wnid in enumerate(wnids):
            folder = Path(root) / part / wnid
            for j in range(per_class):
                h, w = (int(v) for v in rng.integers(48, 97, size=2))
                image = _images(rng, np.array([c]), IMAGENET_CLASSES, (h, w, 3))[0]
                name = f"{wnid}_{j}.JPEG" if part == "train" else f"ILSVRC2012_val_{c * per_class + j + 1:08d}.JPEG"
                write_atomic(folder / name, lambda tmp, a=image: Image.fromarray(a, "RGB").save(tmp, format="JPEG"))
    n_train, n_val = IMAGENET_CLASSES * IMAGENET_TRAIN, IMAGENET_CLASSES * IMAGENET_VAL
    return f"ImageNet ({IMAGENET_CLASSES} classes, {n_train} training, {n_val} validation JPEGs) in {root}"


def write_vaihingen(root: Path, labelled: list[int], test: list[int], label_dirs: list[str]) -> str:
    """IRRG tiles and colour-coded labels: ``labelled`` tiles' in the first of ``label_dirs``, the rest in the last."""
    colours = np.array(list(CLASSES.values()), dtype=np.uint8)
    k = len(colours)
    for tile in sorted({*labelled, *test}):
        rng = np.random.default_rng(tile)
        h, w = TILE_SIZES[tile % len(TILE_SIZES)]
        blocks = rng.integers(0, k, size=(h // 16 + 1, w // 16 + 1))
        blocks.flat[:k] = np.arange(k)  # every class in every tile
        classes = np.kron(blocks, np.ones((16, 16), dtype=np.int64))[:h, :w]
        image = _images(rng, classes.reshape(-1), k, (3,)).reshape(h, w, 3)
        folder = label_dirs[0] if tile in labelled else label_dirs[-1]
        for sub, pixels in ((IMAGE_DIR, image), (folder, colours[classes])):
            write_atomic(Path(root) / sub / tile_name(tile),
                         lambda tmp, a=pixels: Image.fromarray(a, "RGB").save(tmp, format="TIFF"))
    return f"Vaihingen ({len(set(labelled))} labelled and {len(set(test) - set(labelled))} test tiles) in {root}"


def _hub_repo(name: str) -> str:
    """The Hugging Face hub repository of timm model ``name``'s weights; a PapaError when it has none."""
    import timm
    repo_id = getattr(timm_pretrained_cfg(name), "hf_hub_id", None)
    if not repo_id or not timm.is_model(name):
        raise PapaError(f"fake-data: timm/{name} has no Hugging Face hub weights to stand in for")
    return repo_id


def write_hub_weights(cache: Path, name: str) -> Path:
    """Random ``model.safetensors`` of timm model ``name`` (``arch.tag``) in the hub cache layout."""
    import timm
    repo_id = _hub_repo(name)
    with torch.random.fork_rng():
        torch.manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
        model = timm.create_model(name, pretrained=False)  # the pretrained config's head (num_classes)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    staged = repo / "blobs" / "incoming.safetensors"
    # one metadata key: safetensors writes its metadata map in a per-process hash order, so two keys give two files
    write_atomic(staged, lambda tmp: save_file(state, str(tmp), metadata={FAKE_KEY: FAKE_NOTE}))
    blob = repo / "blobs" / file_digest(staged)
    os.replace(staged, blob)
    link = repo / "snapshots" / COMMIT / HUB_FILE
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    write_text(repo / "refs" / "main", COMMIT)
    return link


def _needs(configs: list[Path]) -> tuple[dict, set[str]]:
    """({(dataset, root relative to the data root): loader options}, {timm models with pretrained: timm})."""
    datasets: dict[tuple[str, str], list[dict]] = {}
    models = set()
    for path in configs:
        config = load_config(path)
        config["data_root"] = "."  # roots relative to the data root
        for name in config["experiments"]:
            exp = experiment(config, name, path)
            d, m = exp["data"], exp["model"]
            if not Path(d["root"]).is_absolute():
                datasets.setdefault((d["dataset"], d["root"]), []).append(d["options"])
            if m["pretrained"] == TIMM_CACHE and m["name"].startswith("timm/"):
                models.add(m["name"].removeprefix("timm/"))
    return datasets, models


def default_configs(cwd: Path | None = None) -> list[Path]:
    """Every config of a checkout: ``config/*.yaml`` and ``config/paper/*.yaml`` under ``cwd``."""
    base = Path(cwd or ".") / "config"
    return sorted([*base.glob("*.yaml"), *(base / "paper").glob("*.yaml")])


def _vaihingen(root: Path, options: list[dict]) -> str:
    """Every tile the ``options`` (of the experiments reading this root) name, in the label folders they name."""
    labelled, test, dirs = set(), set(), list(vaihingen.LABEL_DIRS)
    for o in options:
        labelled |= {*o.get("train_tiles", vaihingen.TRAIN_TILES), *o.get("val_tiles", vaihingen.VAL_TILES)}
        test |= set(o.get("test_tiles", vaihingen.TEST_TILES))
        dirs = list(o.get("label_dirs", dirs))
    return write_vaihingen(root, sorted(labelled), sorted(test), dirs)


# every dataset with paths (papa.catalog): writer(root, loader options of the experiments reading it there) -> a line
WRITERS = {
    "optdigits": lambda root, _options: write_optdigits(root),
    "cifar10": lambda root, _options: write_cifar(root, "cifar10"),
    "cifar100": lambda root, _options: write_cifar(root, "cifar100"),
    "imagenet": lambda root, _options: write_imagenet(root),
    "vaihingen": _vaihingen,
}


def write_all(root: Path, configs: list[Path], hub_cache: Path | None = None) -> list[str]:
    """Fake data for every dataset the ``configs`` use, under ``root`` (their data root), and with
    ``hub_cache`` fake weights of every timm model they warm-start from the hub cache; one line per item."""
    if not configs:
        raise PapaError("fake-data: no config files (give --config FILE, or run in a checkout with config/)")
    datasets, models = _needs(configs)
    if hub_cache is not None:  # a model without hub weights is refused before anything is written
        for name in sorted(models):
            _hub_repo(name)
    done = []
    for (dataset, rel), options in sorted(datasets.items()):
        if not DATASETS[dataset].paths:  # shipped with a package (digits): nothing to write
            continue
        done.append(WRITERS[dataset](Path(root) / rel, options))
    write_text(Path(root) / "FAKE_DATA.txt", "Random data written by `papa fake-data` in the formats of the real "
               "datasets, for smoke runs (scale: smoke). Not UCI optdigits, CIFAR, ImageNet or Vaihingen.\n")
    if hub_cache is not None:
        done += [f"timm/{name}: {FAKE_NOTE} in {write_hub_weights(hub_cache, name)}" for name in sorted(models)]
    return done
