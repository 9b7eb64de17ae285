"""``papa bench``: training-step throughput of a population with one engine. A step is the trainer's per batch
(forward and backward of every member, one SGD step over the stacked parameters), on random images and soft
targets made once on the device: the numbers measure the model and engine, not data loading."""

import contextlib
import copy
import platform
import time
from functools import partial
from pathlib import Path

import torch

from papa import averaging
from papa.build import resolve_device
from papa.engines import Engine, analytic_allowed, choose_engine, forward_gflop
from papa.io import write_text
from papa.models import create_model
from papa.population import Population

# (channels, height, width) of models not made for 3x32x32 CIFAR images (the default)
INPUT_SHAPES = {"digits_cnn": (1, 8, 8), "logreg": (1, 8, 8), "resnet50": (3, 224, 224)}

BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200 NVL": 835.0, "H200": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0}
"""Dense bf16 tensor-core peaks (TFLOP/s per GPU) from NVIDIA's data sheets, matched as substrings of the device
name in this order (an unqualified "H100" or "H200" is the SXM part). Other devices: None, not a guess."""


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (the processor string elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def bf16_peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def gflop_per_image(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """Forward + backward GFLOP of one image, counted by torch's FLOP counter on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    m = copy.deepcopy(model).to("meta").train()
    x = torch.empty(2, *shape, device="meta")
    with FlopCounterMode(display=False) as counter:
        m(x).sum().backward()
    return counter.get_total_flops() / 2 / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")  # one kernel each


def profile_step(step, device: torch.device) -> tuple[str, dict]:
    """One call of ``step`` under torch's profiler: the kernel table (the most device time first, CPU time on a
    CPU) and a summary of kernel launches and device-busy time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device.type == "cuda")
    _sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    wall_ms = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    summary = {
        "profile_wall_ms": round(wall_ms, 3),
        "profile_launches": sum(e.count for e in events if e.key in LAUNCH_CALLS),
        # the device's own events (kernels, copies, memsets), as the profiler's table totals them
        "profile_device_ms": round(sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU
                                       and not getattr(e, "is_user_annotation", False)) / 1e3, 3),
    }
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return events.table(sort_by=sort, row_limit=30), summary


def _timed(fn, device: torch.device, calls: int) -> tuple[float, float]:
    """Wall and process-CPU seconds of ``calls`` calls of ``fn``."""
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def run(model: str = "digits_cnn", population: int = 4, batch_size: int = 16, steps: int = 20,
        engine: str = "auto", device: str = "auto", compile: bool = False, channels_last: bool = False,
        precision: str = "fp32", warmup: int = 3, repeats: int = 1, num_classes: int = 10, seed: int = 0,
        profile: str | Path | None = None, model_kwargs: dict | None = None, threads: int | None = None) -> dict:
    """Time ``repeats`` blocks of ``steps`` training steps (after ``warmup`` untimed ones) and a PAPA push on
    ``threads`` CPU threads; ``profile``: a file for the kernel table of one more step. ``step_ms`` is the fastest
    block's mean step (other work only slows a block), ``cpu_ms`` the process CPU time per step (steadier when busy)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dev = resolve_device(device)
        shape = INPUT_SHAPES.get(model, (3, 32, 32))
        torch.manual_seed(seed)
        model_kwargs = dict(model_kwargs or {})
        pop = Population.from_factory(lambda: create_model(model, num_classes=num_classes, in_channels=shape[0],
                                                           **model_kwargs), population, seed=seed).to(dev).train()
        optimizer = torch.optim.SGD(pop.requires_grad_().parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        member_gflop = forward_gflop(pop.template, pop.member_tensors(0), shape) * batch_size
        analytic = analytic_allowed(engine, pop.template, precision == "fp32", compile)
        name = choose_engine(engine, dev, population, member_gflop, analytic)
        if compile:
            # compiled graphs are cached per code object, which every Engine shares: start clean, so that a
            # sweep in one process never hits the recompile limit and silently falls back to eager
            torch._dynamo.reset()
        step_fn = Engine(name, compile=compile, channels_last=channels_last)
        autocast = (partial(torch.autocast, dev.type, dtype=torch.bfloat16) if precision == "bf16"
                    else contextlib.nullcontext)
        x = torch.randn(population, batch_size, *shape, device=dev)
        targets = torch.softmax(torch.randn(population, batch_size, num_classes, device=dev), -1)

        def step():
            step_fn(pop, x, targets, autocast)
            optimizer.step()

        warmup_s = _timed(step, dev, warmup)[0]
        timings = [_timed(step, dev, steps) for _ in range(repeats)]
        blocks = sorted(wall / steps for wall, _ in timings)
        step_s = blocks[0]
        cpu_s = min(cpu for _, cpu in timings) / steps
        push_s = min(_timed(lambda: averaging.push_toward_average_(pop, 0.99), dev, 5)[0] for _ in range(repeats)) / 5
        flop = gflop_per_image(pop.template, shape)
        name_dev, profiled = device_name(dev), {}
        if profile is not None:
            table, profiled = profile_step(step, dev)
            head = (f"{model} p={population} batch={batch_size} {name} {precision} compile={compile} "
                    f"channels_last={channels_last} on {name_dev}: one step {profiled['profile_wall_ms']:.2f} ms, "
                    f"{profiled['profile_launches']} kernel launches, device busy "
                    f"{profiled['profile_device_ms']:.2f} ms")
            write_text(profile, f"{head}\n{table}\n")
        images_per_second = population * batch_size / step_s
        peak = bf16_peak_tflops(name_dev) if dev.type == "cuda" else None
        tflops = flop * images_per_second / 1e3
        return {
            "model": model, "model_kwargs": model_kwargs, "engine": name, "engine_requested": engine,
            "population": population, "batch_size": batch_size, "steps": steps, "warmup": warmup, "repeats": repeats,
            "device": dev.type, "device_name": name_dev, "precision": precision, "compile": compile,
            "channels_last": channels_last, "threads": torch.get_num_threads(),
            "images_per_second": round(images_per_second, 1), "step_ms": round(step_s * 1e3, 3),
            "step_ms_median": round(blocks[len(blocks) // 2] * 1e3, 3), "cpu_ms": round(cpu_s * 1e3, 3),
            "averaging_ms": round(push_s * 1e3, 3), "averaging_fraction_every10": round(push_s / (10 * step_s), 5),
            "warmup_s": round(warmup_s, 2), "gflop_per_image": float(f"{flop:.4g}"),
            "member_forward_gflop": float(f"{member_gflop:.4g}"), "tflops": round(tflops, 4),
            "bf16_peak_tflops": peak, "peak_fraction": round(tflops / peak, 4) if peak else None,
            "torch": torch.__version__, **profiled,
        }
    finally:
        torch.set_num_threads(previous)
