"""Tiny configs and runners shared by the training, CLI and reliability tests."""

import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Self

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


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the papa CLI in this process (papa.cli.main): its exit status and what it printed to stdout and stderr."""
    from papa.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def papa(*args: str, cwd: Path | None = None, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run the papa CLI in a subprocess (one torch thread: tests share two cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "papa.cli", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"papa {' '.join(args)} failed:\n{result.stderr}")
    return result


class SmallDisk:
    """A directory with room for about ``size`` bytes, to meet a full disk for real: a tmpfs of that size mounted
    there where this machine lets the tests mount one (as root), else a plain directory, and then ``limited()``
    makes the kernel refuse, in this process and those it starts, any write past ``size`` bytes of a file
    (RLIMIT_FSIZE: EFBIG, "file too large", where a full disk says ENOSPC). Use as a context manager;
    PAPA_TESTS_NO_TMPFS=1 in the environment takes the second way on any machine."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size
        self.tmpfs = False

    def __enter__(self) -> Self:
        self.path.mkdir(parents=True, exist_ok=True)
        if os.environ.get("PAPA_TESTS_NO_TMPFS"):
            return self
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)],
                                  capture_output=True)
            self.tmpfs = done.returncode == 0
        except OSError:  # no mount command
            self.tmpfs = False
        return self

    def __exit__(self, *exc) -> None:
        if self.tmpfs:
            subprocess.run(["umount", str(self.path)], check=True)

    def fill(self, leave: int) -> None:
        """Take the disk's room but ``leave`` bytes (a tmpfs only: a file size limit has no room to take)."""
        if self.tmpfs:
            import shutil

            free = shutil.disk_usage(self.path).free
            (self.path / "filler").write_bytes(b"\0" * max(free - leave, 0))

    @contextlib.contextmanager
    def limited(self, size: int | None = None):
        """Within: writes past ``size`` (default: the disk's) bytes of a file fail (no-op on a tmpfs, full by
        itself)."""
        import resource

        if self.tmpfs:
            yield
            return
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.size if size is None else size, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
