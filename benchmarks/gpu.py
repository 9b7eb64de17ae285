"""The measurements of ``benchmarks/gpu.sh`` (which sets the sizes): the engine sweep, the trainer's epochs
(the headline), PAPA-all's averaging, and the targets, written to ``OUT/results-<device>.md`` and ``.jsonl``.

    python -m benchmarks.gpu --out OUT --device cuda [sizes]     # see benchmarks/gpu.sh

Work runs in the order the results need it, and nothing starts that would not end before ``--deadline``
(judged by what ran before it): the sweep's eager runs and the compiled run of the headline's model and
population; the trainer's epochs with the loop and with the fastest stacked setting; PAPA-all's
averaging; then the sweep's other compiled runs while time remains. What did not fit is listed as
skipped. The results are rewritten after every step, so a run stopped from outside keeps what it measured.
When a target is missed, torch's kernel tables of one step of each engine (the headline's model and
population) go to ``OUT/profile-<device>.txt``.
"""

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks import headline, run
from papa.io import write_text

HEADLINE_MODEL = "resnet18_cifar"
COMPILE_GUESS_S = 150.0
"""Seconds a compiled sweep run is expected to take before one has been timed (ResNet-18's training step
compiles in about a minute on a GPU server's CPUs; several minutes on two busy cores)."""
EAGER_GUESS_S = 30.0
AVERAGING_GUESS_S = 30.0

GOALS = {"speedup": 5.0, "peak": 0.35, "averaging": 0.01, "trainer": 1.5}
"""The targets: stacked >= 5x the loop (headline model and population, bf16), >= 35% of the dense
bf16 peak, PAPA's push and PAPA-all's averaging < 1% of training, the trainer's epoch within 1.5x of the
engine benchmark's rate."""


def is_compiled(label: str) -> bool:
    return "compile" in label.split("+")


def plan(models: list[str], populations: list[int], engines: list[str], head_p: int) -> tuple[list, list]:
    """The sweep's runs ``(model, p, label)`` in two phases: first every eager run and the headline
    configuration's compiled ones (the targets and the headline setting need them), then the other
    compiled runs, larger populations first (their compile time is the budget's largest unknown)."""
    runs = [(m, p, e) for m in models for p in populations for e in engines]
    first = [r for r in runs if not is_compiled(r[2]) or (r[0], r[1]) == (HEADLINE_MODEL, head_p)]
    later = sorted((r for r in runs if r not in first), key=lambda r: -r[1])
    return first, later


def predicted_s(label: str, done: list[dict]) -> float:
    """A run's expected wall time: the longest of the finished runs of its kind (compiled or eager)."""
    same = [r["wall_s"] for r in done if "wall_s" in r and is_compiled(r["label"]) == is_compiled(label)]
    return max(same, default=COMPILE_GUESS_S if is_compiled(label) else EAGER_GUESS_S)


def skipped(what: dict, reason: str = "skipped: the time budget was spent") -> dict:
    return {**what, "error": reason}


