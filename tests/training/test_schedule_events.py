"""Every scheduled event of a run, counted over whole runs that cross epoch boundaries, against the count and
the steps that the paper's Algorithm 1 gives for the config: PAPA's pushes (every f optimizer steps, the step
counter running across epochs: "ntotal←ntotal+ 1; ifntotalis divisible by f then ..."), with 1 - alpha scaled by
the learning rate of that step; PAPA-all's and PAPA-2's averaging and REPAIR at the end of every k-th epoch but
the last; averaging windows; SWA's updates; the frozen body of fine-tuning; warm restarts and multistep decays.

The expected steps are computed here from the config. Events are observed from outside the trainer: every
optimizer step through torch's global optimizer hooks (the step count, the learning rate it used, which
parameters it moved), and calls of the library functions the trainer uses (papa.averaging, papa.repair,
papa.swa) through counting wrappers, plus the history.csv a run writes."""

import importlib
import inspect
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from papa import averaging, runs, swa
from papa.data.stream import MemberStream
from papa.errors import PapaError
from tests.helpers import tiny_experiment

pytestmark = pytest.mark.usefixtures("one_thread")  # small convolutions lose with threads on busy cores

REPAIR = importlib.import_module("papa.repair")  # the module: the package exports a function of that name
N_TRAIN = 1408  # digits: 1437 training images less the 2% validation split


class Events:
    """What happens during a run, step by step. ``steps``: optimizer steps so far; ``lrs[s]``: the learning
    rate step s + 1 used; ``moved[s]``: for each parameter tensor of the optimizer, whether step s + 1 changed
    it; ``calls``: (name, step, arguments by parameter name) of every watched library call, ``step`` being
    the optimizer steps done before it."""

    def __init__(self, monkeypatch, moves: bool = False):
        self.steps, self.lrs, self.moved, self.calls = 0, [], [], []
        self._monkeypatch, self._before = monkeypatch, None

        def pre(opt, args, kwargs):
            self.lrs.append(opt.param_groups[0]["lr"])
            if moves:
                self._before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]

        def post(opt, args, kwargs):
            self.steps += 1
            if moves:
                after = [p for g in opt.param_groups for p in g["params"]]
                self.moved.append([not torch.equal(a, b) for a, b in zip(self._before, after, strict=True)])

        self._handles = [register_optimizer_step_pre_hook(pre),
                         register_optimizer_step_post_hook(post)]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def watch(self, owner, name: str) -> None:
        """Record every call of ``owner.name``, wherever a papa module holds that function (a module that
        imported it by name included)."""
        original = getattr(owner, name)
        signature = inspect.signature(original)

        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            self.calls.append((name, self.steps, dict(bound.arguments)))
            return original(*args, **kwargs)

        if isinstance(owner, type):
            self._monkeypatch.setattr(owner, name, wrapper)
            return
        for module in [m for key, m in sys.modules.items() if key == "papa" or key.startswith("papa.")]:
            for attr, value in list(vars(module).items()):
                if value is original:
                    self._monkeypatch.setattr(module, attr, wrapper)

    def at(self, name: str) -> list[int]:
        """The steps at which ``name`` was called."""
        return [step for n, step, _ in self.calls if n == name]

    def args(self, name: str) -> list[dict]:
        return [args for n, _, args in self.calls if n == name]


@pytest.fixture
def events(monkeypatch):
    recorder = Events(monkeypatch)
    yield recorder
    recorder.close()


@pytest.fixture
def moves(monkeypatch):
    recorder = Events(monkeypatch, moves=True)
    yield recorder
    recorder.close()


@pytest.fixture(scope="module")
def split_path(tmp_path_factory, one_thread) -> Path:
    path = tmp_path_factory.mktemp("schedule") / "split.json"
    runs.prepare(tiny_experiment(), path)
    return path


def logreg(**overrides) -> dict:
    """TINY with logistic regression (the cheapest model; events do not depend on it)."""
    exp = tiny_experiment(model={"name": "logreg"}, **overrides)
    exp["model"]["kwargs"] = {}
    return exp


