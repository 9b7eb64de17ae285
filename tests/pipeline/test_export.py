"""`papa export`, papa.load_soup and papa.load_model on a tiny run made by the real pipeline stages (prepare, train,
soups --evaluate on digits): the exported network scores metrics.json's test accuracy when read back with plain
torch, and bad input (no such run, soup or member; stale soups or metrics; an --out that is no export) is one
line, exit status 2 and nothing written."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import papa
from papa import export, runs
from papa.checkpoint import load_tensors, save_tensors
from papa.errors import PapaError
from papa.soups import SOUPS
from tests.helpers import REPO, tiny_experiment, write_config
from tests.helpers import papa as papa_cli

pytestmark = pytest.mark.slow  # trains a population through the pipeline's commands

SMALL = {"population": {"size": 2}, "train": {"epochs": 1, "batch_size": 256}}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """results/tiny/papa/seed1 of a config with one tiny digits experiment, as the workflow's rules make it."""
    root = tmp_path_factory.mktemp("export")
    config = write_config(root / "config.yaml", SMALL)
    split, out = root / "split.json", root / "run"
    papa_cli("prepare", "--config", str(config), "--out", str(split), check=True)
    papa_cli("train", "--config", str(config), "--variant", "papa", "--seed", "1", "--split", str(split), "--out",
             str(out), check=True)
    papa_cli("soups", "--config", str(config), "--split", str(split), "--run", str(out), "--evaluate", check=True)
    return out


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``papa export ARGS`` in this process (the command's own error handling, without a start-up per call)."""
    from papa.cli import main

    code = main(["export", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _accuracy_with_plain_torch(folder: Path, model: torch.nn.Module) -> float:
    """Test accuracy (%) on the digits test set, normalized as the export's config.json says."""
    spec = json.loads((folder / "config.json").read_text())
    splits = runs.load_data(tiny_experiment(**SMALL))
    mean = torch.tensor(spec["input"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(spec["input"]["std"]).view(1, -1, 1, 1)
    x = (splits.test.images.float() / 255 - mean) / std
    assert list(x.shape[1:]) == [spec["input"]["channels"], *spec["input"]["size"]]
    with torch.no_grad():
        predictions = model(x).argmax(1)
    return (predictions == splits.test.labels).double().mean().item() * 100


@pytest.mark.parametrize("which", [[], ["--soup", "avg_soup_repair"], ["--soup", "greedy_soup"], ["--member", "1"]])
def test_exported_network_scores_the_test_accuracy_of_metrics_json(run, tmp_path, which, capsys):
    out = tmp_path / "export"
    if not which:  # the command itself once, as a user runs it
        stdout = papa_cli("export", "--run", str(run), "--out", str(out), check=True).stdout
    else:
        code, stdout, _ = cli(capsys, "--run", str(run), *which, "--out", str(out))
        assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    key = which[1] if which and which[0] == "--soup" else "greedy_soup_repair"
    expected = metrics["members"][1] if which[:1] == ["--member"] else metrics[key]
    assert stdout.count("\n") == 1 and f"test accuracy {expected:.2f}%" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".*"))  # no temporary folder left

    # the architecture's own tensors: a freshly built digits_cnn loads them with strict=True
    stock = papa.models.create_model("digits_cnn", num_classes=10, in_channels=1, width=8)
    stock.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    assert _accuracy_with_plain_torch(out, stock.eval()) == expected
    assert _accuracy_with_plain_torch(out, papa.load_model(out)) == expected

    spec = export.read_spec(out)
    n = spec["network"]
    assert (n["experiment"], n["variant"], n["seed"], n["population"]) == ("tiny", "papa", 1, 2)
    assert n["test_accuracy"] == expected and n["aligned"] is False  # the run did not align its members
    if which[:1] == ["--member"]:  # its validation accuracy, as measured for the greedy soup
        assert n["val_accuracy"] == metrics["val_members"][1] is not None
    if key == "avg_soup_repair" and which[:1] != ["--member"]:
        assert n["members"] == [0, 1] and n["repaired"]
        # REPAIR gave both convolutions a bias; both are folded into their BatchNorms
        assert spec["biases"] == {"folded": {"conv1": ["bn1"], "conv2": ["bn2"]}, "kept": [], "note": ""}
    assert spec["classes"] == [str(d) for d in range(10)] and spec["kwargs"] == {"width": 8}
    assert spec["versions"]["torch"] == torch.__version__.split("+")[0]
    assert spec["run"]["population_sha256"] == metrics["population_sha256"]

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "pytorch" and front["license"] == "mit"
    assert front["pipeline_tag"] == "image-classification" and "papa" in front["tags"]
    assert front["model-index"][0]["results"][0]["metrics"][0]["value"] == round(expected, 4)
    for needle in ("`tiny`", "| Variant | papa |", "| Seed | 1 |", f"{expected:.2f}%", "std = [", "width=8",
                   "Transactions on Machine Learning Research", "  dataset: digits\n"):
        assert needle in card, needle
    from papa.provenance import describe

    assert spec["code"] == metrics["code"] and f"- papa code: {describe(metrics['code'])}\n" in card


def test_load_model_gives_the_dtype_asked_for(run, tmp_path):
    export.export(run, tmp_path / "export")
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model, wide = papa.load_model(tmp_path / "export"), papa.load_model(tmp_path / "export", dtype=torch.float64)
    assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {torch.float32}
    assert {t.dtype for t in wide.state_dict().values() if t.is_floating_point()} == {torch.float64}
    with torch.no_grad():
        torch.testing.assert_close(wide(x.double()).float(), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", ["drop", "add"])
def test_load_model_refuses_weights_that_do_not_fit_the_architecture(run, tmp_path, change):
    out = tmp_path / "export"
    export.export(run, out)
    tensors = load_file(out / "model.safetensors")
    if change == "drop":
        del tensors["linear.weight"]
    else:
        tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(PapaError, match=r"model\.safetensors: does not fit digits_cnn \(Error\(s\) in loading"):
        papa.load_model(out)


def test_load_soup_gives_the_soup_the_pipeline_evaluated(run):
    exp = tiny_experiment(**SMALL)
    opened = runs.open_run(exp, run.parent / "split.json", run)
    tensors, _ = load_tensors(run / "soups.safetensors")
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for name in SOUPS:
        pipeline = opened.pop.module_from_state({k[len(name) + 1:]: v for k, v in tensors.items()
                                                 if k.startswith(f"{name}.")}).eval()
        soup = papa.load_soup(run, name, device="cpu")
        assert not soup.training and soup.conv1.bias is None  # the stock architecture, REPAIR's biases folded
        with torch.no_grad():
            torch.testing.assert_close(soup(x), pipeline(x), rtol=1e-5, atol=1e-5)
    assert papa.load_soup(run).state_dict().keys() == soup.state_dict().keys()  # default: greedy_soup_repair


def test_a_run_trained_before_population_json_recorded_its_input_exports_the_same(run, tmp_path):
    """Runs whose population.json has no ``input``/``classes`` (written before they were recorded): the export
    reads them off the dataset instead and writes the same description."""
    old = tmp_path / "run"
    shutil.copytree(run, old)
    tensors, meta = load_tensors(old / "population.safetensors")
    save_tensors(old / "population.safetensors", tensors, {k: v for k, v in meta.items()
                                                          if k not in ("input", "classes", "versions")})
    exp = tiny_experiment(**SMALL)
    runs.soups_and_metrics(exp, run.parent / "split.json", old)  # the soups of the rewritten population
    files = export.read_run(old)
    assert "input" not in files.meta
    assert export.run_spec(files) == export.run_spec(export.read_run(run))


def test_an_earlier_export_is_replaced(run, tmp_path, capsys):
    out = tmp_path / "export"
    assert cli(capsys, "--run", str(run), "--member", "0", "--out", str(out))[0] == 0
    assert cli(capsys, "--run", str(run), "--soup", "avg_soup", "--out", str(out))[0] == 0
    assert export.read_spec(out)["network"]["soup"] == "avg_soup"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# bad input -----------------------------------------------------------------------------------------------------
def _stale_soups(run: Path) -> None:
    """The population retrained (here: one tensor changed) after the soups were made."""
    tensors, meta = load_tensors(run / "population.safetensors")
    tensors["linear.bias"] = tensors["linear.bias"] + 1
    save_tensors(run / "population.safetensors", tensors, meta)


def _stale_metrics(run: Path) -> None:
    """The soups remade (here: one tensor changed) after metrics.json was computed."""
    tensors, meta = load_tensors(run / "soups.safetensors")
    tensors["avg_soup.linear.bias"] = tensors["avg_soup.linear.bias"] + 1
    save_tensors(run / "soups.safetensors", tensors, meta)


BAD = {
    "no-such-run": (lambda r: shutil.rmtree(r), [], "no such run directory"),
    "not-trained": (lambda r: (r / "population.safetensors").unlink(), [], "run `papa train`"),
    "no-metrics": (lambda r: (r / "metrics.json").unlink(), [], "run `papa evaluate`"),
    "no-such-soup": (lambda r: None, ["--soup", "best_soup"], "no soup 'best_soup'"),
    "no-such-member": (lambda r: None, ["--member", "2"], "no member 2: the population"),
    "negative-member": (lambda r: None, ["--member", "-1"], "no member -1"),
    "stale-soups": (_stale_soups, [], "soups.safetensors is stale"),
    "stale-metrics": (_stale_metrics, [], "metrics.json is stale"),
    "out-is-not-an-export": (lambda r: None, ["--out", "{notes}"], "exists and is not a papa export"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, case, capsys):
    change, args, needle = BAD[case]
    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    change(bad)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    args = [a.replace("{notes}", str(notes)) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "export")]
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    code, stdout, stderr = cli(capsys, "--run", str(bad), *args, *out)
    assert code == 2 and stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("papa export: error: ") and needle in lines[0], stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert (notes / "mine.txt").read_text() == "keep me"


def test_the_model_card_cites_the_paper_as_the_readme_does():
    from papa.card import BIBTEX

    readme = (REPO / "README.md").read_text()
    assert f"```bibtex\n{BIBTEX}\n```" in readme


def test_the_command_itself_refuses_in_one_line(tmp_path):
    result = papa_cli("export", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "export"))
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr == f"papa export: error: {tmp_path / 'nowhere'}: no such run directory\n"
    assert sorted(tmp_path.iterdir()) == []
