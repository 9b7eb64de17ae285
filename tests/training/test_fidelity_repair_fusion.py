"""fidelity option ``repair_fusion`` reaches every REPAIR of a run: the averagings during training (PAPA-all, the
genetic ablations' children), the soups of `papa soups` and Table 5's REPAIRed soup. ``paper``: papa's exact REPAIR;
``authors``: the scripts' fusion (papa.repair._repair_authors_, member moments in train mode)."""

import importlib

import pytest

from papa import runs
from papa.averagers import Genetic, Replace, averager_for
from papa.checkpoint import load_tensors
from tests.helpers import tiny_experiment
from tests.training.test_align_pipeline import experiment, permuted_run
from tests.training.test_fidelity_training import spy

pytestmark = pytest.mark.usefixtures("one_thread")
REPAIR = importlib.import_module("papa.repair")


def fusions(monkeypatch) -> dict[str, list]:
    """The calls of each fusion's in-place REPAIR and of member_moments (wherever it is called from)."""
    calls = {name: spy(monkeypatch, REPAIR, name) for name in ("_repair_", "_repair_authors_")}
    calls["member_moments"] = [call for module in ("papa.repair", "papa.soups", "papa.averagers")
                               for call in [spy(monkeypatch, importlib.import_module(module), "member_moments")]]
    return calls


def _check(calls: dict[str, list], setting: str) -> None:
    used, unused = ("_repair_authors_", "_repair_") if setting == "authors" else ("_repair_", "_repair_authors_")
    assert calls[used] and not calls[unused]
    want = "authors" if setting == "authors" else "exact"
    moments = [call for calls_here in calls["member_moments"] for call in calls_here]
    assert moments and all(kw.get("fusion", "exact") == want for _, kw in moments)


@pytest.mark.parametrize("setting", ["paper", "authors"])
def test_papa_all_averaging_repairs_with_the_configured_fusion(monkeypatch, tmp_path, setting):
    exp = tiny_experiment(population={"size": 3}, train={"epochs": 2}, fidelity={"repair_fusion": setting},
                          averaging={"papa-all": {"every": 1, "repair_iters": 2}})
    calls = fusions(monkeypatch)
    split = tmp_path / "split.json"
    runs.prepare(exp, split)
    runs.train(exp, "papa-all", 1, split, tmp_path / "r", progress=False)
    _check(calls, setting)
    assert len(calls["_repair_" if setting == "paper" else "_repair_authors_"]) == 1  # after epoch 1 of 2


def test_every_averager_that_repairs_carries_the_fusion():
    for setting, fusion in (("paper", "exact"), ("authors", "authors")):
        exp = tiny_experiment(fidelity={"repair_fusion": setting})
        assert averager_for("papa-all", exp).repair_fusion == fusion
        assert averager_for("papa-2", exp).repair_fusion == fusion
        exp["averaging"]["genetic"]["elitism"] = True
        genetic = averager_for("papa-2", exp)
        assert isinstance(genetic, Genetic) and isinstance(genetic, Replace) and genetic.repair_fusion == fusion
    assert averager_for("papa-all", tiny_experiment(fidelity="authors")).repair_fusion == "authors"
    assert averager_for("papa-all", tiny_experiment()).repair_fusion == "exact"


@pytest.mark.parametrize("setting", ["paper", "authors"])
def test_soups_and_table5_repair_with_the_configured_fusion(monkeypatch, tmp_path, setting):
    exp = experiment(tmp_path, "resnet20", fidelity={"repair_fusion": setting})
    run, split, _ = permuted_run(tmp_path, exp, variant="baseline")
    calls = fusions(monkeypatch)
    runs.soups(exp, split, run)
    _check(calls, setting)
    calls = fusions(monkeypatch)
    out = runs.similarity(exp, split, run)
    assert out["repaired"]
    _check(calls, setting)
    soups = load_tensors(run / "soups.safetensors")[0]  # the authors' fusion adds no bias to ResNet-20's convs
    assert ("avg_soup_repair.conv1.bias" in soups) == (setting == "paper")
    assert not any(k.endswith(".bias") and "conv" in k for k in soups) or setting == "paper"
