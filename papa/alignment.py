"""Permutation alignment by feature matching (Git Re-Basin's activation matching, Ainsworth et al., 2023).

Hidden units of a network can be permuted without changing its function: permute a layer's output channels
(with its BatchNorm) and the next layers' input channels alike. Averaging two independently trained networks
only makes sense once their units correspond, so ``align(model, reference, batches)`` permutes ``model``'s
units to match ``reference``'s: for each *permutation group* (a set of channels that must be permuted
together) it runs both networks on the same inputs, correlates every unit of one with every unit of the
other (channels of a convolution's output, every image position a sample) and solves the linear assignment
that maximizes the total correlation (``scipy.optimize.linear_sum_assignment``).

Alignment is architecture-specific (Appendix A.4): the groups are derived from the module structure of the
registered ``vgg11_bn``, ``vgg16_bn``, ``resnet18_cifar`` and ``resnet20`` (any width or depth of those
classes), see ``permutation_spec``.

For populations, Appendix A.4: ``align_population`` aligns every member to one member (PAPA-all's
ablation; ``align_members_`` does it in place, optimizer state included, during training);
``aligned_greedy_soup`` aligns each member to the current greedy soup before trying it, and
``aligned_average_soup`` each member to the running average of those before it.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from papa.errors import PapaError
from papa.models.resnet_cifar import BasicBlock, CifarResNet
from papa.models.vgg import VGG
from papa.population import Population
from papa.soups import average_soup, greedy_members

UNSUPPORTED = "permutation alignment supports vgg11_bn, vgg16_bn, resnet18_cifar and resnet20"

Batches = Iterable | Callable[[int | None, torch.Generator], Iterable]
"""Alignment data: an iterable of input tensors (or of tuples whose first element is the input), or, as for
REPAIR, a callable ``batches(None, generator)`` returning one (the generator seeded with ``seed`` on every
call). Both networks see each batch in the same pass, so a shuffling or augmenting loader is fine; a one-shot
iterator is kept in memory by the functions that pass over the data more than once."""


# permutation specs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tap:
    """Where a group's features are read: the output of module ``module``, through a ReLU if ``relu``."""

    module: str
    relu: bool = False


@dataclass(frozen=True)
class PermGroup:
    """Channels permuted together: ``axes`` lists every (state_dict name, axis) indexed by them, ``taps``
    the activations whose units they are (their correlation matrices are summed before matching)."""

    name: str
    size: int
    taps: tuple[Tap, ...]
    axes: tuple[tuple[str, int], ...]


class _Builder:
    """Accumulates one group's taps and axes."""

    def __init__(self, name: str, size: int, state: dict[str, Tensor]):
        self.name, self.size, self.state = name, size, state
        self.taps: list[Tap] = []
        self.axes: list[tuple[str, int]] = []

    def _add(self, name: str, axis: int) -> None:
        if name not in self.state:  # absent bias, affine-free or stat-free BatchNorm
            return
        if self.state[name].shape[axis] != self.size:
            raise PapaError(f"{name}: axis {axis} has {self.state[name].shape[axis]} channels, expected {self.size}")
        self.axes.append((name, axis))

    def produced_by(self, conv: str, bn: str) -> None:
        """``conv``'s output channels, through BatchNorm ``bn``."""
        for name in (f"{conv}.weight", f"{conv}.bias"):
            self._add(name, 0)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            self._add(f"{bn}.{leaf}", 0)

    def consumed_by(self, layer: str) -> None:
        """The input channels of conv or linear ``layer``."""
        self._add(f"{layer}.weight", 1)

    def build(self) -> PermGroup:
        return PermGroup(self.name, self.size, tuple(self.taps), tuple(self.axes))


def _vgg_spec(model: VGG, state: dict[str, Tensor]) -> list[PermGroup]:
    layers = list(model.features.named_children())
    groups: list[PermGroup] = []
    current: _Builder | None = None
    k = 0
    while k < len(layers):
        name, m = layers[k]
        if isinstance(m, nn.MaxPool2d | nn.AvgPool2d):
            k += 1
            continue
        bn = layers[k + 1][1] if k + 1 < len(layers) else None
        relu = layers[k + 2][1] if k + 2 < len(layers) else None
        if not (isinstance(m, nn.Conv2d) and m.groups == 1 and isinstance(bn, nn.BatchNorm2d)
                and isinstance(relu, nn.ReLU)):
            raise PapaError(f"{UNSUPPORTED}: VGG features.{name} is not a conv-BatchNorm-ReLU block")
        conv, bn_name, relu_name = f"features.{name}", f"features.{layers[k + 1][0]}", f"features.{layers[k + 2][0]}"
        if current is not None:
            current.consumed_by(conv)
            groups.append(current.build())
        current = _Builder(conv, m.out_channels, state)
        current.produced_by(conv, bn_name)
        current.taps.append(Tap(relu_name))  # post-ReLU features
        k += 3
    if current is None or not isinstance(model.classifier, nn.Linear):
        raise PapaError(f"{UNSUPPORTED}: VGG without convolutions or a linear classifier")
    current.consumed_by("classifier")
    groups.append(current.build())
    return groups


