"""The fast paths on every device: engines, the on-device data stream, the trainer's speed options, REPAIR
through the stacked forward and the benchmark.

Each test runs on the CPU here and in CI, which checks the test itself, and again on CUDA where a GPU is
present (marker ``gpu``; on a CUDA machine: ``pytest -m gpu``). Convolutions run in full fp32 on CUDA
(TF32 off) so that float tolerances mean the same on both devices.
"""

import contextlib

import pytest
import torch
from torch import nn

from papa import averaging, bench, runs
from papa.data.splits import load_split
from papa.engines import ENGINES
from papa.population import Population
from papa.train import Trainer
from tests.helpers import tiny_experiment

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])]
P, B, CLASSES = 4, 8, 3


@pytest.fixture(autouse=True)
def full_fp32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def bn_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, CLASSES))


def train_engine(name: str, variant: str, device: str) -> Population:
    """Four steps of SGD with momentum, BatchNorm in train mode, the variant's averaging after each step."""
    pop = Population.from_factory(bn_cnn, P, seed=5).to(device).train()
    for t in pop.params.values():
        t.requires_grad_(True)
    opt = torch.optim.SGD(list(pop.params.values()), lr=0.1, momentum=0.9, weight_decay=1e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(P, B, 1, 4, 4, generator=g).to(device)
        targets = torch.softmax(torch.randn(P, B, CLASSES, generator=g), -1).to(device)
        ENGINES[name](pop, x, targets, contextlib.nullcontext)
        opt.step()
        if variant == "papa":
            averaging.push_toward_average_(pop, 0.7)
        elif variant == "papa-all" and step % 2:
            averaging.average_all_(pop)
        elif variant == "papa-2" and step % 2:
            averaging.pair_average_(pop, torch.Generator().manual_seed(step))
    return pop


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["baseline", "papa", "papa-all", "papa-2"])
def test_engines_give_the_same_population_on_the_device(device, variant):
    loop, stacked = (train_engine(name, variant, device) for name in ("loop", "stacked"))
    for name, t in loop.tensors():
        u = stacked.state_dict()[name]
        assert u.device.type == device
        torch.testing.assert_close(u.detach(), t.detach(), atol=1e-5, rtol=1e-4, msg=name)
    assert not torch.allclose(stacked.buffers["1.running_var"], torch.ones(P, 4, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_stacked_dropout_masks_differ_per_member_on_the_device(device):
    """Identical members on identical inputs: their gradients differ only through their dropout masks."""
    pop = Population.from_factory(lambda: nn.Sequential(nn.Dropout(0.5), nn.Linear(64, 2)), P, seed=0,
                                  same_init=True).to(device).train()
    for t in pop.params.values():
        t.requires_grad_(True)
    x = torch.ones(P, B, 64, device=device)
    ENGINES["stacked"](pop, x, torch.full((P, B, 2), 0.5, device=device), contextlib.nullcontext)
    grads = pop.params["1.weight"].grad
    assert all(not torch.equal(grads[0], grads[j]) for j in range(1, P))


def _trainer(tmp_path, device: str, variant: str = "papa-all", **train) -> Trainer:
    exp = tiny_experiment(train={"epochs": 2, "device": device, **train}, population={"size": 3})
    split_path = tmp_path / "split.json"
    runs.prepare(exp, split_path)
    return Trainer(exp, variant, 1, runs.load_data(exp), load_split(split_path), progress=False)


@pytest.mark.parametrize("device", DEVICES)
def test_the_training_set_and_every_batch_live_on_the_device(tmp_path, device):
    trainer = _trainer(tmp_path, device, engine="stacked")
    stream = trainer.stream
    assert stream.images.device.type == device and stream.images.dtype == torch.uint8
    x, targets = next(iter(stream.epoch(0)))
    assert x.device.type == device and targets.device.type == device
    assert x.shape[0] == 3 and torch.isfinite(x).all()


@pytest.mark.parametrize("device", DEVICES)
def test_stacked_bf16_channels_last_training_with_stacked_repair(tmp_path, device):
    """The GPU configuration of the paper runs (stacked, bf16 autocast, channels-last) trains, and PAPA-all
    with REPAIR goes through the stacked forward; the result stays close to the fp32 loop's."""
    fast = _trainer(tmp_path / "fast", device, engine="stacked", precision="bf16", channels_last=True)
    assert fast.stacked and fast.engine.channels_last
    reference = _trainer(tmp_path / "ref", device, engine="loop")
    for trainer in (fast, reference):
        trainer.run_epoch()
        trainer.average()
    for name, t in reference.pop.params.items():
        u = fast.pop.params[name]
        assert u.device.type == device and torch.isfinite(u).all(), name
        assert (u - t).norm() <= 0.05 * t.norm() + 1e-3, name
    # PAPA-all: every member now holds the REPAIRed average
    w = fast.pop.params["linear.weight"]
    torch.testing.assert_close(w[1], w[0])


@pytest.mark.parametrize("device", DEVICES)
def test_bench_runs_on_the_device(device):
    out = bench.run(model="digits_cnn", population=2, batch_size=8, steps=2, warmup=1, engine="stacked",
                    device=device, precision="bf16", threads=1)
    assert out["device"].startswith(device) and out["engine"] == "stacked"
    assert out["images_per_second"] > 0 and out["averaging_ms"] > 0
    if device == "cuda":
        assert "peak_fraction" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_training_steps_never_make_the_host_wait_for_the_gpu(tmp_path):
    """Drawing a batch (per-member crop, flip, erasing, mixup on the device, randomness from host
    generators), the stacked step and the optimizer step queue GPU work without one synchronization, so
    the host runs ahead of the GPU; only Trainer.read_losses waits, every LOSS_READ_EVERY steps."""
    trainer = _trainer(tmp_path, "cuda", variant="papa", engine="stacked", precision="bf16", channels_last=True)
    batches = trainer.stream.epoch(0)
    next(batches)  # the first draw may initialize CUDA state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            x, targets = next(batches)
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.engine(trainer.pop, x, targets, trainer.autocast)
            trainer.optimizer.step()
            trainer.push()
    finally:
        torch.cuda.set_sync_debug_mode("default")
