"""REPAIR for p networks (Appendix A.3, Algorithms 4 and 5): give an averaged network the feature moments
of the networks it averages.

Averaging collapses the variance of features. REPAIR measures, for every convolution and linear layer, the
per-channel mean and std of its output (the pre-activation) in each member, and rescales the averaged
network's layer so that E[X] = sum_i w_i E[X_i] and std(X) = sum_i w_i std(X_i). Channels are dim 1 of a
convolution's output and the last dim of a linear layer's. Every network sees the same batches (one seed),
up to its own augmentation.

Written once, over populations: a repaired soup is a population of one. Every pass runs all members either
in one vmapped call per batch (``stacked``, as the stacked engine trains) or one member at a time, each pass
then stopping once the layer being repaired has fired; the two agree up to float rounding (dropout masks
differ). The BatchNorm recomputation (Algorithm 5, SWA's update_bn) is the same pass in train mode.

``fusion="authors"`` (the experiment's ``fidelity.repair_fusion: authors``) computes REPAIR as the authors'
recombine/repair.py did instead: one train-mode pass per network and the scripts' fusion (``_repair_authors_``).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from papa.forward import Batches, eval_mode, hooked, inputs
from papa.population import Population
from papa.rng import derive_seed, seeded

Moments = dict[str, tuple[Tensor, Tensor]]
"""Layer name -> (mean, std) per output channel, float64."""


# data ---------------------------------------------------------------------------------------------
def _freeze(batches: Batches, iters: int) -> Batches:
    """Keep the first ``iters`` fixed batches, so a one-shot iterator or a shuffling loader gives every
    network the same data."""
    return batches if callable(batches) else list(itertools.islice(batches, iters))


def _data(batches: Batches, members: list[int | None], iters: int, seed: int, device, stacked: bool) -> list:
    """Every member's first ``iters`` batches (``batches(j, ...)`` for member j when callable), batch by
    batch: a (p, B, ...) tensor each when ``stacked``, else a list of p inputs."""
    if iters < 1:
        raise ValueError(f"REPAIR needs at least one batch, got iters={iters}")
    per_member = [[x.to(device) for x in itertools.islice(inputs(batches, j, seed), iters)] for j in members]
    if not per_member[0]:
        raise ValueError("REPAIR got no batches")
    if len({len(xs) for xs in per_member}) > 1 or stacked and any(
        len({x.shape for x in same}) > 1 for same in zip(*per_member, strict=False)
    ):
        raise ValueError("REPAIR needs every member's batches to have the same count"
                         + (" and shapes (stacked)" if stacked else ""))
    return [torch.stack(same) if stacked else list(same) for same in zip(*per_member, strict=True)]


MIN_IMAGES = 16
"""REPAIR warns when it measures fewer images than this per network (docs/decisions.md). A layer whose output has
one value per image and channel (a squeeze-excitation convolution on pooled features, a hidden linear layer)
gets each std from as many values as there are images: from 2, a std is half a difference, and when the
networks see different images (each member its own augmentation) the ratio target std / std is heavy-tailed.
In EfficientNetV2-S such layers got factors up to 5 x 10^4 from 2 images, at most 27 from 4, 5 from 16. The
BatchNorm statistics REPAIR rebuilds are as unreliable."""

_warned_few_images = False


def _warn_if_few_images(xs: list) -> None:
    """One warning line per process on stderr when REPAIR's batches ``xs`` hold fewer than ``MIN_IMAGES``
    images per network (a smoke-scale run: expected there, not meant as a result)."""
    global _warned_few_images
    n = sum(len(x[0]) for x in xs)  # x: member 0's batch first, stacked or not
    if n >= MIN_IMAGES or _warned_few_images:
        return
    _warned_few_images = True
    print(f"papa: warning: REPAIR measured {n} image(s) per network, fewer than {MIN_IMAGES}: its rescale factors "
          "and rebuilt BatchNorm statistics are unreliable at this size (fine for a smoke check, not for results; "
          "use more or larger REPAIR batches)", file=sys.stderr)


def _check_weights(weights, p: int) -> Tensor:
    w = torch.full((p,), 1.0 / p, dtype=torch.float64) if weights is None else weights
    w = torch.as_tensor(w, dtype=torch.float64).flatten().cpu()
    if w.numel() != p:
        raise ValueError(f"expected {p} REPAIR weights, got {w.numel()}")
    if (w < 0).any() or abs(float(w.sum()) - 1.0) > 1e-6:
        raise ValueError(f"REPAIR weights must be non-negative and sum to 1, got {w.tolist()}")
    return w


# layers ---------------------------------------------------------------------------------------------
def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear | _ConvNd)


def _channel_dim(layer: nn.Module, y: Tensor) -> int:
    if isinstance(layer, nn.Linear):
        return y.dim() - 1
    return 1 if y.dim() == len(layer.kernel_size) + 2 else 0  # 0: an unbatched convolution


@dataclass
class _Layer:
    name: str
    module: nn.Module
    calls: int = 0  # times it fires in one forward pass (shared layers fire more than once)
    feeds_bn: bool = True  # each of its outputs went straight into a BatchNorm
    is_output: bool = False  # its output is the model's output (the classifier's logits)


@torch.no_grad()
def _find_layers(model: nn.Module, x: Tensor) -> list[_Layer]:
    """The convolution and linear layers that fire on ``x`` (eval mode), in the order they first fire.

    A layer feeds a BatchNorm when the next module to start after it is a BatchNorm whose input is that
    layer's output tensor itself, every time it fires."""
    found: dict[str, _Layer] = {}
    pending: list[tuple[_Layer, Tensor]] = []

    def after(name: str, module: nn.Module):
        def hook(_, __, output):
            layer = found.setdefault(name, _Layer(name, module))
            layer.calls += 1
            pending[:] = [(layer, output)]

        return hook

    def before(module: nn.Module, inputs):
        if pending:
            layer, out = pending.pop()
            layer.feeds_bn &= isinstance(module, _BatchNorm) and bool(inputs) and inputs[0] is out

    handles = [m.register_forward_pre_hook(before) for m in model.modules()]
    handles += [m.register_forward_hook(after(n, m)) for n, m in model.named_modules() if _is_layer(m)]
    with hooked(handles), eval_mode(model):
        y = model(x)
    for layer, out in pending:  # the last layer's output went nowhere near a BatchNorm
        layer.feeds_bn = False
        layer.is_output = out is y
    for layer in found.values():
        if not isinstance(layer.module.weight, nn.Parameter):
            raise ValueError(f"REPAIR cannot rescale {layer.name}: its weight is computed (parametrized)")
    return list(found.values())