def _resnet_spec(model: CifarResNet, state: dict[str, Tensor]) -> list[PermGroup]:
    """One residual-stream group from the stem (or a projection shortcut) to the next projection, shared by
    every block output on the way; one inner group per block (conv1 -> bn1 -> conv2)."""
    groups: list[PermGroup] = []
    stream = _Builder("stream:stem", model.conv1.out_channels, state)
    stream.produced_by("conv1", "bn1")
    stream.taps.append(Tap("bn1", relu=True))
    for i in range(1, model.num_stages + 1):
        for b, block in enumerate(model.get_submodule(f"layer{i}")):
            prefix = f"layer{i}.{b}"
            if not isinstance(block, BasicBlock):
                raise PapaError(f"{UNSUPPORTED}: {prefix} is not a BasicBlock")
            inner = _Builder(f"inner:{prefix}", block.conv1.out_channels, state)
            inner.produced_by(f"{prefix}.conv1", f"{prefix}.bn1")
            inner.taps.append(Tap(f"{prefix}.bn1", relu=True))
            inner.consumed_by(f"{prefix}.conv2")
            groups.append(inner.build())
            stream.consumed_by(f"{prefix}.conv1")
            if block.downsample is not None:
                ds = block.downsample
                if not (len(ds) == 2 and isinstance(ds[0], nn.Conv2d) and isinstance(ds[1], nn.BatchNorm2d)):
                    raise PapaError(f"{UNSUPPORTED}: {prefix}.downsample is not a conv-BatchNorm projection")
                stream.consumed_by(f"{prefix}.downsample.0")
                groups.append(stream.build())
                stream = _Builder(f"stream:{prefix}", ds[0].out_channels, state)
                stream.produced_by(f"{prefix}.downsample.0", f"{prefix}.downsample.1")
            stream.produced_by(f"{prefix}.conv2", f"{prefix}.bn2")
            stream.taps.append(Tap(prefix))  # the block's output, after the residual sum and ReLU
    stream.consumed_by("fc")
    groups.append(stream.build())
    return groups


def permutation_spec(model: nn.Module) -> list[PermGroup]:
    """The permutation groups of ``model``, in forward order.

    VGG: one group per convolution (its output channels and BatchNorm, the next convolution's or the
    classifier's input channels), matched on its post-ReLU features. CIFAR ResNet: the residual stream is one
    group from the stem to the first projection shortcut (stem conv/BN, every block's conv2/bn2, the blocks'
    conv1 inputs and the projection's input), then one more per projection (its conv/BN, the stage's
    conv2/bn2 outputs, ... the fc's input), matched on the stem's post-ReLU output and every block output
    together; each block's inner channels (conv1/bn1 out, conv2 in) are a group matched on post-ReLU bn1."""
    state = model.state_dict()
    if isinstance(model, VGG):
        return _vgg_spec(model, state)
    if isinstance(model, CifarResNet):
        return _resnet_spec(model, state)
    raise PapaError(f"{UNSUPPORTED}, not {type(model).__name__}")


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


# data ---------------------------------------------------------------------------------------------
def _inputs(batches: Batches, seed: int) -> Iterable[Tensor]:
    source = batches(None, torch.Generator().manual_seed(seed)) if callable(batches) else batches
    for b in source:
        yield b[0] if isinstance(b, tuple | list) else b


def reusable(batches: Batches) -> Batches:
    """``batches`` made safe to pass over more than once: a one-shot iterator is kept in a list."""
    if callable(batches) or iter(batches) is not batches:
        return batches
    return list(batches)


def _device(model: nn.Module) -> torch.device:
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if t is None else t.device


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

    modes = [m.training for m in (reference, *models)]
    for m in (reference, *models):
        m.eval()
    device = _device(reference)
    batches_seen = 0
    try:
        for x in _inputs(batches, seed):
            handles = _hooks(reference, taps, keep)
            try:
                reference(x.to(device))
            finally:
                for h in handles:
                    h.remove()
            for j, m in enumerate(models):
                def accumulate(k: int, y: Tensor, j: int = j) -> None:
                    cross[j][k].add(_units(y).to(ref_units[k].device), ref_units[k])

                handles = _hooks(m, taps, accumulate)
                try:
                    m(x.to(_device(m)))
                finally:
                    for h in handles:
                        h.remove()
            ref_units.clear()
            batches_seen += 1
    finally:
        for m, mode in zip((reference, *models), modes, strict=True):
            m.train(mode)
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


