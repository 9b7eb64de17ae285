"""Every paper config (and the default one, for its figures), end to end at smoke scale (docs/smoke.md), through
Snakemake, on data from `papa fake-data` (slow; CI runs it): prepare, train, soups and evaluate, similarity,
aggregate, render and plot, with the real
loaders and the real timm architectures loaded from the fake hub cache. Each config must finish, every
metrics.json (and similarity.json) must have every key, and every table must show a value in every cell of
its paper CSV.

CI smoke-runs every config, in two halves side by side (``HALF``: one per `make test` worker, tests/conftest.py),
each half in order in its own working directory, so runs shared by several configs of a half train once. Of
those configs CI trains a covering subset of the runs, chosen by one rule (``tests.smoke_configs.covering_runs``,
which `make smoke SMOKE_ARGS=--cover` applies to every config): runs an earlier config trained come free, then
the run exercising the most things not yet exercised (a model, dataset, variant, averaging scheme, ablation,
option or pipeline path: ``tests.smoke_configs.features``) is trained, until none adds one; a curves figure trains
every run it plots; a config whose runs add nothing still trains its first run. Its tables are then rendered
from the runs trained and, for each run not trained, a stand-in: the metrics of the nearest trained run (same
experiment, else model and dataset, else dataset), relabelled (``tests.smoke_configs.stand_ins``). So every cell of
every table is checked to render a value, every row and column finding its run, while the numbers in the cells of
runs CI does not train are their stand-ins'; `make smoke` trains them all.

``test_ci_covers_every_feature_of_every_config`` checks that these runs still cover every model, dataset,
variant, averaging scheme, ablation and pipeline path of the configs.
"""

from functools import cache
from pathlib import Path

import pytest
import yaml

from papa import config as cfg
from papa.report import plan
from tests import smoke_configs as smoke

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "config" / "paper"
# the paper's configs, and the default one (the only config with figures: the plot step)
PATHS = {p.stem: p for p in PAPER.glob("*.yaml")} | {"config": ROOT / "config" / "config.yaml"}
ORDER = ["a10", "a10-bundled", "a10-readings", "table1", "table1_imagenet", "table1_finetune", "table3", "table5",
         "tables10-11", "table12", "table13", "tables6-9", "table2", "table18", "tables14-17", "figure2", "config"]
# CI smoke-runs every config, in two halves side by side (one per `make test` worker: tests/conftest.py), each
# in its own working directory: configs that share runs (an experiment of the same name) are in one half.
HALF = {"a10": "a", "a10-bundled": "a", "a10-readings": "a", "table1": "a", "table1_imagenet": "a", "table3": "a",
        "tables10-11": "a", "table13": "a", "tables6-9": "a", "table2": "a", "table18": "a", "config": "a",
        "table1_finetune": "b", "table5": "b", "table12": "b", "tables14-17": "b", "figure2": "b"}
CI = [name for name in ORDER if name in HALF]


@cache
def _config(name: str) -> dict:
    return cfg.load_config(PATHS[name])


@cache
def _selection() -> dict[str, list[tuple[str, str]]]:
    """The runs CI trains for every config (see the module docstring): a greedy cover of every feature."""
    return smoke.covering_runs([(name, _config(name)) for name in CI])


def ci_runs(name: str) -> list[tuple[str, str]]:
    """The (experiment, variant) pairs CI trains for config ``name``."""
    return _selection()[name]


def test_ci_covers_every_feature_of_every_config():
    everything, covered = set(), set()
    for name in CI:
        config = _config(name)
        chosen = set(ci_runs(name))
        for pair in plan.runs(config):
            found = smoke.run_features(config, pair)
            everything |= found
            if pair in chosen:
                covered |= found
    assert sorted(everything - covered, key=str) == []
    assert {f[1] for f in covered if f[0] == "model"} >= {
        "timm/convit_tiny.fb_in1k", "timm/eva02_tiny_patch14_224.mim_in22k", "timm/tf_efficientnetv2_s.in21k",
        "resnet50", "unet", "resnet20"}
    assert sorted(PATHS) == sorted(ORDER) == sorted(CI)
    assert all(ci_runs(name) for name in CI)  # every config's tables and figures are rendered


def test_configs_sharing_runs_are_in_one_half():
    """Each half trains in its own working directory: a run one config shares with another (same experiment
    name) must be trained in the half that renders both."""
    for name in CI:
        for other in CI:
            if set(_config(name)["experiments"]) & set(_config(other)["experiments"]):
                assert HALF[name] == HALF[other], (name, other)


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    work = tmp_path_factory.mktemp("smoke")
    data, hub = smoke.fake_data(work, [PATHS[name] for name in CI])
    return work, data, hub


