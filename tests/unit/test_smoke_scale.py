"""Smoke scale (papa/smoke.py, docs/smoke.md) and top-level config overrides (`--config KEY=VALUE`).

The rule applies to any experiment of any config: these tests run it over every experiment of every paper
config and check what it must keep (architectures, image sizes, variants, schemes, every scheduled event)
and what it must shrink, then the overrides, the subset of a dataset and the workflow's handling of both.
"""

import os
from pathlib import Path

import pytest
import torch
import yaml

from papa import config as cfg
from papa import smoke
from papa.data import ArrayDataset, Policy
from papa.errors import PapaError
from tests.helpers import tiny_experiment, write_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted([*(ROOT / "config" / "paper").glob("*.yaml"), ROOT / "config" / "config.yaml"])


def _pairs(path: Path):
    full = cfg.load_config(path)
    small = cfg.load_config(path, {"scale": "smoke"})
    for name in full["experiments"]:
        yield name, cfg.experiment(full, name, path), cfg.experiment(small, name, path)


def _steps(exp: dict) -> int:
    return smoke.PATCH_STEPS if "epoch_size" in exp["data"]["options"] else smoke._steps_per_epoch(exp)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_smoke_scale_keeps_what_the_run_is_and_every_event_it_has(path):
    for name, full, small in _pairs(path):
        # kept: the architecture, its weights, input size, the optimizer and schedule kind, averaging schemes,
        # augmentations, averaging windows, milestones, alignment and genetic settings
        for key in ("model",):
            assert small[key] == full[key], name
        assert small["data"]["dataset"] == full["data"]["dataset"]
        assert small["data"]["image_size"] == full["data"]["image_size"]
        assert small["train"]["optimizer"] == full["train"]["optimizer"]
        assert {k: v for k, v in small["train"]["schedule"].items() if k != "restart_every"} == {
            k: v for k, v in full["train"]["schedule"].items() if k != "restart_every"}
        assert small["augment"]["grid"] == full["augment"]["grid"]
        assert small["averaging"]["window"] == full["averaging"]["window"]
        assert small["averaging"]["genetic"] == full["averaging"]["genetic"]
        for variant in ("papa", "papa-all", "papa-2"):
            a, b = small["averaging"][variant], full["averaging"][variant]
            assert {k: v for k, v in a.items() if k not in ("every", "repair_iters")} == {
                k: v for k, v in b.items() if k not in ("every", "repair_iters")}, name
        # shrunk: a few items, small batches, few epochs and members
        assert small["data"]["subset"] == smoke.SUBSET
        assert small["train"]["batch_size"] == min(full["train"]["batch_size"], smoke.MAX_BATCH)
        assert small["population"]["size"] == min(full["population"]["size"], smoke.MAX_POPULATION)
        assert smoke.MIN_EPOCHS <= small["train"]["epochs"] <= min(full["train"]["epochs"], 5), name
        assert small["averaging"]["papa-all"]["repair_iters"] == smoke.MAX_REPAIR_ITERS
        # every scheduled event of the full run happens at smoke scale
        assert set(smoke.events(full, None)) <= set(smoke.events(small, _steps(small))), name
        assert small["scale"] == "smoke" and full["scale"] == "full"


def test_config_level_smoke_scale():
    config = cfg.load_config(ROOT / "config" / "paper" / "a10.yaml", {"scale": "smoke"})
    assert config["seeds"] == [1] and config["results"] == str(Path("results") / "smoke")
    assert config["tables"][0]["caption"].startswith("Smoke scale")
    assert cfg.load_config(ROOT / "config" / "paper" / "a10.yaml")["seeds"] == list(range(1, 11))


def _smoke(**experiment) -> dict:
    raw = {"scale": "smoke", "experiments": {"x": experiment}}
    return cfg.experiment(cfg.validate(raw, "config", "test"), "x", "test")


