"""Seeded random streams owned by a run: every draw in the library comes from one of these."""

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def derive_seed(*keys: object) -> int:
    """A stable 63-bit seed from any keys (run seed, member index, purpose...): a digest of their repr, the same
    on every machine and run (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") >> 1


def generator(*keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded from ``keys`` (see derive_seed)."""
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (such as a module constructor, which draws from the global RNG) under ``seed``, restoring the
    global CPU and CUDA RNG states afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def seeded_globals(seed: int):
    """Run library code that draws from the global RNGs (torch, ``random``, numpy) under ``seed``, then put the
    callers' RNG states back, so those draws disturb nothing else."""
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
