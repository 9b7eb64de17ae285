"""`papa export` of a segmentation run (U-Net on tiny Vaihingen tiles, trained, souped and evaluated in process): the
export and its model card give the network's test mean F1 as the run's metrics.json has it (``<soup>_f1_average``
for a soup, ``f1_members[j]['average']`` for member j), beside its pixel accuracy; a run whose files cannot be
read, or a soup and a member asked for at once, is one error and nothing written."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from papa import export, runs
from papa.checkpoint import load_tensors, save_tensors
from papa.errors import PapaError
from tests.helpers import run_cli, tiny_experiment
from tests.vaihingen_tiles import OPTIONS, write_tiles

pytestmark = pytest.mark.slow  # trains a population

NETWORKS = {"avg_soup_repair": ["--soup", "avg_soup_repair"], "avg_soup": ["--soup", "avg_soup"],
            "member 0": ["--member", "0"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> Path:
    """A baseline run of two U-Nets, two epochs on 48 patches of the tiny tiles: enough for distinct F1 scores."""
    root = tmp_path_factory.mktemp("segmentation-export")
    tiles = write_tiles(root / "vaihingen")
    exp = tiny_experiment(
        data={"dataset": "vaihingen", "root": str(tiles), "options": {**OPTIONS, "epoch_size": 48}},
        model={"name": "unet", "kwargs": {"width": 4, "depth": 2}}, population={"size": 2},
        train={"epochs": 2, "batch_size": 4, "optimizer": {"lr": 0.05}},
        augment={"grid": {"mixup": [0.0], "label_smoothing": [0.0], "cutmix": [0.0], "random_erasing": [0.0]}})
    runs.prepare(exp, root / "split.json")
    runs.train(exp, "baseline", 1, root / "split.json", root / "run", progress=False)
    runs.soups_and_metrics(exp, root / "split.json", root / "run")
    return root / "run"


def cli(capsys, *args: str) -> tuple[int, str, str]:
    return run_cli(capsys, "export", *args)


def test_the_networks_f1_scores_differ(run):
    """The scores the tests below look up are distinct, so a wrong key would show (the greedy soups here are one
    member: that member's scores)."""
    m = json.loads((run / "metrics.json").read_text())
    f1 = [m["avg_soup_repair_f1_average"], m["avg_soup_f1_average"], m["mean_f1_average"],
          m["ensemble_f1_average"], *(f["average"] for f in m["f1_members"])]
    assert len(set(f1)) == len(f1), f1


@pytest.mark.parametrize("network", NETWORKS)
def test_the_export_and_its_card_give_the_test_mean_f1_of_metrics_json(run, tmp_path, network, capsys):
    out = tmp_path / "export"
    code, stdout, stderr = cli(capsys, "--run", str(run), *NETWORKS[network], "--out", str(out))
    assert code == 0 and stderr == ""
    m = json.loads((run / "metrics.json").read_text())
    if network == "member 0":
        f1, accuracy = m["f1_members"][0]["average"], m["members"][0]
    else:
        f1, accuracy = m[f"{network}_f1_average"], m[network]
    assert stdout == (f"{out}: {network} of tiny/baseline/seed1 (unet), test pixel accuracy {accuracy:.2f}%; "
                      "REPAIR's biases of 10 layers folded into BatchNorms\n" if network.endswith("_repair") else
                      f"{out}: {network} of tiny/baseline/seed1 (unet), test pixel accuracy {accuracy:.2f}%\n")

    described = export.read_spec(out)["network"]
    assert described["metric"] == "pixel accuracy" and described["test_accuracy"] == accuracy
    assert described["test_f1_average"] == f1  # the very number, through JSON
    card = (out / "README.md").read_text()
    assert f"| Test mean F1 | {f1:.2f}% |\n" in card
    assert f"| Test pixel accuracy | {accuracy:.2f}% (metrics.json of the run) |\n" in card
    matter = yaml.safe_load(card.split("---\n")[1])
    assert matter["pipeline_tag"] == "image-segmentation"
    assert matter["model-index"][0]["results"][0]["metrics"][0]["type"] == "pixel_accuracy"


def test_a_soup_and_a_member_at_once_are_refused(run, tmp_path):
    """The command's --soup and --member exclude each other; the library says so too, before writing anything."""
    with pytest.raises(PapaError, match="^give a soup or a member, not both$"):
        export.export(run, tmp_path / "export", soup="avg_soup", member=0)
    assert list(tmp_path.iterdir()) == []


def _population_without_config(run: Path) -> None:
    tensors, meta = load_tensors(run / "population.safetensors")
    save_tensors(run / "population.safetensors", tensors, {k: v for k, v in meta.items() if k != "config"})


BAD = {
    "population-without-config": (_population_without_config,
                                  "population.safetensors: no experiment config in its metadata (not written by "
                                  "`papa train`?)"),
    "metrics-not-json": (lambda r: (r / "metrics.json").write_text('{"members": [1.0,'), "metrics.json: unreadable ("),
    "metrics-not-text": (lambda r: (r / "metrics.json").write_bytes(b"\xff\xfe{}"), "metrics.json: unreadable ("),
}


@pytest.mark.parametrize("case", BAD)
def test_unreadable_run_files_are_one_line_and_write_nothing(run, tmp_path, case, capsys):
    change, needle = BAD[case]
    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    change(bad)
    before = sorted(tmp_path.rglob("*"))
    code, stdout, stderr = cli(capsys, "--run", str(bad), "--out", str(tmp_path / "export"))
    assert code == 2 and stdout == ""
    assert stderr.startswith(f"papa export: error: {bad}/") and stderr.count("\n") == 1 and needle in stderr, stderr
    assert sorted(tmp_path.rglob("*")) == before