def test_events_that_need_more_epochs_get_them():
    late = _smoke(train={"epochs": 300}, averaging={"window": [0.75, 1.0]})
    assert late["train"]["epochs"] == 5  # epoch 4 is the only averaging epoch after 75%, before the last
    assert {"papa-all averaging", "papa-2 averaging", "PAPA push"} <= set(smoke.events(late, _steps(late)))
    swa = _smoke(train={"epochs": 450, "swa": {"start": 0.5, "lr": 0.05}})
    assert swa["train"]["epochs"] == 4 and "papa-all averaging during SWA" in smoke.events(swa, _steps(swa))
    before = _smoke(train={"epochs": 450, "swa": {"start": 0.5, "lr": 0.05}}, averaging={"window": [0.0, 0.5]})
    assert "papa-all averaging during SWA" not in smoke.events(before, _steps(before))  # as at full scale
    tuned = _smoke(train={"epochs": 50, "freeze_epochs": 2, "schedule": {"restart_every": 25}},
                   averaging={"papa-all": {"every": 20}})
    t = tuned["train"]
    assert t["freeze_epochs"] == 1 and t["schedule"]["restart_every"] == 1 and t["epochs"] == 2
    assert {"unfreeze", "warm restart"} <= set(smoke.events(tuned, _steps(tuned)))
    swa_epochs = _smoke(train={"epochs": 100, "swa": {"start": 75, "lr": 0.05, "anneal_epochs": 10}})
    assert swa_epochs["train"]["swa"]["start"] < swa_epochs["train"]["epochs"]


def test_an_event_is_one_that_happens_inside_the_run():
    """Unfreezing, a warm restart and the SWA start are events only when they fall after the first epoch begins
    and before the last ends; under ``fidelity.finetune_freeze: authors`` the body never unfreezes."""
    def found(train: dict, **experiment) -> set[str]:
        return set(smoke.events(tiny_experiment(train={"epochs": 6, **train}, **experiment), None))

    assert "unfreeze" in found({"freeze_epochs": 5})
    assert "unfreeze" not in found({"freeze_epochs": 6}) | found({"freeze_epochs": 0})
    assert "unfreeze" not in found({"freeze_epochs": 2}, fidelity={"finetune_freeze": "authors"})
    assert "warm restart" in found({"schedule": {"restart_every": 5}})
    assert "warm restart" not in found({"schedule": {"restart_every": 6}})
    assert "SWA start" in found({"swa": {"start": 1, "lr": 0.05}})
    assert "SWA start" in found({"swa": {"start": 0.75, "lr": 0.05}})


def test_pushes_and_patches_fit_a_smoke_epoch():
    exp = _smoke(averaging={"papa": {"every": 50}})
    assert exp["averaging"]["papa"]["every"] == _steps(exp)
    tiles = _smoke(data={"dataset": "vaihingen", "options": {"patch_size": 256, "epoch_size": 10000}},
                   train={"batch_size": 10})
    assert tiles["data"]["options"] == {"patch_size": smoke.MAX_PATCH, "epoch_size": smoke.PATCH_STEPS * 2}
    default_tiles = _smoke(data={"dataset": "vaihingen"})  # the loader's defaults are shrunk too
    assert default_tiles["data"]["options"]["patch_size"] == smoke.MAX_PATCH
    dart = _smoke(population={"size": 5}, augment={"members": [{"cutout": k} for k in range(1, 6)]})
    assert [m["cutout"] for m in dart["augment"]["members"]] == [1, 2, 3]


def test_patch_datasets_are_the_loaders_with_patch_options_and_their_default_side():
    import inspect

    from papa.catalog import DATASETS
    from papa.data import LOADERS

    found = {}
    for name, loader in LOADERS.items():
        params = inspect.signature(loader).parameters
        assert ("epoch_size" in params) == ("patch_size" in params), name
        if "patch_size" in params:
            found[name] = params["patch_size"].default
    assert found == {name: d.patch_size for name, d in DATASETS.items() if d.patch_size is not None}


def test_a_config_at_smoke_scale_loads_without_torch(tmp_path):
    """The Snakefile and papa render / aggregate load the config at smoke scale: torch would add seconds to each."""
    import subprocess
    import sys

    code = ("import sys; from papa.config import load_config\n"
            "for path in sys.argv[2:]: load_config(path, {'scale': 'smoke', 'data_root': sys.argv[1]})\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    paths = [str(p) for p in sorted((ROOT / "config").rglob("*.yaml"))]
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path), *paths], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr[-500:])


def test_an_event_no_smoke_run_can_keep_is_one_line():
    with pytest.raises(PapaError, match=r"experiment 'x': at smoke scale.*papa-all averaging"):
        _smoke(train={"epochs": 1000}, averaging={"window": [0.99, 1.0]})


