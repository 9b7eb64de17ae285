"""Training engines: one optimizer step's passes, overwriting every trainable parameter's stacked ``.grad`` and
returning the members' losses (p,). ``loop``: one member at a time (the reference, as the official code); ``stacked``:
all in one ``vmap`` call (BatchNorm statistics, dropout masks per member); ``analytic``: logistic regression in fp32,
closed-form gradient with the stacked kernels in their order: same bits, a third of the cost (docs/performance.md)."""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap

from papa.errors import PapaError
from papa.forward import eval_mode, hooked
from papa.models.linear import LogisticRegression
from papa.population import Population

LossFn = Callable[[dict, dict, Tensor, Tensor], Tensor]


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Soft-target cross-entropy (mixup, CutMix, label smoothing) of (B, K) or per-pixel (B, K, H, W) logits."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def has_tied_tensors(module: torch.nn.Module) -> bool:
    """Whether a parameter or buffer of ``module`` is registered under two names (e.g. tied embeddings)."""
    return any(len(dict(named(remove_duplicate=False))) != len(dict(named()))
               for named in (module.named_parameters, module.named_buffers))


def member_loss_fn(template: torch.nn.Module) -> LossFn:
    """``loss(params, buffers, x, targets)`` of one member, run through ``template``'s structure. Tied tensors are
    re-tied (a search costing about a small model's forward pass) only when the template has them."""
    tied = has_tied_tensors(template)
    return lambda params, buffers, x, targets: soft_cross_entropy(
        functional_call(template, {**params, **buffers}, (x,), tie_weights=tied), targets)


def stacked_channels_last(x: Tensor) -> Tensor:
    """(p, B, C, H, W) stored as (B, H, W, p, C): vmap's grouped conv reads a channels-last (B, p*C, H, W) view."""
    return x.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)


def _conv_weights_channels_last(params: dict[str, Tensor], dim: int) -> dict[str, Tensor]:
    """The ``dim``-dimensional (conv) weights copied channels-last, their channel axis (third from last) stored
    innermost ((O, kh, kw, C); stacked: (p, O, kh, kw, C), so their grouped view is), gradients flowing through: only
    then do a convolution and the BatchNorm and pooling after it stay so."""
    return {n: t.movedim(-3, -1).contiguous().movedim(-1, -3) if t.dim() == dim else t for n, t in params.items()}