LAYER_SETS = {"conv": (_ConvNd,), "conv+linear": (_ConvNd, nn.Linear)}
"""``repair.layers``: the layers REPAIR rescales. ``conv`` is the authors' REPAIR (recombine/repair.py wraps
Conv2d layers only); ``conv+linear`` also rescales hidden linear layers (transformer blocks, MLPs)."""


def _preactivations(pop: Population, x: Tensor, layers: str = "conv+linear") -> list[_Layer]:
    """The layers REPAIR rescales: every layer of kind ``layers`` (``LAYER_SETS``) except the one producing the
    model's output. Logits are not pre-activations (A.2), and matching their std to the members' would inflate
    the averaged classifier's confidence; the official REPAIR leaves the classifier alone too. Found on member 0
    (every member has its architecture)."""
    if layers not in LAYER_SETS:
        raise ValueError(f"repair layers must be one of {', '.join(LAYER_SETS)}, got {layers!r}")
    return [layer for layer in _find_layers(pop.member(0), x)
            if not layer.is_output and isinstance(layer.module, LAYER_SETS[layers])]


def _chunk_moments(y: Tensor, dim: int) -> tuple[int, Tensor, Tensor]:
    """(count, mean, sum of squared deviations) per channel ``dim`` of one output, in float64."""
    if y.dim() == 1 and dim == 0:  # one sample of a linear layer: nothing to reduce over
        y, dim = y.unsqueeze(0), 1
    dims = [d for d in range(y.dim()) if d != dim]
    n = y.numel() // y.shape[dim]
    mean = y.sum(dims, dtype=torch.float64) / n
    shape = [-1 if d == dim else 1 for d in range(y.dim())]
    # Centre in y's dtype, so the temporary is no bigger than y, then correct for the rounded centre.
    centre = mean.to(y.dtype)
    m2 = ((y - centre.view(shape)) ** 2).sum(dims, dtype=torch.float64)
    return n, mean, m2 - n * (mean - centre.double()) ** 2