@pytest.mark.slow
@pytest.mark.parametrize("name", CI)
def test_paper_config_at_smoke_scale(fake, name):
    work, data, hub = fake
    pairs = ci_runs(name)
    summary = smoke.run_config(work, PATHS[name], data, hub, cores=2,
                               pairs=None if pairs == plan.runs(_config(name)) else pairs)
    print(summary.line())
    assert summary.returncode == 0, summary.log[-5000:]
    assert summary.problems == []
    assert summary.rendered == summary.tables and summary.plotted == summary.figures
    # the weights of experiments no later config uses: gigabytes over the configs (full-size architectures)
    later = smoke.later_experiments([_config(other) for other in CI], CI.index(name))
    smoke.prune_weights(work, smoke.smoke_config(PATHS[name], data), later)


# the workflow's --config overrides ----------------------------------------------------------------------
def test_workflow_runs_a_config_at_smoke_scale_from_the_command_line(tmp_path):
    from tests.pipeline.test_workflow import job_counts, snakemake

    done = snakemake(tmp_path, "--dry-run", "--printshellcmds", "--config", "scale=smoke",
                     f"data_root={tmp_path / 'fake'}", configfile=PAPER / "table1_finetune.yaml")
    assert job_counts(done.stdout) == {"prepare": 3, "train": 12, "soups": 12, "aggregate": 1,
                                       "render_table": 2, "all": 1}  # one seed
    assert "results/smoke/cifar100-convitti-ft-p5/papa-all/seed1/metrics.json" in done.stdout
    assert "reports/smoke/table1-finetune.md" in done.stdout and "results/metrics.csv" not in done.stdout
    # what the jobs read: the report's the config with the overrides written in, a run's its experiment's own
    assert "papa render --config results/smoke/table1_finetune.yaml " in done.stdout
    # a dry run writes nothing (tests/pipeline/test_workflow.py: a live run writes these files once it holds its
    # lock); what it would write:
    assert not (tmp_path / "results").exists()
    overrides = {"scale": "smoke", "data_root": str(tmp_path / "fake")}
    config, jobs, files = cfg.workflow_config([PAPER / "table1_finetune.yaml"], overrides)
    paths, job_files = cfg.job_configs([PAPER / "table1_finetune.yaml"], overrides, config)
    assert jobs == "results/smoke/table1_finetune.yaml"
    written = yaml.safe_load(files[jobs])
    assert written["scale"] == "smoke" and written["data_root"] == str(tmp_path / "fake")
    own = "results/smoke/cifar100-convitti-ft-p5/config.yaml"
    assert paths["cifar100-convitti-ft-p5"] == own
    assert f"papa train --config {own} --experiment cifar100-convitti-ft-p5 " in done.stdout
    (tmp_path / own).parent.mkdir(parents=True)
    (tmp_path / own).write_text(job_files[own])
    written = cfg.load_yaml(tmp_path / own)
    assert list(written["experiments"]) == ["cifar100-convitti-ft-p5"] and "tables" not in written
    assert written["scale"] == "smoke" and written["data_root"] == str(tmp_path / "fake")
    # the run's experiment as the whole config defines it
    assert (cfg.experiment(cfg.load_config(tmp_path / own), "cifar100-convitti-ft-p5")
            == cfg.experiment(cfg.load_config(PAPER / "table1_finetune.yaml", overrides), "cifar100-convitti-ft-p5"))


def test_workflow_refuses_a_bad_override(tmp_path):
    from tests.pipeline.test_workflow import snakemake

    for override, named in (("scale=tiny", "tiny"), ("colour=red", "colour")):
        done = snakemake(tmp_path, "--dry-run", "--config", override, configfile=PAPER / "a10.yaml", check=False)
        assert done.returncode != 0 and named in done.stdout + done.stderr, done.stderr
    assert not (tmp_path / "results").exists()


def test_prune_weights_deletes_only_the_weights_of_experiments_not_kept(tmp_path):
    config = {"results": "results/smoke", "experiments": {"a": {}, "b": {}}}
    for exp in ("a", "b"):
        run = tmp_path / "results" / "smoke" / exp / "papa" / "seed1"
        run.mkdir(parents=True)
        (run / "population.safetensors").write_bytes(b"x" * 10)
        (run / "soups.safetensors").write_bytes(b"y" * 5)
        (run / "metrics.json").write_text("{}")
    assert smoke.prune_weights(tmp_path, config, keep={"b"}) == 15
    left = sorted(str(p.relative_to(tmp_path / "results" / "smoke")) for p in tmp_path.rglob("*.*"))
    assert left == ["a/papa/seed1/metrics.json", "b/papa/seed1/metrics.json", "b/papa/seed1/population.safetensors",
                    "b/papa/seed1/soups.safetensors"]
