"""Model soups (Wortsman et al., 2022; ``make_soups``: the paper's recipe) and the logit ensemble of a population."""

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from papa.alignment import align, permutation_spec, permute, running_soup_permutations
from papa.averaging import subset_weights
from papa.forward import Batches, eval_mode, reusable
from papa.population import Population
from papa.repair import member_moments, repair

SOUPS = ("avg_soup", "greedy_soup", "avg_soup_repair", "greedy_soup_repair")
"""The four soups of ``make_soups``, named as in soups.safetensors and metrics.json."""

GREEDY_CRITERIA = (">=", ">")
"""When the greedy soup keeps a member: its score does not decrease (``>=``, Algorithm 3 of the paper), or it
strictly increases (``>``, the authors' code: models/combined.py ``if train_or_val_acc_new > train_or_val_acc``)."""


def average_soup(pop: Population, weights=None) -> nn.Module:
    """One module whose tensors are the (weighted, default uniform) average of the members'."""
    w = torch.full((pop.size,), 1.0 / pop.size, dtype=torch.float64) if weights is None else weights
    return pop.module_from_state(pop.combine(w))


def _scores(pop: Population, score: Callable[[nn.Module], float]) -> list[float]:
    return [float(score(pop.member(j))) for j in range(pop.size)]


def _greedy(scores: Sequence[float], score: Callable[[nn.Module], float],
            soup_of: Callable[[list[int], nn.Module | None], nn.Module],
            criterion: str = ">=") -> tuple[list[int], nn.Module | None]:
    """Algorithm 3's loop: members by decreasing ``scores`` (ties in member order); each next member j is tried as
    the soup ``soup_of(members, current soup or None)`` and kept when its score passes ``criterion`` against the
    best so far. Returns the members kept, in the order added, and the last soup kept (None: the best alone)."""
    if criterion not in GREEDY_CRITERIA:
        raise ValueError(f"greedy criterion must be one of {', '.join(GREEDY_CRITERIA)}, got {criterion!r}")
    order = sorted(range(len(scores)), key=lambda j: -scores[j])
    included, best, soup = [order[0]], scores[order[0]], None
    for j in order[1:]:
        candidate = soup_of([*included, j], soup)
        s = float(score(candidate))
        if s > best or (criterion == ">=" and s == best):
            included.append(j)
            best, soup = s, candidate
    return included, soup


def greedy_soup(pop: Population, score: Callable[[nn.Module], float], criterion: str = ">=",
                scores: Sequence[float] | None = None) -> tuple[nn.Module, list[int]]:
    """Greedy soup, Algorithm 3: the soup and its members, in the order added (``scores``: the members', if known)."""
    scores = _scores(pop, score) if scores is None else scores
    included, _ = _greedy(scores, score, lambda members, _: average_soup(pop, subset_weights(pop.size, members)),
                          criterion)
    return average_soup(pop, subset_weights(pop.size, included)), included


def sequential_alignment(pop: Population, batches: Batches, order: Sequence[int] | None = None,
                         seed: int = 666) -> Population:
    """Members aligned in ``order`` (default 0, 1, ...), each to the average of those before it; member order kept."""
    perms = running_soup_permutations(pop, batches, order, seed)
    return Population.from_modules([permute(pop.member(j), perms[j]) if j in perms else pop.member(j)
                                    for j in range(pop.size)])


def aligned_average_soup(pop: Population, batches: Batches, order: Sequence[int] | None = None,
                         seed: int = 666) -> nn.Module:
    """The average soup of ``sequential_alignment(pop, batches, order)``."""
    return average_soup(sequential_alignment(pop, batches, order, seed))


