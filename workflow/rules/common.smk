"""Config checks, the run lock, paths and per-step resources shared by the rules (no rules here)."""

import fcntl
import hashlib
import os
import re
import sys
from pathlib import Path

from snakemake.cli import get_argument_parser

from papa.config import (check_averaging_fires, deep_merge, experiment, job_configs, load_yaml, missing_data,
                         workflow_config, write_configs)
from papa.errors import DiskError, PapaError
from papa.io import write_error
from papa.report import plan


def fail(message, status=2):
    """Stop before any job, with the one line `papa` itself would print, and exit 2 (4 for a write the file
    system refused, as `papa`; Snakemake would add a traceback, or its 30-line schema dump)."""
    print(f"papa: error: {message}", file=sys.stderr)
    sys.exit(status)


# the default config only when none is given (Snakemake would otherwise merge the two); read by papa first, so
# that malformed YAML is one line naming the file and the line (a --configfile is read by Snakemake itself,
# before this file runs: docs/troubleshooting.md)
if not workflow.overwrite_configfiles:
    try:
        load_yaml("config/config.yaml")
    except PapaError as e:
        fail(e)

    configfile: "config/config.yaml"


# One config file; `--config KEY=VALUE` overrides of its top-level keys are validated like the file, and the
# report's jobs then read the file with the overrides written in (CONFIGFILE, under the results directory); a
# run's jobs read its experiment's own config file (JOB_CONFIGS, <results>/<experiment>/config.yaml), so a run
# that several configs share is trained once. These files are written only once this run holds the run lock
# (below), never by a dry run: a dry run or a refused run beside a running one must not change what the running
# one's jobs read. At `scale: smoke` (papa/smoke.py) the config is shrunk and results and reports go to their
# own directories. The same checks, defaults and one-line messages as `papa` (papa.config, from papa/schemas/).
try:
    _effective, CONFIGFILE, _CONFIG_FILES = workflow_config(workflow.configfiles, workflow.config_settings.config)
    plan.check(_effective, str(workflow.configfiles[0]))
except PapaError as e:
    fail(e)
config.clear()
config.update(_effective)


# one run of this workflow at a time in this directory: an exclusive lock on .snakemake/papa-run.lock, held by
# this process until it ends (the kernel drops it when the process dies, however it dies). Holding it proves
# that any Snakemake directory lock left in .snakemake/locks/ is stale (a run killed by SIGKILL, OOM or a lost
# node), so it is cleared: the same command then resumes (the profile reruns incomplete outputs, and training
# resumes from its last checkpoint). Dry runs, --lint, --unlock and the other commands that run no job take no
# lock; jobs on a cluster node (non-main processes) neither.
INFO_ONLY = ("dryrun", "lint", "unlock", "list_rules", "list_target_rules", "dag", "rulegraph", "filegraph",
             "d3dag", "summary", "detailed_summary", "list_changes", "list_input_changes", "list_params_changes",
             "list_untracked", "cleanup_metadata", "cleanup_shadow", "archive", "export_cwl", "containerize",
             "generate_unit_tests", "debug_dag", "list_conda_envs", "conda_create_envs_only", "print_compilation")


def runs_jobs():
    """Whether this Snakemake command can run jobs (its own command line, as Snakemake parses it)."""
    if not workflow.is_main_process:
        return False
    try:
        args, _ = get_argument_parser().parse_known_args(sys.argv[1:])
    except (SystemExit, Exception):  # not the snakemake command line (Snakemake's API called from Python)
        return True
    return not any(getattr(args, name, None) for name in INFO_ONLY)


def hold_run_lock(state=Path(".snakemake")):
    """Take the run lock (exit in one line when another run holds it), then clear stale Snakemake locks."""
    state.mkdir(exist_ok=True)
    fd = os.open(state / "papa-run.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        fail(f"another run of this workflow (process {holder}) is running in {Path.cwd()}; wait for it to "
             "finish, or stop it, then run the same command again")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    stale = sorted((state / "locks").glob("*.lock"))
    for f in stale:
        f.unlink(missing_ok=True)
    if stale:
        print(f"papa: cleared the directory lock left by an earlier run that was stopped ({len(stale)} files); "
              "resuming", file=sys.stderr)
    return fd  # kept open, hence locked, until this process exits


RUNS_JOBS = runs_jobs()
RUN_LOCK = hold_run_lock() if RUNS_JOBS else None

# `--sdm apptainer` runs every job in this image; null selects the project image (lint needs one)
CONTAINER = config["container"] or "containers/papa.sif"

RESULTS = config["results"]
# smoke runs (papa/smoke.py) keep their results, reports and logs apart from full-scale ones
REPORTS = "reports/smoke" if config["scale"] == "smoke" else "reports"
LOGS = "logs/smoke" if config["scale"] == "smoke" else "logs"
SPLIT = f"{RESULTS}/{{experiment}}/split.json"
RUN = f"{RESULTS}/{{experiment}}/{{variant}}/seed{{seed}}"
METRICS = f"{RESULTS}/metrics.csv"
BENCH = f"{RESULTS}/benchmarks"

