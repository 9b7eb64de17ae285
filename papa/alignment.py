"""Permutation alignment by feature matching (Git Re-Basin's activation matching, Ainsworth et al., 2023).

Hidden units of a network can be permuted without changing its function: permute a layer's output channels
(with its BatchNorm) and the next layers' input channels alike. Averaging two independently trained networks
only makes sense once their units correspond, so ``align(model, reference, batches)`` permutes ``model``'s
units to match ``reference``'s: for each *permutation group* (a set of channels that must be permuted
together) it runs both networks on the same inputs, correlates every unit of one with every unit of the
other (channels of a convolution's output, every image position a sample) and solves the linear assignment
that maximizes the total correlation (``scipy.optimize.linear_sum_assignment``).

Alignment is architecture-specific (Appendix A.4): a model declares its groups with a ``permutation_groups()``
method (papa.models.permutation; the registered ``vgg11_bn``, ``vgg16_bn``, ``resnet18_cifar`` and
``resnet20`` do, at any width or depth), see ``permutation_spec``.

For populations, Appendix A.4: ``align_population`` aligns every member to one member (PAPA-all's
ablation; ``align_members_`` does it in place, optimizer state included, during training), or with
``target="running-soup"`` each member to the average of those aligned before it (the authors' PAPA-all:
models/combined.py:232-255); ``align_pairs`` aligns within pairs taken in order, each aligned member kept for the
next pairs (the authors' PAPA-2: recombine/permutations.py:47-52). The aligned soups are in papa.soups.
"""

from __future__ import annotations

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
def _check_perms(spec: list[PermGroup], perms: dict[str, Tensor]) -> None:
    names = {g.name for g in spec}
    if perms.keys() != names:
        raise ValueError(f"permutations for {sorted(perms)[:3]}... do not match the groups {sorted(names)[:3]}...")
    for g in spec:
        p = perms[g.name]
        if p.shape != (g.size,) or not torch.equal(p.sort().values.cpu(), torch.arange(g.size)):
            raise ValueError(f"{g.name}: not a permutation of {g.size} channels")


@torch.no_grad()
def permute(model: nn.Module, perms: dict[str, Tensor]) -> nn.Module:
    """A copy of ``model`` with group ``name``'s channel ``i`` taken from channel ``perms[name][i]``
    (every tensor the group indexes, along its axis). Computes the same function as ``model``."""
    spec = permutation_spec(model)
    _check_perms(spec, perms)
    out = copy.deepcopy(model)
    state = out.state_dict()  # shares storage with ``out``'s tensors
    for g in spec:
        for name, axis in g.axes:
            t = state[name]
            t.copy_(t.index_select(axis, perms[g.name].to(t.device)))
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


class _Cross:
    """Running sums for the correlation between the units of two activations (float64)."""

    def __init__(self):
        self.n = 0
        self.sab: Tensor | None = None
        self.sb = self.sbb = None

    def add(self, b: Tensor, a: Tensor) -> None:
        ab, sb, sbb = a @ b.T, b.sum(1), (b * b).sum(1)
        if self.sab is None:
            self.sab, self.sb, self.sbb = ab, sb, sbb
        else:
            self.sab += ab
            self.sb += sb
            self.sbb += sbb
        self.n += b.shape[1]


class _Moments:
    def __init__(self):
        self.n, self.s, self.ss = 0, None, None

    def add(self, a: Tensor) -> None:
        s, ss = a.sum(1), (a * a).sum(1)
        self.s, self.ss = (s, ss) if self.s is None else (self.s + s, self.ss + ss)
        self.n += a.shape[1]


def _correlation(ref: _Moments, cross: _Cross) -> Tensor:
    """corr[i, j] between reference unit i and model unit j; 0 where either unit is constant."""
    n = ref.n
    mean_a, mean_b = ref.s / n, cross.sb / n
    std_a = (ref.ss / n - mean_a**2).clamp_min(0).sqrt()
    std_b = (cross.sbb / n - mean_b**2).clamp_min(0).sqrt()
    cov = cross.sab / n - torch.outer(mean_a, mean_b)
    denom = torch.outer(std_a, std_b)
    return torch.where(denom > 0, cov / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(cov))


def _hooks(model: nn.Module, taps: list[Tap], on_output: Callable[[int, Tensor], None]) -> list:
    handles = []
    for k, tap in enumerate(taps):
        def hook(_, __, y, k=k, relu=tap.relu):
            on_output(k, F.relu(y) if relu else y)

        handles.append(model.get_submodule(tap.module).register_forward_hook(hook))
    return handles


