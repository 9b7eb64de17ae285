"""REPAIR for p networks (Appendix A.3, Algorithms 4 and 5): give an averaged network the feature moments
of the networks it averages.

Averaging collapses the variance of features. REPAIR measures, for every convolution and linear layer, the
per-channel mean and std of its output (the pre-activation) in each member, and rescales the averaged
network's layer so that E[X] = sum_i w_i E[X_i] and std(X) = sum_i w_i std(X_i). Channels are dim 1 of a
convolution's output and the last dim of a linear layer's. Every network sees the same batches (one seed),
up to its own augmentation.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from papa.population import Population
from papa.rng import derive_seed, seeded

Batches = Iterable[Tensor] | Callable[[int | None, torch.Generator], Iterable[Tensor]]
"""Repair data: the same input tensors for every network, or ``batches(member, generator)`` yielding
member ``member``'s augmented inputs (None: the repaired network, no member-specific augmentation). The
callable gets a fresh CPU generator seeded with the repair seed on every call; a batch may also be a tuple
whose first element is the input."""

Moments = dict[str, tuple[Tensor, Tensor]]
"""Layer name -> (mean, std) per output channel, float64."""


# data ---------------------------------------------------------------------------------------------
def _device(module: nn.Module) -> torch.device:
    t = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if t is None else t.device


def _input(batch, device: torch.device) -> Tensor:
    if isinstance(batch, tuple | list):
        batch = batch[0]
    return batch.to(device)


def _freeze(batches: Batches, iters: int) -> Batches:
    """Keep the first ``iters`` fixed batches, so a one-shot iterator or a shuffling loader gives every
    network the same data."""
    return batches if callable(batches) else list(itertools.islice(batches, iters))


def _data(batches: Batches, member: int | None, iters: int, seed: int, device: torch.device) -> list[Tensor]:
    if iters < 1:
        raise ValueError(f"REPAIR needs at least one batch, got iters={iters}")
    source = batches(member, torch.Generator().manual_seed(seed)) if callable(batches) else batches
    xs = [_input(b, device) for b in itertools.islice(source, iters)]
    if not xs:
        raise ValueError("REPAIR got no batches")
    return xs


def _check_weights(weights, p: int) -> Tensor:
    w = torch.full((p,), 1.0 / p, dtype=torch.float64) if weights is None else weights
    w = torch.as_tensor(w, dtype=torch.float64).flatten().cpu()
    if w.numel() != p:
        raise ValueError(f"expected {p} REPAIR weights, got {w.numel()}")
    if (w < 0).any() or abs(float(w.sum()) - 1.0) > 1e-6:
        raise ValueError(f"REPAIR weights must be non-negative and sum to 1, got {w.tolist()}")
    return w


# layers and passes --------------------------------------------------------------------------------
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


class _Stop(BaseException):
    """Ends a forward pass early: nothing after the layer being repaired can change its output.
    A BaseException, so that a model's own ``except Exception`` does not swallow it."""


def _forward(model: nn.Module, x: Tensor, stop: _Layer | None = None) -> None:
    """model(x), cut short once ``stop`` has fired as often as in a full pass."""
    if stop is None:
        model(x)
        return
    count = 0

    def hook(*_):
        nonlocal count
        count += 1
        if count == stop.calls:
            raise _Stop

    handle = stop.module.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()


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
    was_training = model.training
    model.eval()
    try:
        y = model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for layer, out in pending:  # the last layer's output went nowhere near a BatchNorm
        layer.feeds_bn = False
        layer.is_output = out is y
    for layer in found.values():
        if not isinstance(layer.module.weight, nn.Parameter):
            raise ValueError(f"REPAIR cannot rescale {layer.name}: its weight is computed (parametrized)")
    return list(found.values())


def _preactivations(model: nn.Module, x: Tensor) -> list[_Layer]:
    """The layers REPAIR rescales: every conv/linear except the one producing the model's output. Logits
    are not pre-activations (A.2), and matching their std to the members' would inflate the averaged
    classifier's confidence; the official REPAIR leaves the classifier alone too."""
    return [layer for layer in _find_layers(model, x) if not layer.is_output]


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


