"""Permutation alignment by feature matching (Git Re-Basin's activation matching, Ainsworth et al., 2023; Appendix
A.4): for each permutation group a model declares (papa.models.permutation), every unit of one network is correlated
with every unit of the other on the same inputs (every image position a sample), and the assignment maximizing the
total correlation is solved. ``align_members_`` and ``align_pairs`` align populations as PAPA-all and PAPA-2 do."""

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from papa.errors import PapaError
from papa.forward import Batches, device_of, eval_mode, hooked, inputs, reusable
from papa.models.permutation import UNSUPPORTED, PermGroup, Tap
from papa.population import Population


def permutation_spec(model: nn.Module) -> list[PermGroup]:
    """The permutation groups of ``model``, in forward order, as the model declares them."""
    if not hasattr(model, "permutation_groups"):
        raise PapaError(f"{UNSUPPORTED}, not {type(model).__name__}")
    return model.permutation_groups()


# applying permutations ----------------------------------------------------------------------------
@torch.no_grad()
def permute(model: nn.Module, perms: dict[str, Tensor]) -> nn.Module:
    """A copy of ``model`` (the same function) with group ``name``'s channel ``i`` taken from channel
    ``perms[name][i]`` in every tensor the group indexes."""
    spec = permutation_spec(model)
    names = {g.name for g in spec}
    if perms.keys() != names:
        raise ValueError(f"permutations for {sorted(perms)[:3]}... do not match the groups {sorted(names)[:3]}...")
    for g in spec:
        p = perms[g.name]
        if p.shape != (g.size,) or not torch.equal(p.sort().values.cpu(), torch.arange(g.size)):
            raise ValueError(f"{g.name}: not a permutation of {g.size} channels")
    out = copy.deepcopy(model)  # its state_dict shares storage with its tensors: permuted as a population of one
    permute_stacked_({name: t.unsqueeze(0) for name, t in out.state_dict().items()}, spec, {0: perms})
    return out


