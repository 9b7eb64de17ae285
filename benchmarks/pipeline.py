"""Time a whole pipeline as a user runs it: `snakemake --cores N` on a config, from fresh results, in a scratch
directory (this checkout's workflow and its default profile). Prints one JSON line: wall clock, CPU time of
everything it ran (Snakemake and every job, user + system), Snakemake's own share, and per step the jobs and
their mean wall time (Snakemake's per-job benchmark files); with ``--record FILE.jsonl`` the line is appended there
and FILE.md is rewritten as a table of every recorded line.

    python -m benchmarks.pipeline                             # config/config.yaml on every core
    python -m benchmarks.pipeline --label "after X" --record benchmarks/results-pipeline-cpu-amd-epyc.jsonl
    python -m benchmarks.pipeline --config config/paper/a10.yaml --cores 2 --data-root data   # A.10, UCI's files

Measure on an otherwise idle machine: the 1-minute load average before and after is recorded to show it.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"


def machine() -> str:
    """'<CPU model>, <n> logical CPUs' (the CPU model as ``papa bench`` names it)."""
    import torch

    from papa.bench import device_name

    return f"{device_name(torch.device('cpu'))}, {os.cpu_count()} logical CPUs"


def commit() -> str:
    """This checkout's commit, with '+changes' when tracked files differ from it (the results files under
    benchmarks/ excepted)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    # the benchmarks' own results files (where --record writes) are not changes to what is measured
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results-*")
    return head + ("+changes" if changed else "")


def own_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) of process ``pid`` itself, its children excluded (psutil, which Snakemake
    depends on); None once it is gone."""
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def step_times(workdir: Path) -> dict[str, dict]:
    """Per step, from Snakemake's benchmark files (<results>/benchmarks/<step>/...tsv; the steps: prepare, train,
    soups, similarity, report): jobs, their mean wall seconds and their CPU seconds in all (Snakemake samples a
    job's CPU time while it runs, so this undercounts short jobs)."""
    jobs = defaultdict(list)
    for tsv in sorted(workdir.glob("results/**/benchmarks/*/**/*.tsv")):
        parts = tsv.relative_to(workdir).parts
        with tsv.open() as f:
            jobs[parts[parts.index("benchmarks") + 1]] += [(float(r["s"]), float(r["cpu_time"]))
                                                           for r in csv.DictReader(f, delimiter="\t")]
    return {step: {"jobs": len(js), "mean_s": round(sum(s for s, _ in js) / len(js), 2),
                   "cpu_s": round(sum(c for _, c in js), 1)} for step, js in sorted(jobs.items())}


def command(config: Path, cores: str, workdir: Path, data_root: Path | None = None) -> list[str]:
    """The Snakemake command run in ``workdir``; ``data_root`` overrides the config's (the datasets' folder,
    which a fresh scratch directory does not hold)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
           "--cores", cores, "--configfile", str(config.resolve())]
    return cmd + (["--config", f"data_root={Path(data_root).resolve()}"] if data_root is not None else [])


def run(config: Path, cores: str, workdir: Path, data_root: Path | None = None) -> dict:
    """Run the pipeline once in ``workdir`` and measure it."""
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = command(config, cores, workdir, data_root)
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    log = workdir / "snakemake.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    snakemake_cpu: list[float] = []
    reaped = threading.Event()

    def watch():  # Snakemake's own CPU time, read until it is reaped (wait4 below only gives the total)
        while not reaped.is_set():
            seconds = own_cpu(proc.pid)
            if seconds is not None:
                snakemake_cpu[:] = [seconds]
            reaped.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # the usage of Snakemake and of every job it waited for (os.wait4, not Popen.wait, which drops it)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    reaped.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    if proc.returncode:
        tail = log.read_text().splitlines()[-20:]
        raise SystemExit(f"benchmarks.pipeline: snakemake failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "user_s": round(usage.ru_utime, 1),
        "system_s": round(usage.ru_stime, 1),
        "snakemake_cpu_s": round(snakemake_cpu[0], 1) if snakemake_cpu else None,
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "steps": step_times(workdir),
    }


def table(rows: list[dict]) -> str:
    """The recorded runs as a Markdown table."""
    head = ("| date | label | commit | config | cores | wall | CPU (user + system) | Snakemake's own CPU | "
            "jobs (mean wall s) | load before → after | machine |\n" + "|---" * 11 + "|\n")

    def cells(r):
        jobs = ", ".join(f"{step} {v['jobs']} ({v['mean_s']})" for step, v in r["steps"].items())
        minutes, seconds = divmod(round(r["wall_s"]), 60)
        return [r["date"], r["label"], r["commit"], r["config"], r["cores"], f"{minutes} min {seconds:02d} s",
                f"{r['cpu_s']:.0f} s ({r['user_s']:.0f} + {r['system_s']:.0f})", f"{r['snakemake_cpu_s']} s", jobs,
                f"{r['load_before']} → {r['load_after']}", r["machine"]]

    return head + "".join("| " + " | ".join(map(str, cells(r))) + " |\n" for r in rows)


def record(row: dict, path: Path) -> None:
    """Append ``row`` to ``path`` (.jsonl) and rewrite the .md table of every row there."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.with_suffix(".md").write_text(
        "# The pipeline end to end (`python -m benchmarks.pipeline`)\n\n" + table(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml",
                        help="config to run (default: config/config.yaml)")
    parser.add_argument("--cores", default="all", help="snakemake --cores (default: all)")
    parser.add_argument("--label", default="", help="what this measurement is of (kept with it)")
    parser.add_argument("--record", type=Path, metavar="FILE.jsonl",
                        help="append the result to FILE.jsonl and rewrite FILE.md")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="run in DIR (empty or new) and keep it, instead of a temporary directory")
    parser.add_argument("--data-root", type=Path, metavar="DIR",
                        help="the datasets' folder (the config's data_root, e.g. holding optdigits/ for A.10)")
    args = parser.parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        if any(args.keep.iterdir()):
            parser.error(f"--keep {args.keep}: not empty (the pipeline must start from fresh results)")
        measured = run(args.config, args.cores, args.keep, args.data_root)
    else:
        with tempfile.TemporaryDirectory(prefix="papa-pipeline-") as tmp:
            measured = run(args.config, args.cores, Path(tmp), args.data_root)
    config = args.config.resolve()
    row = {"date": time.strftime("%Y-%m-%d %H:%M"), "label": args.label, "commit": commit(),
           "config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else str(config),
           "cores": args.cores, **measured, "machine": machine()}
    print(json.dumps(row))
    if args.record is not None:
        record(row, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
