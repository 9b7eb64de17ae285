"""Training engines: how one optimizer step's forward and backward passes run over the members.

Both overwrite the stacked ``.grad`` of every trainable population parameter and return the per-member
losses, shape (p,):
- ``loop``: one member at a time through ``functional_call`` (the reference, and what the official code
  does); launch-bound for small batches on a GPU.
- ``stacked``: all members in one ``torch.func.vmap`` call, which turns each layer into one batched
  (grouped) kernel. BatchNorm updates each member's stacked running statistics; dropout draws
  different masks per member (``randomness="different"``).
- ``analytic``: logistic regression only (the ``logreg`` model in fp32), its softmax cross-entropy gradient
  written out in closed form over the stacked members, without autograd. The same kernels as the stacked
  engine's autograd in the same order, so the same bits; a batch-1 step costs a third of the stacked one
  (docs/performance.md), where vmap's and autograd's per-call bookkeeping is the whole step.

``PopulationScaler`` is fp16 loss scaling over a population (``fidelity.mixed_precision: authors`` on CUDA):
one torch.amp.GradScaler shared by the members, stepped member by member as the authors' scripts did.

``Engine`` adds the opt-in speed-ups: ``torch.compile`` of the step (compiled on the first call,
then reused for every member, step and epoch) and channels-last inputs and conv weights for
convolutional models. ``choose_engine`` resolves ``engine: auto``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap

from papa.errors import PapaError
from papa.models.linear import LogisticRegression
from papa.population import Population

LossFn = Callable[[dict, dict, Tensor, Tensor], Tensor]


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against soft targets (mixup, CutMix and label smoothing all produce them): classes on
    dim 1, so (B, K) logits, or (B, K, H, W) per-pixel logits averaged over pixels too."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def has_tied_tensors(module: torch.nn.Module) -> bool:
    """Whether a parameter or buffer of ``module`` is registered under two names (e.g. an embedding shared
    with the output layer)."""
    return any(len(dict(named(remove_duplicate=False))) != len(dict(named()))
               for named in (module.named_parameters, module.named_buffers))


def member_loss_fn(template: torch.nn.Module) -> LossFn:
    """``loss(params, buffers, x, targets)`` of one member, run through ``template``'s structure.

    ``functional_call`` re-ties tied tensors on every call, a search through the module that costs about as
    much as a small model's forward pass; it is asked to only when the template has tied tensors."""
    tied = has_tied_tensors(template)

    def member_loss(params: dict, buffers: dict, x: Tensor, targets: Tensor) -> Tensor:
        return soft_cross_entropy(functional_call(template, {**params, **buffers}, (x,), tie_weights=tied), targets)

    return member_loss


def stacked_channels_last(x: Tensor) -> Tensor:
    """A (p, B, C, H, W) batch laid out in memory as (B, H, W, p, C).

    vmap runs a convolution over stacked members as one grouped convolution on the (B, p*C, H, W) view
    of its input; with this layout that view is already channels-last, so no copy is made."""
    return x.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)


def stacked_weight_channels_last(w: Tensor) -> Tensor:
    """A (p, O, C, kh, kw) conv weight laid out as (p, O, kh, kw, C): its grouped (p*O, C, kh, kw) view
    is channels-last. A convolution only stays channels-last when its weight is too, and then BatchNorm
    and max-pooling after it also take their channels-last kernels (several times faster on CPU)."""
    return w.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def _conv_weights_channels_last(params: dict[str, Tensor], dim: int) -> dict[str, Tensor]:
    """Copies of the ``dim``-dimensional (conv) weights in channels-last layout; gradients flow through."""
    if dim == 4:
        return {n: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
                for n, t in params.items()}
    return {n: stacked_weight_channels_last(t) if t.dim() == 5 else t for n, t in params.items()}