def train(exp: dict, variant: str, split_path: Path, tmp_path: Path) -> pd.DataFrame:
    """Run `papa train`'s stage; its history.csv."""
    runs.train(exp, variant, 1, split_path, tmp_path / variant, progress=False)
    return pd.read_csv(tmp_path / variant / "history.csv")


def cosine(exp: dict, step: int, total: int, period: int | None = None) -> float:
    """The learning-rate multiplier after ``step`` steps of a cosine schedule from 1 to lr_min / lr (SGDR's
    warm restarts every ``period`` steps)."""
    floor = exp["train"]["schedule"]["lr_min"] / exp["train"]["optimizer"]["lr"]
    t = (step % period) / period if period else step / total
    return floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2


# PAPA's pushes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("every", "window", "scaled"), [(4, (0.0, 1.0), True), (4, (0.25, 0.75), True),
                                                         (5, (0.0, 1.0), False)])
def test_papa_pushes_every_f_steps_across_epochs(events, split_path, tmp_path, every, window, scaled):
    """3 epochs of 11 steps: the step counter runs across epochs (pushes at 12 and 24 with f = 4 are one step
    into an epoch), inside the window's steps only, and each push uses 1 - alpha' = (1 - alpha) lr_t / lr_0 with
    lr_t the rate after that step's update (Algorithm 1 updates gamma before the push)."""
    exp = logreg(population={"size": 2}, train={"epochs": 3, "batch_size": 128},
                 averaging={"window": list(window), "papa": {"every": every, "alpha": 0.9, "scale_with_lr": scaled}})
    events.watch(averaging, "push_toward_average_")
    train(exp, "papa", split_path, tmp_path)
    spe = N_TRAIN // 128
    total = 3 * spe
    assert events.steps == total == 33
    lo, hi = window[0] * total, window[1] * total
    expected = [s for s in range(1, total + 1) if s % every == 0 and lo < s <= hi]
    assert events.at("push_toward_average_") == expected
    assert any((s % spe) % every for s in expected)  # some pushes are not every-th step of their epoch
    # the push's own strength: theta <- theta + w (mean - theta), w = min((1 - alpha) lr_ratio, 1)
    alphas = [1 - min((1 - a["alpha"]) * a["lr_ratio"], 1) for a in events.args("push_toward_average_")]
    scale = [cosine(exp, s, total) if scaled else 1.0 for s in expected]
    assert alphas == pytest.approx([1 - 0.1 * f for f in scale], rel=0, abs=1e-12)


@pytest.mark.parametrize("variant", ["papa-all", "papa-2"])
def test_epoch_averaging_that_could_never_happen_is_refused(split_path, tmp_path, variant):
    """Every 5th epoch of 5 would be after the last, when nothing trains: the run would be the baseline under
    another name, so training refuses it before the first step, naming the key (papa.config)."""
    exp = logreg(population={"size": 2}, train={"epochs": 5, "batch_size": 256}, averaging={variant: {"every": 5}})
    with pytest.raises(PapaError, match=rf"averaging\.{variant}\.every: 5 >= train\.epochs \(5\)"):
        train(exp, variant, split_path, tmp_path)
    assert not (tmp_path / variant).exists()  # refused before anything is written


def test_baseline_and_epoch_variants_never_push(events, split_path, tmp_path):
    exp = logreg(population={"size": 2}, train={"epochs": 2, "batch_size": 256},
                 averaging={"papa": {"every": 1}, "papa-all": {"every": 1}})
    events.watch(averaging, "push_toward_average_")
    for variant in ("baseline", "papa-all"):
        train(exp, variant, split_path, tmp_path)
    assert events.at("push_toward_average_") == []


