"""Averaging a population in place: PAPA's push, PAPA-all, PAPA-2 and the weightings of Table 14. Each is a
row-stochastic p x p mixing matrix M along the member axis, theta_i <- sum_j M[i, j] theta_j (``mixing_matrix`` builds
it, ``mix_`` applies it; the common cases have cheaper in-place forms). ``comm``: where the members live
(papa.distributed); under torchrun ``pop`` holds one process's share and ``comm`` communicates."""

import torch
from torch import Tensor

from papa.population import Population, for_averaging, rounded

SCHEMES = ("all", "pair-half", "pair-75", "many-half", "many-75", "dirichlet")
"""PAPA-all, PAPA-2 (pair-half) and the weightings of Table 14. Its "GreedySoup" row (scheme ``greedy``) depends
on the members' validation accuracy, so papa.averagers builds its matrix with ``greedy_matrix``."""

PAIR_SCHEMES = ("pair-half", "pair-75")  # rows mixing two members (PAPA-2 and Table 14's pair-75)

PAIRINGS = ("random", "first")  # how PAPA-2 picks its partners (draw_pairs)


def member_means(pop: Population) -> dict[str, Tensor]:
    """Every tensor's mean over the members, shape (1, ...) (float64 for integer buffers)."""
    return {name: for_averaging(t).mean(0, keepdim=True) for name, t in pop.tensors()}


@torch.no_grad()
def mix_(pop: Population, matrix: Tensor, comm=None) -> Population:
    """Replace member i by sum_j matrix[i, j] * member j (integer buffers in float64, rounded). Pair matrices gather
    the two partners into one scratch buffer reused for every tensor instead of a p x p contraction per tensor."""
    p = pop.size if comm is None else comm.p
    m = torch.as_tensor(matrix, dtype=torch.float64).cpu()
    if m.shape != (p, p):
        raise ValueError(f"mixing matrix must be {p}x{p}, got {tuple(m.shape)}")
    rows, source = (m, pop.state_dict().__getitem__) if comm is None else comm.sources(pop, m)
    rows = rows.to(pop.device)  # (held members, members they read)
    top = rows.topk(2, dim=1) if rows.shape[1] >= 2 and (rows > 0).sum(1).max() <= 2 else None  # pair rows
    scratch: dict[torch.dtype, Tensor] = {}
    for name, t in pop.tensors():
        members = source(name)
        if not t.is_floating_point() or top is None:
            t.copy_(rounded(torch.tensordot(rows.to(for_averaging(t).dtype), for_averaging(members), dims=1), t.dtype))
            continue
        (first, second), (wa, wb) = top.indices.unbind(1), top.values.unbind(1)
        flat, members = t.view(t.shape[0], -1), members.reshape(members.shape[0], -1)
        if t.dtype not in scratch:  # sized for the largest tensor
            scratch[t.dtype] = torch.empty(max(x.numel() for _, x in pop.tensors()), dtype=t.dtype, device=t.device)
        a = scratch[t.dtype][: flat.numel()].view_as(flat)
        torch.index_select(members, 0, first, out=a)
        a.mul_(wa.to(t.dtype)[:, None])
        a.add_(members.index_select(0, second).mul_(wb.to(t.dtype)[:, None]))
        flat.copy_(a)
    return pop


@torch.no_grad()
def average_all_(pop: Population, weights=None, comm=None) -> Population:
    """PAPA-all: every member becomes the (weighted) population average."""
    if weights is not None:
        p = pop.size if comm is None else comm.p
        w = torch.as_tensor(weights, dtype=torch.float64, device="cpu").flatten()
        if w.numel() != p:
            raise ValueError(f"expected {p} weights, got {w.numel()}")
        if (w < 0).any() or not torch.isclose(w.sum(), w.new_ones(())):
            raise ValueError(f"weights must be non-negative and sum to 1, got {w.tolist()}")
        return mix_(pop, w.expand(p, -1), comm)
    means = member_means(pop) if comm is None else comm.means(pop)
    for name, t in pop.tensors():
        t.copy_(rounded(means[name], t.dtype).expand_as(t))
    return pop