def loop_step(pop: Population, x: Tensor, targets: Tensor, autocast, *, loss_fn: LossFn | None = None,
              channels_last: bool = False, scale: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """One member at a time. Gradients are taken w.r.t. a detached view of each member's slice and
    copied into the stacked .grad, so a member's backward never touches the other members' tensors.
    A parameter no member's loss uses gets ``.grad = None`` (the optimizer skips it), as in ``stacked``.
    ``scale`` (a GradScaler's ``scale``) multiplies each loss before its backward; the losses returned are
    unscaled."""
    loss_fn = loss_fn or member_loss_fn(pop.template)
    trainable = [n for n, t in pop.params.items() if t.requires_grad]
    used = dict.fromkeys(trainable, False)
    for n in trainable:
        t = pop.params[n]
        if t.grad is None:
            t.grad = torch.empty_like(t)  # every member's slice is written below
    losses = []
    for j in range(pop.size):
        params = {n: t[j].detach().requires_grad_(t.requires_grad) for n, t in pop.params.items()}
        buffers = {n: b[j] for n, b in pop.buffers.items()}
        xj, used_params = x[j], params
        if channels_last and x.dim() == 5:
            xj = xj.contiguous(memory_format=torch.channels_last)
            used_params = _conv_weights_channels_last(params, 4)
        with autocast():
            loss = loss_fn(used_params, buffers, xj, targets[j])
        grads = torch.autograd.grad(loss if scale is None else scale(loss), [params[n] for n in trainable],
                                    allow_unused=True)
        for n, g in zip(trainable, grads, strict=True):
            if g is None:
                pop.params[n].grad[j].zero_()
            else:
                pop.params[n].grad[j].copy_(g)
                used[n] = True
        losses.append(loss.detach())
    for n, u in used.items():
        if not u:
            pop.params[n].grad = None
    return torch.stack(losses)


def stacked_step(pop: Population, x: Tensor, targets: Tensor, autocast, *, loss_fn: LossFn | None = None,
                 channels_last: bool = False, scale: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """All members at once: vmap over the member axis of parameters, buffers and data. ``scale`` as in
    ``loop_step`` (applied to the sum of the members' losses, as the scripts scaled theirs)."""
    loss_fn = loss_fn or vmap(member_loss_fn(pop.template), randomness="different")
    params = pop.params
    if channels_last and x.dim() == 5:
        x, params = stacked_channels_last(x), _conv_weights_channels_last(params, 5)
    with autocast():
        losses = loss_fn(params, pop.buffers, x, targets)
    # dropping the old gradients lets backward hand over its fresh ones instead of adding into zeros
    for t in pop.params.values():
        t.grad = None
    total = losses.sum()
    (total if scale is None else scale(total)).backward()
    return losses.detach()


def analytic_supported(template: torch.nn.Module) -> bool:
    """Whether the ``analytic`` engine can train ``template``: logistic regression (one linear layer on the
    flattened input, softmax cross-entropy in the loss)."""
    return isinstance(template, LogisticRegression)


def analytic_allowed(engine: str, template: torch.nn.Module, fp32: bool, compiled: bool) -> bool:
    """Whether the analytic engine can train ``template`` as asked (logistic regression, in fp32, not compiled:
    compilation is of the autograd engines' step); a PapaError when ``engine`` names it and it cannot."""
    allowed = analytic_supported(template) and fp32 and not compiled
    if engine == "analytic" and not allowed:
        raise PapaError("engine analytic trains logistic regression (model logreg) in fp32 without compilation, "
                        f"not {type(template).__name__}{'' if fp32 else ' in reduced precision'}"
                        f"{' compiled' if compiled else ''}")
    return allowed


def analytic_step(pop: Population, x: Tensor, targets: Tensor, autocast=None, *, loss_fn: LossFn | None = None,
                  channels_last: bool = False, scale: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Logistic regression's step in closed form, for (p, B, ...) inputs and (p, B, K) soft targets (fp32, no loss
    scaling: ``autocast``, ``loss_fn``, ``channels_last`` and ``scale`` are there for the engines' common call).

    logits = x W^T + b per member; loss = -(targets * log_softmax(logits)).sum(K).mean(B). Backward: the mean
    and the minus hand log_softmax the gradient -(1/B) targets; log_softmax's own backward op (the one autograd
    calls, for the same bits) turns it into the logits' gradient g; then grad W = (x^T g)^T and grad b = the
    sum of g over the batch, the products the stacked engine's linear backward computes."""
    if not analytic_supported(pop.template):
        raise ValueError(f"the analytic engine trains logistic regression only, not {type(pop.template).__name__}")
    w, b = pop.params["linear.weight"], pop.params["linear.bias"]
    with torch.no_grad():
        x = x.flatten(2)
        logits = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
        logp = F.log_softmax(logits, dim=2)
        losses = -(targets * logp).sum(2).mean(1)
        g = torch._log_softmax_backward_data(targets * (-1.0 / x.shape[1]), logp, 2, logp.dtype)
        w.grad = torch.bmm(x.transpose(1, 2), g).transpose(1, 2) if w.requires_grad else None
        b.grad = g.sum(1) if b.requires_grad else None
    return losses


ENGINES: dict[str, Callable] = {"loop": loop_step, "stacked": stacked_step, "analytic": analytic_step}


class Engine:
    """A configured engine: ``engine(pop, x, targets, autocast) -> losses``, like the plain step functions.

    With ``compile``, the member loss (vmapped for ``stacked``) goes through ``torch.compile`` on the first
    call; later calls, for any member, step or epoch, reuse the compiled graph as long as the population's
    template (and so the architecture and shapes) stays the same."""

    def __init__(self, name: str, compile: bool = False, channels_last: bool = False):
        if name not in ENGINES:
            raise ValueError(f"unknown engine {name!r}; expected one of {', '.join(ENGINES)}")
        self.name, self.compile, self.channels_last = name, compile, channels_last
        self._template: torch.nn.Module | None = None
        self._loss_fn: LossFn | None = None

    def loss_fn(self, template: torch.nn.Module) -> LossFn | None:
        if self.name == "analytic":
            return None
        if template is not self._template:
            fn = member_loss_fn(template)
            if self.name == "stacked":
                fn = vmap(fn, randomness="different")
            if self.compile:
                fn = torch.compile(fn)
            self._template, self._loss_fn = template, fn
        return self._loss_fn

    @property
    def stacked(self) -> bool:
        """Whether members run all at once (REPAIR and BatchNorm passes then go through one vmapped call too)."""
        return self.name != "loop"

    def __call__(self, pop: Population, x: Tensor, targets: Tensor, autocast,
                 scale: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        return ENGINES[self.name](pop, x, targets, autocast, loss_fn=self.loss_fn(pop.template),
                                  channels_last=self.channels_last, scale=scale)

    def __repr__(self) -> str:
        return f"Engine({self.name!r}, compile={self.compile}, channels_last={self.channels_last})"


_FLOAT32_MAX = torch.finfo(torch.float32).max


class PopulationScaler(torch.amp.GradScaler):
    """fp16 loss scaling as the authors' scripts ran it (main.py:172-189, utils/utils.py:70-71): one
    ``GradScaler()`` with torch's defaults (scale 2**16, x2 after 2,000 clean updates, x0.5 on an overflow)
    shared by the whole population, whose summed loss is scaled once; then, member by member in member order,
    ``scaler.step(optimizer[l]); scaler.update()``. So each member's step is skipped only when its own
    gradients hold an inf or NaN, the scale changes after every member (halved after an overflowing one, the
    growth counter advancing p times per step), and a member's gradients are unscaled by the scale as it
    stands when its turn comes: after an overflowing member the later members' gradients come out doubled for
    that step, as they did in the scripts (their GradScaler unscales each optimizer with the current scale).

    papa has one optimizer over the stacked tensors, so a skipped member is restored: its parameters and
    optimizer state (momentum, Adam's moments; zeros where the state did not exist yet, which is what a
    fresh state amounts to) are put back after the step. When every member overflows the optimizer does not
    step at all. The one thing a stacked optimizer cannot hold per member is AdamW's step count: a member
    skipped while others step counts that step in its bias correction (the scripts' own optimizer did not).
    Under torchrun every rank sees every member's overflow flag, so all ranks keep the same scale."""

    def __init__(self, device: torch.device | str):
        super().__init__(torch.device(device).type)

    def step_population(self, optimizer: torch.optim.Optimizer, pop: Population, comm) -> list[bool]:
        """Unscale the stacked gradients member by member, step the members whose gradients are finite and
        update the scale as the scripts' per-member step/update pairs did; every member's overflow flag (in
        member order, all ranks') is returned."""
        grads = [t.grad for t in pop.params.values() if t.grad is not None]
        local = torch.zeros(pop.size, dtype=torch.bool, device=grads[0].device if grads else None)
        for g in grads:
            local |= ~torch.isfinite(g).flatten(1).all(1)
        found = [bool(a) for a, _ in comm.gather_scores([(float(f), 0.0) for f in local.tolist()])]
        scale, tracker = self.get_scale(), int(self.state_dict()["_growth_tracker"])
        interval, growth, backoff = self.get_growth_interval(), self.get_growth_factor(), self.get_backoff_factor()
        inverse = []
        for overflow in found:  # scaler.step(optimizer[l]); scaler.update(), l = 0, 1, ...
            inverse.append(1.0 / scale)
            if overflow:
                scale, tracker = scale * backoff, 0
            else:
                tracker += 1
                if tracker == interval:  # grown only to a finite float32, as torch's update kernel does
                    scale, tracker = (scale * growth if scale * growth <= _FLOAT32_MAX else scale), 0
        self.update(scale)
        self._growth_tracker.fill_(tracker)
        mine = [found[j] for j in comm.members]
        if grads:
            inv = torch.tensor([inverse[j] for j in comm.members], dtype=torch.float32, device=grads[0].device)
            for g in grads:
                g.mul_(inv.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))
        if all(mine):
            return found
        skipped = [k for k, f in enumerate(mine) if f]
        if not skipped:
            optimizer.step()
            return found
        kept = _member_slices(optimizer, pop, skipped)
        for g in grads:
            g[skipped] = 0
        optimizer.step()
        with torch.no_grad():
            for t, rows in kept:
                t[skipped] = rows
            for t in _fresh_state(optimizer, pop, kept):
                t[skipped] = 0
        return found


def _member_slices(optimizer: torch.optim.Optimizer, pop: Population, rows: list[int]) -> list[tuple[Tensor, Tensor]]:
    """Copies of ``rows`` (members) of every parameter with a gradient and of its per-member optimizer state."""
    kept = []
    for t in pop.params.values():
        if t.grad is None:
            continue
        kept.append((t, t.detach()[rows].clone()))
        for v in optimizer.state.get(t, {}).values():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == pop.size:
                kept.append((v, v[rows].clone()))
    return kept


def _fresh_state(optimizer: torch.optim.Optimizer, pop: Population, kept: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """Per-member optimizer state tensors created by the step just taken (none were in ``kept``)."""
    known = {id(t) for t, _ in kept}
    return [v for t in pop.params.values() if t.grad is not None
            for v in optimizer.state.get(t, {}).values()
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == pop.size and id(v) not in known]


_WEIGHTED = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)


def forward_gflop(model: torch.nn.Module, tensors: dict[str, Tensor], shape: tuple[int, ...]) -> float:
    """Forward GFLOP of one image of ``shape`` (C, H, W) in the convolutions and linear layers of ``model`` run
    with ``tensors`` (two per multiply-add: what dominates any network's compute), read from the layers' input
    and output shapes in one forward pass of two zero images in evaluation mode without gradients: nothing
    is changed, and it costs one small forward pass (a meta-device pass would import torch._dynamo, seconds
    of CPU in processes that otherwise never do)."""
    flop = 0

    def count(module: torch.nn.Module, inputs: tuple, output: Tensor) -> None:
        nonlocal flop
        if isinstance(module, torch.nn.Linear):
            flop += 2 * module.in_features * output.numel()
        elif module.transposed:  # every input element meets (out_channels / groups) x kernel weights
            flop += 2 * inputs[0].numel() * module.out_channels // module.groups * math.prod(module.kernel_size)
        else:  # every output element sums (in_channels / groups) x kernel products
            flop += 2 * output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)

    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, _WEIGHTED)]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            functional_call(model, tensors, (torch.zeros(2, *shape, device=device),))
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return flop / 2 / 1e9


