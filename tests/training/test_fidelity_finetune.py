"""``fidelity.finetune_normalization`` and ``finetune_freeze``: fine-tuning as the authors' scripts are written
(SamsungSAILMontreal/PAPA at 47ad83a) against the paper's §4.2. The scripts normalize CIFAR with CIFAR's mean/std
(data/cifar100.py), not the pretrained network's, and their linear probing freezes the body at epoch 0
(main.py:159-161) but never unfreezes it (main.py:163 compares the integer epoch with 0.04): the head alone trains
for the whole run."""

import pytest
import torch

from papa import runs, smoke
from papa.data.datasets import CIFAR100_MEAN, CIFAR100_STD
from papa.models.pretrained import TIMM_CACHE, pretrained_normalization
from papa.train import Trainer, head_only
from tests.helpers import tiny_experiment
from tests.training.test_finetune import TINY_TIMM, pretrained_source, save_state
from tests.unit.test_data import write_cifar

pytestmark = pytest.mark.usefixtures("one_thread")
EVA = "timm/eva02_tiny_patch14_224.mim_in22k"  # pretrained with CLIP's mean/std, not CIFAR's


@pytest.mark.parametrize("setting", ["paper", "authors"])
def test_pretrained_models_see_cifar_normalization_under_authors_only(tmp_path, setting):
    write_cifar(tmp_path, "cifar100", per_file=10)
    exp = {"data": {"dataset": "cifar100", "root": str(tmp_path), "image_size": None, "options": {}},
           "model": {"name": EVA, "pretrained": TIMM_CACHE}, "fidelity": {"finetune_normalization": setting}}
    splits = runs.load_data(exp)
    clip = pretrained_normalization(EVA, TIMM_CACHE)
    assert clip[0] != pytest.approx(CIFAR100_MEAN)  # the two readings differ for this model
    expected = (CIFAR100_MEAN, CIFAR100_STD) if setting == "authors" else clip
    for part in (splits, splits.train, splits.test):
        assert (part.mean, part.std) == (pytest.approx(expected[0]), pytest.approx(expected[1]))
    # what the run records for export follows the same statistics
    assert runs.input_spec(exp, splits)["input"]["mean"] == pytest.approx(expected[0])


def test_head_only_epochs_by_setting():
    exp = tiny_experiment(train={"epochs": 5, "freeze_epochs": 2})
    assert [head_only(exp, e) for e in range(5)] == [True, True, False, False, False]
    exp["fidelity"]["finetune_freeze"] = "authors"
    assert [head_only(exp, e) for e in range(5)] == [True] * 5  # frozen at epoch 0, never unfrozen
    exp["train"]["freeze_epochs"] = 0  # --linear_prob_time 0: no freezing at all
    assert not any(head_only(exp, e) for e in range(5))


def test_smoke_events_list_no_unfreeze_under_authors():
    exp = tiny_experiment(train={"epochs": 4, "freeze_epochs": 1})
    assert "unfreeze" in smoke.events(exp, 10)
    exp["fidelity"]["finetune_freeze"] = "authors"
    assert "unfreeze" not in smoke.events(exp, 10)


@pytest.mark.parametrize("setting", ["paper", "authors"])
def test_the_body_stays_pretrained_for_the_whole_run_under_authors(tmp_path, setting):
    """Two epochs, one of them head-only by train.freeze_epochs, with PAPA-all averaging after the first: under
    ``authors`` the body (weights, not BatchNorm statistics) ends exactly as pretrained, averaging included,
    while the head trains; under ``paper`` the second epoch moves the body."""
    write_cifar(tmp_path / "data", "cifar10", per_file=24)
    source = pretrained_source()
    save_state(source, tmp_path / "pretrained.safetensors")
    exp = tiny_experiment(
        data={"dataset": "cifar10", "root": str(tmp_path / "data"), "image_size": 24},
        model={"name": f"timm/{TINY_TIMM}", "pretrained": str(tmp_path / "pretrained.safetensors")},
        population={"size": 2},
        train={"epochs": 2, "freeze_epochs": 1, "batch_size": 16, "optimizer": {"name": "adamw", "lr": 1e-3}},
        averaging={"papa-all": {"every": 1, "from_start": True, "repair": False}},
        fidelity={"finetune_freeze": setting},
    )
    exp["model"]["kwargs"] = {}  # TINY's digits_cnn width
    splits = runs.load_data(exp)
    split = {"train": list(range(64)), "val": list(range(64, 80))}
    trainer = Trainer(exp, "papa-all", 1, splits, split, progress=False)
    head_before = trainer.pop.params["fc.weight"].clone()
    trainer.fit()
    assert any(r["phase"] == "after_avg" for r in trainer.progress.history)
    body = [n for n, v in source.state_dict().items()
            if not n.startswith("fc.") and v.is_floating_point() and not n.endswith(("running_mean", "running_var"))]
    kept = [n for n in body if all(torch.equal(trainer.pop.params[n][j], source.state_dict()[n]) for j in range(2))]
    assert not torch.equal(trainer.pop.params["fc.weight"], head_before)
    if setting == "authors":
        assert kept == body
    else:
        assert not kept
