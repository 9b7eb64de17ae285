"""Every piece of state a run carries survives a stop and a resume, bit for bit: each variant stopped at an
epoch boundary (right after that epoch's averaging, push or SWA update) and in the middle of an epoch (right
after a push), with a model that has dropout (the global RNG state matters mid-epoch), and runs whose state
includes momentum and Adam moments, the scheduler, PAPA's push counter, the averaging generation (mutations),
SWA's running averages and the frozen body of fine-tuning.

A stop is what SLURM asks for: SIGUSR1 delivered to this process while the data stream yields the chosen batch;
`papa train`'s stage (runs.train) checkpoints and raises Stopped, the same call resumes, and the population,
its sidecar and history.csv must equal those of an uninterrupted run byte for byte."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from papa import runs
from papa.config import deep_merge
from papa.data.stream import MemberStream
from papa.models.registry import MODELS
from papa.train import Stopped
from tests.helpers import tiny_experiment

pytestmark = pytest.mark.usefixtures("one_thread")  # small convolutions lose with threads on busy cores

OUTPUTS = ("population.safetensors", "population.json", "history.csv")
STEPS = 5  # per epoch: 1409 training images in batches of 256 (a sixth of 129 with fidelity.last_batch: authors)


def dropout_cnn(num_classes: int, in_channels: int = 1, width: int = 4) -> nn.Module:
    """conv (no bias) -> BatchNorm -> ReLU -> pool -> dropout -> linear: a tiny digits model with dropout."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(width * 16, num_classes))


BASE = {"model": {"name": "dropout_cnn", "kwargs": {"width": 4}}, "population": {"size": 2},
        "train": {"epochs": 3, "batch_size": 256}, "augment": {"per_batch": True}}
RUNS = {
    # name: (variant, experiment overrides)
    "baseline": ("baseline", {}),
    "papa": ("papa", {"averaging": {"papa": {"every": 2, "alpha": 0.8}}}),
    "papa-all": ("papa-all", {"averaging": {"papa-all": {"every": 1, "repair_iters": 2}}}),
    "papa-2-mutations": ("papa-2", {"averaging": {"papa-2": {"every": 1, "repair_iters": 2},
                                                  "genetic": {"mutation_std": 0.01}}}),
    "papa-all-swa-adamw-finetune": ("papa-all", {
        "train": {"epochs": 4, "freeze_epochs": 1, "optimizer": {"name": "adamw", "lr": 0.01},
                  "schedule": {"restart_every": 2}, "swa": {"start": 2, "lr": 0.005, "anneal_epochs": 1}},
        "averaging": {"papa-all": {"every": 1, "repair_iters": 2}}}),
    "papa-authors-last-batch": ("papa", {"averaging": {"papa": {"every": 2, "alpha": 0.8}},
                                         "fidelity": {"last_batch": "authors", "push_steps": "authors"}}),
}
# (run, epoch, batch): the signal arrives while batch ``batch`` (0-based) of epoch ``epoch`` (0-based) is drawn
STOPS = [
    ("baseline", 0, STEPS - 1), ("baseline", 1, 2),
    ("papa", 1, STEPS - 1), ("papa", 1, 2),  # after epoch 2 (step 10, a push), and right after the push at step 8
    ("papa-all", 0, STEPS - 1), ("papa-all", 1, 1),  # right after the first averaging, and mid-epoch after it
    ("papa-2-mutations", 0, STEPS - 1), ("papa-2-mutations", 1, 3),  # averagings (mutations) follow both
    ("papa-all-swa-adamw-finetune", 0, STEPS - 1),  # the end of the frozen epoch
    ("papa-all-swa-adamw-finetune", 2, STEPS - 1),  # the first SWA update and an averaging of the SWA averages
    ("papa-all-swa-adamw-finetune", 3, 1),  # mid-epoch during SWA, after a warm restart
    ("papa-authors-last-batch", 1, STEPS - 1),  # right after a push (steps 1, 3, 5 of 6), the short batch to come
    ("papa-authors-last-batch", 0, STEPS),  # after it: the epoch's end
]


