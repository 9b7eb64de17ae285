"""`make smoke`: every paper config at smoke scale on fake data, through Snakemake, in a temporary directory.

    python -m tests.smoke_configs [CONFIG ...] [--workdir DIR] [--cores N] [--cover] [--keep] [--keep-weights]

Writes fake data and fake pretrained weights (`papa fake-data`), then runs
`snakemake --configfile CONFIG --config scale=smoke data_root=DIR` for each config (config/config.yaml and
config/paper/*.yaml by default) in one working directory, so runs shared by several configs train once, and
prints one line per config: wall time, CPU time of its jobs, runs (and how many trained now), tables and
figures made, and whether every table shows every cell of its paper CSV, every metrics.json has every key and
every PAPA-all / PAPA-2 / SWA run's history shows its averaging / SWA phase. Once a config is checked, the
weights (*.safetensors) of its experiments that no later config uses are deleted (``--keep-weights`` keeps them):
full-size architectures make a run's population and soups hundreds of MB even at smoke scale. Exits non-zero
when a config fails or is incomplete; its Snakemake log stays in the working directory. The checks are reused
by the CI test (tests/pipeline/test_smoke.py). (papa/smoke.py is the rule that shrinks a config; this runs them.)
"""

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from papa.config import experiment, load_config
from papa.report import paper, plan
from papa.report.tables import cell_experiment, cell_variant, columns
from papa.variants import VARIANTS

REPO = Path(__file__).resolve().parents[1]
# the default config too: the only one with figures
CONFIGS = [REPO / "config" / "config.yaml", *sorted((REPO / "config" / "paper").glob("*.yaml"))]
# the keys of every metrics.json (docs/interfaces.md), and those a segmentation run adds
METRICS_KEYS = ("experiment", "variant", "seed", "population", "members", "mean", "min", "max", "std", "ensemble",
                "avg_soup", "greedy_soup", "greedy_soup_size", "avg_soup_repair", "greedy_soup_repair",
                "greedy_soup_members", "soups_aligned", "val_members", "code", "data")
F1_MODELS = ("mean", "ensemble", "avg_soup", "greedy_soup", "avg_soup_repair", "greedy_soup_repair")
STEPS = ("prepare", "train", "soups", "similarity")
SIMILARITY_KEYS = ("experiment", "variant", "seed", "stages", "between_networks", "network_and_avg_soup", "aligned",
                   "repaired", "repair_iters", "test_images", "code")


def environment(hub: Path) -> dict[str, str]:
    """The environment of the `papa` and `snakemake` calls: this interpreter's bin first on PATH (the rules
    call `papa`), the fake hub cache, one torch thread per job."""
    bin_dir = Path(sys.executable).parent
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_CACHE": str(hub),
            "OMP_NUM_THREADS": "1"}


def fake_data(work: Path, configs: list[Path]) -> tuple[Path, Path]:
    """`papa fake-data` for ``configs`` under ``work``: (data root, hub cache)."""
    data, hub = work / "data", work / "hub"
    args = [sys.executable, "-m", "papa.cli", "fake-data", "--root", str(data), "--hub-cache", str(hub)]
    for c in configs:
        args += ["--config", str(c)]
    subprocess.run(args, check=True, env=environment(hub), capture_output=True, text=True)
    return data, hub


