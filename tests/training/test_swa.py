"""Stochastic weight averaging (paper A.11): the averages are the means of the end-of-epoch iterates, the
learning rate follows SWALR, BatchNorm statistics are recomputed after the swap, PAPA-all's window and
mixing of the averages, bit-identical resume."""

import re

import pytest
import torch
from torch.optim.swa_utils import SWALR

from papa.build import lr_factor
from papa.checkpoint import load_tensors, save_tensors
from papa.config import deep_merge
from papa.population import Population
from papa.repair import reset_batchnorm, reset_batchnorm_
from papa.rng import generator
from papa.train import Stopped, Trainer
from papa.variants import swa_start_epoch
from tests.conftest import small_cnn
from tests.helpers import papa, tiny_experiment, write_config
from tests.training.test_train import prepared

# 4 epochs of 22 steps; SWA over the last two (start 0.5), reaching its rate after one epoch
SWA = {"train": {"epochs": 4, "swa": {"start": 0.5, "lr": 0.02, "anneal_epochs": 1, "bn_batches": 3}}}


def params(pop: Population) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in pop.params.items()}


def record_iterates(trainer: Trainer) -> list[dict]:
    """Per epoch: the members' parameters right after its last step (before any averaging or the final
    swap), and whether the epoch ended with an averaging."""
    iterates = []
    run_epoch, evaluate = trainer.run_epoch, trainer.evaluate

    def run(*args, **kwargs):
        iterates.append({"averaged": False})
        return run_epoch(*args, **kwargs)

    def first_evaluate():
        iterates[-1].setdefault("params", params(trainer.pop))
        return evaluate()

    def average():
        iterates[-1]["averaged"] = True
        Trainer.average(trainer)

    trainer.run_epoch, trainer.evaluate, trainer.average = run, first_evaluate, average
    return iterates


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    exp = tiny_experiment(**SWA)
    splits, split, _ = prepared(tmp_path_factory.mktemp("swa"), exp)
    return splits, split


def test_swa_average_is_the_mean_of_the_swa_epochs_iterates(data, one_thread):
    exp = tiny_experiment(**SWA)
    trainer = Trainer(exp, "baseline", 1, *data, progress=False)
    iterates = record_iterates(trainer)
    pop = trainer.fit()
    assert trainer.swa_start == 2 and trainer.swa.count == 2
    swa_iterates = [it["params"] for it in iterates[2:]]
    for name, t in pop.params.items():
        torch.testing.assert_close(t, (swa_iterates[0][name] + swa_iterates[1][name]) / 2, rtol=1e-6, atol=1e-7)
        assert not torch.equal(t, swa_iterates[1][name])  # not simply the last iterate
    # the swapped-in members are evaluated and recorded as phase "swa" of the last epoch
    phases = [r["phase"] for r in trainer.progress.history if r["epoch"] == 4]
    assert phases == ["end"] * 3 + ["swa"] * 3


@pytest.mark.parametrize("anneal", ["linear", "cos"])
@pytest.mark.parametrize("anneal_epochs", [0, 1, 3])
@pytest.mark.parametrize("start", [0.3, 4])
def test_swa_learning_rate_follows_swalr_to_the_swa_rate(anneal, anneal_epochs, start):
    spe, epochs, lr0, swa_lr = 3, 10, 0.1, 0.03
    swa_cfg = {"start": start, "lr": swa_lr, "anneal": anneal, "anneal_epochs": anneal_epochs}
    exp = tiny_experiment(train={"epochs": epochs, "optimizer": {"lr": lr0}, "swa": swa_cfg,
                                 "schedule": {"name": "multistep", "milestones": [0.2], "gamma": 0.5}})
    regular = tiny_experiment(train={"epochs": epochs, "optimizer": {"lr": lr0},
                                     "schedule": {"name": "multistep", "milestones": [0.2], "gamma": 0.5}})
    first = 3 if start == 0.3 else 4
    assert swa_start_epoch(exp) == first
    for step in range(first * spe):  # before SWA: the regular schedule
        assert lr_factor(exp, step, spe) == lr_factor(regular, step, spe)
    # SWALR built at the SWA start from the schedule's rate there, stepped once per epoch
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr0 * lr_factor(regular, first * spe, spe))
    scheduler = SWALR(optimizer, swa_lr, anneal_epochs=anneal_epochs, anneal_strategy=anneal)
    for epoch in range(first, epochs):
        expected = optimizer.param_groups[0]["lr"]
        for step in range(epoch * spe, (epoch + 1) * spe):
            assert lr0 * lr_factor(exp, step, spe) == pytest.approx(expected, rel=1e-12)
        optimizer.step()
        scheduler.step()
    assert lr0 * lr_factor(exp, epochs * spe - 1, spe) == pytest.approx(swa_lr)


