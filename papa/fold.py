"""REPAIR's biases folded into the BatchNorms they feed: a repaired soup in its architecture's own tensors.

REPAIR gives every bias-free layer it rescales a bias b (a ResNet soup gets ``conv.bias`` tensors its architecture
lacks). Where the layer's output y goes into a BatchNorm with running mean mu and nowhere else, BN(y + b; mu) =
BN(y; mu - b) exactly in eval mode, and in train mode too (the batch mean absorbs b, and the folded running mean
stays exactly b below, at any momentum); the folded network loads into the stock architecture with ``strict=True``."""

import contextlib
import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from papa.forward import eval_mode, hooked

TOLERANCE = 1e-4
"""The largest logit difference (relative to the largest logit, at least 1) the folded network may show."""


@dataclass
class Fold:
    """What ``fold_biases`` did: ``folded`` maps each layer whose bias went into BatchNorm running means to those
    BatchNorms; ``kept`` lists the layers whose bias stays (in forward order, then by name)."""

    folded: dict[str, list[str]] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    note: str = ""  # why every bias was kept, when folding had to be undone


def _tensors(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _tensors(o)] if isinstance(out, list | tuple) else []


def _readers(roots: list[Tensor]) -> Counter:
    """For every autograd node reachable from ``roots``: how many edges of the graph read its output (the roots
    count as read once each, by whoever called the network)."""
    readers: Counter = Counter(t.grad_fn for t in roots if t.grad_fn is not None)
    stack, seen = list(readers), set()
    while stack:
        if (node := stack.pop()) not in seen:
            seen.add(node)
            children = [child for child, _ in node.next_functions if child is not None]
            readers.update(children)
            stack += children
    return readers


def _channels_first(layer: nn.Module, y: Tensor) -> bool:
    """Whether ``layer``'s output channels are dim 1 of ``y``, the dim a BatchNorm normalizes."""
    return y.dim() == (2 if isinstance(layer, nn.Linear) else len(layer.kernel_size) + 2)


def batchnorm_feeds(model: nn.Module, x: Tensor) -> dict[str, list[str] | None]:
    """For every convolution and linear layer that fires when ``model`` (eval mode) runs on ``x``: the
    BatchNorms that its output goes into, each time it fires, when nothing else reads that output (by the autograd
    graph of the pass) and those BatchNorms take no other input; None where that is not so."""
    model = copy.deepcopy(model)  # hooks, and gradients on every parameter so every operation is recorded
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point())
    outputs: dict[str, list[Tensor]] = {}
    inputs: dict[str, list[Tensor]] = {}
    handles = [m.register_forward_hook(lambda _, __, y, n=n: outputs.setdefault(n, []).append(y))
               for n, m in model.named_modules() if isinstance(m, nn.Linear | _ConvNd)]
    handles += [m.register_forward_pre_hook(lambda _, a, n=n: inputs.setdefault(n, []).append(a[0] if a else None))
                for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    with hooked(handles), torch.enable_grad(), eval_mode(model):
        readers = _readers(_tensors(model(x)))
    # BatchNorm -> the layers whose outputs it took (None: anything else)
    fed_by = {bn: {next((n for n, ys in outputs.items() if any(t is y for y in ys)), None) for t in xs}
              for bn, xs in inputs.items()}
    found: dict[str, list[str] | None] = {}
    for name, ys in outputs.items():
        bns = sorted(bn for bn, sources in fed_by.items() if name in sources)
        alone = all(fed_by[bn] == {name} for bn in bns)
        each = all(y.grad_fn is not None and readers[y.grad_fn] == 1 and _channels_first(model.get_submodule(name), y)
                   and any(any(t is y for t in inputs[bn]) for bn in bns) for y in ys)
        found[name] = bns if bns and alone and each else None
    return found


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad(), eval_mode(model):
        return torch.cat([t.flatten().float() for t in _tensors(model(x))])


def agrees(model: nn.Module, reference: nn.Module, x: Tensor, tol: float = TOLERANCE) -> tuple[bool, float]:
    """Whether two networks' eval-mode outputs on ``x`` agree up to ``tol`` (relative to the largest, at least 1),
    and the largest difference."""
    a, b = _logits(model, x), _logits(reference, x)
    if a.shape != b.shape:
        return False, float("inf")
    diff = float((a - b).abs().max())
    return diff <= tol * max(1.0, float(b.abs().max())), diff


@torch.no_grad()
def fold_biases(module: nn.Module, layers: list[str], x: Tensor) -> tuple[nn.Module, Fold]:
    """A copy of ``module`` without the biases of ``layers`` (REPAIR's), each folded into the running mean of the
    BatchNorms its output alone feeds (``batchnorm_feeds``); a bias that cannot be folded is kept. Should the copy's
    outputs on ``x`` differ from ``module``'s (``agrees``, in float64 too where float32 rounding alone could explain
    it), every bias is kept, ``Fold.note`` saying why."""
    feeds = batchnorm_feeds(module, x) if layers else {}
    order = {name: k for k, name in enumerate(feeds)}
    layers = sorted(layers, key=lambda n: (order.get(n, len(order)), n))
    out, fold = copy.deepcopy(module), Fold()
    for name in layers:
        bns = feeds.get(name)
        layer = out.get_submodule(name)
        if bns is None or layer.bias is None:
            fold.kept.append(name)
            continue
        bias = layer.bias.detach().double()
        for mean in (out.get_submodule(bn).running_mean for bn in bns):
            if mean is not None:  # without running statistics a BatchNorm ignores any shift
                mean.copy_((mean.double() - bias.to(mean.device)).to(mean))
        layer.bias = None
        fold.folded[name] = bns
    if fold.folded:
        same, diff = agrees(out, module, x)
        if not same and x.dtype != torch.float64:  # float64 copies (the folded running means stay rounded)
            with contextlib.suppress(RuntimeError, TypeError):  # a model that cannot run in float64 keeps the answer
                same, diff = agrees(copy.deepcopy(out).double(), copy.deepcopy(module).double(), x.double())
        if not same:
            return copy.deepcopy(module), Fold(kept=layers, note=f"folding changed the outputs (by up to {diff:.3g} "
                                                "on a probe input); every bias kept")
    return out, fold