# populations and soups ----------------------------------------------------------------------------
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


def align_members_(
    pop: Population, batches: Batches, reference: int = 0, seed: int = 666,
    companions: Sequence[dict[str, Tensor]] = (),
) -> dict[int, dict[str, Tensor]]:
    """``align_population`` in place: every member's units permuted to match member ``reference``'s (PAPA-all's
    alignment, Appendix A.4). ``companions`` are further stacked tensors indexed like the members' parameters
    (an optimizer's momentum), permuted alike so that training goes on as if nothing happened. Returns the
    permutations applied, by member."""
    if not -pop.size <= reference < pop.size:
        raise IndexError(f"reference member {reference} out of range for a population of {pop.size}")
    reference %= pop.size
    spec = permutation_spec(pop.template)
    others = [j for j in range(pop.size) if j != reference]
    if not others:
        return {}
    modules = pop.to_modules()
    perms = dict(zip(others, match_many(modules[reference], [modules[j] for j in others], batches, seed),
                     strict=True))
    for stacked in (pop.state_dict(), *companions):
        permute_stacked_(stacked, spec, perms)
    return perms


def _mean(modules: list[nn.Module]) -> nn.Module:
    return average_soup(Population.from_modules(modules))


def sequential_alignment(
    pop: Population, batches: Batches, order: Sequence[int] | None = None, seed: int = 666
) -> Population:
    """Every member aligned to the running average: ``order[0]`` (default member 0) is kept, each next member
    is aligned to the average of the (aligned) members before it. The result keeps member order."""
    order = list(range(pop.size)) if order is None else list(order)
    if sorted(order) != list(range(pop.size)):
        raise ValueError(f"order must be a permutation of the {pop.size} members, got {order}")
    batches = reusable(batches)
    aligned: dict[int, nn.Module] = {order[0]: pop.member(order[0])}
    for j in order[1:]:
        aligned[j] = align(pop.member(j), _mean(list(aligned.values())), batches, seed)
    return Population.from_modules([aligned[j] for j in range(pop.size)])


def aligned_average_soup(
    pop: Population, batches: Batches, order: Sequence[int] | None = None, seed: int = 666
) -> nn.Module:
    """The average soup of ``sequential_alignment(pop, batches, order)``: members in member order unless
    ``order`` is given (e.g. by decreasing validation accuracy)."""
    return average_soup(sequential_alignment(pop, batches, order, seed))


def greedy_alignment(
    pop: Population, score: Callable[[nn.Module], float], batches: Batches, seed: int = 666,
    scores: Sequence[float] | None = None,
) -> tuple[Population, list[int], nn.Module]:
    """Appendix A.4's aligned greedy soup. Members are sorted by ``score`` (higher is better, ties in member
    order); the best is the soup; every next one is aligned to the current soup, then added when the soup's
    score does not decrease (``>=``, as ``greedy_soup``).

    Returns the population of aligned members (each as aligned when it was tried, the best unchanged), the
    indices of the soup's members in the order they were added, and the soup (the uniform average of those
    aligned members): REPAIR the soup against the aligned population, not the original one. ``scores``:
    the members' scores when the caller already has them (saves evaluating each member again)."""
    batches = reusable(batches)
    if scores is None:
        scores = [float(score(pop.member(j))) for j in range(pop.size)]
    aligned: dict[int, nn.Module] = {}  # each member as aligned when it was tried; the first one as it is

    def soup_of(members: list[int]) -> nn.Module:
        modules = [aligned.setdefault(i, pop.member(i)) for i in members]
        return modules[0] if len(modules) == 1 else _mean(modules)

    def aligned_score(members: list[int]) -> float:
        *included, j = members
        aligned[j] = align(pop.member(j), soup_of(included), batches, seed)
        return score(soup_of(members))

    included = greedy_members(scores, aligned_score)
    soup = soup_of(included)
    return Population.from_modules([aligned.setdefault(j, pop.member(j)) for j in range(pop.size)]), included, soup


def aligned_greedy_soup(
    pop: Population, score: Callable[[nn.Module], float], batches: Batches, seed: int = 666
) -> tuple[nn.Module, list[int]]:
    """The greedy soup with permutation alignment (Appendix A.4): like ``greedy_soup``, but each member is
    aligned to the current soup before it is tried. Returns the soup and its members in the order added;
    ``greedy_alignment`` also gives the aligned population (what REPAIR needs)."""
    _, included, soup = greedy_alignment(pop, score, batches, seed)
    return soup, included
