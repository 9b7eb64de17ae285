"""Algorithm 1 end to end: the digits acceptance test, schedules, PAPA's scaled push, averaging
epochs and windows, determinism, the CLI's stages and its one-line errors."""

import json
import math

import pytest
import torch

from papa import runs
from papa.build import lr_factor
from papa.config import deep_merge
from papa.data import load_split
from papa.metrics import predict, scores
from papa.soups import average_soup
from papa.train import Trainer
from tests.helpers import REPO, papa, tiny_experiment, write_config


def prepared(tmp_path, exp):
    split_path = tmp_path / "split.json"
    runs.prepare(exp, split_path)
    return runs.load_data(exp), load_split(split_path), split_path


# the acceptance test of the core library -----------------------------------------------------------
@pytest.mark.slow
def test_digits_baseline_soup_collapses_while_papa_soups_match_their_population(tmp_path):
    """The default digits experiment, p = 4, seed 1: averaging independently trained networks collapses
    (the baseline average soup is near chance), while every PAPA variant's average soup is within one
    point of its population's mean test accuracy."""
    exp = runs.load_experiment(REPO / "config/config.yaml", "digits")
    assert exp["population"]["size"] == 4
    splits, split, _ = prepared(tmp_path, exp)
    results = {}
    for variant in ("baseline", "papa", "papa-all", "papa-2"):
        trainer = Trainer(exp, variant, 1, splits, split, progress=False)
        pop = trainer.fit()
        members = [r["test_accuracy"] for r in trainer.progress.history
                   if r["epoch"] == trainer.progress.epoch and r["phase"] == "end"]
        soup = average_soup(pop).eval()
        results[variant] = (sum(members) / len(members), scores(predict(soup, splits.test), splits.test.labels)[0])
    mean, soup = results["baseline"]
    assert mean > 95 and soup < mean - 50, results
    for variant in ("papa", "papa-all", "papa-2"):
        mean, soup = results[variant]
        assert mean > 95 and abs(soup - mean) <= 1.0, (variant, results)


