"""Tiny configs and runners shared by the training, CLI and reliability tests."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent

TINY = {
    "data": {"dataset": "digits"},
    "model": {"name": "digits_cnn", "kwargs": {"width": 8}},
    "population": {"size": 3},
    "train": {"epochs": 3, "batch_size": 64, "optimizer": {"lr": 0.05}, "engine": "loop", "device": "cpu"},
    "augment": {"grid": {"mixup": [0.0, 0.2], "label_smoothing": [0.0, 0.1], "cutmix": [0.0],
                         "random_erasing": [0.0, 0.2]}},
    "averaging": {"papa": {"every": 4, "alpha": 0.9}, "papa-all": {"every": 1, "repair_iters": 2},
                  "papa-2": {"every": 1, "repair_iters": 2}},
    "soups": {"repair_iters": 2},
}


def write_config(path: Path, experiment: dict | None = None, **top) -> Path:
    """A config file with one experiment, ``tiny``: TINY deep-merged with ``experiment``."""
    from papa.config import deep_merge

    exp = deep_merge(TINY, experiment or {})
    config = {"seeds": [1], "experiments": {"tiny": exp}, **top}
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_experiment(**overrides) -> dict:
    """The validated TINY experiment (with ``overrides`` deep-merged), as papa.runs sees it."""
    from papa import config as cfg

    raw = {"experiments": {"tiny": cfg.deep_merge(copy.deepcopy(TINY), overrides)}}
    return cfg.experiment(cfg.validate(raw, "config", "test"), "tiny", "test")


def papa(*args: str, cwd: Path | None = None, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run the papa CLI in a subprocess (one torch thread: tests share two cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "papa.cli", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"papa {' '.join(args)} failed:\n{result.stderr}")
    return result
