"""``fidelity.mixed_precision``: the authors' fp16 autocast with one GradScaler (main.py:172-189, utils/utils.py:70-71)
against papa's bf16 autocast. On CUDA only: the CPU trains as under ``paper``. The loss-scaling path itself runs
here with torch.amp.GradScaler on the CPU, checked against the scripts' own loop (one scaler, one summed loss, then
``scaler.step(optimizer[l]); scaler.update()`` per member) and through a checkpoint."""

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn

from papa import runs
from papa.build import build_precision
from papa.checkpoint import load_tensors, save_tensors
from papa.distributed import Local
from papa.engines import ENGINES, PopulationScaler, soft_cross_entropy
from papa.population import Population
from papa.train import Trainer
from tests.helpers import tiny_experiment

pytestmark = pytest.mark.usefixtures("one_thread")
P = 3


def _exp(setting: str, precision: str) -> dict:
    return tiny_experiment(train={"precision": precision}, fidelity={"mixed_precision": setting})


@pytest.mark.parametrize("precision", ["fp32", "bf16-cuda", "bf16"])
def test_the_cpu_runs_the_same_under_both_settings(precision):
    cpu = torch.device("cpu")
    assert build_precision(_exp("authors", precision), cpu) == build_precision(_exp("paper", precision), cpu)
    assert build_precision(_exp("authors", precision), cpu)[1] is None  # no loss scaling on the CPU


def test_cuda_mixed_precision_is_fp16_with_a_scaler_under_authors_only():
    cuda = torch.device("cuda")  # only its type is read; a GradScaler made without CUDA warns and disables itself
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for precision in ("bf16-cuda", "bf16"):
            dtype, scaler = build_precision(_exp("authors", precision), cuda)
            assert dtype == torch.float16 and isinstance(scaler, PopulationScaler)
            assert build_precision(_exp("paper", precision), cuda) == (torch.bfloat16, None)
        assert build_precision(_exp("authors", "fp32"), cuda) == (None, None)


def _members() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(P)]


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(P, 5, 4, generator=g)
    targets = torch.softmax(torch.randn(P, 5, 3, generator=g), -1)
    return x, targets


def _scalers(device: str = "cpu", interval: int = 2):
    ours, theirs = PopulationScaler(device), torch.amp.GradScaler(device)
    for s in (ours, theirs):  # a short growth interval, so that the scale also grows within a step
        s.load_state_dict({**s.state_dict(), "growth_interval": interval})
    return ours, theirs


@pytest.mark.parametrize("engine", ["loop", "stacked"])
def test_the_scaler_steps_the_members_as_the_scripts_did(engine):
    """Three steps; in the second, member 1's gradient holds an inf: its step is skipped (parameters and momentum
    untouched), the scale halves at its turn, so member 2's gradient comes out doubled, and the scale grows after
    two clean member updates: every parameter matches p separate SGD optimizers run with one GradScaler."""
    modules = _members()
    reference = [copy.deepcopy(m) for m in modules]
    pop = Population.from_modules(modules).requires_grad_()
    opt = torch.optim.SGD(pop.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    ref_opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2) for m in reference]
    scaler, ref_scaler = _scalers()
    for step in range(3):
        x, targets = _batch(step)
        opt.zero_grad(set_to_none=True)
        ENGINES[engine](pop, x, targets, contextlib.nullcontext, scale=scaler.scale)
        for o in ref_opts:
            o.zero_grad(set_to_none=True)
        loss = sum(soft_cross_entropy(m(x[j]), targets[j]) for j, m in enumerate(reference))
        ref_scaler.scale(loss).backward()
        if step == 1:  # an overflow in member 1 alone
            pop.params["0.weight"].grad[1, 0, 0] = float("inf")
            reference[1][0].weight.grad[0, 0] = float("inf")
            before = {n: t[1].clone() for n, t in pop.params.items()}
        found = scaler.step_population(opt, pop, Local(P))
        for o in ref_opts:  # main.py:186-189
            ref_scaler.step(o)
            ref_scaler.update()
        assert found == [False, step == 1, False]
        if step == 1:
            assert all(torch.equal(pop.params[n][1], before[n]) for n in before)  # skipped
        assert scaler.get_scale() == ref_scaler.get_scale()
        assert scaler.state_dict() == ref_scaler.state_dict()
        for j, m in enumerate(reference):
            for n, t in m.named_parameters():
                torch.testing.assert_close(pop.params[n][j], t.detach(), rtol=1e-6, atol=1e-7)
    # from 2**16, every second clean member update doubles it: at step 0's member 1, step 1's member 0 (then
    # member 1 halves it), step 2's members 0 and 2
    assert scaler.get_scale() == 2.0 ** 19