class Sweep:
    """The engine sweep's runs, each a ``papa bench`` process (benchmarks/run.py)."""

    def __init__(self, args, work: Path):
        self.args, self.work, self.rows = args, work, []
        self.options = argparse.Namespace(device=args.device, precision=args.precision, channels_last=True,
                                          threads=args.threads, repeats=args.repeats)
        self.cfg = {"batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup}

    def profile_path(self, label: str) -> Path:
        return self.work / f"profile-{label}.txt"

    def run(self, model: str, p: int, label: str, deadline: float) -> dict:
        left = deadline - time.time()
        what = {"kind": "engine", "model": model, "population": p, "label": label}
        if left < predicted_s(label, self.rows):
            row = skipped(what)
        else:
            profile = self.profile_path(label) if (model, p) == (HEADLINE_MODEL, self.args.headline_population) \
                else None
            row = {**what, **run.bench(model, p, label, self.cfg, self.options, profile=profile, timeout=left)}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row


def find(rows: list[dict], model: str, p: int, label: str) -> dict | None:
    return next((r for r in rows if (r["model"], r["population"], r["label"]) == (model, p, label)
                 and "error" not in r), None)


def best_stacked(rows: list[dict], p: int) -> dict | None:
    """The fastest stacked run (any option) of the headline model at population ``p``."""
    ok = [r for r in rows if (r["model"], r["population"]) == (HEADLINE_MODEL, p) and "error" not in r
          and r["label"].split("+")[0] == "stacked"]
    return max(ok, key=lambda r: r["images_per_second"], default=None)


def measured(fn, *args, **kwargs) -> dict:
    """``fn``'s result, or an ``error`` row (the traceback goes to stderr): one failed measurement must not
    cost the others on a machine held for minutes."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # recorded, and the run goes on
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}


def experiment(args, engine: str, compile: bool) -> dict:
    """The headline experiment with one setting's overrides."""
    return headline.experiment(headline.settings(engine, compile, args.device, args.headline_population,
                                                 args.headline_batch_size, args.precision, args.repair_iters))


def headline_data(args) -> tuple:
    """The headline's dataset and validation split (the same for every setting)."""
    exp = experiment(args, "loop", False)
    return headline.cifar_shaped_data(exp, args.train_images, args.test_images)


def trainer_runs(args, sweep: Sweep, data: tuple, deadline: float):
    """The headline: the trainer's epochs with the loop and with the fastest stacked setting of the sweep,
    one row per setting as it is measured."""
    p, batch = args.headline_population, args.headline_batch_size
    best = best_stacked(sweep.rows, p)
    labels = ["loop"] + ([best["label"]] if best else [])
    steps = len(data[1]["train"]) // batch
    for label in labels:
        engine, compile = label.split("+")[0], is_compiled(label)
        what = {"kind": "trainer", "label": label, "population": p, "batch_size": batch}
        bench_row = find(sweep.rows, HEADLINE_MODEL, p, label)
        # the benchmark's step with a margin for the data path and the evaluation, and the compilation
        guess = 2 * steps * bench_row["step_ms"] / 1e3 + compile * bench_row["warmup_s"] if bench_row else 0.0
        if time.time() + guess > deadline:
            row = skipped(what)
        else:
            exp = experiment(args, engine, compile)
            # a compiled setting trains one more epoch: the first pays for the compilation
            row = {**what, **measured(headline.time_epochs, exp, data, args.headline_epochs + compile,
                                      deadline=deadline)}
        print(json.dumps(row), flush=True)
        yield row


def averaging_run(args, trainers: list[dict], data: tuple, deadline: float) -> dict:
    """PAPA-all's averaging (with REPAIR) in the headline experiment, with the fastest trainer setting."""
    timed = [r for r in trainers if "error" not in r]
    what = {"kind": "averaging", "variant": "papa-all"}
    if not timed or time.time() + AVERAGING_GUESS_S > deadline:
        return skipped(what)
    fastest = max(timed, key=lambda r: r["images_per_second"])
    exp = experiment(args, fastest["engine"], fastest["compile"])
    row = {**what, **measured(headline.time_averaging, exp, data), "label": fastest["label"],
           "epoch_s": fastest["epoch_s"]}
    print(json.dumps(row), flush=True)
    return row


def target(name: str, value: float | None, goal: str, met: bool, shown: str, missing: str = "not measured") -> dict:
    """One target's row; ``met`` is None (unknown) when there is no ``value``, and ``missing`` says why."""
    return {"kind": "target", "target": name, "value": value, "goal": goal,
            "measured": missing if value is None else shown, "met": None if value is None else met}


def targets(sweep_rows: list[dict], trainers: list[dict], averaging: dict | None, p: int,
            precision: str = "bf16") -> list[dict]:
    """Each target with its measured value and whether it was met (None: not measured, or no known peak)."""
    loop, best = find(sweep_rows, HEADLINE_MODEL, p, "loop"), best_stacked(sweep_rows, p)
    where = f"{HEADLINE_MODEL}, p = {p}, {precision}, channels-last"
    speedup = best["images_per_second"] / loop["images_per_second"] if loop and best else None
    peak = best["peak_fraction"] if best else None
    push = best["averaging_fraction_every10"] if best else None
    no_peak = "not measured" if best is None else f"unknown: no dense bf16 peak is known for {best['device_name']}"
    share, every = None, "?"
    if averaging and "error" not in averaging:
        every = averaging["every_epochs"]
        share = averaging["averaging_s"] / (every * averaging["epoch_s"])
    a = GOALS["averaging"]
    out = [
        target(f"stacked ({best['label'] if best else 'stacked'}) / loop, {where}", speedup,
               f">= {GOALS['speedup']:g}x", speedup is not None and speedup >= GOALS["speedup"], f"{speedup:.2f}x"
               if speedup else ""),
        target(f"fraction of the dense bf16 peak, {where}", peak, f">= {GOALS['peak']:.0%}",
               peak is not None and peak >= GOALS["peak"], f"{peak:.1%}" if peak else "", missing=no_peak),
        target("PAPA push every 10 steps, share of training time", push, f"< {a:.0%}",
               push is not None and push < a, f"{push:.3%}" if push is not None else ""),
        target(f"PAPA-all averaging (REPAIR included) every {every} epochs, share of training time", share,
               f"< {a:.0%}", share is not None and share < a, f"{share:.3%}" if share is not None else ""),
    ]
    for tr in trainers:
        bench_row = find(sweep_rows, HEADLINE_MODEL, p, tr["label"])
        ratio = bench_row["images_per_second"] / tr["images_per_second"] if "error" not in tr and bench_row else None
        out.append(target(f"engine benchmark rate / trainer epoch rate ({tr['label']})", ratio,
                          f"<= {GOALS['trainer']:g}x", ratio is not None and ratio <= GOALS["trainer"],
                          f"{ratio:.2f}x" if ratio else ""))
    return out


def verdict(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "unknown"}[met]


def markdown(meta: dict, sweep_rows: list[dict], trainers: list[dict], averaging: dict | None,
             goals: list[dict]) -> str:
    lines = [f"# GPU benchmark: {meta['device_name']} (benchmarks/gpu.sh)", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items()]
    lines += ["", "## Targets", "", "| target | measured | goal | result |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['goal']} | {verdict(t['met'])} |" for t in goals]
    lines += ["", "## The trainer: one epoch of `papa train` (the headline)", "",
              f"`{headline.PAPER_CONFIG.relative_to(headline.REPO)}`, experiment `{headline.EXPERIMENT}`, variant "
              f"papa (a push every 10 steps), seed 1, {meta['precision']}, on CIFAR-shaped random images. "
              "An epoch is the training steps and the evaluation of every member (validation and test sets); "
              "images/s counts member-images of training per second of the whole epoch, and without the "
              "evaluation; the paper run is the first epoch (with its warm-up) and 299 more like the last; "
              "the floor is that run's training FLOPs at the dense bf16 peak.", "",
              "| setting | p | batch | steps/epoch | epoch s | first epoch s | evaluation s | images/s "
              "| images/s, training only | 300 epochs (h) | floor (h) | × floor |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in trainers:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['population']} | {r['batch_size']} | {r['error']} |" + " |" * 8)
            continue
        lines.append(
            f"| {r['label']} | {r['population']} | {r['batch_size']} | {r['steps_per_epoch']} | {r['epoch_s']:.2f} "
            f"| {r['first_epoch_s']:.2f} | {r['eval_s']:.2f} | {r['images_per_second']:,.0f} "
            f"| {r['train_images_per_second']:,.0f} | {r['projected_run_h']:.2f} "
            f"| {run.fmt(r['floor_run_h'], 3)} | {run.fmt(r['floor_ratio'], 1)} |")
    if averaging:
        lines += ["", "PAPA-all's averaging (the mean written back, then REPAIR): " + (
            averaging["error"] if "error" in averaging else
            f"{averaging['averaging_s'] * 1e3:,.1f} ms with the {averaging['label']} setting, every "
            f"{averaging['every_epochs']} epochs of {averaging['epoch_s']:.2f} s.")]
    lines += ["", f"## The engine sweep (`papa bench`, {meta['precision']})", "",
              "One process per run; images/s counts member-images after warm-up, the fastest of the timed "
              "blocks; × loop compares with the loop at the same p; push: one PAPA push and its share of 10 "
              "steps; % bf16 peak against the device's dense bf16 peak (– where unknown).", "",
              run.table(sweep_rows), ""]
    return "\n".join(lines)


def write_results(out: Path, name: str, meta: dict, sweep_rows, trainers, averaging, goals) -> Path:
    md = out / f"results-{name}.md"
    rows = [*sweep_rows, *trainers, *([averaging] if averaging else []), *goals]
    write_text(md.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    write_text(md, markdown(meta, sweep_rows, trainers, averaging, goals))
    return md


def save_profiles(out: Path, name: str, sweep: Sweep, labels: list[str]) -> Path | None:
    """Concatenate the profiled steps of each engine into ``OUT/profile-<name>.txt``."""
    parts = [sweep.profile_path(label).read_text() for label in labels if sweep.profile_path(label).is_file()]
    if not parts:
        return None
    path = out / f"profile-{name}.txt"
    write_text(path, "\n\n".join(parts))
    return path


def device_of(rows: list[dict], fallback: str) -> tuple[str, str]:
    ok = next((r for r in rows if "device_name" in r), None)
    return (ok["device"], ok["device_name"]) if ok else (fallback, "unknown device")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the results")
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--name-suffix", default="", help="appended to results-<device> (e.g. -quick)")
    ap.add_argument("--models", nargs="+", default=["resnet18_cifar", "vgg16_bn"])
    ap.add_argument("--populations", nargs="+", type=int, default=[10, 4, 2, 1])
    ap.add_argument("--engines", nargs="+", default=["loop", "stacked", "stacked+compile"])
    ap.add_argument("--batch-size", type=int, default=64, help="sweep: images per member per step")
    ap.add_argument("--steps", type=int, default=20, help="sweep: timed steps per block")
    ap.add_argument("--warmup", type=int, default=5, help="sweep: untimed steps first")
    ap.add_argument("--repeats", type=int, default=3, help="sweep: timed blocks; the fastest counts")
    ap.add_argument("--threads", type=int, help="torch CPU threads of the sweep's runs")
    ap.add_argument("--train-images", type=int, default=50_000, help="headline: CIFAR-shaped training images")
    ap.add_argument("--test-images", type=int, default=10_000, help="headline: test images")
    ap.add_argument("--headline-population", type=int, default=10)
    ap.add_argument("--headline-batch-size", type=int, default=64)
    ap.add_argument("--headline-epochs", type=int, default=1, help="timed epochs (a compiled setting: one more)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="bf16: autocast (the GPU's)")
    ap.add_argument("--repair-iters", type=int, help="PAPA-all's REPAIR batches (default: the config's, 5)")
    ap.add_argument("--deadline", type=float, help="time.time() after which nothing new starts (default: none)")
    ap.add_argument("--command", default="", help="the command line shown in the results")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    deadline = args.deadline or float("inf")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="papa-gpu-"))
    sweep = Sweep(args, work)
    first, later = plan(args.models, args.populations, args.engines, args.headline_population)
    trainers: list[dict] = []
    averaging: dict | None = None
    goals: list[dict] = []

    def save() -> Path:
        kind, device = device_of([*sweep.rows, *trainers], args.device)
        meta = {
            "device_name": device,
            "device": f"`{kind}`, torch {next((r['torch'] for r in sweep.rows if 'torch' in r), '?')}, "
                      f"{os.cpu_count()} CPUs",
            "date": datetime.date.today().isoformat(),
            "precision": ("bf16 autocast" if args.precision == "bf16" else "fp32") + ", channels-last",
            "command": f"`{args.command or 'python -m benchmarks.gpu ' + ' '.join(argv or sys.argv[1:])}`",
            "sweep": f"models {', '.join(args.models)}; p {', '.join(map(str, args.populations))}; engines "
                     f"{', '.join(args.engines)}; batch {args.batch_size}; {args.warmup} warm-up steps, then the "
                     f"fastest of {args.repeats} blocks of {args.steps} steps",
            "headline": f"{args.train_images:,} training images ({args.test_images:,} test), "
                        f"p = {args.headline_population}, batch {args.headline_batch_size}",
        }
        name = run.results_name(kind, device) + args.name_suffix
        return write_results(args.out, name, meta, sweep.rows, trainers, averaging, goals)

    try:
        for item in first:
            sweep.run(*item, deadline)
            save()
        data = headline_data(args)
        for row in trainer_runs(args, sweep, data, deadline):
            trainers.append(row)
            save()
        averaging = averaging_run(args, trainers, data, deadline)
        # the targets need only the runs done so far (the headline's model and population)
        goals = targets(sweep.rows, trainers, averaging, args.headline_population, args.precision)
        md = save()
        profile = None
        if any(t["met"] is False for t in goals):
            profile = save_profiles(args.out, md.stem.removeprefix("results-"), sweep, args.engines)
        for item in later:
            sweep.run(*item, deadline)
            save()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nTargets ({md.name}):")
    for t in goals:
        print(f"  {verdict(t['met']):>7}  {t['target']}: {t['measured']} (goal {t['goal']})")
    for r in trainers:
        if "error" not in r:
            print(f"  trainer, {r['label']}: {r['images_per_second']:,.0f} images/s, epoch {r['epoch_s']:.1f} s, "
                  f"300 epochs ~ {r['projected_run_h']:.2f} h, x floor {run.fmt(r['floor_ratio'], 1)}")
    print(f"wrote {md}, {md.with_suffix('.jsonl')}" + (f", {profile}" if profile else ""))
    return 0 if any("error" not in r for r in sweep.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