# PAPA-all and PAPA-2: averaging and REPAIR at epoch boundaries -----------------------------------------------
@pytest.mark.parametrize(("variant", "every", "window", "repaired", "from_start"), [
    ("papa-all", 2, (0.0, 1.0), True, False), ("papa-2", 2, (0.0, 1.0), True, False),
    ("papa-all", 1, (0.0, 0.4), False, False), ("papa-2", 1, (0.4, 1.0), True, False),
    ("papa-all", 4, (0.0, 1.0), True, False), ("papa-all", 3, (0.0, 1.0), True, True),
    ("papa-2", 2, (0.0, 1.0), False, True), ("papa-all", 2, (0.4, 1.0), True, True)])
def test_epoch_averaging_every_k_epochs_but_the_last(events, split_path, tmp_path, variant, every, window, repaired,
                                                     from_start):
    """5 epochs of 5 steps: the population is averaged (all members, or random pairs) after every k-th epoch
    inside the window, never after the last (nothing trains after it: the soups come next), REPAIRed each time
    when ``repair``; history.csv records the members just before and after each averaging. A window (a, b]
    holds the epochs after a fraction a of training up to b included (Table 14's "average only from epochs 0 to
    150" then "from 150 to 300" split the epochs): [0.4, 1] starts after epoch 2, [0, 0.4] ends with it.
    ``from_start`` (the authors' mix_from_start) also averages after the first epoch, inside the window."""
    exp = logreg(population={"size": 3}, train={"epochs": 5, "batch_size": 256},
                 averaging={"window": list(window), variant: {"every": every, "repair": repaired, "repair_iters": 2,
                                                              "from_start": from_start}})
    for name in ("average_all_", "mix_", "push_toward_average_"):
        events.watch(averaging, name)
    events.watch(REPAIR, "repair_population_")
    history = train(exp, variant, split_path, tmp_path)
    spe, epochs = N_TRAIN // 256, 5
    lo, hi = window[0] * epochs, window[1] * epochs
    expected = [e for e in range(1, epochs + 1)
                if (e % every == 0 or (from_start and e == 1)) and e < epochs and lo < e <= hi]
    steps = [e * spe for e in expected]
    averaged = events.at("average_all_" if variant == "papa-all" else "mix_")
    assert averaged == steps
    assert events.at("mix_" if variant == "papa-all" else "average_all_") == []
    assert events.at("push_toward_average_") == []
    assert events.at("repair_population_") == (steps if repaired else [])
    for phase in ("before_avg", "after_avg"):
        rows = history[history.phase == phase]
        assert sorted(set(rows.epoch)) == expected and len(rows) == 3 * len(expected)
    assert len(history[history.phase == "end"]) == 3 * epochs
    if variant == "papa-2":
        for matrix in (a["matrix"] for a in events.args("mix_")):  # each row: two distinct members, half and half
            assert all(sorted(row.tolist()) == [0.0, 0.5, 0.5] for row in matrix)


def test_repair_during_training_draws_its_batches_only_at_averaging(events, split_path, tmp_path, monkeypatch):
    """REPAIR's data (each member's own augmentation, ``repair_iters`` batches per member) is drawn at the
    averaging epochs, and nowhere else during training."""
    drawn = []
    original = MemberStream.member_batches

    def recording(stream, j, generator, n):
        drawn.append((events.steps, j, n))
        return original(stream, j, generator, n)

    monkeypatch.setattr(MemberStream, "member_batches", recording)
    exp = logreg(population={"size": 3}, train={"epochs": 4, "batch_size": 256},
                 averaging={"papa-2": {"every": 2, "repair_iters": 3}})
    train(exp, "papa-2", split_path, tmp_path)
    spe = N_TRAIN // 256
    assert {step for step, _, _ in drawn} == {2 * spe}  # after epoch 2 only (epoch 4 is the last)
    assert {j for _, j, _ in drawn} == {0, 1, 2} and {n for _, _, n in drawn} == {3}


