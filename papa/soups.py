"""Model soups (Wortsman et al., 2022) and the logit ensemble: a population in, plain modules out."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from papa.population import Population


def average_soup(pop: Population, weights=None) -> nn.Module:
    """One module whose tensors are the (weighted, default uniform) average of the members'."""
    w = torch.full((pop.size,), 1.0 / pop.size, dtype=torch.float64) if weights is None else weights
    return pop.module_from_state(pop.combine(w))


def subset_weights(p: int, members: list[int]) -> Tensor:
    """Uniform weights over ``members``, zero elsewhere."""
    w = torch.zeros(p, dtype=torch.float64)
    w[members] = 1.0 / len(members)
    return w


def greedy_members(scores: Sequence[float], soup_score: Callable[[list[int]], float]) -> list[int]:
    """Algorithm 3's selection, the one rule of every greedy soup: members sorted by ``scores`` (higher is
    better, ties in member order), the best one first; each next one is added when ``soup_score`` of the
    members so far plus it does not decrease (``>=``, as in the paper; the official code requires a strict
    improvement). Returns the chosen members in the order they were added."""
    order = sorted(range(len(scores)), key=lambda j: -scores[j])
    included, best = [order[0]], float(scores[order[0]])
    for j in order[1:]:
        s = float(soup_score([*included, j]))
        if s >= best:
            included.append(j)
            best = s
    return included


def greedy_soup(pop: Population, score: Callable[[nn.Module], float]) -> tuple[nn.Module, list[int]]:
    """The greedy soup (Algorithm 3, ``greedy_members``) of uniform averages of members, scored by ``score``.

    Returns the soup and the indices of the members it averages, in the order they were added."""
    scores = [float(score(pop.member(j))) for j in range(pop.size)]
    included = greedy_members(scores, lambda members: score(average_soup(pop, subset_weights(pop.size, members))))
    return average_soup(pop, subset_weights(pop.size, included)), included


def logit_ensemble(logits: Sequence[Tensor]) -> Tensor:
    """The ensemble's logits from its members' logits (one tensor per member, same shape): their mean.
    The ensemble of every reported number (metrics.json, whole-tile segmentation scores) is this one; averaged
    probabilities or a majority vote would rank some inputs differently."""
    return torch.stack(list(logits)).mean(0)


@torch.no_grad()
def ensemble_logits(pop: Population, x: Tensor) -> Tensor:
    """The logit-average ensemble (``logit_ensemble``) of the members in eval mode on ``x``."""
    was_training = pop.template.training
    pop.eval()
    try:
        return logit_ensemble([pop.forward(j, x) for j in range(pop.size)])
    finally:
        pop.train(was_training)
