"""Feature similarity between networks (Appendix A.5, Table 5): how much of their features a population shares.

For every ResNet stage (``layer1`` .. ``layer4`` of resnet18_cifar, ``layer1`` .. ``layer3`` of resnet20)
each input's stage output is flattened and two networks are compared by the cosine similarity of those
vectors, averaged over inputs, in percent. As in the paper, the members are first permutation-aligned (feature
matching, to member 0) and the average soup REPAIRed, so that features are compared unit for unit.
"""

from __future__ import annotations

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
MEASURES = ("all", "first-two")
"""Whose similarity ``population_similarity`` averages: every pair of members and every member with the soup
(``all``), or members 0 and 1 and member 0 with the soup (``first-two``, the authors' correlation_est:
models/combined.py ``cossim`` compares net_list[0] with net_list[1], and net_list[0] with the soup)."""


def stages(model: nn.Module) -> list[str]:
    """The names of ``model``'s stages: ``layer1`` .. ``layerN`` of a CIFAR ResNet."""
    if not isinstance(model, CifarResNet):
        raise PapaError(f"feature similarity supports resnet18_cifar and resnet20, not {type(model).__name__}")
    return [f"layer{i}" for i in range(1, model.num_stages + 1)]


@torch.no_grad()
def _stage_outputs(model: nn.Module, names: list[str], x: Tensor) -> list[Tensor]:
    """Eval-mode outputs of the stages ``names`` on ``x``."""
    out: dict[str, Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda _, __, y, n=n: out.__setitem__(n, y.detach()))
               for n in names]
    with hooked(handles), eval_mode(model):
        model(x.to(device_of(model)))
    return [out[n] for n in names]


def stage_features(model: nn.Module, batches: Batches, seed: int = 666) -> list[Tensor]:
    """Per stage, the eval-mode stage outputs on all of ``batches``, concatenated: (N, C, H, W) each.
    Holds every feature in memory; ``cosine_similarity`` streams instead."""
    names = stages(model)
    outputs = [_stage_outputs(model, names, x) for x in inputs(batches, None, seed)]
    if not outputs:
        raise ValueError("feature similarity got no batches")
    return [torch.cat(per_stage) for per_stage in zip(*outputs, strict=True)]


def pairwise_similarity(
    models: Sequence[nn.Module], pairs: Sequence[tuple[int, int]], batches: Batches, seed: int = 666
) -> list[list[float]]:
    """For each pair (i, j) of ``models``, per stage, the mean over inputs of the cosine similarity of the
    flattened stage outputs of models i and j, in percent (float64; a zero vector has similarity 0). One
    pass over ``batches``, each model run once per batch."""
    names = stages(models[0])
    for m in models[1:]:
        if stages(m) != names:
            raise PapaError("cannot compare the features of networks with different stages")
    sums = torch.zeros(len(pairs), len(names), dtype=torch.float64)
    n = 0
    for x in inputs(batches, None, seed):
        feats = [_stage_outputs(m, names, x) for m in models]
        for p, (i, j) in enumerate(pairs):
            for s in range(len(names)):
                a, b = feats[i][s].flatten(1).double(), feats[j][s].flatten(1).double().to(feats[i][s].device)
                sums[p, s] += F.cosine_similarity(a, b, dim=1, eps=1e-300).sum().cpu()
        n += x.shape[0]
    if n == 0:
        raise ValueError("feature similarity got no batches")
    return (100.0 * sums / n).tolist()


def cosine_similarity(model_a: nn.Module, model_b: nn.Module, batches: Batches, seed: int = 666) -> list[float]:
    """Per stage, the mean over inputs of the cosine similarity between the two networks' flattened stage
    outputs, in percent. No alignment: align ``model_b`` to ``model_a`` first to compare unit for unit."""
    return pairwise_similarity([model_a, model_b], [(0, 1)], batches, seed)[0]


def population_similarity(
    pop: Population, batches: Batches, align: bool = True, repair: bool = True, repair_iters: int = 5,
    seed: int = 666, measure_batches: Batches | None = None, layers: str = "conv+linear", fusion: str = "exact",
) -> dict[str, dict[str, list[float]]]:
    """Table 5's rows for one population: per stage, the mean cosine similarity (percent) over pairs of
    members (``"between two networks"``) and between each member and the average soup (``"between one network
    and AvgSoup"``). With ``align``, members are first aligned to member 0 by feature matching on ``batches``;
    with ``repair``, the soup is REPAIRed (``repair_iters`` batches) against the (aligned) members. The
    similarity is measured on ``measure_batches`` (default: ``batches``), e.g. test data. Returns both measures of
    ``MEASURES``, each as {BETWEEN_NETWORKS: per stage, NETWORK_AND_SOUP: per stage}; ``layers`` and ``fusion``:
    REPAIR's (papa.repair.LAYER_SETS, FUSIONS)."""
    if pop.size < 2:
        raise ValueError("feature similarity needs a population of at least 2 members")
    batches = reusable(batches)
    if align:
        pop = align_population(pop, batches, reference=0, seed=seed)
    soup = average_soup(pop)
    if repair:
        soup = repair_soup(soup, pop, batches, iters=repair_iters, seed=seed, layers=layers, fusion=fusion)
    members = pop.to_modules()
    member_pairs = list(itertools.combinations(range(pop.size), 2))
    soup_pairs = [(j, pop.size) for j in range(pop.size)]
    measure = batches if measure_batches is None else measure_batches
    sims = pairwise_similarity([*members, soup], member_pairs + soup_pairs, measure, seed)
    sims = torch.tensor(sims, dtype=torch.float64)  # float64 as pairwise_similarity computes them
    first_pair, first_soup = member_pairs.index((0, 1)), len(member_pairs)
    return {
        "all": {BETWEEN_NETWORKS: sims[: len(member_pairs)].mean(0).tolist(),
                NETWORK_AND_SOUP: sims[len(member_pairs):].mean(0).tolist()},
        "first-two": {BETWEEN_NETWORKS: sims[first_pair].tolist(), NETWORK_AND_SOUP: sims[first_soup].tolist()},
    }
