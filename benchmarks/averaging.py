"""Averaging cost: papa.averaging's in-place ops against foreach, flat-buffer and index_select variants.

    python benchmarks/averaging.py --device cuda --model resnet18_cifar --population 10

Prints one JSON line per (operation, implementation) with milliseconds per call (fastest of the blocks).
The alternatives live here only to be measured; every one is checked against papa.averaging first.
"""

import argparse
import json
import time

import torch

from papa import averaging
from papa.bench import INPUT_SHAPES, device_name
from papa.models import create_model
from papa.population import Population


def clone(pop: Population) -> Population:
    return Population(pop.template, {n: t.clone() for n, t in pop.params.items()},
                      {n: t.clone() for n, t in pop.buffers.items()})


def floats(pop: Population) -> list[torch.Tensor]:
    return [t for _, t in pop.tensors() if t.is_floating_point()]


@torch.no_grad()
def push_foreach(pop: Population, alpha: float) -> None:
    """Mean by p foreach adds over member slices, then one foreach lerp per member: 2p + 1 launches
    instead of two per tensor. (Integer buffers are left out: a real version handles them as before.)"""
    ts = floats(pop)
    mean = torch._foreach_mul([t[0] for t in ts], 1.0 / pop.size)
    for j in range(1, pop.size):
        torch._foreach_add_(mean, [t[j] for t in ts], alpha=1.0 / pop.size)
    for j in range(pop.size):
        torch._foreach_lerp_([t[j] for t in ts], mean, 1.0 - alpha)


@torch.no_grad()
def push_flat(flat: torch.Tensor, alpha: float) -> None:
    """The lower bound: every float tensor a view into one (p, N) buffer, so a push is two kernels."""
    flat.lerp_(flat.mean(0, keepdim=True).expand_as(flat), 1.0 - alpha)


@torch.no_grad()
def pair_index_select(pop: Population, pairs: torch.Tensor, buffers: dict) -> None:
    """PAPA-2 as gathers into preallocated (2p, ...) buffers and a mean over each pair."""
    idx = pairs.flatten().to(pop.device)
    for name, t in pop.tensors():
        if t.is_floating_point():
            buf = buffers[name]
            torch.index_select(t, 0, idx, out=buf)
            torch.mean(buf.view(pop.size, 2, *t.shape[1:]), 1, out=t)


def timed(fn, device: torch.device, calls: int = 10, blocks: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(blocks):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18_cifar")
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    shape = INPUT_SHAPES.get(args.model, (3, 32, 32))
    pop = Population.from_factory(lambda: create_model(args.model, 10, shape[0]), args.population).to(dev)
    p, alpha = pop.size, 0.99
    n_float = sum(t[0].numel() for t in floats(pop))
    flat = torch.randn(p, n_float, device=dev)
    pairs = averaging.draw_pairs(p, torch.Generator().manual_seed(0))
    matrix = torch.zeros(p, p, dtype=torch.float64)
    matrix[torch.arange(p), pairs[:, 0]] += 0.5
    matrix[torch.arange(p), pairs[:, 1]] += 0.5
    buffers = {n: torch.empty(2 * p, *t.shape[1:], dtype=t.dtype, device=dev)
               for n, t in pop.tensors() if t.is_floating_point()}

    # the alternatives compute what papa.averaging computes
    for op, ref, alt in [
        ("push", lambda q: averaging.push_toward_average_(q, alpha), lambda q: push_foreach(q, alpha)),
        ("pair", lambda q: averaging.mix_(q, matrix), lambda q: pair_index_select(q, pairs, buffers)),
    ]:
        a, b = clone(pop), clone(pop)
        ref(a)
        alt(b)
        for name, t in a.tensors():
            if t.is_floating_point():
                torch.testing.assert_close(t, b.state_dict()[name], rtol=1e-5, atol=1e-6, msg=f"{op} {name}")

    runs = {
        ("push", "papa.averaging (mean + lerp_ per tensor)"):
            lambda: averaging.push_toward_average_(pop, alpha),
        ("push", "foreach (2p+1 multi-tensor calls)"): lambda: push_foreach(pop, alpha),
        ("push", "flat (p, N) buffer (lower bound)"): lambda: push_flat(flat, alpha),
        ("papa-all", "papa.averaging (mean written back)"): lambda: averaging.average_all_(pop),
        ("papa-2", "papa.averaging mix_ (p x p tensordot)"): lambda: averaging.mix_(pop, matrix),
        ("papa-2", "index_select into preallocated (2p, ...) + mean"):
            lambda: pair_index_select(pop, pairs, buffers),
    }
    info = {"model": args.model, "population": p, "device": dev.type, "device_name": device_name(dev),
            "tensors": len(list(pop.tensors())), "floats_per_member": n_float}
    for (op, impl), fn in runs.items():
        ms = round(timed(fn, dev, args.calls), 3)
        print(json.dumps({**info, "op": op, "implementation": impl, "ms": ms}))


if __name__ == "__main__":
    main()