@torch.no_grad()
def push_toward_average_(pop: Population, alpha: float, lr_ratio: float = 1.0, comm=None) -> Population:
    """PAPA (§2.3): theta_j <- alpha' * theta_j + (1 - alpha') * mean(theta), where 1 - alpha' = (1 - alpha) *
    lr_ratio (capped at 1; lr_t / lr_0 in the paper). alpha = 1 changes nothing, alpha = 0 is PAPA-all."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    weight = min((1.0 - alpha) * lr_ratio, 1.0)  # of the mean
    if weight == 0.0:
        return pop
    means = member_means(pop) if comm is None else comm.means(pop)
    for name, t in pop.tensors():
        if t.is_floating_point():
            t.lerp_(means[name].expand_as(t), weight)
        else:
            t.copy_(rounded(for_averaging(t).lerp(means[name].expand_as(t), weight), t.dtype))
    return pop


def draw_pairs(p: int, generator: torch.Generator, n: int | None = None, pairs: str = "random") -> Tensor:
    """PAPA-2's partners: an (n, 2) tensor (n = p by default), row i the two distinct members averaged into
    member i. ``random``: rows drawn without replacement from all p(p-1)/2 pairs (the paper's "different random
    pairs"). ``first``: the first n pairs in lexicographic order, in a random order (main.py:290-293: at p = 10, 9
    of the 10 rows contain member 0). Pairs repeat only when there are fewer than n (p = 2)."""
    if p < 2:
        raise ValueError("pair averaging needs at least 2 members")
    if pairs not in PAIRINGS:
        raise ValueError(f"unknown pairing {pairs!r}; expected one of {', '.join(PAIRINGS)}")
    n = p if n is None else n
    every = torch.combinations(torch.arange(p), 2)  # in lexicographic order
    if pairs == "first":
        if n > len(every):  # p = 2: the authors average the one pair into both members
            return every[torch.arange(n) % len(every)]
        return every[:n][torch.randperm(n, generator=generator)]
    picks = []
    while len(picks) < n:
        picks.extend(torch.randperm(len(every), generator=generator)[: n - len(picks)].tolist())
    return every[picks]


def child_rows(pairs: Tensor, p: int, heavy: float, generator: torch.Generator | None) -> Tensor:
    """One row of weights over the p parents per pair: a random one of the two parents weighs ``heavy`` (without
    ``generator``, the first), the other 1 - ``heavy``."""
    n = len(pairs)
    if generator is not None:
        flip = torch.rand(n, generator=generator) < 0.5
        pairs = torch.where(flip[:, None], pairs.flip(1), pairs)
    rows = torch.zeros(n, p, dtype=torch.float64)
    rows[torch.arange(n), pairs[:, 0]] += heavy
    rows[torch.arange(n), pairs[:, 1]] += 1.0 - heavy
    return rows


def mixing_matrix(scheme: str, p: int, generator: torch.Generator | None = None, pairs: str = "random") -> Tensor:
    """The p x p row-stochastic matrix (float64) of ``scheme``: ``all``, uniform rows (PAPA-all); ``pair-half`` /
    ``pair-75``, row i 1/2 + 1/2 on a pair (``draw_pairs``), or 3/4 + 1/4, the heavier at random (the authors'
    ``[random.randint(0, 1)]``); ``many-half`` / ``many-75``, member i keeps 1/2 (3/4) of itself, the others share the
    rest (recombine/permutations.py's ``many_half``/``many_75``); ``dirichlet``, flat Dirichlet rows."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown averaging scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    if scheme == "all":
        return torch.full((p, p), 1.0 / p, dtype=torch.float64)
    if generator is None and scheme not in ("many-half", "many-75"):  # the other schemes draw
        raise ValueError(f"scheme {scheme!r} is random and needs a generator")
    heavy = 0.5 if scheme.endswith("half") else 0.75
    if scheme in PAIR_SCHEMES:
        return child_rows(draw_pairs(p, generator, pairs=pairs), p, heavy, generator if scheme == "pair-75" else None)
    if scheme == "dirichlet":  # normalized exponentials are a flat Dirichlet draw
        e = -torch.log(torch.rand(p, p, generator=generator, dtype=torch.float64).clamp_min(1e-300))
        return e / e.sum(1, keepdim=True)
    if p < 2:
        raise ValueError(f"scheme {scheme!r} needs at least 2 members")
    return torch.full((p, p), (1.0 - heavy) / (p - 1), dtype=torch.float64).fill_diagonal_(heavy)


def subset_weights(p: int, members: list[int]) -> Tensor:
    """Uniform weights over ``members``, zero elsewhere."""
    w = torch.zeros(p, dtype=torch.float64)
    w[list(members)] = 1.0 / len(members)
    return w


def greedy_matrix(members: list[int], p: int) -> Tensor:
    """The ``greedy`` scheme's matrix: every row the uniform weights over the greedy soup's ``members``."""
    return subset_weights(p, members).expand(p, p).clone()


def pair_average_(pop: Population, generator: torch.Generator) -> Tensor:
    """PAPA-2: member i becomes the average of a random pair of distinct members; returns the mixing matrix."""
    return weighted_average_(pop, "pair-half", generator)


def weighted_average_(pop: Population, scheme: str, generator: torch.Generator | None = None) -> Tensor:
    """Average with any scheme of ``SCHEMES``; returns the mixing matrix used."""
    m = mixing_matrix(scheme, pop.size, generator)
    mix_or_average_(pop, None if scheme == "all" else m)
    return m


def mix_or_average_(pop: Population, matrix: Tensor | None, comm=None) -> None:
    """``mix_`` by ``matrix``, or where it is None (PAPA-all) ``average_all_``."""
    if matrix is None:
        average_all_(pop, comm=comm)
    else:
        mix_(pop, matrix, comm)