def steps(name: str) -> int:
    """A run's steps per epoch."""
    return STEPS + (RUNS[name][1].get("fidelity", {}).get("last_batch") == "authors")


@pytest.fixture(scope="module")
def registered():
    """The dropout model in the registry, for this module only."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(MODELS, "dropout_cnn", dropout_cnn)
        yield


@pytest.fixture(scope="module")
def split_path(tmp_path_factory, registered) -> Path:
    path = tmp_path_factory.mktemp("resume") / "split.json"
    runs.prepare(tiny_experiment(**BASE), path)
    return path


@pytest.fixture(scope="module")
def references(split_path, one_thread) -> dict:
    """Uninterrupted runs, made once each on first use."""
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            variant, overrides = RUNS[name]
            made[name] = split_path.parent / "reference" / name
            runs.train(experiment(name), variant, 1, split_path, made[name], progress=False)
        return made[name]

    return get


def experiment(name: str) -> dict:
    return tiny_experiment(**deep_merge(BASE, RUNS[name][1]))


def signal_at(monkeypatch, epoch: int, batch: int) -> None:
    original = MemberStream.epoch

    def epoch_with_signal(stream, e):
        for i, item in enumerate(original(stream, e)):
            if (e, i) == (epoch, batch):
                os.kill(os.getpid(), signal.SIGUSR1)
            yield item

    monkeypatch.setattr(MemberStream, "epoch", epoch_with_signal)


@pytest.mark.parametrize(("name", "epoch", "batch"), STOPS, ids=[f"{n}-e{e}-b{b}" for n, e, b in STOPS])
def test_stop_and_resume_is_bit_identical(references, split_path, tmp_path, monkeypatch, name, epoch, batch):
    variant, _ = RUNS[name]
    exp, out = experiment(name), tmp_path / "run"
    signal_at(monkeypatch, epoch, batch)
    with pytest.raises(Stopped):
        runs.train(exp, variant, 1, split_path, out, progress=False)
    meta = json.loads((out / "checkpoint.json").read_text())
    boundary = batch == steps(name) - 1
    assert (meta["epoch"], meta["batch"]) == ((epoch + 1, 0) if boundary else (epoch, batch + 1))
    assert meta["step"] == epoch * steps(name) + batch + 1
    assert not [f for f in OUTPUTS[:2] if (out / f).exists()]  # history.csv holds the finished epochs so far
    monkeypatch.undo()

    runs.train(exp, variant, 1, split_path, out, progress=False)
    reference = references(name)
    for f in OUTPUTS:
        assert (out / f).read_bytes() == (reference / f).read_bytes(), f
    assert not list(out.glob("checkpoint*"))


def test_the_runs_exercise_the_state_they_claim(references, split_path):
    """The reference runs do what the stops rely on: dropout acts in training, PAPA-all averages after every
    epoch but the last, the SWA run ends with its SWA phase, the authors' last batch makes 6 steps an epoch."""
    import pandas as pd

    model = dropout_cnn(10)
    model.train()
    x = torch.randn(4, 1, 8, 8)
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.equal(a, model(x))
    history = pd.read_csv(references("papa-all") / "history.csv")
    assert sorted(set(history[history.phase == "after_avg"].epoch)) == [1, 2]
    history = pd.read_csv(references("papa-all-swa-adamw-finetune") / "history.csv")
    assert sorted(set(history[history.phase == "after_avg"].epoch)) == [1, 2, 3]
    assert list(history[history.phase == "swa"].epoch) == [4, 4]
    meta = json.loads((references("papa-authors-last-batch") / "population.json").read_text())
    assert meta["steps"] == 3 * steps("papa-authors-last-batch") == 18
