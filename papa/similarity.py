"""Feature similarity between networks (Appendix A.5, Table 5): the cosine similarity of two networks' flattened
ResNet stage outputs, averaged over inputs, in percent. As in the paper, the members are first permutation-aligned
to member 0 and the average soup REPAIRed, so that features are compared unit for unit."""

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from papa.alignment import align_population
from papa.errors import PapaError
from papa.forward import Batches, device_of, eval_mode, hooked, inputs, reusable
from papa.models.resnet_cifar import CifarResNet
from papa.population import Population
from papa.repair import repair as repair_soup
from papa.soups import average_soup

BETWEEN_NETWORKS = "between two networks"
NETWORK_AND_SOUP = "between one network and AvgSoup"


def stages(model: nn.Module) -> list[str]:
    """The names of ``model``'s stages: ``layer1`` .. ``layerN`` of a CIFAR ResNet."""
    if not isinstance(model, CifarResNet):
        raise PapaError(f"feature similarity supports resnet18_cifar and resnet20, not {type(model).__name__}")
    return [f"layer{i}" for i in range(1, model.num_stages + 1)]


@torch.no_grad()
def _stage_outputs(model: nn.Module, names: list[str], x: Tensor) -> list[Tensor]:
    out: dict[str, Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda _, __, y, n=n: out.__setitem__(n, y.detach()))
               for n in names]
    with hooked(handles), eval_mode(model):
        model(x.to(device_of(model)))
    return [out[n] for n in names]


def pairwise_similarity(models: Sequence[nn.Module], pairs: Sequence[tuple[int, int]], batches: Batches,
                        seed: int = 666) -> Tensor:
    """For each pair (i, j) of ``models``, per stage, the mean over inputs of the cosine similarity of the
    flattened stage outputs of models i and j, in percent (a zero vector has similarity 0), in one pass."""
    names = stages(models[0])
    if any(stages(m) != names for m in models[1:]):
        raise PapaError("cannot compare the features of networks with different stages")
    sums = torch.zeros(len(pairs), len(names), dtype=torch.float64)
    n = 0
    for x in inputs(batches, None, seed):
        feats = [_stage_outputs(m, names, x) for m in models]
        if any(f.shape != g.shape for other in feats[1:] for f, g in zip(feats[0], other, strict=True)):
            raise PapaError("cannot compare the features of networks whose stages output different shapes")
        for p, (i, j) in enumerate(pairs):
            for s in range(len(names)):
                a, b = feats[i][s].flatten(1).double(), feats[j][s].flatten(1).double().to(feats[i][s].device)
                sums[p, s] += F.cosine_similarity(a, b, dim=1, eps=1e-300).sum().cpu()
        n += x.shape[0]
    if n == 0:
        raise ValueError("feature similarity got no batches")
    return 100.0 * sums / n


def cosine_similarity(model_a: nn.Module, model_b: nn.Module, batches: Batches, seed: int = 666) -> list[float]:
    """``pairwise_similarity`` of two networks, as they are (no alignment)."""
    return pairwise_similarity([model_a, model_b], [(0, 1)], batches, seed)[0].tolist()


def population_similarity(pop: Population, batches: Batches, align: bool = True, repair: bool = True,
                          repair_iters: int = 5, seed: int = 666, measure_batches: Batches | None = None,
                          layers: str = "conv+linear", fusion: str = "exact",
                          align_batches: Batches | None = None) -> dict[str, dict[str, list[float]]]:
    """Table 5's rows for one population, per stage: the mean similarity between members (``BETWEEN_NETWORKS``) and
    between a member and the average soup (``NETWORK_AND_SOUP``), over every pair of members and every member
    (``"all"``), or members 0 and 1 and member 0 (``"first-two"``, the authors' correlation_est: models/combined.py
    ``cossim``). With ``align``, members are first aligned to member 0 on ``batches``; with ``repair``, the soup is
    REPAIRed on them. Aligned on ``align_batches`` and measured on ``measure_batches`` (default: ``batches``)."""
    if pop.size < 2:
        raise ValueError("feature similarity needs a population of at least 2 members")
    batches = reusable(batches)
    if align:
        pop = align_population(pop, batches if align_batches is None else align_batches, reference=0, seed=seed)
    soup = average_soup(pop)
    if repair:
        soup = repair_soup(soup, pop, batches, iters=repair_iters, seed=seed, layers=layers, fusion=fusion)
    member_pairs = list(itertools.combinations(range(pop.size), 2))
    soup_pairs = [(j, pop.size) for j in range(pop.size)]
    measure = batches if measure_batches is None else measure_batches
    sims = pairwise_similarity([*pop.to_modules(), soup], member_pairs + soup_pairs, measure, seed)
    k = len(member_pairs)  # sims[0]: members 0 and 1 (the first combination); sims[k:]: each member with the soup
    return {"all": {BETWEEN_NETWORKS: sims[:k].mean(0).tolist(), NETWORK_AND_SOUP: sims[k:].mean(0).tolist()},
            "first-two": {BETWEEN_NETWORKS: sims[0].tolist(), NETWORK_AND_SOUP: sims[k].tolist()}}