def snakemake(work: Path, config: Path, data: Path, hub: Path, *args: str, cores: int = 2,
              timeout: float | None = None) -> subprocess.CompletedProcess:
    """Snakemake on the repository's workflow, run in ``work``, at smoke scale on the fake data; one thread
    per job (smoke jobs are small: ``cores`` jobs at a time use the cores better than fewer, wider ones)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory",
           str(work), "--cores", str(cores), *args, "--set-threads", *[f"{step}=1" for step in STEPS],
           "--configfile", str(config), "--config", "scale=smoke", f"data_root={data}"]
    return subprocess.run(cmd, env=environment(hub), capture_output=True, text=True, timeout=timeout)


def papa(hub: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "papa.cli", *args], env=environment(hub), capture_output=True,
                          text=True, check=True)


def smoke_config(config: Path, data: Path):
    return load_config(config, {"scale": "smoke", "data_root": str(data)})


def run_dirs(work: Path, config: dict, pairs=None) -> list[Path]:
    """The run directories of ``pairs`` ((experiment, variant); default: every run the config trains)."""
    pairs = plan.runs(config) if pairs is None else pairs
    return [work / config["results"] / e / v / f"seed{s}" for e, v in pairs for s in config["seeds"]]


def metrics_problems(work: Path, config: dict, pairs=None) -> list[str]:
    """What is missing from the metrics.json (and similarity.json) of the runs: files, keys, finite numbers."""
    problems = []
    for run in run_dirs(work, config, pairs):
        path = run / "metrics.json"
        if not path.is_file():
            problems.append(f"{path.relative_to(work)}: missing")
            continue
        metrics = json.loads(path.read_text())
        wanted = list(METRICS_KEYS)
        if "classes" in metrics:
            wanted += ["classes", "f1_members"] + [f"{m}_f1_{k}" for m in F1_MODELS
                                                   for k in (*metrics["classes"], "average")]
        problems += [f"{path.relative_to(work)}: no key {k!r}" for k in wanted if k not in metrics]
        problems += [f"{path.relative_to(work)}: {k} = {v!r}" for k, v in metrics.items()
                     if isinstance(v, float) and not math.isfinite(v)]
    shown = plan.similarity_runs(config) if pairs is None else set(pairs) & set(plan.similarity_runs(config))
    for run in run_dirs(work, config, sorted(shown)):
        path = run / "similarity.json"
        found = json.loads(path.read_text()) if path.is_file() else {}
        problems += [f"{path.relative_to(work)}: no key {k!r}" for k in SIMILARITY_KEYS if k not in found]
    return problems


def event_problems(work: Path, config: dict, pairs=None) -> list[str]:
    """Runs whose history.csv lacks an averaging (PAPA-all, PAPA-2) or the SWA phase their experiment has."""
    problems = []
    for e, v in plan.runs(config) if pairs is None else pairs:
        exp = experiment(config, e)
        wanted = {"after_avg"} if VARIANTS[v].unit == "epochs" else set()
        wanted |= {"swa"} if exp["train"]["swa"] is not None else set()
        for s in config["seeds"]:
            path = work / config["results"] / e / v / f"seed{s}" / "history.csv"
            if path.is_file():
                with path.open() as f:
                    phases = {r["phase"] for r in csv.DictReader(f)}
                problems += [f"{path.relative_to(work)}: no {phase!r} phase" for phase in sorted(wanted - phases)]
    return problems


def cell_runs(config: dict, table: dict) -> dict[tuple[str, str], tuple[str, str]]:
    """{(row label, column header): (experiment, variant)} of every cell of a table that shows a run."""
    cells = {}
    for row in table["rows"]:
        for header, (variant, _) in columns(table, config["variants"], row).items():
            if (v := cell_variant(row, variant)) is not None and (e := cell_experiment(row, header)) is not None:
                cells[row["label"], header] = (e, v)
    return cells


def table_problems(work: Path, config: dict, reports: Path | None = None) -> list[str]:
    """Cells of the paper's tables (papa/report/paper/<id>.csv) that a rendered table leaves without a value.
    Tables are read from ``reports`` (default reports/smoke)."""
    reports = reports or work / "reports" / "smoke"
    problems = []
    for table in config["tables"]:
        path = reports / f"{table['name']}.csv"
        if not path.is_file():
            problems.append(f"{path.relative_to(work)}: not rendered")
            continue
        with path.open() as f:
            ours = {(r["row"], r["column"]): r["text"] for r in csv.DictReader(f)}
        runs = cell_runs(config, table)
        wanted = list(paper.values(table["paper"])) if table["paper"] else list(runs)
        wanted = [cell for cell in wanted if cell in runs]
        problems += [f"{path.name}: {row!r} / {column!r}: {ours.get((row, column), 'no cell')!r}"
                     for row, column in wanted if ours.get((row, column), "—") in ("", "—")]
    return problems


def stand_ins(work: Path, config: dict, pairs, out: Path) -> list[str]:
    """For every run of the config not in ``pairs`` (not trained), a copy of a trained run's metrics.json (and
    similarity.json) under ``out``, relabelled as that run: the trained run of the same experiment, else of the
    same model and dataset, else of the same dataset, else the first. So the tables render every cell, which checks
    that every row and column of every layout finds its run; the numbers are the stand-in's. Returns the files."""

    def traits(pair):
        exp = experiment(config, pair[0])
        return exp["data"]["dataset"], exp["model"]["name"], pair[0]

    def nearest(pair, candidates):  # the most leading traits in common; ties: the first in order
        return max(sorted(candidates), key=lambda c: next(k for k in (3, 2, 1, 0)
                                                           if traits(c)[:k] == traits(pair)[:k]))

    shown, files = set(plan.similarity_runs(config)), []
    for pair in plan.runs(config):
        if pair in pairs:
            continue
        sources = {"metrics.json": nearest(pair, pairs)}
        if pair in shown and pairs & shown:
            sources["similarity.json"] = nearest(pair, pairs & shown)
        for name, (e, v) in sources.items():
            for seed in config["seeds"]:
                data = json.loads((work / config["results"] / e / v / f"seed{seed}" / name).read_text())
                dest = out / "stand-ins" / pair[0] / pair[1] / f"seed{seed}" / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(json.dumps({**data, "experiment": pair[0], "variant": pair[1]}))
                files.append(str(dest))
    return files