def test_an_inf_step_is_skipped_and_the_scale_halves():
    pop = Population.from_modules(_members()).requires_grad_()
    opt = torch.optim.AdamW(pop.parameters(), lr=0.1)
    scaler = PopulationScaler("cpu")
    x, targets = _batch(0)
    ENGINES["stacked"](pop, x, targets, contextlib.nullcontext, scale=scaler.scale)
    for t in pop.params.values():
        t.grad[:, ...] = float("nan")  # every member overflows: no optimizer step at all
    before = {n: t.clone() for n, t in pop.params.items()}
    assert scaler.step_population(opt, pop, Local(P)) == [True] * P
    assert all(torch.equal(pop.params[n], before[n]) for n in before) and not opt.state
    assert scaler.get_scale() == 2.0 ** 16 / 2 ** P  # halved at every member's update


def test_a_member_skipped_under_adamw_keeps_its_parameters_and_moments_and_its_step_counts():
    """Member 1 overflows at both steps: its parameters stay, its moments are zero where this step made them and
    untouched after, while the others move; AdamW's step count (one number for all members) counts the step."""
    pop = Population.from_modules(_members()).requires_grad_()
    opt = torch.optim.AdamW(pop.parameters(), lr=0.1, weight_decay=1e-2)
    scaler = PopulationScaler("cpu")
    for step in range(2):
        x, targets = _batch(step)
        opt.zero_grad(set_to_none=True)
        ENGINES["stacked"](pop, x, targets, contextlib.nullcontext, scale=scaler.scale)
        pop.params["0.weight"].grad[1, 0, 0] = float("inf")
        before = {n: t.clone() for n, t in pop.params.items()}
        moments = {n: {k: opt.state[t][k][1].clone() for k in ("exp_avg", "exp_avg_sq")}
                   for n, t in pop.params.items() if opt.state.get(t)}
        assert scaler.step_population(opt, pop, Local(P)) == [False, True, False]
        for n, t in pop.params.items():
            assert torch.equal(t[1], before[n][1]) and not torch.equal(t[0], before[n][0])
            state = opt.state[t]
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(state[k][1], moments[n][k] if step else torch.zeros_like(t[1])), (n, k)
            assert state["step"].dim() == 0 and state["step"].item() == step + 1


def test_the_scale_never_grows_past_the_largest_finite_float32():
    """As torch's update kernel: a growth that would overflow float32 (2**127 -> 2**128) leaves the scale as it is."""
    pop = Population.from_modules(_members()).requires_grad_()
    opt = torch.optim.SGD(pop.parameters(), lr=0.1)
    scaler = PopulationScaler("cpu")
    scaler.scale(torch.ones(()))  # made lazily, then set: the gradients below stay unscaled (finite)
    scaler.load_state_dict({**scaler.state_dict(), "scale": 2.0 ** 127, "growth_interval": 1})
    ENGINES["stacked"](pop, *_batch(0), contextlib.nullcontext)
    assert scaler.step_population(opt, pop, Local(P)) == [False] * P
    assert scaler.get_scale() == 2.0 ** 127 and scaler.state_dict()["_growth_tracker"] == 0


def _force_scaler(monkeypatch, state: dict) -> None:
    """The authors' CUDA path on the CPU: fp16 autocast, a PopulationScaler starting from ``state``."""
    def precision(exp, device):
        scaler = PopulationScaler("cpu")
        scaler.load_state_dict({**scaler.state_dict(), **state})
        return torch.float16, scaler

    monkeypatch.setattr("papa.train.build_precision", precision)


