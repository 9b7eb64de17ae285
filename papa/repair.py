"""REPAIR for p networks (Appendix A.3, Algorithms 4 and 5): every convolution and linear layer of an averaged
network is rescaled so that, per output channel (dim 1 of a convolution's output, the last dim of a linear layer's),
E[X] = sum_i w_i E[X_i] and std(X) = sum_i w_i std(X_i) over its members, measured on the same batches. Written over
populations (a repaired soup: a population of one); the BatchNorm reset (Algorithm 5) is the same pass in train mode."""

import contextlib
import functools
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
    """The first ``iters`` batches kept, so a one-shot iterator or a shuffling loader gives every network the same."""
    return batches if callable(batches) else list(itertools.islice(batches, iters))


def _data(batches: Batches, members: list[int | None], iters: int, seed: int, device, stacked: bool,
          role: str | None = None) -> list:
    """Every member's first ``iters`` batches, batch by batch: (p, B, ...) tensors when ``stacked``, else lists. Each
    member's come from ``seed`` (callable ``batches``: the same images for all), or with ``role`` (``"member"``, whose
    moments are taken, or ``"repaired"``) from a seed of its own, derive_seed(seed, "repair-images", role, j)."""
    if iters < 1:
        raise ValueError(f"REPAIR needs at least one batch, got iters={iters}")
    batches = _freeze(batches, iters)
    seeds = [seed if role is None else derive_seed(seed, "repair-images", role, j) for j in members]
    per_member = [[x.to(device) for x in itertools.islice(inputs(batches, j, s), iters)]
                  for j, s in zip(members, seeds, strict=True)]
    if not per_member[0]:
        raise ValueError("REPAIR got no batches")
    if len({len(xs) for xs in per_member}) > 1 or stacked and any(len({x.shape for x in same}) > 1
                                                                 for same in zip(*per_member, strict=False)):
        raise ValueError("REPAIR needs every member's batches to have the same count"
                         + (" and shapes (stacked)" if stacked else ""))
    return [torch.stack(same) if stacked else list(same) for same in zip(*per_member, strict=True)]


MIN_IMAGES = 16
"""REPAIR warns when it measures fewer images than this per network: a std from so few values makes its rescale
factors and rebuilt BatchNorm statistics unreliable (docs/decisions.md, "REPAIR from few images")."""

_warned_few_images = False


def _warn_if_few_images(xs: list) -> None:
    global _warned_few_images
    n = sum(len(x[0]) for x in xs)  # x: member 0's batch first, stacked or not
    if n < MIN_IMAGES and not _warned_few_images:
        _warned_few_images = True
        print(f"papa: warning: REPAIR measured {n} image(s) per network, fewer than {MIN_IMAGES}: its rescale "
              "factors and rebuilt BatchNorm statistics are unreliable at this size (fine for a smoke check, not for "
              "results; use more or larger REPAIR batches)", file=sys.stderr)


def _check_weights(weights, p: int) -> Tensor:
    w = torch.full((p,), 1.0 / p, dtype=torch.float64) if weights is None else weights
    w = torch.as_tensor(w, dtype=torch.float64).flatten().cpu()
    if w.numel() != p:
        raise ValueError(f"expected {p} REPAIR weights, got {w.numel()}")
    if (w < 0).any() or abs(float(w.sum()) - 1.0) > 1e-6:
        raise ValueError(f"REPAIR weights must be non-negative and sum to 1, got {w.tolist()}")
    return w


def _check_choice(what: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"repair {what} must be one of {', '.join(choices)}, got {value!r}")


# layers ---------------------------------------------------------------------------------------------
LAYER_SETS = {"conv": (_ConvNd,), "conv+linear": (_ConvNd, nn.Linear)}
"""``repair.layers``: the layers REPAIR rescales. ``conv`` is the authors' REPAIR (recombine/repair.py wraps
Conv2d layers only); ``conv+linear`` also rescales hidden linear layers (transformer blocks, MLPs)."""


@dataclass
class _Layer:
    name: str
    module: nn.Module
    calls: int = 0  # times it fires in one forward pass (shared layers fire more than once)
    feeds_bn: bool = True  # each of its outputs went straight into a BatchNorm
    is_output: bool = False  # its output is the model's output (the classifier's logits)