def loop_step(pop: Population, x: Tensor, targets: Tensor, autocast, *, loss_fn: LossFn | None = None,
              channels_last: bool = False, scale: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """One member at a time, its gradients w.r.t. a detached view of its slice copied into the stacked .grad (None
    where no member's loss uses a parameter). ``scale`` (a GradScaler's) scales each loss for its backward only."""
    loss_fn = loss_fn or member_loss_fn(pop.template)
    trainable = [n for n, t in pop.params.items() if t.requires_grad]
    for n in trainable:
        if pop.params[n].grad is None:
            pop.params[n].grad = torch.empty_like(pop.params[n])  # every member's slice is written below
    used, losses = set(), []
    for j in range(pop.size):
        params = {n: t[j].detach().requires_grad_(t.requires_grad) for n, t in pop.params.items()}
        xj, used_params = x[j], params
        if channels_last and x.dim() == 5:
            xj = xj.contiguous(memory_format=torch.channels_last)
            used_params = _conv_weights_channels_last(params, 4)
        with autocast():
            loss = loss_fn(used_params, {n: b[j] for n, b in pop.buffers.items()}, xj, targets[j])
        grads = torch.autograd.grad(loss if scale is None else scale(loss), [params[n] for n in trainable],
                                    allow_unused=True)
        for n, g in zip(trainable, grads, strict=True):
            if g is None:
                pop.params[n].grad[j].zero_()
            else:
                pop.params[n].grad[j].copy_(g)
                used.add(n)
        losses.append(loss.detach())
    for n in set(trainable) - used:
        pop.params[n].grad = None
    return torch.stack(losses)


def stacked_step(pop: Population, x: Tensor, targets: Tensor, autocast, *, loss_fn: LossFn | None = None,
                 channels_last: bool = False, scale: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """All members in one vmap; ``scale`` (see ``loop_step``) on the summed loss, as the scripts scaled theirs."""
    loss_fn = loss_fn or vmap(member_loss_fn(pop.template), randomness="different")
    params = pop.params
    if channels_last and x.dim() == 5:
        x, params = stacked_channels_last(x), _conv_weights_channels_last(params, 5)
    with autocast():
        losses = loss_fn(params, pop.buffers, x, targets)
    for t in pop.params.values():  # backward then hands over its fresh gradients instead of adding into zeros
        t.grad = None
    total = losses.sum()
    (total if scale is None else scale(total)).backward()
    return losses.detach()


def analytic_allowed(engine: str, template: torch.nn.Module, fp32: bool, compiled: bool) -> bool:
    """Whether the analytic engine can train ``template`` as asked (logistic regression, in fp32, not compiled:
    compilation is of the autograd engines' step); a PapaError when ``engine`` names it and it cannot."""
    allowed = isinstance(template, LogisticRegression) and fp32 and not compiled
    if engine == "analytic" and not allowed:
        raise PapaError("engine analytic trains logistic regression (model logreg) in fp32 without compilation, "
                        f"not {type(template).__name__}{'' if fp32 else ' in reduced precision'}"
                        f"{' compiled' if compiled else ''}")
    return allowed


def analytic_step(pop: Population, x: Tensor, targets: Tensor, autocast=None, *, loss_fn: LossFn | None = None,
                  channels_last: bool = False, scale: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Logistic regression's step in closed form, (p, B, ...) inputs and (p, B, K) soft targets (fp32, unscaled; the
    other arguments are the engines' common call): log_softmax gets the gradient -(1/B) targets, its own backward op
    (autograd's, for the same bits) gives the logits' g; grad W = (x^T g)^T and grad b = g summed over the batch."""
    if not isinstance(pop.template, LogisticRegression):
        raise ValueError(f"the analytic engine trains logistic regression only, not {type(pop.template).__name__}")
    w, b = pop.params["linear.weight"], pop.params["linear.bias"]
    with torch.no_grad():
        x = x.flatten(2)
        logp = F.log_softmax(torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2)), dim=2)
        losses = -(targets * logp).sum(2).mean(1)
        g = torch._log_softmax_backward_data(targets * (-1.0 / x.shape[1]), logp, 2, logp.dtype)
        w.grad = torch.bmm(x.transpose(1, 2), g).transpose(1, 2) if w.requires_grad else None
        b.grad = g.sum(1) if b.requires_grad else None
    return losses


ENGINES: dict[str, Callable] = {"loop": loop_step, "stacked": stacked_step, "analytic": analytic_step}


class Engine:
    """A configured step function; ``compile`` compiles the member loss (vmapped for ``stacked``) once per template."""

    def __init__(self, name: str, compile: bool = False, channels_last: bool = False):
        if name not in ENGINES:
            raise ValueError(f"unknown engine {name!r}; expected one of {', '.join(ENGINES)}")
        self.name, self.compile, self.channels_last = name, compile, channels_last
        self.stacked = name != "loop"  # members all at once (REPAIR and BatchNorm passes then one vmapped call too)
        self._template, self._loss_fn = None, None  # the last template and its member loss

    def loss_fn(self, template: torch.nn.Module) -> LossFn | None:
        if self.name == "analytic":
            return None
        if template is not self._template:
            fn = member_loss_fn(template)
            if self.name == "stacked":
                fn = vmap(fn, randomness="different")
            if self.compile:  # static shapes: an epoch's short last batch (fidelity.last_batch) compiles a graph
                fn = torch.compile(fn, dynamic=False)  # of its own once, and the full batches keep theirs
            self._template, self._loss_fn = template, fn
        return self._loss_fn

    def __call__(self, pop: Population, x: Tensor, targets: Tensor, autocast,
                 scale: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        return ENGINES[self.name](pop, x, targets, autocast, loss_fn=self.loss_fn(pop.template),
                                  channels_last=self.channels_last, scale=scale)

    def __repr__(self) -> str:
        return f"Engine({self.name!r}, compile={self.compile}, channels_last={self.channels_last})"


class PopulationScaler(torch.amp.GradScaler):
    """fp16 loss scaling as the authors' scripts ran it (main.py:172-189, utils/utils.py:70-71): one default
    ``GradScaler()`` for the summed loss, then per member ``scaler.step(optimizer[l]); scaler.update()``: a member's
    step is skipped only when its own gradients overflow, each unscaled by the scale at its turn (doubled after an
    overflowing member, as in the scripts). With one optimizer over the stacked tensors, a skipped member's parameters
    and optimizer state are put back after the step (AdamW's step count still counts it). All ranks see every flag."""

    def __init__(self, device: torch.device | str):
        super().__init__(torch.device(device).type)

    def step_population(self, optimizer: torch.optim.Optimizer, pop: Population, comm) -> list[bool]:
        """Unscale, step the members without overflow, update the scale; every member's overflow flag (all ranks')."""
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
                    if scale * growth <= torch.finfo(torch.float32).max:
                        scale *= growth
                    tracker = 0
        self.update(scale)
        self._growth_tracker.fill_(tracker)
        mine = [found[j] for j in comm.members]
        inv = torch.tensor([inverse[j] for j in comm.members], dtype=torch.float32, device=local.device)
        for g in grads:
            g.mul_(inv.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))
        if all(mine):
            return found
        skipped = [k for k, f in enumerate(mine) if f]
        if not skipped:
            optimizer.step()
            return found
        kept = [(t, t.detach()[skipped]) for t in _member_state(optimizer, pop)]  # a copy: indexed by a list
        for g in grads:
            g[skipped] = 0
        optimizer.step()
        known = {id(t) for t, _ in kept}
        with torch.no_grad():
            for t, rows in kept:
                t[skipped] = rows
            for t in _member_state(optimizer, pop):
                if id(t) not in known:  # state the step just created
                    t[skipped] = 0
        return found


def _member_state(optimizer: torch.optim.Optimizer, pop: Population) -> list[Tensor]:
    """Every parameter with a gradient, each followed by its per-member optimizer state tensors."""
    return [v for t in pop.params.values() if t.grad is not None for v in (t, *optimizer.state.get(t, {}).values())
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == pop.size]


def forward_gflop(model: torch.nn.Module, tensors: dict[str, Tensor], shape: tuple[int, ...]) -> float:
    """Forward GFLOP of one image of ``shape`` (C, H, W) in the convolutions and linear layers of ``model`` with
    ``tensors``, from one eval-mode pass of two zero images (a meta-device pass would import torch._dynamo)."""
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
    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))]
    with hooked(hooks), eval_mode(model), torch.no_grad():
        functional_call(model, tensors, (torch.zeros(2, *shape, device=device),))
    return flop / 2 / 1e9


CPU_STACKED_MAX_GFLOP = 0.04
"""``auto`` on a CPU stacks members up to this many forward GFLOP per member step (overhead-bound, paid once stacked);
above, the loop is as fast or faster (benchmarks/README.md: stacked never slower to 0.04, loop up to 1.3x from 0.08)."""


def choose_engine(name: str, device: torch.device | str, population: int | None = None,
                  member_gflop: float | None = None, analytic: bool = False) -> str:
    """Resolve ``auto`` from the config alone, never a timing (on CUDA the loop is launch-bound). ``member_gflop``:
    forward_gflop per image x batch size."""
    if name != "auto":
        return name
    if analytic:
        return "analytic"
    if population == 1:
        return "loop"
    cheap = member_gflop is not None and member_gflop <= CPU_STACKED_MAX_GFLOP
    return "stacked" if torch.device(device).type == "cuda" or cheap else "loop"