# top-level overrides ----------------------------------------------------------------------------------------
def test_overrides_are_validated_like_the_file(tmp_path):
    path = write_config(tmp_path / "c.yaml")
    config = cfg.load_config(path, {"scale": "smoke", "data_root": "/elsewhere", "seeds": ["4", "5"]})
    assert config["seeds"] == [4] and config["data_root"] == "/elsewhere"
    assert cfg.experiment(config, "tiny")["data"]["root"] == "/elsewhere/digits"
    with pytest.raises(PapaError, match=r"c\.yaml with --config scale=tiny: scale: 'tiny' is not one of full, smoke"):
        cfg.load_config(path, {"scale": "tiny"})
    with pytest.raises(PapaError, match=r"with --config colour=red: \(top level\): unknown key 'colour'"):
        cfg.load_config(path, {"colour": "red"})
    with pytest.raises(PapaError, match=r"with --config seeds=\['x'\]: seeds\.0: 'x' is not of type 'integer'"):
        cfg.load_config(path, {"seeds": ["x"]})
    raw = yaml.safe_load(path.read_text())
    raw["seeds"] = "1"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(PapaError, match=r"^[^ ]*c\.yaml: seeds: '1' is not of type 'array'"):  # the file's own error
        cfg.load_config(path, {"scale": "smoke"})


def test_workflow_config_plans_the_jobs_config_only_with_overrides(tmp_path, monkeypatch):
    """workflow_config writes nothing (the workflow writes its files once it holds the run lock, never in a dry
    run); write_configs rewrites a file only when its content changes."""
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path / "c.yaml")
    config, jobs, files = cfg.workflow_config([path], {})
    assert jobs == str(path) and config["scale"] == "full" and files == {}
    config, jobs, files = cfg.workflow_config([path], {"scale": "smoke", "data_root": "fake"})
    assert Path(jobs) == Path("results/smoke/c.yaml") and config["results"] == "results/smoke"
    assert list(files) == [jobs] and not Path(jobs).exists()
    cfg.write_configs(files)
    written = yaml.safe_load(Path(jobs).read_text())
    assert written["scale"] == "smoke" and written["data_root"] == "fake"
    assert cfg.load_config(jobs)["experiments"] == config["experiments"]
    os.utime(jobs, (0, 0))
    cfg.write_configs(cfg.workflow_config([path], {"scale": "smoke", "data_root": "fake"})[2])
    assert Path(jobs).stat().st_mtime == 0  # unchanged: not rewritten, so nothing downstream reruns
    cfg.write_configs(cfg.workflow_config([path], {"scale": "smoke", "data_root": "other"})[2])
    assert Path(jobs).stat().st_mtime > 0
    with pytest.raises(PapaError, match="exactly one config file"):
        cfg.workflow_config([path, path], {})


def test_job_configs_hold_one_experiment_each_at_a_path_of_the_experiment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path / "c.yaml")
    config = cfg.load_config(path, {"scale": "smoke", "data_root": "fake"})
    jobs, files = cfg.job_configs([path], {"scale": "smoke", "data_root": "fake"}, config)
    assert sorted(jobs) == sorted(config["experiments"]) and sorted(files) == sorted(jobs.values())
    assert not list(tmp_path.glob("results/**/*.yaml"))  # planned, not written
    cfg.write_configs(files)
    for name, job in jobs.items():
        assert Path(job) == Path("results/smoke") / name / "config.yaml"
        written = yaml.safe_load(Path(job).read_text())
        assert list(written["experiments"]) == [name] and not set(cfg.REPORT_KEYS) & set(written)
        assert written["scale"] == "smoke" and written["data_root"] == "fake"
        assert cfg.experiment(cfg.load_config(job), name) == cfg.experiment(config, name)
    # another config file naming the same experiments: the same paths (no rerun), rewritten only when changed
    other = tmp_path / "other.yaml"
    other.write_text(path.read_text())
    job = next(iter(jobs.values()))
    os.utime(job, (0, 0))
    cfg.write_configs(cfg.job_configs([path], {"scale": "smoke", "data_root": "fake"}, config)[1])
    assert Path(job).stat().st_mtime == 0
    assert cfg.job_configs([other], {"scale": "smoke", "data_root": "fake"}, config)[0] == jobs