def random_permutations(model: nn.Module, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """A uniformly random permutation for every group of ``model`` (for tests and sanity checks)."""
    return {g.name: torch.randperm(g.size, generator=generator) for g in permutation_spec(model)}


def invert(perms: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse permutations: ``permute(permute(m, p), invert(p))`` has ``m``'s tensors."""
    return {name: torch.argsort(p) for name, p in perms.items()}


# feature matching ---------------------------------------------------------------------------------
def _units(y: Tensor) -> Tensor:
    """Activations (N, C, ...) as (C, samples) in float64: every position of every image a sample."""
    return y.detach().transpose(0, 1).reshape(y.shape[1], -1).double()


def _plus(sums: tuple | None, *new) -> tuple:
    """Running sums of per-batch statistics: ``new`` added to ``sums`` (None before the first batch)."""
    return new if sums is None else tuple(s + t for s, t in zip(sums, new, strict=True))


def _correlation(ref: tuple, cross: tuple) -> Tensor:
    """corr[i, j] of reference unit i and model unit j from the sums (n, a, aa), (ab, b, bb); 0 for a constant unit."""
    (n, sa, saa), (sab, sb, sbb) = ref, cross
    mean_a, mean_b = sa / n, sb / n
    std_a = (saa / n - mean_a**2).clamp_min(0).sqrt()
    std_b = (sbb / n - mean_b**2).clamp_min(0).sqrt()
    cov = sab / n - torch.outer(mean_a, mean_b)
    denom = torch.outer(std_a, std_b)
    return torch.where(denom > 0, cov / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(cov))


def _hooks(model: nn.Module, taps: list[Tap], on_output: Callable[[Tap, Tensor], None]) -> list:
    return [model.get_submodule(tap.module).register_forward_hook(
        lambda _, __, y, tap=tap: on_output(tap, F.relu(y) if tap.relu else y)) for tap in taps]


@torch.no_grad()
def correlations(reference: nn.Module, models: Sequence[nn.Module], batches: Batches,
                 seed: int = 666) -> list[dict[str, Tensor]]:
    """For each of ``models``, every group's (reference units x model units) correlation matrix, summed over
    the group's taps, from one eval-mode pass over ``batches`` (the reference runs once per batch)."""
    spec = permutation_spec(reference)
    groups = [(g.name, g.size) for g in spec]  # names and sizes only: a REPAIRed soup has conv biases its members lack
    if any([(g.name, g.size) for g in permutation_spec(m)] != groups for m in models):
        raise PapaError("cannot align networks of different architectures")
    taps = sorted({t for g in spec for t in g.taps}, key=lambda t: (t.module, t.relu))
    ref_sums: dict[Tap, tuple] = {}
    cross: list[dict[Tap, tuple]] = [{} for _ in models]
    ref_units: dict[Tap, Tensor] = {}

    def keep(t: Tap, y: Tensor) -> None:
        a = ref_units[t] = _units(y)
        ref_sums[t] = _plus(ref_sums.get(t), a.shape[1], a.sum(1), (a * a).sum(1))

    batches_seen = 0
    with eval_mode(reference, *models):
        for x in inputs(batches, None, seed):
            with hooked(_hooks(reference, taps, keep)):
                reference(x.to(device_of(reference)))
            for j, m in enumerate(models):
                def accumulate(t: Tap, y: Tensor, j: int = j) -> None:
                    b = _units(y).to(ref_units[t].device)
                    cross[j][t] = _plus(cross[j].get(t), ref_units[t] @ b.T, b.sum(1), (b * b).sum(1))

                with hooked(_hooks(m, taps, accumulate)):
                    m(x.to(device_of(m)))
            ref_units.clear()
            batches_seen += 1
    if batches_seen == 0:
        raise ValueError("permutation alignment got no batches")
    return [{g.name: sum(_correlation(ref_sums[t], per_tap[t]) for t in g.taps) for g in spec} for per_tap in cross]


def _assign(corr: Tensor) -> Tensor:
    from scipy.optimize import linear_sum_assignment
    rows, cols = linear_sum_assignment(corr.cpu().numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)[torch.as_tensor(rows).argsort()]


def match_many(reference: nn.Module, models: Sequence[nn.Module], batches: Batches,
               seed: int = 666) -> list[dict[str, Tensor]]:
    """``match`` for several models against one reference, in one pass over the data."""
    return [{name: _assign(c) for name, c in corr.items()} for corr in correlations(reference, models, batches, seed)]


def match(model: nn.Module, reference: nn.Module, batches: Batches, seed: int = 666) -> dict[str, Tensor]:
    """The permutations that align ``model`` to ``reference``: ``permute(model, match(...))`` has, for each
    group, the assignment of ``model``'s units to ``reference``'s maximizing their total correlation."""
    return match_many(reference, [model], batches, seed)[0]


def align(model: nn.Module, reference: nn.Module, batches: Batches, seed: int = 666) -> nn.Module:
    """A copy of ``model`` (the same function) with its hidden units permuted to match ``reference``'s."""
    return permute(model, match(model, reference, batches, seed))


# populations ----------------------------------------------------------------------------
def align_population(pop: Population, batches: Batches, reference: int = 0, seed: int = 666) -> Population:
    """A new population with every member aligned to member ``reference`` (kept as is), in one pass over the data."""
    out = Population.from_modules(pop.to_modules())
    align_members_(out, batches, reference, seed)
    return out


@torch.no_grad()
def permute_stacked_(stacked: dict[str, Tensor], spec: list[PermGroup], perms: dict[int, dict[str, Tensor]]) -> None:
    """Permute, in place, member j's slice of every stacked tensor (name -> (p, ...), names as in a member's
    state_dict) by ``perms[j]``. Names missing from ``stacked`` are skipped (optimizer state has no buffers)."""
    for j, member_perms in perms.items():
        for g in spec:
            for name, axis in g.axes:
                if (t := stacked.get(name)) is not None:
                    t[j].copy_(t[j].index_select(axis, member_perms[g.name].to(t.device)))


ALIGN_TARGETS = ("member", "running-soup")
"""What ``align_members_`` aligns each member to: one ``member`` (the reference), or the ``running-soup``: the
uniform average of the members aligned before it, the reference first and the others in index order."""


def running_soup_permutations(pop: Population, batches: Batches, order: Sequence[int] | None = None,
                              seed: int = 666) -> dict[int, dict[str, Tensor]]:
    """The permutations aligning each member to the running soup (the authors' PAPA-all, models/combined.py:232-255):
    ``order[0]`` (default member 0) is kept, each next member matched to the uniform average of those before it in
    ``order``, as aligned."""
    order = list(range(pop.size)) if order is None else list(order)
    if sorted(order) != list(range(pop.size)):
        raise ValueError(f"order must be a permutation of the {pop.size} members, got {order}")
    batches = reusable(batches)
    aligned, perms = [pop.member(order[0])], {}
    for j in order[1:]:
        soup = Population.from_modules(aligned)
        soup = soup.module_from_state(soup.combine(torch.full((soup.size,), 1.0 / soup.size, dtype=torch.float64)))
        member = pop.member(j)
        perms[j] = match(member, soup, batches, seed)
        aligned.append(permute(member, perms[j]))
    return perms


def align_members_(pop: Population, batches: Batches, reference: int = 0, seed: int = 666,
                   companions: Sequence[dict[str, Tensor]] = (),
                   target: str = "member") -> dict[int, dict[str, Tensor]]:
    """``align_population`` in place, aligning to ``target`` (``ALIGN_TARGETS``). ``companions`` are further stacked
    tensors indexed like the members' parameters (an optimizer's momentum), permuted alike so that training goes on
    as if nothing happened. Returns the permutations applied, by member."""
    if target not in ALIGN_TARGETS:
        raise ValueError(f"unknown alignment target {target!r}; expected one of {', '.join(ALIGN_TARGETS)}")
    if not -pop.size <= reference < pop.size:
        raise IndexError(f"reference member {reference} out of range for a population of {pop.size}")
    reference %= pop.size
    spec = permutation_spec(pop.template)
    others = [j for j in range(pop.size) if j != reference]
    if not others:
        return {}
    if target == "running-soup":
        perms = running_soup_permutations(pop, batches, [reference, *others], seed)
    else:
        modules = pop.to_modules()
        perms = dict(zip(others, match_many(modules[reference], [modules[j] for j in others], batches, seed),
                         strict=True))
    for stacked in (pop.state_dict(), *companions):
        permute_stacked_(stacked, spec, perms)
    return perms


def align_pairs(pop: Population, pairs: Sequence[tuple[int, int]], batches: Batches | None,
                seed: int = 666) -> Population:
    """The parents of pair-averaged children, as the authors' PAPA-2 aligns them (recombine/permutations.py:47-52):
    pairs (a, b) taken in order, b's units permuted to match a's and kept in b's place for every later pair, so
    permutations accumulate. Returns pair k's a (as it then stands) at 2k and its aligned b at 2k + 1; ``batches``
    None: the members as they are."""
    if batches is not None:
        permutation_spec(pop.template)
        batches = reusable(batches)
    modules, parents = pop.to_modules(), []
    for a, b in pairs:
        a, b = int(a), int(b)
        if a == b:
            raise ValueError(f"a pair needs two distinct members, got ({a}, {b})")
        if batches is not None:
            modules[b] = align(modules[b], modules[a], batches, seed)
        parents += [modules[a], modules[b]]
    return Population.from_modules(parents)
