"""Segmentation scores on whole tiles: overall pixel accuracy and per-class F1 from confusion matrices. As the paper
(A.1.3), one forward pass per whole validation or test tile, no sliding window; counts are summed over all pixels of
all tiles before any ratio (as the ISPRS benchmark and Audebert et al. score), on the full (non-eroded) labels."""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from papa.data.augment import eval_transform
from papa.data.vaihingen import TileDataset
from papa.soups import logit_ensemble


def confusion(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(K, K) int64 counts: row = true class, column = predicted class."""
    index = labels.flatten().long() * num_classes + pred.flatten().long()
    # counted where the pixels are: only K*K counts cross to the CPU, not millions of indices per tile
    return torch.bincount(index, minlength=num_classes**2).cpu().view(num_classes, num_classes)


def pixel_accuracy(conf: Tensor) -> float:
    """Overall accuracy in percent: correctly labelled pixels over all pixels."""
    return conf.diag().sum().item() / max(conf.sum().item(), 1) * 100.0


def f1_scores(conf: Tensor) -> Tensor:
    """Per-class F1 in percent (float64), 2 TP / (2 TP + FP + FN); 0 for a class neither present nor predicted."""
    c = conf.double()
    return 200.0 * c.diag() / (c.sum(0) + c.sum(1)).clamp_min(1)  # (TP + FP) + (TP + FN); TP = 0 where it is 0


def f1_dict(conf: Tensor, classes: Sequence[str]) -> dict[str, float]:
    """{class: F1, ..., 'average': mean F1 over all classes} in percent."""
    f1 = f1_scores(conf)
    return {**{name: f1[k].item() for k, name in enumerate(classes)}, "average": f1.mean().item()}


@torch.no_grad()
def tile_confusions(fns: Sequence[Callable[[Tensor], Tensor]], data: TileDataset, indices=None, device="cpu",
                    ensemble: bool = False) -> tuple[list[Tensor], list[float]]:
    """Each ``fn``'s confusion matrix and mean per-pixel cross-entropy over the tiles ``indices`` (default all);
    with ``ensemble`` the logit-average ensemble of the fns comes last."""
    tiles = range(len(data)) if indices is None else [int(i) for i in indices]
    k, n = data.num_classes, len(fns) + int(ensemble)
    confs = [torch.zeros(k, k, dtype=torch.int64) for _ in range(n)]
    losses, pixels = [0.0] * n, 0
    for i in tiles:
        x = eval_transform(data.images[i][None].to(device), data.mean, data.std)
        y = data.labels[i][None].to(device)
        outputs = [fn(x).float() for fn in fns]
        if ensemble:
            outputs.append(logit_ensemble(outputs))
        for m, logits in enumerate(outputs):
            confs[m] += confusion(logits.argmax(1), y, k)
            losses[m] += F.cross_entropy(logits, y, reduction="sum").item()
        pixels += y.numel()
    return confs, [loss / max(pixels, 1) for loss in losses]
