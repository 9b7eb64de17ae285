"""Training engines: how one optimizer step's forward and backward passes run over the members.

Both fill the stacked ``.grad`` of every population parameter and return the per-member losses:
- ``loop``: one member at a time through ``functional_call`` (the reference, and what the official code
  does); launch-bound for small batches on a GPU.
- ``stacked``: all members in one ``torch.func.vmap`` call, which turns each layer into one batched
  (grouped) kernel. BatchNorm updates each member's stacked running statistics; dropout draws
  different masks per member (``randomness="different"``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap

from papa.population import Population


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against soft targets (mixup, CutMix and label smoothing all produce them)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def loop_step(pop: Population, x: Tensor, targets: Tensor, autocast) -> Tensor:
    """One member at a time. Gradients are taken w.r.t. a detached view of each member's slice and
    copied into the stacked .grad, so a member's backward never touches the other members' tensors."""
    losses = []
    for j in range(pop.size):
        params = {n: t[j].detach().requires_grad_(t.requires_grad) for n, t in pop.params.items()}
        with autocast():
            out = functional_call(pop.template, {**params, **{n: b[j] for n, b in pop.buffers.items()}}, (x[j],))
        loss = soft_cross_entropy(out, targets[j])
        trainable = [(n, p) for n, p in params.items() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in trainable], allow_unused=True)
        for (n, _), g in zip(trainable, grads, strict=True):
            stacked = pop.params[n]
            if stacked.grad is None:
                stacked.grad = torch.zeros_like(stacked)
            if g is None:
                stacked.grad[j].zero_()
            else:
                stacked.grad[j].copy_(g)
        losses.append(loss.detach())
    return torch.stack(losses)


def stacked_step(pop: Population, x: Tensor, targets: Tensor, autocast) -> Tensor:
    """All members at once: vmap over the member axis of parameters, buffers and data."""

    def member_loss(params, buffers, xj, tj):
        out = functional_call(pop.template, {**params, **buffers}, (xj,))
        return soft_cross_entropy(out, tj)

    with autocast():
        losses = vmap(member_loss, randomness="different")(pop.params, pop.buffers, x, targets)
    for t in pop.params.values():
        if t.grad is not None:
            t.grad.zero_()
    losses.sum().backward()
    return losses.detach()


ENGINES: dict[str, Callable] = {"loop": loop_step, "stacked": stacked_step}


def choose_engine(name: str, device: torch.device) -> str:
    """``auto``: the stacked engine on GPUs (where the loop is launch-bound) and on CPU too, where
    batching the members' small convolutions also wins (see benchmarks/README); ``loop`` remains
    the reference implementation."""
    if name != "auto":
        return name
    return "stacked"
