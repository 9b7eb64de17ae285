"""Tiny Vaihingen trees in the real ISPRS layout (IRRG TIFF tiles and colour-coded label TIFFs)."""

from pathlib import Path

import numpy as np
from PIL import Image

from papa.data.vaihingen import CLASSES, tile_name

COLOURS = np.array(list(CLASSES.values()), dtype=np.uint8)
TRAIN, VAL, TEST = (1, 3, 7), (5, 15), (2, 4)
OPTIONS = {"train_tiles": list(TRAIN), "val_tiles": list(VAL), "test_tiles": list(TEST), "patch_size": 32,
           "epoch_size": 24}


def tile_classes(tile: int, h: int = 64, w: int = 80) -> np.ndarray:
    """Class indices (H, W): blocks of classes placed by the tile number, so every class appears."""
    rng = np.random.default_rng(tile)
    blocks = rng.integers(0, len(CLASSES), size=(h // 16 + 1, w // 16 + 1))
    blocks.flat[: len(CLASSES)] = np.arange(len(CLASSES))
    return np.kron(blocks, np.ones((16, 16), dtype=np.int64))[:h, :w]


def write_tiles(root: Path, tiles=TRAIN + VAL + TEST, h: int = 64, w: int = 80) -> Path:
    """Image pixels are a noisy function of the class, so a network can learn the labels."""
    (root / "top").mkdir(parents=True, exist_ok=True)
    (root / "gts_for_participants").mkdir(exist_ok=True)
    (root / "gts_complete").mkdir(exist_ok=True)
    palette = np.array([[200, 200, 200], [60, 60, 200], [120, 220, 120], [30, 140, 30], [240, 240, 40],
                        [200, 40, 40]], dtype=np.int64)
    for t in tiles:
        k = tile_classes(t, h, w)
        noise = np.random.default_rng(100 + t).integers(-30, 31, size=(h, w, 3))
        image = np.clip(palette[k] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(image, "RGB").save(root / "top" / tile_name(t))
        labels_dir = "gts_complete" if t in TEST else "gts_for_participants"
        Image.fromarray(COLOURS[k], "RGB").save(root / labels_dir / tile_name(t))
    return root