@pytest.mark.parametrize("start, needle", [
    (4, "SWA would start after 4 of 4 epochs"),
    (0.1, "SWA would start after 0 of 4 epochs"),
    (1.5, "1.5 is neither a fraction below 1 nor a whole number of epochs"),
    (0, "train.swa.start: 0 is less than or equal to the minimum of 0"),
])
def test_bad_swa_start_is_a_one_line_config_error(start, needle):
    from papa.errors import PapaError

    with pytest.raises(PapaError, match=re.escape(needle)):
        tiny_experiment(train={"epochs": 4, "swa": {"start": start, "lr": 0.01}})


def test_bad_swa_config_stops_the_cli_before_training(tmp_path):
    config = write_config(tmp_path / "config.yaml", {"train": {"swa": {"start": 0.5, "lr": 0.01, "anneal": "cosine"}}})
    result = papa("train", "--config", str(config), "--variant", "baseline", "--seed", "1", "--split",
                  str(tmp_path / "split.json"), "--out", str(tmp_path / "run"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"papa train: error: {config}: experiment 'tiny': train.swa.anneal: 'cosine' is not one of linear, cos"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stacked", [False, True])
def test_batchnorm_recomputation_is_update_bn_for_every_member(stacked, one_thread):
    pop = Population.from_factory(small_cnn, 3, seed=2)
    for t in pop.buffers.values():
        t.fill_(7)  # stale statistics, to be replaced entirely
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 5, 1, 6, 6, generator=gen) * (j + 1) for j in range(4)]
    assert reset_batchnorm_(pop, batches, stacked=stacked) == 4
    for j in range(3):
        member = pop.member(j)
        expected = reset_batchnorm(pop.member(j), [x[j] for x in batches])
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(member[1], key), getattr(expected[1], key), rtol=1e-5, atol=1e-6)
        assert int(member[1].num_batches_tracked) == 4
    assert pop.template[1].momentum == 0.1 and pop.template.training


