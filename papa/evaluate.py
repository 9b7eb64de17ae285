"""Accuracy of members, ensembles and soups on held-out data."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from papa.data.augment import eval_transform


@torch.no_grad()
def predict(fn: Callable[[Tensor], Tensor], data, indices=None, batch_size: int = 500, device="cpu") -> Tensor:
    """Logits of ``fn`` on ``data`` (an ArrayDataset, optionally restricted to ``indices``), on CPU."""
    images = data.images if indices is None else data.images[torch.as_tensor(indices)]
    out = []
    for start in range(0, len(images), batch_size):
        x = eval_transform(images[start : start + batch_size].to(device), data.mean, data.std)
        out.append(fn(x).float().cpu())
    return torch.cat(out)


def scores(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    """(accuracy in percent, mean cross-entropy)."""
    acc = (logits.argmax(1) == labels).double().mean().item() * 100.0
    return acc, F.cross_entropy(logits, labels).item()


def module_fn(module, device) -> Callable[[Tensor], Tensor]:
    module = module.to(device).eval()
    return module


def member_logits(pop, data, indices=None, batch_size: int = 500, device="cpu") -> list[Tensor]:
    """Each member's logits (eval mode) on ``data``."""
    was_training = pop.template.training
    pop.eval()
    try:
        return [
            predict(lambda x, j=j: pop.forward(j, x), data, indices, batch_size, device) for j in range(pop.size)
        ]
    finally:
        pop.train(was_training)


def labels_of(data, indices=None) -> Tensor:
    return data.labels if indices is None else data.labels[torch.as_tensor(indices)]
