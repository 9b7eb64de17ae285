"""The authors' averaging options in a real training run (issue 13): Table 14's GreedySoup averaging, the
genetic selection of Table 16, REPAIR's layer set and greedy criterion reaching the trainer, bf16 only on CUDA,
and bicubic resizing."""

import importlib
from pathlib import Path

import pandas as pd
import pytest
import torch

from papa import averaging, runs
from papa.averagers import Genetic, averager_for
from papa.data import eval_batches
from papa.data.augment import eval_transform
from papa.train import Trainer
from tests.helpers import tiny_experiment

pytestmark = pytest.mark.usefixtures("one_thread")
REPAIR = importlib.import_module("papa.repair")


@pytest.fixture(scope="module")
def split_path(tmp_path_factory, one_thread) -> Path:
    path = tmp_path_factory.mktemp("fidelity") / "split.json"
    runs.prepare(tiny_experiment(), path)
    return path


def spy(monkeypatch, owner, name: str) -> list:
    calls, original = [], getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def test_greedy_averaging_replaces_every_member_by_the_greedy_soup(monkeypatch, split_path, tmp_path):
    """Table 14's GreedySoup row: after each averaging every member holds the greedy soup of the population
    (judged on the validation split), REPAIRed toward the moments of the members it averages."""
    exp = tiny_experiment(population={"size": 4}, train={"epochs": 3},
                          averaging={"papa-all": {"scheme": "greedy", "every": 1, "repair_iters": 2}})
    mixes = spy(monkeypatch, averaging, "mix_")
    repairs = spy(monkeypatch, importlib.import_module("papa.averagers"), "repair_population_")
    runs.train(exp, "papa-all", 1, split_path, tmp_path / "r", progress=False)
    history = pd.read_csv(tmp_path / "r" / "history.csv")
    assert len(mixes) == 2 and len(repairs) == 2
    for k, ((_, matrix, *_), _) in enumerate(mixes):
        matrix = torch.as_tensor(matrix)
        assert (matrix == matrix[0]).all()  # every member the same soup
        kept = matrix[0].nonzero().flatten().tolist()
        assert torch.allclose(matrix[0][kept], torch.full((len(kept),), 1 / len(kept), dtype=torch.float64))
        before = history[(history.phase == "before_avg") & (history.epoch == k + 1)]
        assert int(before.val_accuracy.to_numpy().argmax()) in kept  # the greedy soup starts from the best
        assert torch.equal(torch.as_tensor(repairs[k][0][1]), matrix)


def test_genetic_elitism_in_training_scores_repaired_children_by_validation_loss(monkeypatch, split_path, tmp_path):
    exp = tiny_experiment(population={"size": 5}, train={"epochs": 2},
                          averaging={"papa-2": {"every": 1, "repair_iters": 2},
                                     "genetic": {"tournament": True, "elitism": True}})
    scored = spy(monkeypatch, importlib.import_module("papa.averagers"), "select")
    children = spy(monkeypatch, importlib.import_module("papa.averagers"), "repair_population_")
    t = Trainer(exp, "papa-2", 1, runs.load_data(exp), runs.load_split(split_path), progress=False)
    assert isinstance(t.averager, Genetic)
    t.fit()
    ((args, _),) = scored
    p, losses = args[0], args[1]
    assert p == 5 and len(losses) == 5 and all(x > 0 for x in losses)  # validation losses, not accuracies
    # REPAIR of the 10 = min(6p, p(p-1)/2) children, then of the survivors
    assert [len(call[0][1]) for call in children] == [10, 5]


def test_config_options_reach_the_averager():
    exp = tiny_experiment(repair={"layers": "conv"}, soups={"greedy_criterion": ">"},
                          averaging={"papa-all": {"from_start": True, "every": 5}})
    a = averager_for("papa-all", exp)
    assert (a.repair_layers, a.greedy_criterion, a.from_start) == ("conv", ">", True)
    assert [e for e in range(1, 12) if a.due_after_epoch(e, 12)] == [1, 5, 10]
    default = averager_for("papa-2", tiny_experiment())
    assert (default.repair_layers, default.greedy_criterion, default.from_start) == ("conv+linear", ">=", False)