CPU_STACKED_MAX_GFLOP = 0.04
"""``auto`` on a CPU stacks the members when one member's step is at most this many forward GFLOP (forward_gflop
per image x batch size). Below it a step is bound by per-call overhead (Python, dispatch, autograd), which the
stacked engine pays once for all members and the loop once per member; above it the convolutions dominate, and
the loop's separate convolutions run as fast as stacked grouped ones or faster on a CPU. Placed by the grid of
benchmarks/README.md: up to 0.04 (the digits CNN at width 32 and batch 16, or width 16 and batch 64) the stacked
engine was the faster one at every batch size and p measured, or even with the loop; at 0.08 and beyond the
loop measured up to 1.3x faster."""


def choose_engine(name: str, device: torch.device | str, population: int | None = None,
                  member_gflop: float | None = None, analytic: bool = False) -> str:
    """Resolve ``auto`` (other names pass through) from the device type, the population size,
    ``member_gflop``, the forward GFLOP of one member's step (forward_gflop per image x batch size), and
    ``analytic``, whether the analytic engine can train the model (analytic_supported, in fp32): a function of
    the config alone, never of a timing, so a config always trains with the same engine.

    - logistic regression in fp32: ``analytic`` on any device (the stacked engine's bits, at a third of its cost);
    - one member: ``loop`` on any device (vmap over one member batches nothing);
    - CUDA: ``stacked``, where the loop's ~170 small kernel launches per member and step make it
      launch-bound;
    - CPU: ``stacked`` for overhead-bound steps (``member_gflop`` <= CPU_STACKED_MAX_GFLOP: logistic
      regression, small CNNs at small batches), else ``loop`` (also when the work is not given), where both
      engines run the same compute-bound kernels and separate convolutions beat grouped ones."""
    if name != "auto":
        return name
    if analytic:
        return "analytic"
    if population == 1:
        return "loop"
    if torch.device(device).type == "cuda":
        return "stacked"
    return "stacked" if member_gflop is not None and member_gflop <= CPU_STACKED_MAX_GFLOP else "loop"
