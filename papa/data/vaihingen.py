"""ISPRS Vaihingen 2D semantic labeling (paper A.1.3) as the ISPRS release unpacks under ``root`` (default
``data/vaihingen``): IRRG tiles in ``top/``, non-eroded colour-coded labels in ``gts_for_participants/`` (the 16
labelled tiles), then ``gts_complete/`` (the 17 test tiles; option ``label_dirs``). The split (docs/decisions.md;
Fatras et al., 2021, list no ids) validates on DeepNetsForEO's (Audebert et al., 2017) four held-out tiles plus tile
37; the train set holds the training, then the validation tiles (``Splits.fixed_split``)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from papa import catalog
from papa.data.datasets import Splits, register
from papa.errors import PapaError

TRAIN_TILES = (1, 3, 7, 11, 13, 17, 23, 26, 28, 32, 34)
VAL_TILES = (5, 15, 21, 30, 37)
TEST_TILES = (2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38)

# class name -> label colour (R, G, B), in class-index order
CLASSES = {"impervious_surfaces": (255, 255, 255), "building": (0, 0, 255), "low_vegetation": (0, 255, 255),
           "tree": (0, 255, 0), "car": (255, 255, 0), "clutter": (255, 0, 0)}
IMAGE_DIR, LABEL_DIRS = catalog.DATASETS["vaihingen"].paths[0], ("gts_for_participants", "gts_complete")
PATCH_SIZE, EPOCH_SIZE = catalog.DATASETS["vaihingen"].patch_size, 10000


@dataclass
class TileDataset:
    """Whole tiles: ``images`` uint8 (3, H, W), ``labels`` int64 (H, W). Streams draw ``epoch_size`` random patches
    per epoch and member; evaluation runs on whole tiles."""
    images: list[Tensor]
    labels: list[Tensor]
    tiles: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    classes: tuple[str, ...]
    patch_size: int = PATCH_SIZE
    epoch_size: int = EPOCH_SIZE

    def __len__(self) -> int:
        return len(self.images)


def tile_name(tile: int) -> str:
    return f"top_mosaic_09cm_area{tile}.tif"


def read_rgb(path: Path) -> np.ndarray:
    """A 3-channel 8-bit image as uint8 (H, W, 3) (a palette image is expanded to its colours, losslessly)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            if image.mode == "P":
                image = image.convert("RGB")
            if image.mode != "RGB":
                raise PapaError(f"{path}: expected a 3-channel 8-bit image, found mode {image.mode}")
            return np.asarray(image, dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError) as e:
        raise PapaError(f"cannot read {path}: {e}") from None


def decode_labels(rgb: np.ndarray, where: str | Path = "labels") -> Tensor:
    """Colour-coded labels uint8 (H, W, 3) -> class indices int64 (H, W)."""
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    colours = np.array([(r << 16) | (g << 8) | b for r, g, b in CLASSES.values()])
    classes = np.argsort(colours)  # the classes in the order of their colour codes
    pos = np.searchsorted(colours[classes], code).clip(0, len(classes) - 1)
    known = colours[classes[pos]] == code
    if not known.all():
        y, x = np.argwhere(~known)[0]
        raise PapaError(f"{where}: unknown label colour {tuple(int(c) for c in rgb[y, x])} at pixel (x={x}, y={y}); "
                        f"expected one of {', '.join(f'{n} {c}' for n, c in CLASSES.items())}")
    return torch.from_numpy(classes[pos])