@pytest.mark.parametrize("engine", ["loop", "stacked"])
def test_members_end_with_their_averages_and_recomputed_batchnorm(data, engine, one_thread):
    exp = tiny_experiment(**deep_merge(SWA, {"train": {"engine": engine}}))
    trainer = Trainer(exp, "baseline", 1, *data, progress=False)
    stale = {}
    finish = trainer.finish_swa

    def finish_swa():
        stale.update({n: t.clone() for n, t in trainer.pop.buffers.items()})
        finish()

    trainer.finish_swa = finish_swa
    pop = trainer.fit()
    for j in range(pop.size):
        batches = list(trainer.stream.member_batches(j, generator(1, "swa-batchnorm"), 3))
        member = pop.member(j)
        reference = reset_batchnorm(pop.member(j), batches)
        for name, t in reference.named_buffers():
            torch.testing.assert_close(member.get_buffer(name), t, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(pop.buffers["bn1.running_mean"][j], stale["bn1.running_mean"][j])
        assert int(member.bn1.num_batches_tracked) == 3


@pytest.mark.parametrize("window, mix", [((0.0, 0.5), True), ((0.0, 1.0), True), ((0.0, 1.0), False)])
def test_papa_all_window_and_swa_averages(data, window, mix, one_thread):
    """Window [0, 0.5]: PAPA-all only before SWA (epochs 1 and 2), the averages are each member's own.
    Full window: PAPA-all also at epoch 3 (never at the last); with ``mix_averages`` the running averages are
    averaged with the members, so member j ends with (mean_k theta_k(3) + theta_j(4)) / 2."""
    exp = tiny_experiment(**deep_merge(SWA, {"averaging": {"window": list(window)},
                                             "train": {"swa": {"mix_averages": mix}}}))
    trainer = Trainer(exp, "papa-all", 1, *data, progress=False)
    iterates = record_iterates(trainer)
    pop = trainer.fit()
    assert [it["averaged"] for it in iterates] == [True, True, window[1] == 1.0, False]
    three, four = iterates[2]["params"], iterates[3]["params"]
    for name, t in pop.params.items():
        at_three = three[name].mean(0, keepdim=True).expand_as(t) if window[1] == 1.0 and mix else three[name]
        torch.testing.assert_close(t, (at_three + four[name]) / 2, rtol=1e-5, atol=1e-6)
    if window[1] == 1.0 and not mix:
        # the members were averaged at epoch 3, their SWA averages were not: they differ from the mixed ones
        assert not torch.allclose(pop.params["linear.weight"],
                              (three["linear.weight"].mean(0) + four["linear.weight"]) / 2)


@pytest.mark.parametrize("variant", ["baseline", "papa-all"])
def test_resume_mid_swa_epoch_is_bit_identical(data, tmp_path, variant, one_thread):
    exp = tiny_experiment(**SWA)
    whole = Trainer(exp, variant, 1, *data, progress=False)
    whole.fit()

    first = Trainer(exp, variant, 1, *data, progress=False)
    engine = first.engine
    ckpt = tmp_path / "checkpoint.safetensors"

    def engine_then_signal(*args):
        if first.progress.step == 3 * first.stream.steps_per_epoch + 5:  # 6 steps into the second SWA epoch
            first.stop_signal = "SIGTERM"
        return engine(*args)

    first.engine = engine_then_signal
    with pytest.raises(Stopped):
        first.fit(checkpoint=lambda t: save_tensors(ckpt, *t.state()))
    assert first.progress.epoch == 3 and first.progress.batch == 6 and first.swa.count == 1

    resumed = Trainer(exp, variant, 1, *data, progress=False)
    resumed.load_state(*load_tensors(ckpt))
    assert resumed.swa.count == 1
    resumed.fit()
    for name, t in whole.pop.state_dict().items():
        assert torch.equal(resumed.pop.state_dict()[name], t), name
    assert resumed.progress.history == whole.progress.history


def test_table13_renders_in_the_papers_layout(tmp_path):
    """Table 13 from fake metrics of every run it needs: one row per SWA schedule, the three column groups
    (baseline with SWA, PAPA-all before SWA, PAPA-all before and during SWA) of population mean and soups,
    each row followed by the paper's numbers."""
    import pandas as pd

    from papa import config as cfg
    from papa.report import aggregate, plan, tables
    from tests.helpers import REPO
    from tests.unit.test_report import fake_metrics

    config = cfg.load_config(REPO / "config/paper/table13.yaml")
    plan.check(config)
    assert config.get("dry_run_only") is None
    assert cfg.experiment(config, "swa-cifar100-resnet18-cosine-lr0.01-avg-before-swa")["train"]["swa"] == {
        "start": 0.5, "lr": 0.01, "anneal": "cos", "anneal_epochs": 10, "bn_batches": None, "mix_averages": True}
    runs = plan.runs(config)
    assert len(runs) == 12
    for k, (experiment, variant) in enumerate(runs):
        fake_metrics(tmp_path / "results", experiment, variant, 1, mean=70.0 + k, avg_soup_repair=10.0 + k)
    frame = aggregate.aggregate(aggregate.find_metrics(tmp_path / "results"))
    (table,) = config["tables"]
    tables.render(table, frame, config["variants"], config["seeds"], tmp_path / "t.md", tmp_path / "t.csv")
    lines = (tmp_path / "t.md").read_text().splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    groups = ["Baseline (SWA)", "PAPA-all before SWA", "PAPA-all before and during SWA"]
    measures = ("Population mean", "Average soup", "Greedy soup")
    assert header == ["Model"] + [f"{g} {c}" for g in groups for c in measures]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[4:] if line.startswith("|")]
    assert [r[0] for r in body] == [x for label in ("Linear 0.05", "Cosine 0.05", "Linear 0.01", "Cosine 0.01")
                                    for x in (label, f"{label} (paper)")]
    index = {run: k for k, run in enumerate(runs)}
    cosine_001 = body[6]
    expected = [("swa-cifar100-resnet18-cosine-lr0.01", "baseline"),
                ("swa-cifar100-resnet18-cosine-lr0.01-avg-before-swa", "papa-all"),
                ("swa-cifar100-resnet18-cosine-lr0.01", "papa-all")]
    for g, run in enumerate(expected):
        assert cosine_001[1 + 3 * g] == f"{70.0 + index[run]:.2f}"  # the population mean, no range
    assert cosine_001[2] == "81.00"  # the baseline's soups plain, as in the ablation setting (avg_soup 80 + seed)
    assert cosine_001[5] == "81.00"  # PAPA-all: the plain average soup (fake avg_soup 80 + seed)
    # the paper's Greed column is marked: no correct run can reach it (a footnote says why)
    assert body[7][1:] == ["80.77", "12.22", "76.72‡", "81.62", "81.87", "77.73‡", "81.80", "81.30", "79.98‡"]
    assert "‡ paper value: the paper's Greed column" in (tmp_path / "t.md").read_text()
    grid = pd.read_csv(tmp_path / "t.csv")
    assert len(grid) == 36 and set(grid["experiment"]) == {e for e, _ in runs}
