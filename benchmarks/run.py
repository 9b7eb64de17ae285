"""Sweep engines x population sizes x models with ``papa bench``; write ``benchmarks/results-<device>.md``.

    python benchmarks/run.py --device cuda          # GPU: bf16, ResNet-18 at batch 64, plus compile
    python benchmarks/run.py --device cpu --quick   # CPU: ResNet-18 at a small batch and few steps
    python benchmarks/run.py --device cpu --models logreg digits_cnn:width=16 --batch-sizes 1 8 64 --images 400

A model is ``name[:key=value,...]`` (its keyword arguments, as a config's model.kwargs).

Every configuration runs in its own ``python -m papa.cli bench`` process (a crash or out-of-memory
becomes a table cell, and no run inherits another's caches). Raw JSON lines go next to the table.
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODELS = ["digits_cnn", "resnet18_cifar"]
POPULATIONS = [1, 2, 4, 10]


def engine_variants(device: str) -> list[str]:
    """``engine[+cl][+bf16][+compile]`` names to sweep (cl: channels-last; bf16: autocast whatever
    --precision says); compilation only where it is expected to pay. On CPU the options are swept for the
    loop and stacked engines, since which of them helps depends on the CPU (AVX512-BF16, oneDNN kernels)."""
    if device == "cuda":
        return ["loop", "stacked", "stacked+compile"]
    return ["loop", "stacked", "loop+cl", "stacked+cl", "loop+cl+compile", "stacked+cl+compile",
            "loop+cl+bf16", "loop+cl+bf16+compile", "stacked+cl+bf16+compile"]


def settings(model: str, device: str, quick: bool) -> dict:
    """Batch size, steps and population sizes per model and device."""
    if model == "resnet18_cifar":
        if device == "cuda":
            return {"batch_size": 64, "steps": 30, "warmup": 5, "populations": POPULATIONS}
        # a CPU ResNet-18 step at p=10, batch 64 takes many seconds: small and few unless asked
        if quick:
            return {"batch_size": 8, "steps": 2, "warmup": 1, "populations": POPULATIONS}
        return {"batch_size": 16, "steps": 5, "warmup": 2, "populations": POPULATIONS}
    steps = 50 if device == "cpu" else 100
    return {"batch_size": 16, "steps": steps, "warmup": 5, "populations": POPULATIONS}


def model_spec(spec: str) -> tuple[str, list[str]]:
    """``digits_cnn:width=16`` -> ("digits_cnn", ["width=16"]): the model and its ``--model-arg`` values."""
    name, _, kwargs = spec.partition(":")
    return name, [kv for kv in kwargs.split(",") if kv]


def bench(model: str, p: int, engine: str, cfg: dict, args, profile: Path | None = None,
          timeout: float | None = None) -> dict:
    """One ``papa bench`` process for ``engine`` (``name[+cl][+bf16][+compile]``); its JSON line, with the
    process's wall time (``wall_s``: start-up and compilation included), or an ``error`` row. ``profile``:
    the file for the kernel table of one profiled step; ``timeout``: seconds before the run is stopped."""
    name, *flags = engine.split("+")
    model, model_args = model_spec(model)
    cmd = [sys.executable, "-m", "papa.cli", "bench", "--model", model, "--population", str(p),
           "--batch-size", str(cfg["batch_size"]), "--steps", str(cfg["steps"]),
           "--warmup", str(cfg["warmup"]), "--repeats", str(args.repeats), "--engine", name,
           "--device", args.device, "--precision", "bf16" if "bf16" in flags else args.precision]
    cmd += ["--compile"] * ("compile" in flags) + ["--channels-last"] * ("cl" in flags or args.channels_last)
    cmd += [arg for kv in model_args for arg in ("--model-arg", kv)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        error = None if proc.returncode == 0 and lines else \
            (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
    except subprocess.TimeoutExpired:
        error = f"stopped after {timeout:.0f} s (time budget)"
    wall = round(time.perf_counter() - start, 1)
    if error is not None:
        return {"model": model, "population": p, "engine": name, "error": error, "wall_s": wall}
    return {**json.loads(lines[-1]), "wall_s": wall}


def results_name(kind: str, device_name: str, threads: int | None = None) -> str:
    """``cpu-amd-epyc``, ``cuda-nvidia-h200``: the device part of ``results-<name>.md``."""
    return slug(f"{kind} {device_name}") + (f"-{threads}thread" if threads else "")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def auto_engine(r: dict) -> str:
    """What ``train.engine: auto`` trains a row's setting with (papa.engines.choose_engine), or – when the row
    does not give the work of a member's step."""
    from papa.engines import choose_engine

    work = r.get("member_forward_gflop")
    return "–" if work is None else choose_engine("auto", r["device"], r["population"], work)


