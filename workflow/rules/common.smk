"""Config checks, paths and per-step resources shared by the rules (no rules here)."""

import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from papa.config import deep_merge, workflow_config
from papa.errors import PapaError
from papa.report import plan

# workflow/schemas/config.schema.yaml is a symlink to the package schema (one source of truth; a `$ref`
# would validate but not fill defaults: jsonschema swaps in its stock validator at the referenced `$schema`)
validate(config, "../schemas/config.schema.yaml")
# One config file; `--config KEY=VALUE` overrides of its top-level keys are validated like the file, and the
# papa jobs then read the file with the overrides written in (CONFIGFILE, under the results directory). At
# `scale: smoke` (papa/smoke.py) the config is shrunk and results and reports go to their own directories.
try:
    _effective, CONFIGFILE = workflow_config(workflow.configfiles, workflow.config_settings.config)
    plan.check(_effective, str(workflow.configfiles[0]))
except PapaError as e:
    raise WorkflowError(str(e)) from None
config.clear()
config.update(_effective)

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
    "evaluate": {"threads": 2, "mem_mb": 4000, "runtime": 30, "gpu": 0},
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