# schedules ------------------------------------------------------------------------------------------
def test_learning_rate_schedules():
    exp = tiny_experiment(train={"epochs": 10, "optimizer": {"lr": 0.1},
                                 "schedule": {"name": "cosine", "lr_min": 1e-4}})
    spe = 7
    assert lr_factor(exp, 0, spe) == 1.0
    assert lr_factor(exp, 70, spe) == pytest.approx(1e-3)
    assert lr_factor(exp, 35, spe) == pytest.approx((1 + 1e-3) / 2)
    exp["train"]["schedule"]["restart_every"] = 5
    assert lr_factor(exp, 35, spe) == 1.0 and lr_factor(exp, 34, spe) < 0.01
    exp["train"]["schedule"] = {"name": "multistep", "milestones": [0.5, 0.75], "gamma": 0.1, "lr_min": 0,
                                "restart_every": None}
    assert [lr_factor(exp, s * spe, spe) for s in (0, 4, 5, 7, 8)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    exp["train"]["schedule"]["name"] = "linear"
    exp["train"]["schedule"]["lr_min"] = 0.0
    assert lr_factor(exp, 35, spe) == pytest.approx(0.5)
    exp["train"]["schedule"]["name"] = "constant"
    assert lr_factor(exp, 69, spe) == 1.0


# PAPA's push and the averaging calendar -------------------------------------------------------------
def test_papa_push_scales_one_minus_alpha_with_the_learning_rate(tmp_path):
    exp = tiny_experiment(averaging={"papa": {"alpha": 0.9, "every": 1}})
    splits, split, _ = prepared(tmp_path, exp)
    trainer = Trainer(exp, "papa", 1, splits, split, progress=False)
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.05 / 4  # a quarter of lr_0: 1 - alpha' = 0.1 / 4
    before = trainer.pop.params["linear.weight"].detach().clone()
    trainer.push()
    mean = before.mean(0)
    expected = 0.975 * before + 0.025 * mean
    assert torch.allclose(trainer.pop.params["linear.weight"], expected, atol=1e-7)


@pytest.mark.parametrize(
    ("variant", "window", "every", "expected"),
    [("papa-all", [0.0, 1.0], 2, [2, 4]), ("papa-2", [0.5, 1.0], 1, [3, 4]), ("papa-all", [0.0, 0.4], 1, [1, 2]),
     ("baseline", [0.0, 1.0], 1, [])],
)
def test_averaging_happens_every_k_epochs_inside_the_window_never_at_the_end(
        tmp_path, variant, window, every, expected):
    exp = tiny_experiment(train={"epochs": 5, "batch_size": 256}, population={"size": 2},
                          averaging={"window": window, variant if variant != "baseline" else "papa-all":
                                     {"every": every, "repair": False}})
    splits, split, _ = prepared(tmp_path, exp)
    trainer = Trainer(exp, variant, 1, splits, split, progress=False)
    trainer.fit()
    after = sorted({r["epoch"] for r in trainer.progress.history if r["phase"] == "after_avg"})
    before = sorted({r["epoch"] for r in trainer.progress.history if r["phase"] == "before_avg"})
    assert after == expected and before == expected
    # after PAPA-all every member is the same network
    for e in expected if variant == "papa-all" else []:
        accs = {r["test_accuracy"] for r in trainer.progress.history if r["epoch"] == e and r["phase"] == "after_avg"}
        assert len(accs) == 1


def test_genetic_ablations_select_parents_or_pair_children_then_mutate(tmp_path):
    """Tables 15-17's ablations: with tournament and elitist selection every member after an averaging is a
    kept parent or the half/half child of two parents (without REPAIR, exactly); mutations then add
    N(0, (std/g)^2) noise to every parameter, after the same selection."""
    genetic = {"tournament": True, "elitism": True}
    populations = {}
    for std in (0.0, 0.01):
        exp = tiny_experiment(population={"size": 4}, averaging={"papa-2": {"repair": False},
                                                                 "genetic": {**genetic, "mutation_std": std}})
        splits, split, _ = prepared(tmp_path, exp)
        trainer = Trainer(exp, "papa-2", 1, splits, split, progress=False)
        before = {n: t.detach().clone() for n, t in trainer.pop.tensors()}
        trainer.average()
        assert trainer.progress.generation == 1
        populations[std] = trainer.pop.state_dict()
    flat = lambda state, j: torch.cat([t[j].double().flatten() for t in state.values()])  # noqa: E731
    parents = [flat(before, j) for j in range(4)]
    candidates = parents + [(a + b) / 2 for i, a in enumerate(parents) for b in parents[i + 1:]]
    for j in range(4):
        assert min((flat(populations[0.0], j) - c).abs().max() for c in candidates) < 1e-6
    noise = torch.cat([(populations[0.01][n] - t).flatten() for n, t in populations[0.0].items()
                       if t.is_floating_point() and n in trainer.pop.params])
    assert abs(noise.std().item() - 0.01) < 0.001


def test_each_member_draws_its_own_policy_and_data_order(tmp_path):
    exp = tiny_experiment(population={"size": 4})
    splits, split, _ = prepared(tmp_path, exp)
    trainer = Trainer(exp, "baseline", 1, splits, split, progress=False)
    assert len({tuple(sorted(vars(p).items())) for p in trainer.policies}) > 1
    x, _ = next(iter(trainer.stream.epoch(0)))
    assert not torch.equal(x[0], x[1])
    again = Trainer(exp, "baseline", 1, splits, split, progress=False)
    assert again.policies == trainer.policies


def test_per_batch_redraws_the_regularization_every_batch(tmp_path):
    from papa.data.stream import batch_policy

    exp = tiny_experiment(population={"size": 1}, augment={"per_batch": True})
    splits, split, _ = prepared(tmp_path, exp)
    trainer = Trainer(exp, "baseline", 1, splits, split, progress=False)
    g = torch.Generator().manual_seed(0)
    drawn = {tuple(sorted(vars(batch_policy(trainer.stream, 0, g)).items())) for _ in range(30)}
    assert len(drawn) > 3


# determinism and the CLI --------------------------------------------------------------------------
def run_pipeline(tmp_path, config, variant="papa-all"):
    split = tmp_path / "split.json"
    run = tmp_path / "run"
    papa("prepare", "--config", str(config), "--out", str(split), check=True)
    papa("train", "--config", str(config), "--variant", variant, "--seed", "1", "--split", str(split),
         "--out", str(run), check=True)
    papa("soups", "--config", str(config), "--split", str(split), "--run", str(run), check=True)
    papa("evaluate", "--config", str(config), "--split", str(split), "--run", str(run), check=True)
    return run


@pytest.mark.slow
def test_same_config_and_seed_give_identical_metrics(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", {"train": {"epochs": 2}})
    a = run_pipeline(tmp_path / "a", config)
    b = run_pipeline(tmp_path / "b", config)
    assert (a / "metrics.json").read_bytes() == (b / "metrics.json").read_bytes()
    assert (a / "population.safetensors").read_bytes() == (b / "population.safetensors").read_bytes()
    metrics = json.loads((a / "metrics.json").read_text())
    keys = ["members", "mean", "min", "max", "std", "ensemble", "avg_soup", "greedy_soup", "greedy_soup_size",
            "avg_soup_repair", "greedy_soup_repair"]
    assert all(k in metrics for k in keys)
    assert len(metrics["members"]) == 3 and 1 <= metrics["greedy_soup_size"] <= 3
    assert math.isclose(metrics["mean"], sum(metrics["members"]) / 3)
    history = (a / "history.csv").read_text().splitlines()
    assert history[0] == "epoch,member,phase,lr,val_accuracy,val_loss,test_accuracy"
    sidecar = json.loads((a / "population.json").read_text())
    assert sidecar["variant"] == "papa-all" and sidecar["seed"] == 1 and "torch" in sidecar["versions"]


@pytest.mark.parametrize(
    ("change", "needle"),
    [({"train": {"epocs": 3}}, "epocs"), ({"data": {"dataset": "mnist"}}, "mnist"),
     ({"model": {"name": "resnet9000"}}, "resnet9000")],
)
def test_bad_config_fails_before_training_with_one_line(tmp_path, change, needle):
    config = write_config(tmp_path / "bad.yaml", change)
    split = tmp_path / "split.json"
    good = write_config(tmp_path / "good.yaml")
    papa("prepare", "--config", str(good), "--out", str(split), check=True)
    result = papa("train", "--config", str(config), "--variant", "papa", "--seed", "1", "--split", str(split),
                  "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_variant_is_one_line(tmp_path):
    config = write_config(tmp_path / "c.yaml")
    result = papa("train", "--config", str(config), "--variant", "papa-3", "--seed", "1", "--split", "x.json",
                  "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "papa-3" in result.stderr


def test_every_subcommand_has_help():
    from papa.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"prepare", "train", "soups", "evaluate"} <= set(sub.choices)
    for name in sub.choices:
        result = papa(name, "--help")
        assert result.returncode == 0 and "usage: papa" in result.stdout, name


def test_deep_merge_is_used_for_experiment_overrides():
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


def test_fine_tuning_freezes_the_body_then_unfreezes_it(tmp_path):
    """Only the head trains during train.freeze_epochs; afterwards every layer does (the official code's
    unfreeze compares an integer epoch with 0.04 and never fires)."""
    exp = tiny_experiment(train={"epochs": 2, "freeze_epochs": 1, "optimizer": {"name": "adamw", "lr": 1e-3}},
                          population={"size": 2})
    splits, split, _ = prepared(tmp_path, exp)
    trainer = Trainer(exp, "baseline", 1, splits, split, progress=False)
    start = {n: t.detach().clone() for n, t in trainer.pop.params.items()}
    trainer.run_epoch()
    assert torch.equal(trainer.pop.params["conv1.weight"], start["conv1.weight"])
    assert torch.equal(trainer.pop.params["bn1.weight"], start["bn1.weight"])
    assert not torch.equal(trainer.pop.params["linear.weight"], start["linear.weight"])
    trainer.run_epoch()
    assert not torch.equal(trainer.pop.params["conv1.weight"], start["conv1.weight"])


# speed options ---------------------------------------------------------------------------------------
def _one_epoch(tmp_path, **train):
    exp = tiny_experiment(train={"epochs": 1, **train}, population={"size": 2})
    splits, split, _ = prepared(tmp_path, exp)
    trainer = Trainer(exp, "papa", 1, splits, split, progress=False)
    trainer.run_epoch()
    return trainer


# One thread: with two, oneDNN splits channels-last convolutions differently from contiguous ones, and an epoch
# of SGD amplifies the different rounding past the tolerance on CPUs without AVX-512.
@pytest.mark.usefixtures("one_thread")
def test_channels_last_option_reaches_the_engine_and_changes_no_result(tmp_path):
    plain = _one_epoch(tmp_path)
    fast = _one_epoch(tmp_path, channels_last=True)
    assert fast.engine.channels_last and not plain.engine.channels_last
    for name, t in plain.pop.params.items():
        torch.testing.assert_close(fast.pop.params[name], t, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_trains_under_cpu_autocast(tmp_path):
    """train.precision bf16 is honoured on CPU too (AVX512-BF16 CPUs run it faster): the run differs
    from fp32 by bf16 rounding only."""
    fp32 = _one_epoch(tmp_path)
    bf16 = _one_epoch(tmp_path, precision="bf16")
    with bf16.autocast():
        assert torch.is_autocast_enabled("cpu")
    w32, w16 = fp32.pop.params["linear.weight"], bf16.pop.params["linear.weight"]
    assert torch.isfinite(w16).all() and not torch.equal(w16, w32)
    assert (w16 - w32).norm() < 0.1 * w32.norm()


def test_compile_option_builds_a_compiling_engine(tmp_path):
    exp = tiny_experiment(train={"compile": True, "engine": "auto"})
    splits, split, _ = prepared(tmp_path, exp)
    trainer = Trainer(exp, "baseline", 1, splits, split, progress=False)
    # auto on a CPU: a width-8 CNN's step at batch 64 (0.01 forward GFLOP a member) is small enough to stack
    assert trainer.engine.compile and trainer.engine.name == "stacked"


def test_stacked_engine_repairs_through_the_stacked_forward_with_the_loops_result(tmp_path):
    """PAPA-all with REPAIR: the stacked engine measures and repairs all members in vmapped passes; from the
    same trained population, its averaging matches the loop engine's up to float rounding (the training epoch
    itself rounds differently in the two engines, which the averaging would carry along)."""
    trainers = {}
    for engine in ("loop", "stacked"):
        exp = tiny_experiment(train={"epochs": 2, "engine": engine})
        splits, split, _ = prepared(tmp_path, exp)
        trainers[engine] = Trainer(exp, "papa-all", 1, splits, split, progress=False)
        assert trainers[engine].stacked == (engine == "stacked")
    trainers["loop"].run_epoch()
    start = {k: v.clone() for k, v in trainers["loop"].pop.state_dict().items()}
    pops = {}
    for engine, trainer in trainers.items():
        trainer.pop.load_state_dict(start)
        trainer.progress.epoch = 1
        trainer.average()
        pops[engine] = trainer.pop
    for name, t in pops["loop"].tensors():
        torch.testing.assert_close(pops["stacked"].state_dict()[name], t, rtol=1e-3, atol=1e-4, msg=name)


# host reads of the losses ------------------------------------------------------------------------------
def test_losses_are_read_in_chunks_and_a_delayed_read_names_the_step_that_diverged(tmp_path, monkeypatch):
    """The host reads the losses every LOSS_READ_EVERY steps and at the end of the epoch (a read per step
    would make it wait for the GPU at every step). The divergence check still names the first step and
    member whose loss was not finite, even when it is read several steps later."""
    from papa import train as train_module
    from papa.errors import PapaError

    monkeypatch.setattr(train_module, "LOSS_READ_EVERY", 4)
    exp = tiny_experiment(train={"epochs": 2, "batch_size": 128})
    splits, split, _ = prepared(tmp_path, exp)
    trainer = Trainer(exp, "baseline", 1, splits, split, progress=False)
    steps = trainer.stream.steps_per_epoch
    assert steps > 6
    reads = []
    read = Trainer.read_losses

    def counting(self, pending, bar=None):
        reads.append(len(pending))
        read(self, pending, bar)

    monkeypatch.setattr(Trainer, "read_losses", counting)
    trainer.run_epoch()
    assert [n for n in reads if n] == [4] * (steps // 4) + ([steps % 4] if steps % 4 else [])

    engine = trainer.engine

    def diverging(pop, x, targets, autocast):
        losses = engine(pop, x, targets, autocast)
        if trainer.progress.step == steps + 5:  # the 6th step of epoch 2 is global step steps + 6
            losses = losses.clone()
            losses[1] = float("nan")
        return losses

    trainer.engine = diverging
    with pytest.raises(PapaError, match=rf"non-finite loss \(nan\) for member 1 at epoch 2, step {steps + 6};"):
        trainer.run_epoch()
    assert trainer.progress.step == steps + 8  # noticed at the read after the second chunk of 4 steps