@torch.no_grad()
def _measure(model: nn.Module, xs: list[Tensor], names=None, stop: _Layer | None = None) -> Moments:
    """Eval-mode output moments of the layers ``names`` (default: all that fire), pooled over ``xs``."""
    stats: dict[str, _Welford] = {}

    def hook_for(name: str):
        def hook(module, _, output):
            stats.setdefault(name, _Welford()).add(output, _channel_dim(module, output))

        return hook

    handles = [
        m.register_forward_hook(hook_for(n))
        for n, m in model.named_modules()
        if _is_layer(m) and (names is None or n in names)
    ]
    was_training = model.training
    model.eval()
    try:
        for x in xs:
            _forward(model, x, stop)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: s.result() for n, s in stats.items()}


# BatchNorm reset (Algorithm 5) ---------------------------------------------------------------------
def _tracking_bns(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def _reset_bn(module: nn.Module, xs: Iterable[Tensor], seed: int | None, stop: _Layer | None = None) -> int:
    bns = _tracking_bns(module)
    if not bns:
        return 0
    momenta = [bn.momentum for bn in bns]
    was_training = module.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches
    module.train()
    seen = 0
    try:
        for b, x in enumerate(xs):
            if seed is None:
                _forward(module, x, stop)
            else:
                # Train-mode randomness (dropout) seeded per batch: a pass cut short at one layer then
                # sees the same masks as a full pass, and the statistics before that layer agree.
                with seeded(derive_seed("repair-batchnorm", seed, b)):
                    _forward(module, x, stop)
            seen += 1
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        module.train(was_training)
    return seen


def reset_batchnorm(module: nn.Module, batches_iter: Iterable, seed: int | None = None) -> nn.Module:
    """Algorithm 5: recompute every BatchNorm's running statistics from scratch, as the plain average over
    ``batches_iter`` of train-mode batch statistics (no grad). Momenta and the training flag are restored.

    With ``seed``, each batch's train-mode randomness (dropout) is drawn from its own seed, the global RNG
    state being restored afterwards."""
    it = iter(batches_iter)
    first = next(it, None)
    if first is None:  # checked before the reset, which would otherwise leave mean 0 and variance 1
        raise ValueError("reset_batchnorm got no batches")
    device = _device(module)
    _reset_bn(module, (_input(b, device) for b in itertools.chain([first], it)), seed)
    return module


# stacked passes: every member in one vmapped forward -------------------------------------------------
def _stacked_data(batches: Batches, members: list[int], iters: int, seed: int, device) -> list[Tensor]:
    """Each member's repair batches stacked along a leading member axis, one (p, B, ...) tensor per batch."""
    per_member = [_data(batches, j, iters, seed, device) for j in members]
    if len({len(xs) for xs in per_member}) > 1 or any(
        len({x.shape for x in same}) > 1 for same in zip(*per_member, strict=False)
    ):
        raise ValueError("stacked REPAIR needs every member's batches to have the same count and shapes")
    return [torch.stack(same) for same in zip(*per_member, strict=True)]


def _stacked_forward(pop: Population):
    """``forward(params, buffers, x)`` of every member at once (vmap), randomness per member."""
    template = pop.template
    return vmap(lambda p, b, x: functional_call(template, {**p, **b}, (x,)), randomness="different")


@torch.no_grad()
def reset_population_batchnorm_(pop: Population, batches: Iterable[Tensor], buffers: dict[str, Tensor] | None = None,
                                seed: int | None = None, stacked: bool = True) -> int:
    """Algorithm 5 (and SWA's update_bn) for every member: reset each tracking BatchNorm's statistics and set
    them to the plain average of train-mode batch statistics over ``batches`` (each (p, B, ...), slice j for
    member j), written into the stacked ``buffers`` (default: the population's own). All members in one
    vmapped pass per batch, or member by member without ``stacked``. With ``seed``, each batch's train-mode
    randomness (dropout) comes from its own seed, as in ``_reset_bn``. Returns the number of batches; the
    momenta and the training flag are restored.

    The cumulative average is BatchNorm's momentum 1/(b+1) at batch b, not ``momentum=None``: the latter
    reads ``num_batches_tracked`` as a Python number, which the vmapped forward cannot do."""
    buffers = pop.buffers if buffers is None else buffers
    bns = [(n, m) for n, m in pop.template.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    for name, _ in bns:
        key = f"{name}." if name else ""
        buffers[f"{key}running_mean"].zero_()
        buffers[f"{key}running_var"].fill_(1.0)
        if f"{key}num_batches_tracked" in buffers:
            buffers[f"{key}num_batches_tracked"].zero_()
    momenta, was_training = [m.momentum for _, m in bns], pop.template.training
    forward = _stacked_forward(pop)
    pop.template.train()
    seen = 0
    try:
        for b, x in enumerate(batches):
            for _, m in bns:
                m.momentum = 1.0 / (b + 1)
            with contextlib.nullcontext() if seed is None else seeded(derive_seed("repair-batchnorm", seed, b)):
                if stacked:
                    forward(pop.params, buffers, x)
                else:
                    for j in range(pop.size):
                        member = {n: t[j] for n, t in itertools.chain(pop.params.items(), buffers.items())}
                        functional_call(pop.template, member, (x[j],))
            seen += 1
    finally:
        for (_, m), momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        pop.template.train(was_training)
    return seen


@torch.no_grad()
def _stacked_measure(pop: Population, buffers: dict[str, Tensor], xs: list[Tensor], names=None):
    """``_measure`` for every member at once: layer name -> (mean, std), each (p, channels)."""
    template = pop.template
    layers = [(n, m) for n, m in template.named_modules() if _is_layer(m) and (names is None or n in names)]
    fired: list[tuple[str, int]] = []

    def moments(params, bufs, x):
        # the hooks see one member's output (vmap); their statistics leave vmap as the function's outputs
        fired.clear()
        out = []

        def hook_for(name: str):
            def hook(module, _, y):
                n, mean, m2 = _chunk_moments(y, _channel_dim(module, y))
                fired.append((name, n))
                out.append((mean, m2))

            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in layers]
        try:
            functional_call(template, {**params, **bufs}, (x,))
        finally:
            for h in handles:
                h.remove()
        return out

    stats: dict[str, _Welford] = {}
    was_training = template.training
    template.eval()
    try:
        for x in xs:
            out = vmap(moments)(pop.params, buffers, x)
            for (name, n), (mean, m2) in zip(fired, out, strict=True):
                stats.setdefault(name, _Welford()).merge(n, mean, m2)
    finally:
        template.train(was_training)
    return {n: s.result() for n, s in stats.items()}


# REPAIR (Algorithm 4) ------------------------------------------------------------------------------
def member_moments(pop: Population, batches: Batches, iters: int = 5, seed: int = 666,
                   stacked: bool = False) -> list[Moments]:
    """Each member's per-channel output moments of every convolution and linear layer, in eval mode on
    its own first ``iters`` batches, after rebuilding a copy's BatchNorm statistics on those batches.

    ``stacked``: all members in one vmapped pass per batch (the stacked engine's forward) instead of one
    member copy at a time; the same statistics up to float rounding (dropout masks differ)."""
    batches = _freeze(batches, iters)
    if stacked:
        xs = _stacked_data(batches, list(range(pop.size)), iters, seed, pop.device)
        buffers = {n: b.clone() for n, b in pop.buffers.items()}
        reset_population_batchnorm_(pop, xs, buffers, seed)
        stats = _stacked_measure(pop, buffers, xs)
        return [{n: (mean[j], std[j]) for n, (mean, std) in stats.items()} for j in range(pop.size)]
    out = []
    for j in range(pop.size):
        member = pop.member(j)
        xs = _data(batches, j, iters, seed, _device(member))
        _reset_bn(member, xs, seed)
        out.append(_measure(member, xs))
    return out


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
    if isinstance(m, _ConvNd) and m.transposed:  # weight (in, out / groups, ...), grouped along dim 0
        g, in_per_group = m.groups, w.shape[0] // m.groups
        factor = scale.view(g, 1, -1).expand(g, in_per_group, -1).reshape(w.shape[0], w.shape[1])
    else:  # weight (out, ...) for Linear and Conv, whatever the groups, dilation or stride
        factor = scale
    w.mul_(factor.view(*factor.shape, *[1] * (w.dim() - factor.dim())).to(w.dtype))
    if not shift:
        return None
    old = torch.zeros_like(mean) if bias is None else bias.double()
    return scale * (old - mean) + target_mean


@torch.no_grad()
def _fuse(layer: _Layer, mean: Tensor, std: Tensor, target: tuple[Tensor, Tensor], shift: bool) -> None:
    """_rescale a module's layer; a bias-free layer that needs a shift gets a bias."""
    m = layer.module
    new_bias = _rescale(m, m.weight, m.bias, mean, std, target, shift)
    if new_bias is None:
        return
    if m.bias is None:  # never drop the shift of a bias-free layer: give it a bias
        m.bias = nn.Parameter(new_bias.to(m.weight.dtype), requires_grad=m.weight.requires_grad)
    else:
        m.bias.copy_(new_bias)


def _repair_(model: nn.Module, xs: list[Tensor], targets: Moments, seed: int, layers: list[_Layer],
             create_bias: bool) -> None:
    """Repair ``model`` in place, layer by layer in forward order.

    Each layer is measured after the layers before it are fused (and the BatchNorm statistics rebuilt on
    them), so the eval-mode moments match the targets exactly. Algorithm 4's single pass through temporary
    BatchNorms instead takes statistics in train mode from a network whose earlier layers are not yet
    repaired, which leaves residual error. Passes stop once the layer has fired, so the cost is about half
    of (layers x iters) forward passes, twice that when the model has BatchNorms."""
    missing = [layer.name for layer in layers if layer.name not in targets]
    if missing:
        raise ValueError(f"no member moments for layers {missing[:3]}")
    has_bn = bool(_tracking_bns(model))
    for layer in layers:
        if has_bn:
            _reset_bn(model, xs, seed, stop=layer)
        mean, std = _measure(model, xs, {layer.name}, stop=layer)[layer.name]
        shift = create_bias or layer.module.bias is not None
        _fuse(layer, mean, std, targets[layer.name], shift)
    if has_bn:
        _reset_bn(model, xs, seed)


def repair(
    model: nn.Module,
    pop: Population,
    batches: Batches,
    iters: int = 5,
    seed: int = 666,
    weights=None,
    target: int | None = None,
    moments: list[Moments] | None = None,
) -> nn.Module:
    """A repaired copy of ``model`` (usually a soup of ``pop``): every convolution and linear layer gets
    the ``weights``-weighted average (default uniform) of the members' per-channel output mean and std.

    Measured in eval mode on the first ``iters`` batches (``batches(target, ...)`` when callable). A
    bias-free layer gets a bias, the only state added. ``moments``: precomputed ``member_moments(pop, ...)``.
    """
    w = _check_weights(weights, pop.size)
    batches = _freeze(batches, iters)
    if moments is None:
        moments = member_moments(pop, batches, iters, seed)
    targets = _targets(moments, w)
    out = copy.deepcopy(model)
    xs = _data(batches, target, iters, seed, _device(out))
    _repair_(out, xs, targets, seed, _preactivations(out, xs[0]), create_bias=True)
    return out


def in_place_layers(layers: list[_Layer]) -> list[_Layer]:
    """The layers in-place REPAIR changes: those with a bias (rescaled and shifted) and the bias-free ones
    feeding a BatchNorm (rescaled; the BatchNorm absorbs the shift). A bias-free layer feeding no BatchNorm
    could only be shifted by adding a bias, which would change the members' architecture: it is left alone."""
    return [layer for layer in layers if layer.module.bias is not None or layer.feeds_bn]


def repair_population_(
    pop: Population, matrix, batches: Batches, moments: list[Moments], iters: int = 5, seed: int = 666,
    members: list[int] | None = None, stacked: bool = False,
) -> Population:
    """Repair, in place, a population just mixed by theta_i <- sum_j matrix[i, j] theta_j: member i gets
    the moments of the pre-mix members (``moments``, from ``member_moments`` before mixing) weighted by
    row i, measured on ``batches(i, ...)``.

    When ``pop`` holds only some members of a larger population (one rank's share), ``matrix`` has one
    row per held member over all ``len(moments)`` members and ``members`` gives each held member's index
    in the whole population (what ``batches`` is called with).

    Members keep their architecture, so no bias can be added. A bias-free layer whose output goes straight
    into a BatchNorm is only rescaled: that BatchNorm's rebuilt running mean absorbs any per-channel shift
    exactly, so everything from the BatchNorm on matches ``repair``. Any other bias-free layer (a
    transformer's bias-free attention projections, e.g. timm ConViT's ``qk``/``v``) cannot have its mean
    shifted in place, so it is left alone, neither shifted nor rescaled, as the authors' REPAIR leaves
    every non-convolution layer alone (``in_place_layers``).

    ``stacked``: every member at once through vmapped full forward passes, instead of one member copy at
    a time with passes cut short at the layer being repaired; the same result up to float rounding.
    """
    p, total = pop.size, len(moments)
    members = list(range(p)) if members is None else list(members)
    m = torch.as_tensor(matrix, dtype=torch.float64).cpu()
    if m.shape != (p, total) or len(members) != p:
        raise ValueError(f"mixing matrix must be {p}x{total} (held members x all members), got {tuple(m.shape)}")
    rows = [_check_weights(m[i], total) for i in range(p)]
    batches = _freeze(batches, iters)
    stacked_xs = _stacked_data(batches, members, iters, seed, pop.device) if stacked else None

    def data(i: int) -> list[Tensor]:
        return [x[i] for x in stacked_xs] if stacked else _data(batches, members[i], iters, seed, pop.device)

    # Same architecture for every member: found on member 0.
    layers = in_place_layers(_preactivations(pop.member(0), data(0)[0]))
    if stacked:
        _stacked_repair_(pop, stacked_xs, [_targets(moments, r) for r in rows], seed, layers)
        return pop
    for i in range(p):
        member, xs = pop.member(i), data(i)
        _repair_(member, xs, _targets(moments, rows[i]), seed, in_place_layers(_preactivations(member, xs[0])),
                 create_bias=False)
        # copied back: what REPAIR writes, the parameters and BatchNorm statistics (another buffer may be a
        # cache the forward pass rebuilt in another shape, e.g. timm ConViT's rel_indices)
        state = dict(member.named_parameters()) | {
            f"{n}.{b}" if n else b: t for n, m in member.named_modules() if isinstance(m, _BatchNorm)
            for b, t in m.named_buffers(recurse=False)}
        with torch.no_grad():
            for name, t in pop.tensors():
                if name in state:
                    t[i].copy_(state[name])
    return pop


@torch.no_grad()
def _stacked_repair_(pop: Population, xs: list[Tensor], targets: list[Moments], seed: int,
                     layers: list[_Layer]) -> None:
    """``_repair_`` of every member at once, on the stacked tensors, layer by layer in forward order."""
    has_bn = bool(_tracking_bns(pop.template))
    for layer in layers:
        if has_bn:
            reset_population_batchnorm_(pop, xs, seed=seed)
        mean, std = _stacked_measure(pop, pop.buffers, xs, {layer.name})[layer.name]
        weight, bias = pop.params[f"{layer.name}.weight"], pop.params.get(f"{layer.name}.bias")
        for i, target in enumerate(targets):
            new_bias = _rescale(layer.module, weight[i], None if bias is None else bias[i], mean[i], std[i],
                                target[layer.name], shift=bias is not None)
            if new_bias is not None:
                bias[i].copy_(new_bias)
    if has_bn:
        reset_population_batchnorm_(pop, xs, seed=seed)