# only what the tables and figures show is trained (all experiments x variants when they show nothing)
RUNS = plan.runs(config)
SEEDS = config["seeds"]
TABLES = [t["name"] for t in config["tables"]]
FIGURES = [f["name"] for f in config["figures"]]


def _alternatives(names):
    return "|".join(map(re.escape, names)) or "(?!)"


# before any job starts: averaging that can never happen in a run to train, data that is not there
try:
    for _experiment, _variant in RUNS:
        check_averaging_fires(experiment(config, _experiment, CONFIGFILE), _variant, where=CONFIGFILE)
except PapaError as e:
    fail(e)


wildcard_constraints:
    experiment=_alternatives(config["experiments"]),
    variant=_alternatives(config["variants"]),
    seed=r"\d+",
    table=_alternatives(TABLES),
    figure=_alternatives(FIGURES),


def all_metrics():
    """metrics.json of every run to train, and similarity.json of those a similarity table shows."""
    metrics = [f"{RESULTS}/{e}/{v}/seed{s}/metrics.json" for e, v in RUNS for s in SEEDS]
    return metrics + [f"{RESULTS}/{e}/{v}/seed{s}/similarity.json" for e, v in plan.similarity_runs(config)
                      for s in SEEDS]


def check_data():
    """Fail now, not in each of a dataset's jobs, when an experiment with outputs still to make has no data (a
    dry run only plans: it may plan for data still to come, e.g. `papa fake-data`)."""
    for name in config["experiments"]:
        todo = [f for f in all_metrics() if f.startswith(f"{RESULTS}/{name}/") and not os.path.exists(f)]
        problem = todo and missing_data(experiment(config, name, CONFIGFILE))
        if problem:
            fail(f"{CONFIGFILE}: experiment {name!r}: {problem}; put the data there (docs/data.md) or set data_root")


if RUNS_JOBS:
    check_data()

# written once every check has passed (a refused config leaves nothing behind), by a run holding the run lock
try:
    JOB_CONFIGS, _JOB_FILES = job_configs(workflow.configfiles, workflow.config_settings.config, config)
    if RUNS_JOBS:
        write_configs(_CONFIG_FILES | _JOB_FILES)
except PapaError as e:
    fail(e)
except OSError as e:
    if write_error(e) is None:
        raise
    fail(write_error(e), DiskError.status)

# what the report's jobs read of the config: a param, so that a table or figure is drawn again when the config
# file's content changes (the file itself is no input: a dry run plans without writing it)
CONFIG_SHA256 = hashlib.sha256(
    _CONFIG_FILES[CONFIGFILE].encode() if CONFIGFILE in _CONFIG_FILES else Path(CONFIGFILE).read_bytes()).hexdigest()


def job_config(wildcards):
    """The config file a run's jobs read: its experiment's (see JOB_CONFIGS)."""
    return JOB_CONFIGS[wildcards.experiment]


def histories(wildcards):
    """history.csv of every run a `curves` figure plots."""
    figure = next(f for f in config["figures"] if f["name"] == wildcards.figure)
    if figure["kind"] != "curves":
        return []
    pairs = plan.figure_runs(figure, config["variants"])
    return [f"{RESULTS}/{e}/{v}/seed{s}/history.csv" for e, v in sorted(pairs) for s in SEEDS]


# per-step defaults; config `resources.<step>` and `resources.experiments.<name>.<step>` override them
RESOURCES = {
    "prepare": {"threads": 1, "mem_mb": 2000, "runtime": 10, "gpu": 0},
    "train": {"threads": 4, "mem_mb": 4000, "runtime": 60, "gpu": 0},
    "soups": {"threads": 2, "mem_mb": 4000, "runtime": 30, "gpu": 0},
    "similarity": {"threads": 2, "mem_mb": 4000, "runtime": 30, "gpu": 0},
}


def res(step, key):
    """A resource of one step for the job's experiment (a function of the wildcards)."""

    def get(wildcards):
        per_experiment = config["resources"].get("experiments", {}).get(wildcards.experiment, {})
        return {**RESOURCES[step], **config["resources"].get(step, {}), **per_experiment.get(step, {})}[key]

    return get


def settings(step):
    """The experiment's own config entries a step's output depends on, as a param: Snakemake reruns the
    step (and what follows) when they change. prepare: data; train: all but soups and similarity; soups:
    soups; similarity: similarity."""

    def get(wildcards):
        own = deep_merge(config["defaults"], config["experiments"][wildcards.experiment] or {})
        if step in ("prepare", "soups", "similarity"):
            return own.get({"prepare": "data", "soups": "soups", "similarity": "similarity"}[step], {})
        return {k: v for k, v in own.items() if k not in ("description", "soups", "similarity")}

    return get