@pytest.mark.parametrize("window", [(0.0, 1.0), (0.25, 0.75)])
def test_push_steps_authors_pushes_as_the_scripts_count(monkeypatch, split_path, tmp_path, window):
    """``fidelity.push_steps: authors``: PAPA pushes after the 1st, 5th and 9th step of every epoch of 11 with f = 4
    (main.py:169, 200: the step's 0-based index within its epoch a multiple of f), inside the window; ``paper``
    after every 4th step of the run."""
    pushed = {}
    original = Trainer.push

    def push(trainer, *args, **kwargs):
        pushed.setdefault(trainer.exp["fidelity"]["push_steps"], []).append(trainer.progress.step)
        return original(trainer, *args, **kwargs)

    monkeypatch.setattr(Trainer, "push", push)
    for setting in ("paper", "authors"):
        exp = tiny_experiment(population={"size": 2}, train={"epochs": 3, "batch_size": 128},
                              fidelity={"push_steps": setting},
                              averaging={"window": list(window), "papa": {"every": 4, "alpha": 0.9}})
        runs.train(exp, "papa", 1, split_path, tmp_path / setting, progress=False)
    lo, hi = window[0] * 33, window[1] * 33  # 3 epochs of 1409 // 128 = 11 steps
    assert pushed["authors"] == [s for e in range(3) for s in (11 * e + 1, 11 * e + 5, 11 * e + 9) if lo < s <= hi]
    assert pushed["paper"] == [s for s in range(4, 34, 4) if lo < s <= hi]


def test_last_batch_authors_trains_every_image_of_each_epoch(split_path):
    """``fidelity.last_batch: authors``: the 1409 training images at batch 100 are 15 steps an epoch, the last of
    9 (the scripts' DataLoader), and the cosine counts those steps; ``paper``: 14 steps of 100."""
    from papa.build import lr_factor

    assert len(runs.load_split(split_path)["train"]) == 1409
    for setting, steps, sizes in (("paper", 14, [100] * 14), ("authors", 15, [100] * 14 + [9])):
        exp = tiny_experiment(population={"size": 2}, train={"epochs": 2, "batch_size": 100},
                              fidelity={"last_batch": setting})
        t = Trainer(exp, "baseline", 1, runs.load_data(exp), runs.load_split(split_path), progress=False)
        engine, seen = t.engine, []
        t.engine = lambda pop, x, *rest, engine=engine, seen=seen: seen.append(x.shape[:2]) or engine(pop, x, *rest)
        t.fit()
        assert seen == [(2, b) for b in sizes * 2] and t.progress.step == 2 * steps
        assert t.scheduler.lr_lambdas[0](7) == lr_factor(exp, 7, steps) != lr_factor(exp, 7, 29 - steps)


def test_repair_layers_reach_repair_during_training(monkeypatch, split_path, tmp_path):
    exp = tiny_experiment(train={"epochs": 2}, repair={"layers": "conv"},
                          averaging={"papa-all": {"every": 1, "repair_iters": 2}})
    calls = spy(monkeypatch, importlib.import_module("papa.averagers"), "repair_population_")
    runs.train(exp, "papa-all", 1, split_path, tmp_path / "r", progress=False)
    assert [kw["layers"] for _, kw in calls] == ["conv"]


@pytest.mark.parametrize(("precision", "enabled"), [("fp32", False), ("bf16", True), ("bf16-cuda", False)])
def test_bf16_cuda_precision_is_fp32_on_the_cpu(split_path, precision, enabled):
    exp = tiny_experiment(train={"precision": precision, "epochs": 1})
    t = Trainer(exp, "baseline", 1, runs.load_data(exp), runs.load_split(split_path), progress=False)
    assert t.autocast()._enabled is enabled


def test_bicubic_resize_reaches_the_batches():
    exp = tiny_experiment(data={"image_size": 16, "resize": "bicubic"})
    splits = runs.load_data(exp)
    assert splits.train.resize == splits.test.resize == "bicubic"
    x, _ = next(eval_batches(splits.test, range(8), 8, "cpu"))
    images = splits.test.images[:8]
    cubic = eval_transform(images, splits.test.mean, splits.test.std, 16, "bicubic")
    linear = eval_transform(images, splits.test.mean, splits.test.std, 16, "bilinear")
    assert torch.equal(x, cubic) and not torch.allclose(cubic, linear)
