"""Seeded random streams owned by a run: every draw in the library comes from one of these."""

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def derive_seed(*keys: object) -> int:
    """A stable 63-bit seed from any keys: a digest of their repr, the same on every machine (hash() is salted)."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") >> 1


def generator(*keys: object) -> torch.Generator:
    """A CPU torch.Generator seeded from ``keys`` (see derive_seed)."""
    return torch.Generator().manual_seed(derive_seed(*keys))


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (a module constructor, say) under ``seed``, then restore the global CPU and CUDA RNG states."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def seeded_globals(seed: int):
    """Run library code drawing from the global torch, ``random`` and numpy RNGs under ``seed``; restore them after."""
    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
