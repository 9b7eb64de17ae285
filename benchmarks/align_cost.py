"""Cost of PAPA's push with feature-matching alignment (Table 17's "feature-matching permutation alignment" row)
against the plain push, to choose ``averaging.align_images``: the run costs at most ~2x the plain one when one
re-alignment costs no more than the ``every`` training steps between two pushes.

    OMP_NUM_THREADS=1 python -m benchmarks.align_cost [--model resnet18_cifar] [--p 5] [--images 64 256]

Times one training step of the population (loop engine, batch 64, 32x32 inputs, SGD) and one ``align_members_``
over the first N images for each N, then fits align(N) = a + b N and prints the largest N with
align(N) <= every x step. Prints one JSON line."""

import argparse
import json
import platform
import time

import torch

from papa.alignment import align_members_
from papa.engines import Engine
from papa.models import create_model
from papa.population import Population


def seconds(fn, repeats: int, warmup: bool) -> float:
    if warmup:
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18_cifar", help="registered model name")
    ap.add_argument("--p", type=int, default=5, help="population size")
    ap.add_argument("--batch-size", type=int, default=64, help="training batch size")
    ap.add_argument("--every", type=int, default=10, help="training steps between two pushes")
    ap.add_argument("--images", type=int, nargs="+", default=[64, 256], help="alignment set sizes to time")
    ap.add_argument("--repeats", type=int, default=2, help="timed repetitions of each measurement")
    ap.add_argument("--no-warmup", action="store_true", help="time the first call too (no untimed warm-up call)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    pop = Population.from_factory(lambda: create_model(a.model, num_classes=100), a.p, seed=0).requires_grad_()
    opt = torch.optim.SGD(pop.parameters(), lr=0.1, momentum=0.9)
    engine = Engine("loop")
    x = torch.randn(a.p, a.batch_size, 3, 32, 32)
    y = torch.randint(100, (a.p, a.batch_size))
    targets = torch.nn.functional.one_hot(y, 100).float()

    def step():
        opt.zero_grad(set_to_none=True)
        engine(pop, x, targets, lambda: torch.autocast("cpu", enabled=False))
        opt.step()

    step_s = seconds(step, a.repeats, not a.no_warmup)
    data = torch.randn(max(a.images), 3, 32, 32)
    align_s = {}
    for n in a.images:
        def align(n=n):
            batches = [data[i:i + 500] for i in range(0, n, 500)]
            align_members_(pop, lambda _j, _g: iter(batches))
        align_s[n] = seconds(align, a.repeats, not a.no_warmup)
    (n0, t0), (n1, t1) = sorted(align_s.items())[0], sorted(align_s.items())[-1]
    slope = (t1 - t0) / (n1 - n0)
    fixed = t0 - slope * n0
    budget = a.every * step_s
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)",
        "torch": torch.__version__, "model": a.model, "p": a.p, "batch_size": a.batch_size, "every": a.every,
        "step_s": round(step_s, 3), "align_s": {str(k): round(v, 3) for k, v in align_s.items()},
        "align_fixed_s": round(fixed, 3), "align_per_image_s": round(slope, 6),
        "max_images_for_2x": int((budget - fixed) / slope) if slope > 0 and budget > fixed else 0,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
