"""Genetic-algorithm ablations of Tables 15-17 (ESGD-style): tournament selection of parents and elitist
selection among parents and 6p children. The paper shows they hurt; they exist to reproduce that."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from papa.errors import PapaError
from papa.population import Population

PAIR_WEIGHTS = {"pair-half": 0.5, "pair-75": 0.75}


def tournament(fitness: Sequence[float], generator: torch.Generator, exclude: int | None = None) -> int:
    """Two distinct random contestants (never ``exclude``); the fitter wins, ties to the first drawn."""
    pool = [j for j in range(len(fitness)) if j != exclude]
    a, b = (pool[k] for k in torch.randperm(len(pool), generator=generator)[:2].tolist())
    return a if fitness[a] >= fitness[b] else b


def child_rows(fitness, n: int, heavy: float, use_tournament: bool, generator: torch.Generator) -> Tensor:
    """``n`` children as rows of weights over the p parents: the first parent weighs ``heavy``."""
    p = len(fitness)
    rows = torch.zeros(n, p, dtype=torch.float64)
    for i in range(n):
        if use_tournament:
            a = tournament(fitness, generator)
            b = tournament(fitness, generator, exclude=a)
        else:
            a, b = torch.randperm(p, generator=generator)[:2].tolist()
        rows[i, a] += heavy
        rows[i, b] += 1.0 - heavy
    return rows


def selection_matrix(
    pop: Population,
    fitness: Sequence[float],
    scheme: str,
    genetic: dict,
    generator: torch.Generator,
    child_fitness: Callable[[dict[str, Tensor]], float],
) -> Tensor:
    """The mixing matrix of one generation with tournament and/or elitist selection.

    Without elitism: p children whose parents are picked by tournament. With elitism: 6p children are
    made and scored; the next population is the top 60% of parents and children by fitness, the rest
    drawn uniformly from the remaining candidates (a parent kept unchanged is an identity row)."""
    if scheme not in PAIR_WEIGHTS:
        raise PapaError(f"genetic selection needs a pair scheme ({', '.join(PAIR_WEIGHTS)}), not {scheme!r}")
    p = pop.size
    if p < 3 and genetic["tournament"]:
        raise PapaError("tournament selection needs at least 3 members")
    heavy = PAIR_WEIGHTS[scheme]
    if not genetic["elitism"]:
        return child_rows(fitness, p, heavy, genetic["tournament"], generator)
    children = child_rows(fitness, 6 * p, heavy, genetic["tournament"], generator)
    candidates = torch.cat([torch.eye(p, dtype=torch.float64), children])
    scores = list(fitness) + [child_fitness(pop.combine(row)) for row in children]
    ranked = sorted(range(len(scores)), key=lambda k: -scores[k])
    n_elite = math.ceil(0.6 * p)
    elite, rest = ranked[:n_elite], ranked[n_elite:]
    pick = torch.randperm(len(rest), generator=generator)[: p - n_elite].tolist()
    return candidates[elite + [rest[k] for k in pick]]
