"""The headline figure: epochs of the real trainer (what ``papa train`` runs), timed end to end.

The experiment is the paper's CIFAR-10 ResNet-18 run (``config/paper/table1.yaml``, p = 10, 300 epochs,
batch 64, the §4.1 augmentation grid, PAPA every 10 steps), validated like any config, with the speed
settings and sizes laid over it before validation. Its data are CIFAR-shaped random images
(``cifar_shaped_data``), because no dataset can be downloaded where this runs.
"""

import gc
import time
from pathlib import Path

import torch

from papa import config as cfg
from papa.bench import bf16_peak_tflops, device_name, gflop_per_image
from papa.data import ArrayDataset, Splits, make_split
from papa.data.datasets import CIFAR10_MEAN, CIFAR10_STD
from papa.train import Trainer
from papa.variants import push_epoch_steps, pushes_after

REPO = Path(__file__).resolve().parent.parent
PAPER_CONFIG = REPO / "config" / "paper" / "table1.yaml"
EXPERIMENT = "cifar10-resnet18-p10-aug"
SEED = 1  # the paper configs' first seed


def experiment(overrides: dict, path: Path = PAPER_CONFIG, name: str = EXPERIMENT) -> dict:
    """Experiment ``name`` of the config file with ``overrides`` deep-merged into its entry, then validated
    and completed exactly as ``papa train --config path --experiment name`` reads it."""
    raw = cfg.load_yaml(path)
    raw["experiments"][name] = cfg.deep_merge(raw["experiments"][name] or {}, overrides)
    return cfg.experiment(cfg.validate(raw, "config", str(path)), name, path)