@torch.no_grad()
def _find_layers(model: nn.Module, x: Tensor) -> list[_Layer]:
    """The convolution and linear layers firing on ``x`` (eval mode), in order of first firing. A layer feeds a
    BatchNorm if, every time it fires, the next module to start is a BatchNorm taking its very output tensor."""
    found: dict[str, _Layer] = {}
    pending: list[tuple[_Layer, Tensor]] = []
    names = {m: n for n, m in model.named_modules() if isinstance(m, LAYER_SETS["conv+linear"])}

    def after(module: nn.Module, _, output):
        layer = found.setdefault(names[module], _Layer(names[module], module))
        layer.calls += 1
        pending[:] = [(layer, output)]

    def before(module: nn.Module, inputs):
        if pending:
            layer, out = pending.pop()
            layer.feeds_bn &= isinstance(module, _BatchNorm) and bool(inputs) and inputs[0] is out

    handles = [m.register_forward_pre_hook(before) for m in model.modules()]
    handles += [m.register_forward_hook(after) for m in names]
    with hooked(handles), eval_mode(model):
        y = model(x)
    for layer, out in pending:  # the last layer's output went nowhere near a BatchNorm
        layer.feeds_bn = False
        layer.is_output = out is y
    for layer in found.values():
        if not isinstance(layer.module.weight, nn.Parameter):
            raise ValueError(f"REPAIR cannot rescale {layer.name}: its weight is computed (parametrized)")
    return list(found.values())


def _preactivations(pop: Population, xs: list, targets: Moments, kinds: str,
                    keep: Callable[[_Layer], bool] = lambda layer: True) -> list[_Layer]:
    """The layers REPAIR rescales (those of ``keep``): every layer of kind ``kinds`` (``LAYER_SETS``) found on member
    0 except the one producing the model's output. Logits are not pre-activations (A.2); matching their std would
    inflate the averaged classifier's confidence, and the official REPAIR leaves the classifier alone too."""
    _warn_if_few_images(xs)
    _check_choice("layers", kinds, LAYER_SETS)
    layers = [layer for layer in _find_layers(pop.member(0), xs[0][0])
              if not layer.is_output and isinstance(layer.module, LAYER_SETS[kinds]) and keep(layer)]
    if missing := [layer.name for layer in layers if layer.name not in targets]:
        raise ValueError(f"no member moments for layers {missing[:3]}")
    return layers


def _chunk_moments(y: Tensor, dim: int) -> tuple[int, Tensor, Tensor]:
    """(count, mean, sum of squared deviations) per channel ``dim`` of one output, in float64."""
    dims = [d for d in range(y.dim()) if d != dim]
    n = y.numel() // y.shape[dim]
    mean = y.sum(dims, dtype=torch.float64, keepdim=True) / n
    # Centre in y's dtype, so the temporary is no bigger than y, then correct for the rounded centre.
    centre = mean.to(y.dtype)
    m2 = ((y - centre) ** 2).sum(dims, dtype=torch.float64, keepdim=True)
    return n, mean.flatten(), (m2 - n * (mean - centre.double()) ** 2).flatten()


