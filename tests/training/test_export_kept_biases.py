"""`papa export` of a REPAIRed soup whose REPAIR biases cannot all be folded: a tiny timm ViT without query-key-value
biases (trained on digits in process), REPAIRed on its linear layers too, gets a ``blocks.0.attn.qkv`` bias no
BatchNorm takes. The command says, on a second line, which layers keep a bias and that papa.load_model reads the
export, and papa.load_model gives back the soup's outputs."""

import json

import pytest
import torch

import papa
from papa import export, runs
from papa.cli import main
from tests.helpers import tiny_experiment

pytestmark = pytest.mark.slow  # trains a population

VIT = {"img_size": 8, "patch_size": 4, "depth": 1, "qkv_bias": False}


def test_the_export_of_a_soup_that_keeps_biases_says_so(tmp_path, capsys, one_thread):
    exp = tiny_experiment(population={"size": 2}, train={"epochs": 1, "batch_size": 256},
                          augment={"grid": {"mixup": [0.0], "label_smoothing": [0.0], "cutmix": [0.0],
                                            "random_erasing": [0.0]}})
    exp["model"] = exp["model"] | {"name": "timm/test_vit", "kwargs": VIT}
    run = tmp_path / "run"
    runs.prepare(exp, tmp_path / "split.json")
    runs.train(exp, "baseline", 1, tmp_path / "split.json", run, progress=False)
    runs.soups_and_metrics(exp, tmp_path / "split.json", run)
    capsys.readouterr()

    out = tmp_path / "export"
    assert main(["export", "--run", str(run), "--soup", "avg_soup_repair", "--out", str(out)]) == 0
    stdout, stderr = capsys.readouterr()
    accuracy = json.loads((run / "metrics.json").read_text())["avg_soup_repair"]
    assert stderr == "" and stdout.splitlines() == [
        f"{out}: avg_soup_repair of tiny/baseline/seed1 (timm/test_vit), test accuracy {accuracy:.2f}%",
        f"{out}: kept the biases REPAIR gave 1 layers (blocks.0.attn.qkv): they feed no BatchNorm alone; load it "
        "with papa.load_model"]
    assert export.read_spec(out)["biases"] == {"folded": {}, "kept": ["blocks.0.attn.qkv"], "note": ""}
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(papa.load_model(out)(x), papa.load_soup(run, "avg_soup_repair")(x))