# SWA ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("start", "first"), [(0.5, 2), (3, 3)])
def test_swa_updates_once_per_epoch_from_its_start_and_finishes_once(events, split_path, tmp_path, start, first):
    """SWA (A.11) averages the end-of-epoch iterates of the epochs from ``start`` on (a fraction of the epochs,
    or an epoch count), then replaces the members once, at the very end, and recomputes BatchNorm."""
    exp = logreg(population={"size": 2}, train={"epochs": 4, "batch_size": 256,
                                                "swa": {"start": start, "lr": 0.01, "anneal_epochs": 1}})
    events.watch(swa.SWA, "update")
    events.watch(swa.SWA, "swap_into")
    history = train(exp, "baseline", split_path, tmp_path)
    spe = N_TRAIN // 256
    assert events.at("update") == [e * spe for e in range(first + 1, 5)]
    assert events.at("swap_into") == [4 * spe]
    assert list(history[history.phase == "swa"].epoch) == [4, 4]


# fine-tuning's frozen body ------------------------------------------------------------------------------------
def test_the_body_is_frozen_for_the_first_freeze_epochs_only(moves, split_path, tmp_path):
    """§4.2: "we freeze all layers except the final layer for the first 6 epochs of training (4% of the training
    time)": during the first ``freeze_epochs`` epochs no step moves the body (not even weight decay), every
    step moves the head; afterwards every step moves everything."""
    exp = tiny_experiment(model={"kwargs": {"width": 4}}, population={"size": 2},
                          train={"epochs": 3, "batch_size": 256, "freeze_epochs": 1})
    train(exp, "baseline", split_path, tmp_path)
    spe = N_TRAIN // 256
    assert len(moves.moved) == 3 * spe
    head = [-2, -1]  # digits_cnn: conv1, bn1 (2), conv2, bn2 (2), then linear.weight and linear.bias
    for step, moved in enumerate(moves.moved, start=1):
        assert all(moved[k] for k in head), step
        assert not any(moved[: head[0]]) if step <= spe else all(moved), step


# learning-rate schedules: warm restarts and decays ----------------------------------------------------------
def test_warm_restarts_every_period_across_epochs(events, split_path, tmp_path):
    """Fine-tuning's cosine schedule "with and without restarts (every 25 epochs)": here every 2 of 6 epochs,
    so the rate returns to lr_0 at steps 2 and 4 epochs in, and nowhere else."""
    exp = logreg(population={"size": 1}, train={"epochs": 6, "batch_size": 256, "optimizer": {"lr": 0.1},
                                                "schedule": {"name": "cosine", "restart_every": 2}})
    history = train(exp, "baseline", split_path, tmp_path)
    spe = N_TRAIN // 256
    period, total = 2 * spe, 6 * spe
    expected = [0.1 * cosine(exp, s, total, period) for s in range(total)]
    assert events.lrs == pytest.approx(expected, rel=1e-12, abs=0)
    restarts = [s for s in range(1, total) if events.lrs[s] > events.lrs[s - 1]]
    assert restarts == [period, 2 * period]
    # history.csv's lr column: the rate after each epoch's last step (a restart's lr_0 at epochs 2 and 4)
    ends = history[history.phase == "end"].groupby("epoch").lr.first().tolist()
    assert ends == pytest.approx([0.1 * cosine(exp, e * spe, total, period) for e in range(1, 7)], rel=1e-12)


def test_multistep_decays_at_its_milestones(events, split_path, tmp_path):
    """The ESGD comparison's schedule: "start at 0.1, decay by 10 at 150 and 225 epochs" of 300; here
    milestones at half and three quarters of 4 epochs: the rate drops tenfold after epochs 2 and 3."""
    exp = logreg(population={"size": 1}, train={"epochs": 4, "batch_size": 256, "optimizer": {"lr": 0.1},
                                                "schedule": {"name": "multistep", "milestones": [0.5, 0.75]}})
    train(exp, "baseline", split_path, tmp_path)
    spe = N_TRAIN // 256
    expected = [0.1] * 2 * spe + [0.01] * spe + [0.001] * spe
    assert events.lrs == pytest.approx(expected, rel=1e-12, abs=0)