def _welford(chunks: list[tuple[int, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of a layer's ``_chunk_moments``, merged one by one (Chan et al.) in float64;
    elementwise, so the statistics may carry a leading member axis."""
    n, mean, m2 = 0, None, None
    for k, mean_k, m2_k in chunks:
        if n:
            delta = mean_k - mean
            mean_k = mean + delta * (k / (n + k))
            m2_k = m2 + m2_k + delta**2 * (n * k / (n + k))
        n, mean, m2 = n + k, mean_k, m2_k
    return mean, (m2 / n).clamp_min(0).sqrt()


def _batch_average(chunks: list[tuple[int, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, std) as a BatchNorm's running buffers hold them after a reset with momentum None (the
    authors' TrackLayer and ResetLayer, recombine/repair.py:17-43, 86-89): the plain average over firings of each
    batch's mean and of its unbiased variance, whose square root is the std (recombine/repair.py:24)."""
    mean = var = None
    for count, (n, mean_b, m2) in enumerate(chunks, 1):
        var_b = m2 / max(n - 1, 1)
        mean = mean_b if mean is None else mean + (mean_b - mean) / count
        var = var_b if var is None else var + (var_b - var) / count
    return mean, var.clamp_min(0).sqrt()


BN_EPS = 1e-5
"""The eps of the authors' temporary BatchNorms (torch's default): their per-batch normalization and their fusion."""


def _normalize(y: Tensor, dim: int, mean: Tensor, std: Tensor) -> Tensor:
    """What a train-mode BatchNorm with weight ``std`` and bias ``mean`` (eps ``BN_EPS``) makes of ``y``: each
    batch's channels ``dim`` normalized by their own (biased) moments, then given ``mean`` and ``std``."""
    dims = [d for d in range(y.dim()) if d != dim]
    mu = y.mean(dims, keepdim=True)
    var = y.var(dims, correction=0, keepdim=True)
    return (y - mu) / torch.sqrt(var + BN_EPS) * std.to(y.dtype).view_as(mu) + mean.to(y.dtype).view_as(mu)


# passes over every member ----------------------------------------------------------------------
class _Stop(BaseException):
    """Ends a pass once the layer being repaired has fired; a BaseException, which ``except Exception`` lets through."""


def _tracking_bns(module: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def _passes(pop: Population, buffers: dict[str, Tensor], xs: Iterable, stacked: bool, *, train: bool = False,
            layers: Iterable[str] = (), stop: _Layer | None = None, seed: int | None = None,
            goals: Moments | None = None,
            averaged: Callable[[nn.Module], bool] | None = None) -> tuple[int, dict]:
    """Run every member j over slice j of each batch of ``xs`` with ``buffers``, in eval mode or in ``train`` mode,
    where each tracking BatchNorm ``averaged`` accepts (default all) averages its batch statistics. Returns the number
    of batches and each of ``layers``' per-channel output (mean, std), (p, channels) each: by ``_welford`` in eval
    mode, by ``_batch_average`` (the authors' TrackLayer) in train mode. ``stacked``: one vmapped call per batch, else
    member by member, each pass cut short once ``stop`` has fired as often as in a full pass. ``seed``: batch b's
    train-mode randomness comes from its own key. ``goals`` (every member's, stacked): those layers' outputs are
    ``_normalize``d to the goal (the authors' ResetLayer), the moments recorded being those before."""
    template = pop.template
    fired: list[tuple[str, int, Tensor, Tensor]] = []
    goal: dict[str, tuple[Tensor, Tensor]] = {}  # the current member's (stacked: all members', vmapped)

    def hook(name: str, module: nn.Module, _, y: Tensor) -> Tensor | None:
        z = y.unsqueeze(0) if y.dim() == 1 else y  # one sample of a linear layer: a batch of one
        # the channels: a linear layer's last dim, a convolution's dim 1 (0 when unbatched)
        dim = z.dim() - 1 if isinstance(module, nn.Linear) else 1 if z.dim() == len(module.kernel_size) + 2 else 0
        fired.append((name, *_chunk_moments(z, dim)))
        return _normalize(z, dim, *goal[name]).reshape_as(y) if name in goal else None

    calls = 0

    def stopper(*_):
        nonlocal calls
        calls += 1
        if calls == stop.calls:
            raise _Stop

    def member(params, bufs, x, goals_j):
        # under vmap the hooks see one member's output; the statistics leave vmap as the outputs
        fired.clear()
        goal.update(goals_j)  # every key: each call's goals are those of the same layers
        with contextlib.suppress(_Stop):
            functional_call(template, {**params, **bufs}, (x,))
        return [(mean, m2) for _, _, mean, m2 in fired]

    def randomness(b: int):
        return contextlib.nullcontext() if seed is None else seeded(derive_seed("repair-batchnorm", seed, b))

    bns = [m for _, m in _tracking_bns(template) if averaged is None or averaged(m)] if train else []
    momenta = [m.momentum for m in bns]
    handles = [template.get_submodule(name).register_forward_hook(functools.partial(hook, name)) for name in layers]
    if stop is not None and not stacked:
        handles.append(template.get_submodule(stop.name).register_forward_hook(stopper))
    stats: dict[str, list[tuple[int, Tensor, Tensor]]] = {}
    goals = goals or {}
    seen = 0
    try:
        with hooked(handles), eval_mode(template, train=train):
            for b, x in enumerate(xs):
                for m in bns:
                    m.momentum = 1.0 / (b + 1)  # not None, whose num_batches_tracked vmap cannot read
                if stacked:
                    with randomness(b):
                        out = vmap(member, randomness="different")(pop.params, buffers, x, goals)
                    firings = [(name, n, mean, m2) for (name, n, _, _), (mean, m2) in zip(fired, out, strict=True)]
                else:
                    each = []
                    for j in range(pop.size):
                        calls = 0
                        params, bufs = ({n: t[j] for n, t in d.items()} for d in (pop.params, buffers))
                        with randomness(b):
                            member(params, bufs, x[j], {n: (m[j], sd[j]) for n, (m, sd) in goals.items()})
                        each.append(list(fired))
                    firings = [(same[0][0], same[0][1], torch.stack([f[2] for f in same]),
                                torch.stack([f[3] for f in same])) for same in zip(*each, strict=True)]
                for name, n, mean, m2 in firings:
                    stats.setdefault(name, []).append((n, mean, m2))
                seen += 1
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
    return seen, {n: (_batch_average if train else _welford)(s) for n, s in stats.items()}


@torch.no_grad()
def reset_batchnorm_(pop: Population, batches: Iterable, buffers: dict[str, Tensor] | None = None,
                     seed: int | None = None, stacked: bool = False, stop: _Layer | None = None) -> int:
    """Algorithm 5 and SWA's update_bn, for every member: reset each tracking BatchNorm's statistics to the plain
    average of train-mode batch statistics over ``batches`` (slice j of each for member j: (p, B, ...) tensors, or
    sequences of p inputs), written into the stacked ``buffers`` (default: the population's own). Returns the
    number of batches; ``stacked``, ``seed`` and ``stop`` as for ``_passes``."""
    buffers = pop.buffers if buffers is None else buffers
    if not _clear_batchnorm_(pop, buffers):
        return 0
    return _passes(pop, buffers, batches, stacked, train=True, stop=stop, seed=seed)[0]


def _clear_batchnorm_(pop: Population, buffers: dict[str, Tensor],
                      only: Callable[[nn.Module], bool] | None = None) -> bool:
    """Reset the statistics in ``buffers`` of the tracking BatchNorms ``only`` accepts (default all); whether any."""
    names = [n for n, m in _tracking_bns(pop.template) if only is None or only(m)]
    for name in names:
        key = f"{name}." if name else ""
        buffers[f"{key}running_mean"].zero_()
        buffers[f"{key}running_var"].fill_(1.0)
        if f"{key}num_batches_tracked" in buffers:
            buffers[f"{key}num_batches_tracked"].zero_()
    return bool(names)


def reset_batchnorm(module: nn.Module, batches_iter: Iterable, seed: int | None = None) -> nn.Module:
    """``reset_batchnorm_`` for one module, in place (as torch's update_bn)."""
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
"""How REPAIR computes and fuses its correction: ``_repair_``, or ``_repair_authors_`` (recombine/repair.py)."""


def member_moments(pop: Population, batches: Batches, iters: int = 5, seed: int = 666, stacked: bool = False,
                   members: list[int] | None = None, fusion: str = "exact", own_images: bool = False) -> list[Moments]:
    """Each member's per-channel output moments of every convolution and linear layer, in eval mode on its own
    first ``iters`` batches (``batches(members[i], ...)`` for the i-th held member; default: its position), after
    rebuilding its BatchNorm statistics on them (on copies: ``pop`` is unchanged). ``fusion="authors"``: as the
    authors' TrackLayers measured them (recombine/repair.py:17-29, 84-99), in one train-mode pass, per batch.
    ``own_images``: each member's batches drawn with a seed of its own (``_data``), not all with ``seed``."""
    _check_choice("fusion", fusion, FUSIONS)
    members = list(range(pop.size)) if members is None else list(members)
    xs = _data(batches, members, iters, seed, pop.device, stacked, "member" if own_images else None)
    buffers = {n: b.clone() for n, b in pop.buffers.items()}
    layers = [n for n, m in pop.template.named_modules() if isinstance(m, LAYER_SETS["conv+linear"])]
    authors = fusion == "authors"
    if authors:
        _clear_batchnorm_(pop, buffers)
    else:
        reset_batchnorm_(pop, xs, buffers, seed, stacked)
    stats = _passes(pop, buffers, xs, stacked, train=authors, layers=layers, seed=seed if authors else None)[1]
    return [{n: (mean[j], std[j]) for n, (mean, std) in stats.items()} for j in range(pop.size)]


def _targets(moments: list[Moments], rows: Tensor, device: torch.device) -> Moments:
    """The weighted average of the members' means and, separately, of their stds, for each row of weights: (rows,
    channels) each, on ``device``."""
    if len(moments) != rows.shape[1]:
        raise ValueError(f"got moments for {len(moments)} members, expected {rows.shape[1]}")
    names = moments[0].keys()
    if any(m.keys() != names for m in moments):
        raise ValueError("members' moments cover different layers")
    stacked = {name: [torch.stack(t) for t in zip(*(m[name] for m in moments), strict=True)] for name in names}
    return {name: tuple(torch.stack([torch.tensordot(w.to(t.device), t, 1) for w in rows]).to(device) for t in both)
            for name, both in stacked.items()}


def _rescale_(pop: Population, layer: _Layer, scale: Tensor, mean: Tensor, target_mean: Tensor) -> None:
    """Turn every member i's ``layer`` output y into scale[i] (y - mean[i]) + target_mean[i] per output channel, in
    place: its weight's output channels multiplied by the scale, its bias (if it has one) set to match."""
    m, w, bias = layer.module, pop.params[f"{layer.name}.weight"], pop.params.get(f"{layer.name}.bias")
    if isinstance(m, _ConvNd) and m.transposed:  # weight (p, in, out / groups, ...), grouped along dim 1
        g, in_per_group = m.groups, w.shape[1] // m.groups
        factor = scale.view(-1, g, 1, w.shape[2]).expand(-1, g, in_per_group, -1).reshape(w.shape[:3])
    else:  # weight (p, out, ...) for Linear and Conv, whatever the groups, dilation or stride
        factor = scale
    w.mul_(factor.view(*factor.shape, *[1] * (w.dim() - factor.dim())).to(w.dtype))
    if bias is not None:
        bias.copy_(target_mean + scale * (bias.double() - mean))


@torch.no_grad()
def _repair_(pop: Population, xs: list, targets: Moments, seed: int, stacked: bool, add_biases: bool,
             kinds: str) -> None:
    """Repair every member i in place toward its ``targets``: y <- s (y - mean) + target mean, s = target std / std,
    layer by layer in forward order, each measured in eval mode after the layers before it are rescaled and the
    BatchNorm statistics rebuilt, so its moments match the targets exactly (``_repair_authors_`` leaves residual
    error). A bias-free layer feeding a BatchNorm is only rescaled (the rebuilt running mean absorbs its shift); any
    other gets a bias with ``add_biases`` (a soup) and is left alone without (docs/decisions.md)."""
    layers = _preactivations(pop, xs, targets, kinds,
                             lambda layer: add_biases or layer.feeds_bn or f"{layer.name}.bias" in pop.params)
    for layer in layers:
        reset_batchnorm_(pop, xs, seed=seed, stacked=stacked, stop=layer)  # nothing to do without BatchNorms
        mean, std = _passes(pop, pop.buffers, xs, stacked, layers=[layer.name], stop=layer)[1][layer.name]
        weight, bias = pop.params[f"{layer.name}.weight"], pop.params.get(f"{layer.name}.bias")
        if bias is None and add_biases:  # never drop the shift of a bias-free layer: give it a bias, zero until set
            bias = pop.params[f"{layer.name}.bias"] = torch.zeros_like(mean, dtype=weight.dtype)
            pop.template.get_submodule(layer.name).bias = nn.Parameter(bias[0].clone())
        target_mean, target_std = targets[layer.name]
        # A channel with (numerically) no spread is a dead unit: scaling it up would only amplify rounding.
        dead = std <= 1e-6 * torch.sqrt(mean**2 + std**2)
        _rescale_(pop, layer, torch.where(dead, torch.ones_like(std), target_std / std), mean, target_mean)
    reset_batchnorm_(pop, xs, seed=seed, stacked=stacked)


def _reset_by_authors(bn: nn.Module) -> bool:
    """The BatchNorms the authors' reset_bn_stats resets (``type(m) == nn.BatchNorm2d``, recombine/repair.py:86-89):
    not a subclass (timm's BatchNormAct2d, a SyncBatchNorm), which updates its statistics with its own momentum."""
    return type(bn) is nn.BatchNorm2d


@torch.no_grad()
def _repair_authors_(pop: Population, xs: list, targets: Moments, seed: int, stacked: bool, kinds: str) -> None:
    """Repair every member i in place toward its ``targets`` as the authors' correct_neuron_stats_multiple fuses it
    (recombine/repair.py:151-236 at 47ad83a), generalized from Conv2d to the layers of ``kinds``. One train-mode pass
    replaces every layer's output by its per-batch normalization to the target (a ResetLayer, l.31-43) while taking
    its running moments and every nn.BatchNorm2d's statistics afresh (l.86-99); then each layer is fused
    (fuse_conv_bn, l.216-236): weight times g = target std / sqrt(running variance + ``BN_EPS``), a bias (only if
    there is one) target mean + g (bias - running mean). No BatchNorm is rebuilt after; each layer keeps its groups,
    dilation and padding (which the authors' rebuilt nn.Conv2d loses)."""
    layers = _preactivations(pop, xs, targets, kinds)
    goals = {layer.name: targets[layer.name] for layer in layers}
    _clear_batchnorm_(pop, pop.buffers, only=_reset_by_authors)
    stats = _passes(pop, pop.buffers, xs, stacked, train=True, layers=[layer.name for layer in layers], seed=seed,
                    goals=goals, averaged=_reset_by_authors)[1]
    for layer in layers:
        (running_mean, running_std), (target_mean, target_std) = stats[layer.name], targets[layer.name]
        _rescale_(pop, layer, target_std / torch.sqrt(running_std**2 + BN_EPS), running_mean, target_mean)


def _repair_any_(pop: Population, xs: list, targets: Moments, seed: int, stacked: bool, add_biases: bool,
                 kinds: str, fusion: str) -> None:
    if fusion == "authors":
        _repair_authors_(pop, xs, targets, seed, stacked, kinds)
    else:
        _repair_(pop, xs, targets, seed, stacked, add_biases, kinds)


def repair(model: nn.Module, pop: Population, batches: Batches, iters: int = 5, seed: int = 666, weights=None,
           target: int | None = None, moments: list[Moments] | None = None, stacked: bool = False,
           layers: str = "conv+linear", fusion: str = "exact", own_images: bool = False) -> nn.Module:
    """A repaired copy of ``model`` (usually a soup of ``pop``): every convolution and linear layer gets the
    ``weights``-weighted average (default uniform) of the members' per-channel output mean and std, measured in
    eval mode on the first ``iters`` batches (``batches(target, ...)`` when callable). A bias-free layer gets a bias,
    the only state added. ``moments``: precomputed ``member_moments(pop, ..., fusion=fusion)`` (else measured here,
    vmapped with ``stacked``). ``layers``: ``LAYER_SETS``; ``fusion``: ``FUSIONS``. ``own_images``: the members and
    the model each measured on a draw of its own (``_data``), as the scripts' same_repair=False."""
    _check_choice("fusion", fusion, FUSIONS)
    w = _check_weights(weights, pop.size)
    batches = _freeze(batches, iters)
    if moments is None:
        moments = member_moments(pop, batches, iters, seed, stacked=stacked, fusion=fusion, own_images=own_images)
    one = Population.from_modules([model])
    xs = _data(batches, [target], iters, seed, one.device, False, "repaired" if own_images else None)
    targets = _targets(moments, w[None], one.device)
    _repair_any_(one, xs, targets, seed, stacked=False, add_biases=True, kinds=layers, fusion=fusion)
    return one.member(0)


def repair_population_(pop: Population, matrix, batches: Batches, moments: list[Moments], iters: int = 5,
                       seed: int = 666, members: list[int] | None = None, stacked: bool = False,
                       layers: str = "conv+linear", fusion: str = "exact", own_images: bool = False) -> Population:
    """Repair, in place, a population just mixed by theta_i <- sum_j matrix[i, j] theta_j: member i gets the
    moments of the pre-mix members (``moments``, from ``member_moments(..., fusion=fusion)``) weighted by row i,
    measured on ``batches(i, ...)``. ``members``: each held member's index in the whole population when ``pop`` is
    one rank's share (``matrix`` then has a row per held member over all ``len(moments)``). No bias is added.
    ``own_images``: each member measured on a draw of its own (``_data``)."""
    _check_choice("fusion", fusion, FUSIONS)
    p, total = pop.size, len(moments)
    members = list(range(p)) if members is None else list(members)
    m = torch.as_tensor(matrix, dtype=torch.float64).cpu()
    if len(members) != p:
        raise ValueError(f"got {len(members)} member indices for a population of {p}")
    if m.shape != (p, total):
        raise ValueError(f"mixing matrix must be {p}x{total} (held members x all members), got {tuple(m.shape)}")
    targets = _targets(moments, torch.stack([_check_weights(m[i], total) for i in range(p)]), pop.device)
    xs = _data(batches, members, iters, seed, pop.device, stacked, "repaired" if own_images else None)
    _repair_any_(pop, xs, targets, seed, stacked, add_biases=False, kinds=layers, fusion=fusion)
    return pop