def render_partial(work: Path, path: Path, config: dict, hub: Path, pairs) -> Path:
    """Aggregate the metrics of ``pairs``, with stand-ins for the runs not trained (``stand_ins``), and render every
    table of the config from them, with the commands the workflow's rules run; returns the folder."""
    out = work / "partial" / path.stem
    metrics = [str(r / "metrics.json") for r in run_dirs(work, config, pairs)]
    shown = sorted(set(pairs) & set(plan.similarity_runs(config)))  # Table 5's cells: similarity.json, as the workflow
    metrics += [str(r / "similarity.json") for r in run_dirs(work, config, shown)]
    metrics += stand_ins(work, config, set(pairs), out)
    papa(hub, "aggregate", *metrics, "--out", str(out / "metrics.csv"))
    jobs = work / config["results"] / path.name  # the config the workflow's jobs read (overrides written in)
    for table in config["tables"]:
        papa(hub, "render", "--config", str(jobs), "--table", table["name"], "--metrics", str(out / "metrics.csv"),
             "--md", str(out / f"{table['name']}.md"), "--csv", str(out / f"{table['name']}.csv"))
    for figure in config["figures"]:  # curves of the runs trained (papa plot skips the others, as for one seed)
        plotted = set(plan.figure_runs(figure, config["variants"])) & set(pairs) if figure["kind"] == "curves" else []
        histories = [str(r / "history.csv") for r in run_dirs(work, config, sorted(plotted))]
        papa(hub, "plot", "--config", str(jobs), "--figure", figure["name"], "--metrics", str(out / "metrics.csv"),
             *(["--histories", *histories] if histories else []), "--out", str(out / f"{figure['name']}.png"))
    return out


# the covering subset of runs (CI's smoke runs; --cover) -----------------------------------------------------
def run_features(config: dict, pair: tuple[str, str]) -> set[tuple]:
    """``features`` of one run of ``config``, with whether the config measures its similarity (Table 5)."""
    return features(experiment(config, pair[0]), pair[1]) | {("similarity", pair in plan.similarity_runs(config))}


def covering_runs(configs: list[tuple[str, dict]]) -> dict[str, list[tuple[str, str]]]:
    """For each (name, config), in order, the (experiment, variant) runs to train so that together they exercise
    every feature of every run (``features``). Runs an earlier config trains come
    free; then, greedily, the run exercising the most features not yet exercised is chosen (ties: runs of
    experiments a later config uses first, then the config's order) until none adds one; a curves figure trains
    every run it plots; a config whose runs add nothing still trains its first run, so its tables and figures
    are rendered and checked."""
    covered, trained, out = set(), set(), {}
    for k, (name, config) in enumerate(configs):
        runs = plan.runs(config)
        found = {pair: run_features(config, pair) for pair in runs}
        later = later_experiments([c for _, c in configs], k)
        chosen = [pair for pair in runs if pair in trained]  # trained for an earlier config: free
        covered = covered.union(*(found[pair] for pair in chosen))
        while rest := [pair for pair in runs if found[pair] - covered]:
            best = max(rest, key=lambda p: (len(found[p] - covered), p[0] in later, -runs.index(p)))
            chosen.append(best)
            covered |= found[best]
        for figure in config["figures"]:  # a curves figure plots every run it shows: train them all
            if figure["kind"] == "curves":
                chosen += [pair for pair in sorted(plan.figure_runs(figure, config["variants"]))
                           if pair not in chosen]
        out[name] = sorted(chosen or runs[:1])
        trained |= set(out[name])
    return out