def read_tile(base: Path, tile: int, label_dirs: tuple[str, ...] = LABEL_DIRS) -> tuple[Tensor, Tensor]:
    """(image uint8 (3, H, W), labels int64 (H, W)) of one tile, its label from the first of ``label_dirs`` with it."""
    image_path = base / IMAGE_DIR / tile_name(tile)
    if not image_path.is_file():
        raise PapaError(f"Vaihingen: tile {tile} not found: expected {image_path}")
    label_paths = [base / folder / tile_name(tile) for folder in label_dirs]
    label_path = next((path for path in label_paths if path.is_file()), None)
    if label_path is None:
        others = f" (or in {', '.join(f'{d}/' for d in label_dirs[1:])})" if len(label_dirs) > 1 else ""
        raise PapaError(f"Vaihingen: no label for tile {tile}: expected {label_paths[0]}{others}")
    image, rgb = read_rgb(image_path), read_rgb(label_path)
    if image.shape != rgb.shape:
        raise PapaError(f"Vaihingen tile {tile}: image {image.shape[1]}x{image.shape[0]} but label "
                        f"{rgb.shape[1]}x{rgb.shape[0]} ({label_path})")
    return torch.from_numpy(image).permute(2, 0, 1).contiguous(), decode_labels(rgb, label_path)


def channel_stats(images: list[Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] pixel units) of uint8 (C, H, W) images, summed tile by tile in float64."""
    n, total, squares = 0, 0.0, 0.0
    for x in images:
        v = x.flatten(1).double() / 255.0
        n, total, squares = n + v.shape[1], total + v.sum(1), squares + (v * v).sum(1)
    mean = total / n
    std = ((squares - n * mean * mean) / max(n - 1, 1)).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _tile_ids(name: str, tiles) -> tuple[int, ...]:
    ids = tuple(tiles) if isinstance(tiles, list | tuple) else ()
    if not ids or not all(type(t) is int and t > 0 for t in ids) or len(set(ids)) != len(ids):
        raise PapaError(f"Vaihingen option {name}: expected a non-empty list of distinct tile numbers, found {tiles!r}")
    return ids


@register("vaihingen")
def load_vaihingen(root=None, train_tiles=TRAIN_TILES, val_tiles=VAL_TILES, test_tiles=TEST_TILES,
                   patch_size: int = PATCH_SIZE, epoch_size: int = EPOCH_SIZE, label_dirs=LABEL_DIRS) -> Splits:
    """train = training + validation tiles, test = test tiles; ``patch_size`` and ``epoch_size`` (patches per epoch
    and member) set the training stream (paper: 256, 10000); mean/std are the training tiles'."""
    train_ids, val_ids, test_ids = (_tile_ids(name, t) for name, t in (
        ("train_tiles", train_tiles), ("val_tiles", val_tiles), ("test_tiles", test_tiles)))
    if shared := set(train_ids) & set(val_ids) | set(test_ids) & {*train_ids, *val_ids}:
        raise PapaError(f"Vaihingen: tiles {sorted(shared)} are in more than one of train/val/test")
    if type(patch_size) is not int or patch_size < 8 or type(epoch_size) is not int or epoch_size < 1:
        raise PapaError(f"Vaihingen: patch_size must be an integer >= 8 and epoch_size >= 1, found {patch_size} "
                        f"and {epoch_size}")
    if isinstance(label_dirs, str) or not label_dirs or not all(isinstance(d, str) and d for d in label_dirs):
        raise PapaError(f"Vaihingen option label_dirs: expected a non-empty list of folder names, found {label_dirs!r}")
    label_dirs = tuple(label_dirs)
    base = catalog.require("vaihingen", root if root is not None else Path("data") / "vaihingen")
    labelled, n_train = train_ids + val_ids, len(train_ids)
    train, test = ([read_tile(base, t, label_dirs) for t in ids] for ids in (labelled, test_ids))
    if small := [t for t, (x, _) in zip(train_ids, train, strict=False) if min(x.shape[1:]) < patch_size]:
        raise PapaError(f"Vaihingen: tile {small[0]} is smaller than the {patch_size}x{patch_size} patches")
    mean, std = channel_stats([x for x, _ in train[:n_train]])
    sets = [TileDataset([x for x, _ in pairs], [y for _, y in pairs], tiles, len(CLASSES), mean, std, "vaihingen",
                        tuple(CLASSES), patch_size, epoch_size)
            for pairs, tiles in ((train, labelled), (test, test_ids))]
    fixed = {"train": list(range(n_train)), "val": list(range(n_train, len(labelled)))}
    return Splits("vaihingen", *sets, len(CLASSES), 3, patch_size, "segmentation", mean, std, fixed_split=fixed)