class _Welford:
    """Per-channel count, mean and sum of squared deviations, merged across chunks (Chan et al.) in
    float64 so that thousands of float32 values per channel lose no precision. Elementwise, so the
    statistics may carry a leading member axis."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, y: Tensor, dim: int) -> None:
        self.merge(*_chunk_moments(y, dim))

    def merge(self, n: int, mean: Tensor, m2: Tensor) -> None:
        if self.n == 0:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
        self.n = total

    def result(self) -> tuple[Tensor, Tensor]:
        return self.mean, (self.m2 / self.n).clamp_min(0).sqrt()


class _BatchAverage:
    """Per-channel statistics as a BatchNorm's running buffers hold them after a reset with momentum None (the
    authors' TrackLayer and ResetLayer, recombine/repair.py:17-43, 86-89): the plain average over firings of each
    batch's mean and of its unbiased variance. ``result`` gives that mean and the square root of that variance
    (recombine/repair.py:24), float64."""

    def __init__(self):
        self.count, self.mean, self.var = 0, None, None

    def merge(self, n: int, mean: Tensor, m2: Tensor) -> None:
        var = m2 / max(n - 1, 1)
        self.count += 1
        self.mean = mean if self.mean is None else self.mean + (mean - self.mean) / self.count
        self.var = var if self.var is None else self.var + (var - self.var) / self.count

    def result(self) -> tuple[Tensor, Tensor]:
        return self.mean, self.var.clamp_min(0).sqrt()


BN_EPS = 1e-5
"""The eps of the authors' temporary BatchNorms (torch's default): their per-batch normalization and their fusion."""


def _normalize(y: Tensor, dim: int, mean: Tensor, std: Tensor) -> Tensor:
    """What a train-mode BatchNorm with weight ``std`` and bias ``mean`` (eps ``BN_EPS``) makes of ``y``, channels
    ``dim``: each batch's channels normalized by their own (biased) moments, then given ``mean`` and ``std``."""
    if y.dim() == 1 and dim == 0:
        y1 = _normalize(y.unsqueeze(0), 1, mean, std)
        return y1.squeeze(0)
    dims = [d for d in range(y.dim()) if d != dim]
    shape = [-1 if d == dim else 1 for d in range(y.dim())]
    mu = y.mean(dims, keepdim=True)
    var = y.var(dims, correction=0, keepdim=True)
    return (y - mu) / torch.sqrt(var + BN_EPS) * std.to(y.dtype).view(shape) + mean.to(y.dtype).view(shape)


# passes over every member ----------------------------------------------------------------------
class _Stop(BaseException):
    """Ends a forward pass early: nothing after the layer being repaired can change its output.
    A BaseException, so that a model's own ``except Exception`` does not swallow it."""