# data.subset --------------------------------------------------------------------------------------------
def test_subsets_are_evenly_spaced_and_keep_the_fixed_split(tmp_path):
    from papa.data import load_dataset
    from papa.data.subset import spaced, subset_splits
    from tests.unit.test_data import write_cifar
    from tests.vaihingen_tiles import OPTIONS, write_tiles

    assert spaced(10, 4) == [0, 3, 6, 9] and spaced(3, 5) == [0, 1, 2] and spaced(7, 1) == [0]
    write_cifar(tmp_path, "cifar10", per_file=8)
    full = load_dataset("cifar10", tmp_path)
    small = subset_splits(full, train=6, test=4)
    assert len(small.train) == 6 and len(small.test) == 4
    assert torch.equal(small.train.images[1], full.train.images[spaced(40, 6)[1]])
    tiles = load_dataset("vaihingen", write_tiles(tmp_path / "v"), **OPTIONS)
    cut = subset_splits(tiles, train=2, val=1, test=1)
    assert cut.train.tiles == (1, 7, 5) and cut.test.tiles == (2,)
    assert cut.fixed_split == {"train": [0, 1], "val": [2]}
    assert torch.equal(cut.train.labels[2], tiles.train.labels[3])


def test_subset_of_an_image_folder_spans_its_classes(tmp_path):
    from PIL import Image

    from papa.data import load_dataset
    from papa.data.subset import subset_splits

    for part in ("train", "val"):
        for c in range(4):
            (tmp_path / part / f"c{c}").mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 20), (60 * c, i, 0)).save(tmp_path / part / f"c{c}" / f"{i}.jpg")
    small = subset_splits(load_dataset("imagenet", tmp_path, image_size=16), train=4, test=2)
    assert small.train.labels.tolist() == [0, 1, 2, 3] and len(small.train.folder.samples) == 4
    assert small.test.labels.tolist() == [0, 3] and small.num_classes == 4


def test_periods_are_rescaled_by_rounding_at_sizes_where_floor_and_ceiling_disagree():
    """A period of v of the full run's E epochs becomes max(1, round(v * e / E)) of the smoke run's e epochs: here
    e = 5 (the window [0.75, 1] of 300 epochs needs it) and v * e / E = 1.67, 2.17, 1.33 and 1.58, where a floor
    (1, 2, 1, 1) or a ceiling (2, 3, 2, 2) would give other periods than rounding (2, 2, 1, 2)."""
    exp = _smoke(train={"epochs": 300, "freeze_epochs": 100, "schedule": {"restart_every": 130}},
                 averaging={"window": [0.75, 1.0], "papa-all": {"every": 80}, "papa-2": {"every": 95}})
    assert exp["train"]["epochs"] == 5
    assert exp["train"]["freeze_epochs"] == 2 and exp["train"]["schedule"]["restart_every"] == 2
    assert exp["averaging"]["papa-all"]["every"] == 1 and exp["averaging"]["papa-2"]["every"] == 2


@pytest.mark.parametrize("last_batch", ["paper", "authors"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("fraction", [0.02, 0.4, 0.42])
def test_the_smoke_push_period_is_the_steps_of_a_smoke_epoch_as_training_counts_them(fraction, batch, last_batch):
    """PAPA's push period is capped at the steps of one smoke epoch, counted as training will: the validation split
    held out of the 6 items (round(f * 6), at least 1: 2.4 -> 2 and 2.52 -> 3, where a ceiling or a floor would
    hold out another count), the incomplete last batch dropped or, with ``fidelity.last_batch: authors``, kept."""
    from papa.data import make_split
    from papa.data.stream import MemberStream

    exp = _smoke(data={"val_fraction": fraction}, train={"batch_size": batch}, averaging={"papa": {"every": 50}},
                 fidelity={"last_batch": last_batch})
    train = make_split(smoke.SUBSET["train"], fraction)["train"]
    stream = MemberStream(ArrayDataset(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), torch.zeros(6, dtype=torch.int64),
                                       2, (0.0,), (1.0,), "six"), train, batch, [Policy()], seed=0,
                          keep_last=last_batch == "authors")
    assert exp["averaging"]["papa"]["every"] == stream.steps_per_epoch == _steps(exp)