def features(exp: dict, variant: str) -> set[tuple]:
    """What a run exercises: model, dataset, variant, averaging scheme, the pipeline paths and the ablations."""
    a, t = exp["averaging"], exp["train"]
    out = {("model", exp["model"]["name"]), ("dataset", exp["data"]["dataset"]), ("variant", variant),
           ("pretrained", exp["model"]["pretrained"] is not None), ("swa", t["swa"] is not None),
           ("freeze", t["freeze_epochs"] > 0), ("restarts", bool(t["schedule"]["restart_every"])),
           ("schedule", t["schedule"]["name"]), ("optimizer", t["optimizer"]["name"]),
           ("augment", exp["augment"]["enabled"], exp["augment"]["per_batch"], exp["augment"]["members"] is not None),
           ("same_init", exp["population"]["same_init"]), ("p=1", exp["population"]["size"] == 1)}
    aligned = exp["soups"]["align"]
    out.add(("soups.align", aligned if isinstance(aligned, bool) else variant in aligned))
    # the authors' options (issue 13): REPAIR's layers, the greedy criterion, resizing, the ResNet-20 variant
    out |= {("repair.layers", exp["repair"]["layers"]), ("greedy", exp["soups"]["greedy_criterion"]),
            ("resize", exp["data"]["resize"]), ("model.kwargs", repr(sorted(exp["model"]["kwargs"].items())))}
    family = VARIANTS[variant].unit  # the averaging code path: pushes every few steps, or averaging every few epochs
    if family != "none":
        out |= {("align", family, a[variant]["align"]), ("window", family, tuple(a["window"]) != (0.0, 1.0)),
                ("mutations", family, a["genetic"]["mutation_std"] > 0)}
    if family == "epochs":
        g = a["genetic"]
        out |= {("scheme", variant, a[variant]["scheme"]), ("repair", variant, a[variant]["repair"]),
                ("from_start", variant, a[variant]["from_start"]),
                ("swa.mix_averages", t["swa"] is not None and t["swa"]["mix_averages"]),
                ("genetic", g["tournament"], g["elitism"], g["mutation_std"] > 0, a[variant]["repair"])}
    return out


@dataclass
class Summary:
    config: str
    seconds: float = 0.0
    cpu: float = 0.0
    runs: int = 0
    trained: int = 0
    tables: int = 0
    rendered: int = 0
    figures: int = 0
    plotted: int = 0
    returncode: int = 0
    problems: list[str] = field(default_factory=list)
    log: str = ""

    def line(self) -> str:
        state = "ok" if not self.returncode and not self.problems else (
            f"FAILED (snakemake exit {self.returncode})" if self.returncode else f"INCOMPLETE ({len(self.problems)})")
        return (f"{self.config:<18} {self.seconds:7.0f} s wall {self.cpu:7.0f} s CPU  {self.runs:3d} runs "
                f"({self.trained} trained now)  tables {self.rendered}/{self.tables}  figures {self.plotted}/"
                f"{self.figures}  {state}")


def job_cpu(work: Path, results: str, since: float) -> float:
    """CPU seconds of the jobs that finished after ``since`` (Snakemake's benchmark files)."""
    total = 0.0
    for tsv in (work / results / "benchmarks").rglob("*.tsv"):
        if tsv.stat().st_mtime >= since:
            row = tsv.read_text().splitlines()[-1].split("\t")
            total += float(row[-1]) if row[-1] not in ("", "NA") else 0.0
    return total