def test_a_resumed_run_matches_an_uninterrupted_one_with_the_scaler_state(tmp_path, monkeypatch):
    """fp16 with a scale that overflows at first and then grows every 3 clean member updates, so that steps keep
    being skipped now and then and which ones depends on the scaler's state: a run resumed from a checkpoint after
    epoch 1 ends exactly where the uninterrupted run does only if the checkpoint restores it."""
    exp = tiny_experiment(population={"size": P}, train={"epochs": 2, "batch_size": 16},
                          data={"subset": {"train": 400, "test": 100}})
    runs.prepare(exp, tmp_path / "split.json")
    splits, split = runs.load_data(exp), runs.load_split(tmp_path / "split.json")
    _force_scaler(monkeypatch, {"scale": 2.0 ** 40, "growth_interval": 3})

    whole = Trainer(exp, "papa-all", 1, splits, split, progress=False)
    whole.run_epoch()
    tensors, meta = whole.state()
    assert meta["grad_scaler"]["scale"] < 2.0 ** 40  # it overflowed and backed off
    save_tensors(tmp_path / "checkpoint.safetensors", tensors, meta)
    whole.run_epoch()

    resumed = Trainer(exp, "papa-all", 1, splits, split, progress=False)
    resumed.load_state(*load_tensors(tmp_path / "checkpoint.safetensors"))
    assert resumed.scaler.state_dict() == meta["grad_scaler"]
    resumed.run_epoch()
    assert resumed.scaler.state_dict() == whole.scaler.state_dict()
    for n, t in whole.pop.state_dict().items():
        assert torch.equal(resumed.pop.state_dict()[n], t), n

    fresh = Trainer(exp, "papa-all", 1, splits, split, progress=False)  # the same checkpoint without its scaler
    meta_without = {k: v for k, v in meta.items() if k != "grad_scaler"}
    with pytest.raises(runs.PapaError, match="no loss scaler state"):
        fresh.load_state(tensors, meta_without)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("engine", ["loop", "stacked"])
def test_cuda_trains_in_fp16_with_the_scaler_under_authors(tmp_path, engine):
    """On CUDA the authors' setting autocasts to fp16 and scales the loss (papa's own setting: bf16, no scaler);
    the scaled steps match the scripts' per-member loop on the GPU too."""
    exp = tiny_experiment(population={"size": P}, fidelity={"mixed_precision": "authors"},
                          train={"epochs": 1, "device": "cuda", "precision": "bf16-cuda", "engine": engine})
    runs.prepare(exp, tmp_path / "split.json")
    trainer = Trainer(exp, "baseline", 1, runs.load_data(exp), runs.load_split(tmp_path / "split.json"),
                      progress=False)
    assert isinstance(trainer.scaler, PopulationScaler) and trainer.scaler.is_enabled()
    with trainer.autocast():
        assert torch.get_autocast_dtype("cuda") == torch.float16
    trainer.run_epoch()
    assert trainer.scaler.state_dict()["_growth_tracker"] > 0 or trainer.scaler.get_scale() != 2.0 ** 16
    assert all(torch.isfinite(t).all() for t in trainer.pop.params.values())

    modules = [m.cuda() for m in _members()]
    reference = [copy.deepcopy(m) for m in modules]
    pop = Population.from_modules(modules).requires_grad_()
    opt = torch.optim.SGD(pop.parameters(), lr=0.1, momentum=0.9)
    ref_opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in reference]
    scaler, ref_scaler = _scalers("cuda")
    for step in range(3):
        x, targets = (t.cuda() for t in _batch(step))
        opt.zero_grad(set_to_none=True)
        ENGINES[engine](pop, x, targets, lambda: torch.autocast("cuda", dtype=torch.float16), scale=scaler.scale)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = sum(soft_cross_entropy(m(x[j]), targets[j]) for j, m in enumerate(reference))
        ref_scaler.scale(loss).backward()
        if step == 1:
            pop.params["0.weight"].grad[1, 0, 0] = float("inf")
            reference[1][0].weight.grad[0, 0] = float("inf")
        assert scaler.step_population(opt, pop, Local(P, "cuda")) == [False, step == 1, False]
        for o in ref_opts:
            ref_scaler.step(o)
            ref_scaler.update()
        assert scaler.state_dict() == ref_scaler.state_dict()
        for j, m in enumerate(reference):
            for n, t in m.named_parameters():
                torch.testing.assert_close(pop.params[n][j], t.detach(), rtol=1e-3, atol=1e-4)
