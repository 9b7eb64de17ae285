"""`papa bench` on the host it reports: the CPU's name where /proc/cpuinfo names no model, and a sweep of compiled runs
in one process (benchmarks/run.py's), each of which compiles its step afresh instead of meeting torch.compile's
recompile limit and silently running eager."""

import platform

import torch
from torch._dynamo.utils import counters

from papa import bench


def test_cpu_name_without_a_model_name_in_cpuinfo(monkeypatch):
    """Some CPUs' /proc/cpuinfo (ARM's) has no "model name" line: the name is the platform's processor string."""
    class CpuInfo:
        def __init__(self, path):
            assert str(path) == "/proc/cpuinfo"

        def read_text(self):
            return "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\n"

    monkeypatch.setattr(bench, "Path", CpuInfo)
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert bench.device_name(torch.device("cpu")) == "aarch64"
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert bench.device_name(torch.device("cpu")) == "arm"


def test_a_sweep_of_compiled_runs_compiles_every_step(monkeypatch):
    """Three compiled runs of different batch sizes under a recompile limit of 2: each compiles its own step. Dynamo's
    caching is the same whatever its backend: the eager one stands in for inductor's seconds of C++ compilation."""
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile(fn, backend="eager", **kwargs))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    torch._dynamo.reset()
    counters.clear()
    for n, batch in enumerate((2, 3, 4), start=1):
        out = bench.run(model="logreg", population=2, batch_size=batch, steps=1, warmup=1, engine="loop",
                        device="cpu", compile=True, threads=1)
        assert out["engine"] == "loop" and out["step_ms"] > 0
        assert counters["stats"]["unique_graphs"] == n, (batch, dict(counters["stats"]))
    torch._dynamo.reset()