def greedy_alignment(pop: Population, score: Callable[[nn.Module], float], batches: Batches, seed: int = 666,
                     scores: Sequence[float] | None = None,
                     criterion: str = ">=") -> tuple[Population, list[int], nn.Module]:
    """Appendix A.4's aligned greedy soup: ``greedy_soup``, but every next member is aligned to the current soup
    (the best member at first) before it is tried. Returns the aligned members (each as aligned when tried), the
    soup's members in the order added, and the soup: REPAIR it against the aligned population, not the original."""
    batches = reusable(batches)
    scores = _scores(pop, score) if scores is None else scores
    aligned: dict[int, nn.Module] = {}

    def soup_of(members: list[int], soup: nn.Module | None) -> nn.Module:
        first, j = members[0], members[-1]
        aligned.setdefault(first, pop.member(first))
        aligned[j] = align(pop.member(j), aligned[first] if soup is None else soup, batches, seed)
        return average_soup(Population.from_modules([aligned[i] for i in members]))

    included, soup = _greedy(scores, score, soup_of, criterion)
    aligned.setdefault(included[0], pop.member(included[0]))
    soup = aligned[included[0]] if soup is None else soup
    return Population.from_modules([aligned[j] for j in range(pop.size)]), included, soup


def aligned_greedy_soup(pop: Population, score: Callable[[nn.Module], float], batches: Batches,
                        seed: int = 666) -> tuple[nn.Module, list[int]]:
    """The greedy soup with permutation alignment (``greedy_alignment`` without the aligned population)."""
    _, included, soup = greedy_alignment(pop, score, batches, seed)
    return soup, included


def make_soups(pop: Population, score: Callable[[nn.Module], float], repair_batches: Batches, iters: int = 5,
               seed: int = 666, align_batches: Batches | None = None, stacked: bool = False, criterion: str = ">=",
               layers: str = "conv+linear", fusion: str = "exact",
               own_images: bool = False) -> tuple[dict[str, nn.Module], list[int]]:
    """The paper's four soups (``SOUPS``): the average and greedy soups (by ``score``, higher is better), each also
    REPAIRed on ``iters`` batches of ``repair_batches`` with the moments of the members it averages; and the greedy
    soup's members, in the order added. A soup of one member is that member, not REPAIRed (P:l.388; models/combined.py
    ``if self.args.repair_soup and n > 1``). With ``align_batches``, the members by decreasing score are each aligned to
    the soup so far (Appendix A.4), and REPAIR targets the aligned members. ``own_images``: REPAIR measures each
    member (once for both soups) and each soup on a draw of its own (papa.repair.member_moments)."""
    if align_batches is not None:
        permutation_spec(pop.template)  # a one-line error on architectures alignment does not support
        scores = _scores(pop, score)
        avg_pop = sequential_alignment(pop, align_batches, sorted(range(pop.size), key=lambda j: -scores[j]))
        greedy_pop, members, greedy = greedy_alignment(pop, score, align_batches, scores=scores, criterion=criterion)
    else:
        avg_pop = greedy_pop = pop
        greedy, members = greedy_soup(pop, score, criterion)
    avg = average_soup(avg_pop)
    moments: dict[int, list] = {}  # each population's member moments once

    def repaired(soup: nn.Module, of: Population, weights: Tensor) -> nn.Module:
        if int((weights > 0).sum()) == 1:
            return copy.deepcopy(soup)
        if id(of) not in moments:
            moments[id(of)] = member_moments(of, repair_batches, iters, seed, stacked=stacked, fusion=fusion,
                                             own_images=own_images)
        return repair(soup, of, repair_batches, iters, seed, weights=weights, moments=moments[id(of)], layers=layers,
                      fusion=fusion, own_images=own_images)

    return {"avg_soup": avg, "greedy_soup": greedy,
            "avg_soup_repair": repaired(avg, avg_pop, subset_weights(pop.size, range(pop.size))),
            "greedy_soup_repair": repaired(greedy, greedy_pop, subset_weights(pop.size, members))}, members


def logit_ensemble(logits: Sequence[Tensor]) -> Tensor:
    """The ensemble's logits, the mean of its members' (one tensor each, same shape): the ensemble of every
    reported number (averaged probabilities or a majority vote would rank some inputs differently)."""
    return torch.stack(list(logits)).mean(0)


@torch.no_grad()
def ensemble_logits(pop: Population, x: Tensor) -> Tensor:
    """The logit-average ensemble of the members in eval mode on ``x``."""
    with eval_mode(pop.template):
        return logit_ensemble([pop.forward(j, x) for j in range(pop.size)])
