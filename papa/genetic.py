"""Genetic-algorithm ablations of Tables 15-17 (ESGD-style) as the authors ran them (main.py): each child mixes a pair
of parents; with elitism, the REPAIRed children are ranked with their parents by validation loss and the best p survive
(the best 60% first, the next in a random order). The paper shows they hurt; they exist to reproduce that."""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from papa.averaging import child_rows, draw_pairs
from papa.errors import PapaError

PAIR_WEIGHTS = {"pair-half": 0.5, "pair-75": 0.75}
ELITE_FRACTION = 0.6  # the authors' elitism_p
CHILDREN_PER_PARENT = 6  # the authors' n_children_per_parent


def tournament_pairs(losses: Sequence[float], n: int, generator: torch.Generator) -> Tensor:
    """``n`` pairs of distinct parents drawn with weights 1 / (1e-5 + loss) (the authors' tournament_pairwise)."""
    weights = 1.0 / (1e-5 + torch.as_tensor(losses, dtype=torch.float64))
    return torch.stack([torch.multinomial(weights, 2, replacement=False, generator=generator) for _ in range(n)])


def n_children(p: int, elitism: bool) -> int:
    """Children per generation: p, or with elitism min(6p, p(p-1)/2) (the authors' 6p capped at the distinct pairs)."""
    return min(CHILDREN_PER_PARENT * p, p * (p - 1) // 2) if elitism else p


def select(p: int, losses: Sequence[float], scheme: str, genetic: dict, generator: torch.Generator,
           children_losses: Callable[[Tensor], Sequence[float]], pairs: str = "random",
           heavy: float | None = None) -> tuple[Tensor, list[int]]:
    """One generation with tournament and/or elitist selection: the candidates' rows of weights over the p parents (the
    children, then with elitism the parents' identity rows) and the candidate each member becomes (without elitism
    member i the i-th child). ``losses``: the parents' validation losses; ``children_losses(rows)``: the (REPAIRed)
    children's. ``pairs``: draw_pairs' partners without tournament selection (with elitism the authors' children are
    every pair, but the first 6p for p > 13). ``heavy``: the heavier parent's weight instead of the scheme's (1.0: each
    child one of its parents, unmerged, as the scripts make them after the last epoch)."""
    if scheme not in PAIR_WEIGHTS:
        raise PapaError(f"genetic selection needs a pair scheme ({', '.join(PAIR_WEIGHTS)}), not {scheme!r}")
    if p < 3 and genetic["tournament"]:
        raise PapaError("tournament selection needs at least 3 members")
    n = n_children(p, genetic["elitism"])
    partners = tournament_pairs(losses, n, generator) if genetic["tournament"] else draw_pairs(p, generator, n, pairs)
    children = child_rows(partners, p, PAIR_WEIGHTS[scheme] if heavy is None else heavy, generator)
    if not genetic["elitism"]:
        return children, list(range(p))
    candidates = torch.cat([children, torch.eye(p, dtype=torch.float64)])  # the authors' order: children first
    scores = torch.as_tensor([*children_losses(children), *losses], dtype=torch.float64)
    ranked = torch.sort(scores, stable=True).indices.tolist()  # lowest loss first
    n_elite = int(p * ELITE_FRACTION)
    rest = [ranked[n_elite + k] for k in torch.randperm(p - n_elite, generator=generator).tolist()]
    return candidates, ranked[:n_elite] + rest


def selection_matrix(*args, **kwargs) -> Tensor:
    """The p x p mixing matrix of ``select(*args, **kwargs)``: row i the weights of the candidate member i becomes."""
    candidates, chosen = select(*args, **kwargs)
    return candidates[chosen]