def cifar_shaped_data(exp: dict, train_images: int, test_images: int, seed: int = 0) -> tuple[Splits, dict]:
    """The data a CIFAR-10 run trains on, with random uint8 pixels and labels in place of the images: the
    dataset (``Splits``) and the validation split (``data.val_fraction`` held out, as ``papa prepare``).

    This is the one function to change for data files: with ``papa fake-data`` archives under a root,
    ``splits = papa.runs.load_data(exp)`` (``exp["data"]["root"]`` pointing there) replaces the tensors."""
    g = torch.Generator().manual_seed(seed)

    def part(n: int) -> ArrayDataset:
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=g)
        return ArrayDataset(images, labels, 10, CIFAR10_MEAN, CIFAR10_STD, "cifar10-random")

    splits = Splits("cifar10-random", part(train_images), part(test_images), 10, 3, 32, "array",
                    CIFAR10_MEAN, CIFAR10_STD)
    d = exp["data"]
    return splits, make_split(train_images, d["val_fraction"], d["split_seed"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_epochs(exp: dict, data: tuple[Splits, dict], epochs: int, variant: str = "papa",
                deadline: float | None = None) -> dict:
    """Train ``epochs`` epochs with the Trainer (each: training steps with PAPA's pushes, then evaluation
    of every member on the validation and test sets) and time each; then time one evaluation alone.

    An epoch is left out when the deadline (a ``time.time()``) would pass before it ends, judged by the
    previous epoch's time. Figures: ``epoch_s`` the last epoch, ``first_epoch_s`` the first (it pays for
    compilation and other warm-up), ``images_per_second`` member-images of training per second of the whole
    epoch, ``train_images_per_second`` the same without the evaluation's time; the paper run's projected
    time (the first epoch then ``train.epochs`` - 1 like the last) and its ratio to the physical floor,
    its training FLOPs at the device's dense bf16 peak."""
    splits, split = data
    trainer = Trainer(exp, variant, SEED, splits, split, progress=False)
    device, t = trainer.device, exp["train"]
    times: list[float] = []
    for _ in range(epochs):
        if times and deadline is not None and time.time() + 1.2 * times[-1] > deadline:
            break
        times.append(_timed(trainer.run_epoch, device))
    eval_s = _timed(trainer.evaluate, device)
    p, steps, batch = trainer.pop.size, trainer.stream.steps_per_epoch, t["batch_size"]
    images = p * trainer.stream.items_per_epoch  # with fidelity.last_batch, the last step's batch is short
    every, epoch_steps = exp["averaging"]["papa"]["every"], push_epoch_steps(exp, steps)
    pushes = sum(pushes_after(s, steps, every, (0.0, 1.0), epoch_steps) for s in range(1, steps + 1))
    gflop = gflop_per_image(trainer.pop.template, (splits.in_channels, splits.image_size, splits.image_size))
    name = device_name(device)
    peak = bf16_peak_tflops(name) if device.type == "cuda" else None
    projected = times[0] + (t["epochs"] - 1) * times[-1]
    floor = t["epochs"] * images * gflop / (peak * 1e3) if peak else None
    result = {
        "kind": "trainer", "experiment": exp["name"], "variant": variant, "model": exp["model"]["name"],
        "population": p, "batch_size": batch, "engine": trainer.engine_name, "compile": t["compile"],
        "channels_last": t["channels_last"], "precision": t["precision"], "device": device.type,
        "device_name": name, "train_images": len(split["train"]), "test_images": len(splits.test),
        "steps_per_epoch": steps, "pushes_per_epoch": pushes if variant == "papa" else 0,
        "epochs_timed": len(times), "first_epoch_s": round(times[0], 3),
        "epoch_s": round(times[-1], 3), "eval_s": round(eval_s, 3),
        "images_per_second": round(images / times[-1], 1),
        "train_images_per_second": round(images / max(times[-1] - eval_s, 1e-9), 1),
        "paper_epochs": t["epochs"], "projected_run_h": round(projected / 3600, 3),
        "gflop_per_image": round(gflop, 4), "bf16_peak_tflops": peak,
        "floor_run_h": round(floor / 3600, 4) if floor else None,
        "floor_ratio": round(projected / floor, 2) if floor else None, "torch": torch.__version__,
    }
    del trainer
    release(device)
    return result


def time_averaging(exp: dict, data: tuple[Splits, dict], variant: str = "papa-all", calls: int = 2) -> dict:
    """One epoch-boundary averaging of ``variant`` (PAPA-all: the mean written back, then REPAIR with each
    member's own augmentation, ``repair_iters`` batches) on a fresh Trainer's population: the fastest of
    ``calls`` (the first may pay for warm-up), and how often the experiment averages (``every`` epochs)."""
    splits, split = data
    trainer = Trainer(exp, variant, SEED, splits, split, progress=False)
    seconds = min(_timed(trainer.average, trainer.device) for _ in range(calls))
    a = exp["averaging"][variant]
    result = {"kind": "averaging", "variant": variant, "engine": trainer.engine_name, "population": trainer.pop.size,
              "repair": a["repair"], "repair_iters": a["repair_iters"], "every_epochs": a["every"],
              "averaging_s": round(seconds, 4)}
    device = trainer.device
    del trainer
    release(device)
    return result


def release(device: torch.device) -> None:
    """Free what a finished measurement left on the device before the next one builds its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def settings(engine: str, compile: bool, device: str, population: int, batch_size: int, precision: str = "bf16",
             repair_iters: int | None = None) -> dict:
    """The overrides of one measured setting, with channels-last as in the engine sweep and papa's bf16 mixed
    precision; ``repair_iters`` (None: the config's) sets PAPA-all's REPAIR batches."""
    over = {"population": {"size": population},
            "train": {"device": device, "engine": engine, "compile": compile, "precision": precision,
                      "channels_last": True, "batch_size": batch_size},
            # bf16 autocast as measured and labelled, whatever the config's fidelity: the authors' fp16 loss
            # scaling (fidelity.mixed_precision) reads every step's overflow flags on the host
            "fidelity": {"mixed_precision": "paper"}}
    if repair_iters is not None:
        over["averaging"] = {"papa-all": {"repair_iters": repair_iters}}
    return over