@torch.no_grad()
def correlations(
    reference: nn.Module, models: Sequence[nn.Module], batches: Batches, seed: int = 666
) -> list[dict[str, Tensor]]:
    """For each of ``models``, every group's (reference units x model units) correlation matrix, summed over
    the group's taps, from one eval-mode pass over ``batches`` (the reference runs once per batch)."""
    spec = permutation_spec(reference)
    for m in models:
        # names and sizes only: a REPAIRed soup has conv biases that its members lack
        if [(g.name, g.size) for g in permutation_spec(m)] != [(g.name, g.size) for g in spec]:
            raise PapaError("cannot align networks of different architectures")
    taps = sorted({t for g in spec for t in g.taps}, key=lambda t: (t.module, t.relu))
    index = {t: k for k, t in enumerate(taps)}
    ref_moments = [_Moments() for _ in taps]
    cross = [[_Cross() for _ in taps] for _ in models]
    ref_units: dict[int, Tensor] = {}

    def keep(k: int, y: Tensor) -> None:
        ref_units[k] = _units(y)
        ref_moments[k].add(ref_units[k])

    batches_seen = 0
    with eval_mode(reference, *models):
        for x in inputs(batches, None, seed):
            with hooked(_hooks(reference, taps, keep)):
                reference(x.to(device_of(reference)))
            for j, m in enumerate(models):
                def accumulate(k: int, y: Tensor, j: int = j) -> None:
                    cross[j][k].add(_units(y).to(ref_units[k].device), ref_units[k])

                with hooked(_hooks(m, taps, accumulate)):
                    m(x.to(device_of(m)))
            ref_units.clear()
            batches_seen += 1
    if batches_seen == 0:
        raise ValueError("permutation alignment got no batches")
    out = []
    for j in range(len(models)):
        out.append({
            g.name: sum(_correlation(ref_moments[index[t]], cross[j][index[t]]) for t in g.taps) for g in spec
        })
    return out


def _assign(corr: Tensor) -> Tensor:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(corr.cpu().numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)[torch.as_tensor(rows).argsort()]


def match_many(
    reference: nn.Module, models: Sequence[nn.Module], batches: Batches, seed: int = 666
) -> list[dict[str, Tensor]]:
    """``match`` for several models against one reference, in one pass over the data."""
    return [{name: _assign(c) for name, c in corr.items()} for corr in correlations(reference, models, batches, seed)]


def match(model: nn.Module, reference: nn.Module, batches: Batches, seed: int = 666) -> dict[str, Tensor]:
    """The permutations that align ``model`` to ``reference``: ``permute(model, match(...))`` has, for each
    group, the assignment of ``model``'s units to ``reference``'s maximizing their total correlation."""
    return match_many(reference, [model], batches, seed)[0]


def align(model: nn.Module, reference: nn.Module, batches: Batches, seed: int = 666) -> nn.Module:
    """A copy of ``model`` whose hidden units are permuted to match ``reference``'s by feature matching on
    ``batches`` (eval mode). It computes the same function as ``model``."""
    return permute(model, match(model, reference, batches, seed))


# populations ----------------------------------------------------------------------------
def align_population(pop: Population, batches: Batches, reference: int = 0, seed: int = 666) -> Population:
    """A new population with every member aligned to member ``reference`` (which is kept as is); the data
    is passed over once, running the reference and every other member on each batch."""
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
                t = stacked.get(name)
                if t is not None:
                    t[j].copy_(t[j].index_select(axis, member_perms[g.name].to(t.device)))


ALIGN_TARGETS = ("member", "running-soup")
"""What ``align_members_`` aligns each member to: one ``member`` (the reference), or the ``running-soup``: the
uniform average of the members aligned before it, the reference first and the others in index order."""


def running_soup_permutations(
    pop: Population, batches: Batches, order: Sequence[int] | None = None, seed: int = 666
) -> dict[int, dict[str, Tensor]]:
    """The permutations aligning each member to the running soup: ``order[0]`` (default member 0) is kept, each
    next member is matched to the uniform average of the members before it in ``order``, as aligned. One pass
    over ``batches`` per member after the first (each depends on the alignments before it)."""
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


def align_members_(
    pop: Population, batches: Batches, reference: int = 0, seed: int = 666,
    companions: Sequence[dict[str, Tensor]] = (), target: str = "member",
) -> dict[int, dict[str, Tensor]]:
    """``align_population`` in place: every member's units permuted to match member ``reference``'s (PAPA-all's
    alignment, Appendix A.4), or with ``target="running-soup"`` (``ALIGN_TARGETS``) to match the average of the
    members aligned before it (``running_soup_permutations``, ``reference`` first, then the others in index
    order). ``companions`` are further stacked tensors indexed like the members' parameters (an optimizer's
    momentum), permuted alike so that training goes on as if nothing happened. Returns the permutations
    applied, by member."""
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
    pairs (a, b) taken in order, b's units permuted to match a's, and the permuted b kept in b's place for every
    later pair (the scripts save it over b's checkpoint), so permutations accumulate. Returns the
    2n parents: pair k's a (as it then stands) at 2k and its aligned b at 2k + 1. ``batches`` None: no
    alignment, the members as they are. ``pop`` is unchanged."""
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