def table(rows: list[dict]) -> str:
    cols = ["model", "p", "batch", "engine", "images/s", "step ms", "× loop", "CPU ms", "× loop (CPU)",
            "push ms", "push at every=10", "TFLOP/s", "% bf16 peak", "member fwd GFLOP", "auto"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def spec(r: dict) -> str:  # the model as given (with its kwargs); rows of other sweeps (gpu.py) name it only
        return r.get("spec", r["model"])

    def key(r: dict) -> tuple:
        return spec(r), r["population"], r.get("batch_size")

    loop = {key(r): r for r in rows if r["label"] == "loop" and "error" not in r}
    for r in rows:
        if "error" in r:
            cells = [spec(r), r["population"], r.get("batch_size", ""), r["label"], f"error: {r['error']}"]
            cells += [""] * 10
        else:
            base = loop.get(key(r))  # None without a loop row to compare with
            peak, cpu, base_cpu = r["peak_fraction"], r.get("cpu_ms"), base and base.get("cpu_ms")
            cells = [
                spec(r), r["population"], r["batch_size"], r["label"], fmt(r["images_per_second"], 0),
                fmt(r["step_ms"], 2), fmt(base and r["images_per_second"] / base["images_per_second"], 2),
                fmt(cpu, 2), fmt(cpu and base_cpu and base_cpu / cpu, 2),
                fmt(r["averaging_ms"], 2), f"{fmt(100 * r['averaging_fraction_every10'], 2)}%",
                fmt(r["tflops"], 2), fmt(peak and 100 * peak, 1),
                "–" if r.get("member_forward_gflop") is None else f"{r['member_forward_gflop']:.3g}", auto_engine(r),
            ]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--models", nargs="+", default=MODELS, help="name[:key=value,...] (model keyword arguments)")
    parser.add_argument("--populations", nargs="+", type=int, help="override the per-model sizes")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="override the per-model batch size: sweep these")
    parser.add_argument("--images", type=int, help="member-images per timed block: steps = max(5, IMAGES // batch) "
                        "(default: the per-model number of steps)")
    parser.add_argument("--engines", nargs="+", help="engine[+compile][+cl] (default: per device)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--channels-last", action="store_true", help="channels-last for every engine")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per run; the fastest counts")
    parser.add_argument("--rounds", type=int, default=1, help="sweeps, interleaved; the fastest counts")
    parser.add_argument("--quick", action="store_true", help="CPU: ResNet-18 at batch 8, 2 steps")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results-<device name>.md")
    args = parser.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    engines = args.engines or engine_variants(kind)

    # rounds interleave the configurations, so a burst of other work on a shared machine slows one
    # round of every configuration rather than every round of one; each keeps its fastest round
    best: dict[tuple, dict] = {}
    for _ in range(args.rounds):
        for model in args.models:
            base = settings(model_spec(model)[0], kind, args.quick)
            for batch in args.batch_sizes or [base["batch_size"]]:
                cfg = {**base, "batch_size": batch}
                if args.images:
                    cfg["steps"] = max(5, args.images // batch)
                for p in args.populations or cfg["populations"]:
                    for engine in engines:
                        r = {**bench(model, p, engine, cfg, args), "label": engine, "spec": model}
                        r.setdefault("batch_size", batch)
                        print(json.dumps(r), flush=True)
                        key = (model, batch, p, engine)
                        speed = r.get("images_per_second", 0)
                        if key not in best or speed > best[key].get("images_per_second", 0):
                            best[key] = r
    rows = list(best.values())
    ok = [r for r in rows if "error" not in r]
    if not ok:
        print("every run failed", file=sys.stderr)
        return 1
    first = ok[0]
    device_name = first["device_name"]
    out = args.out or HERE / f"results-{results_name(kind, device_name, args.threads)}.md"
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"# Engine benchmark: {device_name}",
        "",
        f"- device: `{kind}` ({device_name}), torch {first['torch']}, {first['threads']} CPU threads, "
        f"precision {args.precision}; load average after the sweep {load} ({os.cpu_count()} CPUs)",
        f"- date: {datetime.date.today().isoformat()}; command: `python benchmarks/run.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`",
        "- images/s counts member-images (p x batch per step) after warm-up, fastest of "
        f"{args.repeats} timed blocks in each of {args.rounds} interleaved rounds; × loop compares with the "
        "loop engine at the same p; push: one PAPA push (lerp toward the mean) over the whole population, "
        "and its share of 10 training steps.",
        "- TFLOP/s from the forward + backward GFLOP per image counted by torch's FLOP counter ("
        + ", ".join(sorted({f"{r['spec']} {r['gflop_per_image']:.4g}" for r in ok}))
        + "); % bf16 peak against the device's dense bf16 tensor-core peak (GPUs only, see README).",
        "",
        table(rows),
        "",
    ]
    out.write_text("\n".join(lines))
    out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