def _tracking_bns(module: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def _passes(pop: Population, buffers: dict[str, Tensor], xs: Iterable, stacked: bool, *, train: bool = False,
            layers: Iterable[str] = (), stop: _Layer | None = None, seed: int | None = None,
            per_batch: bool = False, goals: list[Moments] | None = None,
            averaged: Callable[[nn.Module], bool] | None = None) -> tuple[int, dict]:
    """Run every member over each batch of ``xs`` (slice j for member j) with ``buffers`` (eval mode, or train
    mode, where every tracking BatchNorm's statistics become the plain average over the batches: momentum
    1/(b+1) at batch b). Returns the number of batches and, for each of ``layers``, the per-channel moments
    (mean, std) of its output, each (p, channels).

    ``stacked``: one vmapped call per batch (randomness per member). Otherwise member by member, each pass
    cut short once ``stop`` has fired as often as in a full pass. ``seed``: each batch's train-mode randomness
    (dropout) comes from its own seed (every member gets that seed in the loop), the global RNG state being
    restored afterwards.

    ``averaged``: which tracking BatchNorms average their batches in train mode (default all); the others update
    their statistics with their own momentum.

    ``per_batch``: each layer's moments as a BatchNorm's running buffers average them (``_BatchAverage``) rather
    than over every value at once. ``goals`` (one ``Moments`` per member): each of their layers' outputs is
    replaced, batch by batch, by its per-batch normalization given that member's goal mean and std
    (``_normalize``), as the authors' ResetLayer does; the moments recorded are those of the output before."""
    template = pop.template
    fired: list[tuple[str, int, Tensor, Tensor]] = []
    goal: dict[str, tuple[Tensor, Tensor]] = {}  # the current member's (stacked: all members', vmapped)

    def hook_for(name: str):
        def hook(module, _, y):
            dim = _channel_dim(module, y)
            fired.append((name, *_chunk_moments(y, dim)))
            if name in goal:
                return _normalize(y, dim, *goal[name])
            return None

        return hook

    calls = 0

    def stopper(*_):
        nonlocal calls
        calls += 1
        if calls == stop.calls:
            raise _Stop

    def member(params, bufs, x, goals_j):
        # under vmap the hooks see one member's output; the statistics leave vmap as the outputs
        fired.clear()
        goal.clear()
        goal.update(goals_j)
        with contextlib.suppress(_Stop):
            functional_call(template, {**params, **bufs}, (x,))
        return [(mean, m2) for _, _, mean, m2 in fired]

    def randomness(b: int):
        return contextlib.nullcontext() if seed is None else seeded(derive_seed("repair-batchnorm", seed, b))

    bns = [m for _, m in _tracking_bns(template) if averaged is None or averaged(m)] if train else []
    momenta = [m.momentum for m in bns]
    handles = [template.get_submodule(name).register_forward_hook(hook_for(name)) for name in layers]
    if stop is not None and not stacked:
        handles.append(template.get_submodule(stop.name).register_forward_hook(stopper))
    stats: dict[str, _Welford | _BatchAverage] = {}
    accumulator = _BatchAverage if per_batch else _Welford
    stacked_goals = {} if not goals else {
        name: tuple(torch.stack([g[name][k] for g in goals]).to(pop.device) for k in range(2)) for name in goals[0]}
    seen = 0
    try:
        with eval_mode(template, train=train):
            for b, x in enumerate(xs):
                for m in bns:
                    m.momentum = 1.0 / (b + 1)  # not None, whose num_batches_tracked vmap cannot read
                if stacked:
                    with randomness(b):
                        out = vmap(member, randomness="different")(pop.params, buffers, x, stacked_goals)
                    firings = [(name, n, mean, m2) for (name, n, _, _), (mean, m2) in zip(fired, out, strict=True)]
                else:
                    each = []
                    for j in range(pop.size):
                        calls = 0
                        params, bufs = ({n: t[j] for n, t in d.items()} for d in (pop.params, buffers))
                        goals_j = {n: (m[j], sd[j]) for n, (m, sd) in stacked_goals.items()}
                        with randomness(b):
                            member(params, bufs, x[j], goals_j)
                        each.append(list(fired))
                    firings = [(same[0][0], same[0][1], torch.stack([f[2] for f in same]),
                                torch.stack([f[3] for f in same])) for same in zip(*each, strict=True)]
                for name, n, mean, m2 in firings:
                    stats.setdefault(name, accumulator()).merge(n, mean, m2)
                seen += 1
    finally:
        for h in handles:
            h.remove()
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        goal.clear()
    return seen, {n: s.result() for n, s in stats.items()}


@torch.no_grad()
def reset_batchnorm_(pop: Population, batches: Iterable, buffers: dict[str, Tensor] | None = None,
                     seed: int | None = None, stacked: bool = False, stop: _Layer | None = None) -> int:
    """Algorithm 5 and SWA's update_bn, for every member: reset each tracking BatchNorm's statistics and set
    them to the plain average of train-mode batch statistics over ``batches`` (slice j of each for member j:
    (p, B, ...) tensors, or sequences of p inputs in the loop), written into the stacked ``buffers`` (default:
    the population's own). Returns the number of batches; the momenta and the training flag are restored.
    ``stacked``, ``seed`` and ``stop`` as for the passes of REPAIR (see ``_passes``)."""
    buffers = pop.buffers if buffers is None else buffers
    if not _clear_batchnorm_(pop, buffers):
        return 0
    return _passes(pop, buffers, batches, stacked, train=True, stop=stop, seed=seed)[0]


def _clear_batchnorm_(pop: Population, buffers: dict[str, Tensor],
                      only: Callable[[nn.Module], bool] | None = None) -> bool:
    """Reset every tracking BatchNorm's statistics in ``buffers`` (mean 0, variance 1, no batch tracked), or those
    that ``only`` accepts; whether there was any."""
    bns = [(n, m) for n, m in _tracking_bns(pop.template) if only is None or only(m)]
    for name, _ in bns:
        key = f"{name}." if name else ""
        buffers[f"{key}running_mean"].zero_()
        buffers[f"{key}running_var"].fill_(1.0)
        if f"{key}num_batches_tracked" in buffers:
            buffers[f"{key}num_batches_tracked"].zero_()
    return bool(bns)


def reset_batchnorm(module: nn.Module, batches_iter: Iterable, seed: int | None = None) -> nn.Module:
    """``reset_batchnorm_`` for one module, in place (as torch's update_bn): every BatchNorm's running
    statistics recomputed from scratch as the plain average over ``batches_iter`` of train-mode batch
    statistics (no grad). Momenta and the training flag are restored."""
    one = Population.from_modules([module])
    xs = [[x.to(one.device)] for x in inputs(batches_iter, None, 0)]
    if not xs:  # checked before the reset, which would otherwise leave mean 0 and variance 1
        raise ValueError("reset_batchnorm got no batches")
    reset_batchnorm_(one, xs, seed=seed)
    with torch.no_grad():
        for name, t in one.buffers.items():
            module.get_buffer(name).copy_(t[0])
    return module


# REPAIR (Algorithm 4) ------------------------------------------------------------------------------
FUSIONS = ("exact", "authors")
"""How REPAIR computes and fuses its correction. ``exact``: member moments in eval mode over all values; the
repaired network measured layer by layer in eval mode, each layer rescaled and shifted so its moments are the
targets, a bias-free layer's shift kept (an added bias, or the running mean of the BatchNorm it feeds, rebuilt
afterwards). ``authors``: recombine/repair.py at 47ad83a, one train-mode pass each (see ``_repair_authors_``)."""


def _check_fusion(fusion: str) -> None:
    if fusion not in FUSIONS:
        raise ValueError(f"repair fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")


def member_moments(pop: Population, batches: Batches, iters: int = 5, seed: int = 666, stacked: bool = False,
                   members: list[int] | None = None, fusion: str = "exact") -> list[Moments]:
    """Each member's per-channel output moments of every convolution and linear layer, in eval mode on
    its own first ``iters`` batches (``batches(members[i], ...)`` for the i-th held member; default: its
    position), after rebuilding its BatchNorm statistics on those batches (on copies: ``pop`` is unchanged).
    ``stacked``: all members in one vmapped pass per batch.

    ``fusion="authors"``: as the authors' TrackLayers measured them (recombine/repair.py:17-29, 84-99): one pass in
    train mode (the members' BatchNorms normalize by batch statistics, dropout is on), each layer's mean the
    average of its batch means and its std the square root of the average of its unbiased batch variances."""
    _check_fusion(fusion)
    members = list(range(pop.size)) if members is None else list(members)
    xs = _data(_freeze(batches, iters), members, iters, seed, pop.device, stacked)
    buffers = {n: b.clone() for n, b in pop.buffers.items()}
    layers = [n for n, m in pop.template.named_modules() if _is_layer(m)]
    if fusion == "authors":
        _clear_batchnorm_(pop, buffers)
        stats = _passes(pop, buffers, xs, stacked, train=True, layers=layers, seed=seed, per_batch=True)[1]
        return [{n: (mean[j], std[j]) for n, (mean, std) in stats.items()} for j in range(pop.size)]
    reset_batchnorm_(pop, xs, buffers, seed, stacked)
    stats = _passes(pop, buffers, xs, stacked, layers=layers)[1]
    return [{n: (mean[j], std[j]) for n, (mean, std) in stats.items()} for j in range(pop.size)]


def _targets(moments: list[Moments], weights: Tensor) -> Moments:
    """The weighted average of the members' means and, separately, of their stds."""
    if len(moments) != weights.numel():
        raise ValueError(f"got moments for {len(moments)} members, expected {weights.numel()}")
    names = moments[0].keys()
    if any(m.keys() != names for m in moments):
        raise ValueError("members' moments cover different layers")
    out = {}
    for name in names:
        means, stds = zip(*(m[name] for m in moments), strict=True)
        w = weights.to(means[0].device)
        out[name] = (torch.tensordot(w, torch.stack(means), 1), torch.tensordot(w, torch.stack(stds), 1))
    return out


@torch.no_grad()
def _rescale(m: nn.Module, w: Tensor, bias: Tensor | None, mean: Tensor, std: Tensor,
             target: tuple[Tensor, Tensor], shift: bool) -> Tensor | None:
    """Rescale layer ``m``'s output channels in its weight ``w`` (in place): y <- s (y - mean) + target
    mean, s = target std / std. Returns the new bias (float64) when ``shift``, else None."""
    target_mean, target_std = (t.to(mean.device) for t in target)
    # A channel with (numerically) no spread is a dead unit: scaling it up would only amplify rounding.
    dead = std <= 1e-6 * torch.sqrt(mean**2 + std**2)
    scale = torch.where(dead, torch.ones_like(std), target_std / std)
    _scale_outputs_(m, w, scale)
    if not shift:
        return None
    old = torch.zeros_like(mean) if bias is None else bias.double()
    return scale * (old - mean) + target_mean


def _scale_outputs_(m: nn.Module, w: Tensor, scale: Tensor) -> None:
    """Multiply layer ``m``'s output channels by ``scale`` in its weight ``w`` (in place)."""
    if isinstance(m, _ConvNd) and m.transposed:  # weight (in, out / groups, ...), grouped along dim 0
        g, in_per_group = m.groups, w.shape[0] // m.groups
        factor = scale.view(g, 1, -1).expand(g, in_per_group, -1).reshape(w.shape[0], w.shape[1])
    else:  # weight (out, ...) for Linear and Conv, whatever the groups, dilation or stride
        factor = scale
    w.mul_(factor.view(*factor.shape, *[1] * (w.dim() - factor.dim())).to(w.dtype))


@torch.no_grad()
def _repair_(pop: Population, xs: list, targets: list[Moments], seed: int, stacked: bool, add_biases: bool,
             kinds: str = "conv+linear") -> None:
    """Repair every member i in place toward ``targets[i]``, layer by layer in forward order.

    Each layer is measured after the layers before it are rescaled (and the BatchNorm statistics rebuilt on
    them), so the eval-mode moments match the targets exactly. Algorithm 4's single pass through temporary
    BatchNorms (``_repair_authors_``) instead takes statistics in train mode, where every earlier layer is
    normalized batch by batch rather than by the fixed correction fused into it, which leaves residual error.
    Without ``stacked`` the passes stop once the layer has fired, so
    the cost is about half of (layers x iters) forward passes, twice that when the model has BatchNorms.

    A bias-free layer that feeds a BatchNorm is only rescaled: the rebuilt running mean absorbs any
    per-channel shift exactly. Any other bias-free layer gets a bias with ``add_biases`` (a soup), and is
    left alone without (members keep their architecture, so their optimizer's tensors stay valid).

    Fewer than ``MIN_IMAGES`` images per network: one warning line per process (see ``MIN_IMAGES``)."""
    _warn_if_few_images(xs)
    layers = [layer for layer in _preactivations(pop, xs[0][0], kinds)
              if add_biases or layer.feeds_bn or f"{layer.name}.bias" in pop.params]
    missing = [layer.name for layer in layers if layer.name not in targets[0]]
    if missing:
        raise ValueError(f"no member moments for layers {missing[:3]}")
    has_bn = bool(_tracking_bns(pop.template))
    for layer in layers:
        if has_bn:
            reset_batchnorm_(pop, xs, seed=seed, stacked=stacked, stop=layer)
        mean, std = _passes(pop, pop.buffers, xs, stacked, layers=[layer.name], stop=layer)[1][layer.name]
        weight, bias = pop.params[f"{layer.name}.weight"], pop.params.get(f"{layer.name}.bias")
        shift = add_biases or bias is not None
        new_biases = [_rescale(layer.module, weight[i], None if bias is None else bias[i], mean[i], std[i],
                               target[layer.name], shift) for i, target in enumerate(targets)]
        if not shift:
            continue
        if bias is None:  # never drop the shift of a bias-free layer: give it a bias
            pop.params[f"{layer.name}.bias"] = torch.stack(new_biases).to(weight.dtype)
            pop.template.get_submodule(layer.name).bias = nn.Parameter(pop.params[f"{layer.name}.bias"][0].clone())
        else:
            for i, new in enumerate(new_biases):
                bias[i].copy_(new)
    if has_bn:
        reset_batchnorm_(pop, xs, seed=seed, stacked=stacked)


def _reset_by_authors(bn: nn.Module) -> bool:
    """The BatchNorms the authors' reset_bn_stats resets and averages (``type(m) == nn.BatchNorm2d``,
    recombine/repair.py:86-89): exactly nn.BatchNorm2d, not a subclass (timm's BatchNormAct2d, a SyncBatchNorm),
    which keeps its statistics and updates them with its own momentum in the train-mode pass."""
    return type(bn) is nn.BatchNorm2d


@torch.no_grad()
def _repair_authors_(pop: Population, xs: list, targets: list[Moments], seed: int, stacked: bool,
                     kinds: str = "conv+linear") -> None:
    """Repair every member i in place toward ``targets[i]`` as the authors' correct_neuron_stats_multiple fuses it
    (recombine/repair.py:151-236 at 47ad83a), generalized from Conv2d to the layers of ``kinds``.

    One pass in train mode over ``xs``: every layer's output is replaced by its per-batch normalization given the
    target mean and std (a ResetLayer, l.31-43), so later layers see targets batch by batch, while that layer's
    running mean and variance (the average of the batch means and of the unbiased batch variances) and every
    nn.BatchNorm2d's own statistics are estimated afresh (l.86-99; other BatchNorms, see ``_reset_by_authors``,
    update theirs with their momentum). Then each layer is fused (fuse_conv_bn, l.216-236):
    its weight times g = target std / sqrt(running variance + ``BN_EPS``), its bias, only if it has one, becomes
    target mean + g (bias - running mean). A bias-free layer's shift is dropped and no BatchNorm is rebuilt after
    the fusion: a BatchNorm fed by such a layer keeps the statistics it took of the targets. No bias is ever added,
    every layer of ``kinds`` but the output one is rescaled, whatever feeds it, and each keeps its groups, dilation
    and padding (the authors' rebuilt nn.Conv2d, which has none, would break a grouped or dilated convolution).

    Fewer than ``MIN_IMAGES`` images per network: one warning line per process (see ``MIN_IMAGES``)."""
    _warn_if_few_images(xs)
    layers = _preactivations(pop, xs[0][0], kinds)
    missing = [layer.name for layer in layers if layer.name not in targets[0]]
    if missing:
        raise ValueError(f"no member moments for layers {missing[:3]}")
    goals = [{layer.name: target[layer.name] for layer in layers} for target in targets]
    _clear_batchnorm_(pop, pop.buffers, only=_reset_by_authors)
    stats = _passes(pop, pop.buffers, xs, stacked, train=True, layers=[layer.name for layer in layers], seed=seed,
                    per_batch=True, goals=goals, averaged=_reset_by_authors)[1]
    for layer in layers:
        running_mean, running_std = stats[layer.name]
        weight, bias = pop.params[f"{layer.name}.weight"], pop.params.get(f"{layer.name}.bias")
        for i, target in enumerate(targets):
            target_mean, target_std = (t.to(running_mean.device) for t in target[layer.name])
            gain = target_std / torch.sqrt(running_std[i] ** 2 + BN_EPS)
            _scale_outputs_(layer.module, weight[i], gain)
            if bias is not None:
                bias[i].copy_((target_mean + gain * (bias[i].double() - running_mean[i])).to(bias.dtype))


def _repair_any_(pop: Population, xs: list, targets: list[Moments], seed: int, stacked: bool, add_biases: bool,
                 kinds: str, fusion: str) -> None:
    if fusion == "authors":
        _repair_authors_(pop, xs, targets, seed, stacked, kinds)
    else:
        _repair_(pop, xs, targets, seed, stacked, add_biases, kinds)


def repair(
    model: nn.Module,
    pop: Population,
    batches: Batches,
    iters: int = 5,
    seed: int = 666,
    weights=None,
    target: int | None = None,
    moments: list[Moments] | None = None,
    stacked: bool = False,
    layers: str = "conv+linear",
    fusion: str = "exact",
) -> nn.Module:
    """A repaired copy of ``model`` (usually a soup of ``pop``): every convolution and linear layer gets
    the ``weights``-weighted average (default uniform) of the members' per-channel output mean and std.

    Measured in eval mode on the first ``iters`` batches (``batches(target, ...)`` when callable). A
    bias-free layer gets a bias, the only state added. ``moments``: precomputed ``member_moments(pop, ...)``
    (else measured here, vmapped with ``stacked``). ``model`` itself is repaired as a population of one.
    ``layers``: which layers are rescaled (``LAYER_SETS``). ``fusion``: ``FUSIONS``; ``authors`` adds no bias
    (``_repair_authors_``), and ``moments`` must then come from ``member_moments(..., fusion="authors")``.
    """
    _check_fusion(fusion)
    w = _check_weights(weights, pop.size)
    batches = _freeze(batches, iters)
    if moments is None:
        moments = member_moments(pop, batches, iters, seed, stacked=stacked, fusion=fusion)
    one = Population.from_modules([model])
    xs = _data(batches, [target], iters, seed, one.device, stacked=False)
    _repair_any_(one, xs, [_targets(moments, w)], seed, stacked=False, add_biases=True, kinds=layers, fusion=fusion)
    return one.member(0)


def repair_population_(
    pop: Population, matrix, batches: Batches, moments: list[Moments], iters: int = 5, seed: int = 666,
    members: list[int] | None = None, stacked: bool = False, layers: str = "conv+linear", fusion: str = "exact",
) -> Population:
    """Repair, in place, a population just mixed by theta_i <- sum_j matrix[i, j] theta_j: member i gets
    the moments of the pre-mix members (``moments``, from ``member_moments`` before mixing) weighted by
    row i, measured on ``batches(i, ...)``.

    When ``pop`` holds only some members of a larger population (one rank's share), ``matrix`` has one
    row per held member over all ``len(moments)`` members and ``members`` gives each held member's index
    in the whole population (what ``batches`` is called with).

    Members keep their architecture, so no bias can be added: a bias-free layer whose output goes straight
    into a BatchNorm is only rescaled (that BatchNorm's rebuilt running mean absorbs any per-channel shift
    exactly, so everything from the BatchNorm on matches ``repair``), and any other bias-free layer is left
    as it is. ``stacked``: every member at once through vmapped full forward passes. ``layers``: which layers
    are rescaled (``LAYER_SETS``). ``fusion="authors"``: ``_repair_authors_``, which rescales every layer and adds
    no bias anyway (``moments`` from ``member_moments(..., fusion="authors")``).
    """
    _check_fusion(fusion)
    p, total = pop.size, len(moments)
    members = list(range(p)) if members is None else list(members)
    m = torch.as_tensor(matrix, dtype=torch.float64).cpu()
    if m.shape != (p, total) or len(members) != p:
        raise ValueError(f"mixing matrix must be {p}x{total} (held members x all members), got {tuple(m.shape)}")
    targets = [_targets(moments, _check_weights(m[i], total)) for i in range(p)]
    xs = _data(_freeze(batches, iters), members, iters, seed, pop.device, stacked)
    _repair_any_(pop, xs, targets, seed, stacked, add_biases=False, kinds=layers, fusion=fusion)
    return pop
