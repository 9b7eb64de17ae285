"""Accuracy of members, ensembles and soups on held-out data, and the test metrics of metrics.json."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from papa.data import TileDataset, eval_batches
from papa.forward import eval_mode
from papa.segmentation import f1_dict, pixel_accuracy, tile_confusions
from papa.soups import logit_ensemble


@torch.no_grad()
def predict(fn: Callable[[Tensor], Tensor], data, indices=None, batch_size: int = 500, device="cpu", **view) -> Tensor:
    """Logits of ``fn`` (a module in eval mode, or any callable) on ``data`` (or its ``indices``), on the CPU;
    ``view``: eval_batches' ``augment`` and ``generator``, here and below."""
    return torch.cat([fn(x).float().cpu() for x, _ in eval_batches(data, indices, batch_size, device, **view)])


def labels_of(data, indices=None) -> Tensor:
    labels = torch.as_tensor(data.labels)
    return labels if indices is None else labels[torch.as_tensor(list(indices), dtype=torch.int64)]


def scores(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    """(accuracy in percent, mean cross-entropy)."""
    acc = (logits.argmax(1) == labels).double().mean().item() * 100.0
    return acc, F.cross_entropy(logits, labels).item()


def summary(accuracies) -> dict[str, float]:
    """The members' accuracies' mean, min, max and std; the std with ddof = 0 (the members are the population)."""
    acc = torch.as_tensor(list(accuracies), dtype=torch.float64)
    return {"mean": acc.mean().item(), "min": acc.min().item(), "max": acc.max().item(),
            "std": acc.std(correction=0).item()}


def member_logits(pop, data, indices=None, batch_size: int = 500, device="cpu", **view) -> list[Tensor]:
    """Each member's logits (eval mode) on ``data``; one pass over the data serves every member."""
    with torch.no_grad(), eval_mode(pop.template):
        batches = [[pop.forward(j, x).float().cpu() for j in range(pop.size)]
                   for x, _ in eval_batches(data, indices, batch_size, device, **view)]
    return [torch.cat([logits[j] for logits in batches]) for j in range(pop.size)]


def member_confusions(pop, data: TileDataset, indices=None, device="cpu", ensemble: bool = False):
    """``tile_confusions`` of every member in eval mode, plus their logit ensemble last with ``ensemble``."""
    with eval_mode(pop.template):
        return tile_confusions([lambda x, j=j: pop.forward(j, x) for j in range(pop.size)], data, indices, device,
                               ensemble=ensemble)


def population_scores(pop, data, indices=None, batch_size: int = 500, device="cpu",
                      **view) -> list[tuple[float, float]]:
    """Each member's (accuracy in percent, mean cross-entropy) on ``data``: per image, or per pixel of whole tiles."""
    if not isinstance(data, TileDataset):
        labels = labels_of(data, indices)
        return [scores(z, labels) for z in member_logits(pop, data, indices, batch_size, device, **view)]
    confs, losses = member_confusions(pop, data, indices, device)
    return [(pixel_accuracy(c), loss) for c, loss in zip(confs, losses, strict=True)]


def accuracy(module, data, indices=None, batch_size: int = 500, device="cpu", **view) -> float:
    """Accuracy in percent of ``module`` (in eval mode) on ``data``: per image, or per pixel of whole tiles."""
    if isinstance(data, TileDataset):
        return pixel_accuracy(tile_confusions([module], data, indices, device)[0][0])
    return scores(predict(module, data, indices, batch_size, device, **view), labels_of(data, indices))[0]


def held_out_metrics(pop, soups: dict, test, batch_size: int = 500, device="cpu") -> dict:
    """metrics.json's test scores: every member's accuracy (``members``), their logit ensemble's and each soup's (by
    name). For a segmentation dataset, pixel accuracies plus per-class F1 (A.8): ``f1_members`` (each member's
    ``f1_dict``), ``<model>_f1_<class>`` and ``<model>_f1_average`` for model = mean (over members), ensemble, soups."""
    if not isinstance(test, TileDataset):
        labels = labels_of(test)
        logits = member_logits(pop, test, None, batch_size, device)
        return {"members": [scores(z, labels)[0] for z in logits],
                "ensemble": scores(logit_ensemble(logits), labels)[0],
                **{name: accuracy(m, test, None, batch_size, device) for name, m in soups.items()}}
    *members, ensemble = member_confusions(pop, test, None, device, ensemble=True)[0]
    soup_confs = tile_confusions(list(soups.values()), test, None, device)[0]
    models = {"ensemble": ensemble, **dict(zip(soups, soup_confs, strict=True))}
    member_f1 = [f1_dict(c, test.classes) for c in members]
    f1 = {"mean": {k: sum(m[k] for m in member_f1) / len(member_f1) for k in member_f1[0]},
          **{name: f1_dict(c, test.classes) for name, c in models.items()}}
    return {"members": [pixel_accuracy(c) for c in members], **{name: pixel_accuracy(c) for name, c in models.items()},
            "classes": list(test.classes), "f1_members": member_f1,
            **{f"{model}_f1_{k}": v for model, values in f1.items() for k, v in values.items()}}