def run_config(work: Path, path: Path, data: Path, hub: Path, cores: int = 2, pairs=None,
               timeout: float | None = None) -> Summary:
    """Smoke-run one config through Snakemake and check what it produced: every run (its default target), or
    only the runs ``pairs`` ((experiment, variant)), whose tables are then rendered from those runs alone."""
    config = smoke_config(path, data)
    runs = run_dirs(work, config, pairs)
    before = {r for r in runs if (r / "metrics.json").exists()}
    shown = set(plan.similarity_runs(config))
    targets = [f"{config['results']}/{e}/{v}/seed{s}/{name}" for e, v in pairs or [] for s in config["seeds"]
               for name in ("metrics.json", *(["similarity.json"] if (e, v) in shown else []))]
    start, wall = time.time(), time.perf_counter()
    done = snakemake(work, path, data, hub, *targets, cores=cores, timeout=timeout)
    summary = Summary(path.stem, seconds=time.perf_counter() - wall, cpu=job_cpu(work, config["results"], start),
                      runs=len(runs), trained=len({r for r in runs if (r / "metrics.json").exists()} - before),
                      tables=len(config["tables"]), figures=len(config["figures"]), returncode=done.returncode,
                      log=done.stdout + done.stderr)
    if done.returncode:
        return summary
    reports = work / "reports" / "smoke" if pairs is None else render_partial(work, path, config, hub, pairs)
    summary.rendered = sum((reports / f"{t['name']}.md").is_file() for t in config["tables"])
    summary.plotted = sum((reports / f"{f['name']}.png").is_file() for f in config["figures"])
    summary.problems = (metrics_problems(work, config, pairs) + table_problems(work, config, reports)
                        + event_problems(work, config, pairs))
    return summary


def prune_weights(work: Path, config: dict, keep: set[str]) -> int:
    """Delete the weights (*.safetensors) under the config's results of every experiment not in ``keep``;
    returns the bytes freed. Metrics, histories and tables stay: a config checked needs its weights no more."""
    freed = 0
    for exp in set(config["experiments"]) - keep:
        for path in (work / config["results"] / exp).rglob("*.safetensors"):
            freed += path.stat().st_size
            path.unlink()
    return freed


def later_experiments(configs: list[dict], k: int) -> set[str]:
    """The experiments of the configs after the k-th: the runs a smoke run of ``configs`` in order still needs."""
    return {e for config in configs[k + 1:] for e in config["experiments"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", type=Path,
                        help="configs (default: config/config.yaml and config/paper/*.yaml)")
    parser.add_argument("--workdir", type=Path, help="working directory (default: a new temporary one)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="Snakemake --cores")
    parser.add_argument("--keep", action="store_true", help="keep the temporary working directory")
    parser.add_argument("--cover", action="store_true",
                        help="train only a covering subset of each config's runs, in the order given: every model, "
                             "dataset, variant, scheme, ablation and option at least once (as CI does); tables are "
                             "rendered from those runs")
    parser.add_argument("--keep-weights", action="store_true",
                        help="keep every run's weights (default: a config's weights are deleted once it is checked "
                             "and no later config uses its experiments)")
    a = parser.parse_args(argv)
    configs = [c.resolve() for c in a.configs] or CONFIGS
    work = a.workdir.resolve() if a.workdir else Path(tempfile.mkdtemp(prefix="papa-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"smoke scale in {work}: fake data for {len(configs)} configs", flush=True)
    start = time.perf_counter()
    data, hub = fake_data(work, configs)
    print(f"{'fake data':<18} {time.perf_counter() - start:7.0f} s wall", flush=True)
    failed = []
    loaded = [smoke_config(c, data) for c in configs]
    cover = covering_runs([(str(c), config) for c, config in zip(configs, loaded, strict=True)]) if a.cover else {}
    for k, (path, config) in enumerate(zip(configs, loaded, strict=True)):
        pairs = cover.get(str(path))
        summary = run_config(work, path, data, hub, a.cores, pairs=None if pairs == plan.runs(config) else pairs)
        print(summary.line(), flush=True)
        if not a.keep_weights:
            prune_weights(work, config, later_experiments(loaded, k))
        if summary.returncode or summary.problems:
            failed.append(summary)
            log = work / "logs" / f"smoke-{path.stem}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(summary.log + "\n" + "\n".join(summary.problems) + "\n")
            print(f"  see {log}; first problems: {summary.problems[:3]}", flush=True)
    print(f"{'all':<18} {time.perf_counter() - start:7.0f} s wall, {len(configs) - len(failed)}/{len(configs)} "
          "configs ok", flush=True)
    if not failed and not a.keep and not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
