"""Running plain modules forward over data, as REPAIR, alignment, similarity and evaluation do: the ``Batches``
convention for their data, a module's device, eval mode and hooks for a block of code."""

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

Batches = Iterable | Callable[[int | None, torch.Generator], Iterable]
"""Data: an iterable of input tensors (or of tuples whose first element is the input), or a callable
``batches(member, generator)`` returning one: member ``member``'s (augmented) inputs, None for a network that
is no member (a soup). The callable gets a fresh CPU generator seeded with the caller's seed on every call."""


def inputs(batches: Batches, member: int | None, seed: int) -> Iterator[Tensor]:
    """The input tensors of ``batches`` (for ``member``, with a generator seeded ``seed``, when callable)."""
    source = batches(member, torch.Generator().manual_seed(seed)) if callable(batches) else batches
    yield from (b[0] if isinstance(b, tuple | list) else b for b in source)


def reusable(batches: Batches) -> Batches:
    """``batches`` made safe to pass over more than once: a one-shot iterator is kept in a list."""
    return batches if callable(batches) or iter(batches) is not batches else list(batches)


def device_of(module: nn.Module) -> torch.device:
    """Where ``module``'s tensors are (the CPU for a module without any)."""
    t = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if t is None else t.device


@contextlib.contextmanager
def hooked(handles: list) -> Iterator[None]:
    """Run a block with the hooks ``handles`` registered, removing them however it ends."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def eval_mode(*modules: nn.Module, train: bool = False) -> Iterator[None]:
    """Run a block with ``modules`` in eval mode (train mode with ``train``), restoring each one's flag."""
    modes = [m.training for m in modules]
    for m in modules:
        m.train(train)
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
