"""Bad input through the real CLI: every case ends with one line on stderr naming the problem (file, key,
expected vs found), a non-zero exit, no traceback, and no output file left behind, complete or partial.

CASES is what the troubleshooting section of the README lists; ``test_every_kind_of_bad_input_is_tried``
counts them against the kinds the issue names."""

import csv
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from papa import runs
from papa.checkpoint import save_tensors
from papa.config import deep_merge
from papa.data import load_split
from papa.errors import PapaError, one_line
from papa.train import Trainer
from tests.helpers import TINY, papa, tiny_experiment
from tests.unit.test_data import write_cifar

FAST = {"train": {"epochs": 1, "batch_size": 256}}  # one epoch of 6 steps: the trained fixture's run


# the inputs every case starts from ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A split, a trained run (population, history), its soups, and a mid-run checkpoint, all of FAST."""
    root = tmp_path_factory.mktemp("trained")
    exp = tiny_experiment(**FAST)
    runs.prepare(exp, root / "split.json")
    runs.train(exp, "papa", 1, root / "split.json", root / "run", progress=False)
    runs.soups(exp, root / "split.json", root / "run")
    shutil.move(root / "run" / "soups.safetensors", root / "soups.safetensors")
    shutil.move(root / "run" / "soups.json", root / "soups.json")
    # the checkpoint a two-epoch run writes after its first epoch
    exp2 = tiny_experiment(train={"epochs": 2, "batch_size": 256})
    trainer = Trainer(exp2, "papa", 1, runs.load_data(exp2), load_split(root / "split.json"), progress=False)
    trainer.run_epoch()
    save_tensors(root / "checkpoint.safetensors", *trainer.state())
    return root


@dataclass
class World:
    """A case's directory: ``split.json`` and ``run/`` (population.safetensors/.json, history.csv) copied
    from the trained fixture; a case writes its bad input here and returns the command to run."""

    root: Path

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def out(self) -> Path:
        return self.root / "out"

    def config(self, change: dict | None = None, text: str | None = None) -> Path:
        path = self.root / "bad.yaml"
        if text is None:
            exp = deep_merge(deep_merge(TINY, FAST), change or {})
            text = yaml.safe_dump({"seeds": [1], "experiments": {"tiny": exp}})
        path.write_text(text)
        return path

    def prepare(self, config: Path) -> list[str]:
        return ["prepare", "--config", str(config), "--out", str(self.out / "split.json")]

    def train(self, config: Path, variant: str = "papa", split: Path | None = None, *extra: str) -> list[str]:
        return ["train", "--config", str(config), "--variant", variant, "--seed", "1", "--split",
                str(split or self.split), "--out", str(self.out / "run"), *extra]

    def soups(self, config: Path) -> list[str]:
        return ["soups", "--config", str(config), "--split", str(self.split), "--run", str(self.run)]

    def evaluate(self, config: Path) -> list[str]:
        return ["evaluate", "--config", str(config), "--split", str(self.split), "--run", str(self.run)]

    def aggregate(self, text: bytes) -> list[str]:
        """`papa aggregate` of one metrics.json holding ``text``."""
        path = self.root / "results" / "tiny" / "papa" / "seed1" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_bytes(text)
        return ["aggregate", str(path), "--out", str(self.out / "metrics.csv")]

    def plot(self, history: bytes) -> list[str]:
        """`papa plot` of a curves figure from one history.csv holding ``history``."""
        path = self.root / "results" / "tiny" / "papa" / "seed1" / "history.csv"
        path.parent.mkdir(parents=True)
        path.write_bytes(history)
        config = self.config(text="seeds: [1]\nvariants: [papa]\nexperiments: {tiny: {data: {dataset: digits}}}\n"
                                  "figures: [{name: f, kind: curves, caption: c, experiment: tiny}]\n")
        return ["plot", "--config", str(config), "--figure", "f", "--histories", str(path), "--out",
                str(self.out / "f.png")]

    def checkpoint(self, trained: Path) -> Path:
        """A genuine first-epoch checkpoint in the output run directory, as an interrupted run leaves it."""
        (self.out / "run").mkdir(parents=True)
        for suffix in (".safetensors", ".json"):
            shutil.copy(trained / f"checkpoint{suffix}", self.out / "run" / f"checkpoint{suffix}")
        return self.out / "run" / "checkpoint.safetensors"


@dataclass
class Case:
    kind: str  # the kind of bad input the issue names
    make: Callable[[World, Path], list[str]]  # writes the bad input, returns the command line
    needles: tuple[str, ...]  # what the error line must name
    keep: frozenset[str] = frozenset()  # files the failed command may leave (a last good checkpoint)
    check: Callable[[World], None] | None = None  # further assertions on what is left


CASES: dict[str, Case] = {}


def case(name: str, kind: str, *needles: str, keep=(), check=None):
    def add(make):
        CASES[name] = Case(kind, make, needles, frozenset(keep), check)
        return make

    return add


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# configs ---------------------------------------------------------------------------------------------------
@case("malformed-yaml", "malformed YAML", "bad.yaml", "malformed YAML at line 4, column 8")
def _(w, t):
    return w.train(w.config(text="experiments:\n  tiny:\n    data: {dataset: digits\n  other: 1\n"))


@case("top-level-not-a-mapping", "malformed YAML", "bad.yaml", "expected a mapping", "found list")
def _(w, t):
    return w.prepare(w.config(text="- data\n- model\n"))


@case("unknown-key", "unknown key", "bad.yaml", "'tiny'", "train", "unknown key 'epocs'", "expected one of")
def _(w, t):
    return w.train(w.config({"train": {"epocs": 3}}))


@case("unknown-top-level-key", "unknown key", "bad.yaml", "unknown key 'experiment'", "expected one of")
def _(w, t):
    return w.prepare(w.config(text="experiment: {tiny: {}}\nexperiments: {tiny: {}}\n"))


@case("wrong-type", "wrong type", "bad.yaml", "train.epochs", "'ten' is not of type 'integer'")
def _(w, t):
    return w.train(w.config({"train": {"epochs": "ten"}}))


@case("wrong-type-section", "wrong type", "bad.yaml", "averaging.papa", "is not of type 'object'")
def _(w, t):
    return w.train(w.config({"averaging": {"papa": 0.9}}))


@case("population-below-1", "out of range", "bad.yaml", "population.size", "0 is less than the minimum of 1")
def _(w, t):
    return w.train(w.config({"population": {"size": 0}}))


@case("alpha-zero", "out of range", "bad.yaml", "averaging.papa.alpha", "less than or equal to the minimum of 0")
def _(w, t):
    return w.train(w.config({"averaging": {"papa": {"alpha": 0}}}))


@case("alpha-above-one", "out of range", "bad.yaml", "averaging.papa.alpha", "1.5 is greater than the maximum of 1")
def _(w, t):
    return w.train(w.config({"averaging": {"papa": {"alpha": 1.5}}}))


@case("every-zero", "out of range", "bad.yaml", "averaging.papa.every", "0 is less than the minimum of 1")
def _(w, t):
    return w.train(w.config({"averaging": {"papa": {"every": 0}}}))


@case("every-negative", "out of range", "bad.yaml", "averaging.papa-all.every", "-2 is less than the minimum of 1")
def _(w, t):
    return w.train(w.config({"averaging": {"papa-all": {"every": -2}}}), "papa-all")


@case("negative-epochs", "out of range", "bad.yaml", "train.epochs", "-1 is less than the minimum of 1")
def _(w, t):
    return w.train(w.config({"train": {"epochs": -1}}))


@case("window-outside-0-1", "out of range", "bad.yaml", "averaging.window.1", "1.5 is greater than the maximum of 1")
def _(w, t):
    return w.train(w.config({"averaging": {"window": [0.0, 1.5]}}))


@case("window-reversed", "out of range", "bad.yaml", "averaging.window", "start 0.8 must be before end 0.2")
def _(w, t):
    return w.train(w.config({"averaging": {"window": [0.8, 0.2]}}))


@case("unknown-dataset", "unknown name", "bad.yaml", "data.dataset", "'mnist' is not one of digits, optdigits, cifar10")
def _(w, t):
    return w.prepare(w.config({"data": {"dataset": "mnist"}}))


@case("unknown-model", "unknown name", "bad.yaml", "model.name: unknown model 'resnet9000'", "expected one of",
      "digits_cnn")
def _(w, t):
    return w.train(w.config({"model": {"name": "resnet9000"}}))


@case("unknown-model-option", "unknown name", "model 'digits_cnn'", "'depth'")
def _(w, t):
    return w.train(w.config({"model": {"kwargs": {"depth": 3}}}))


@case("unknown-variant", "unknown name", "unknown variant 'papa-3'", "expected one of baseline, papa")
def _(w, t):
    return w.train(w.config(), "papa-3")


@case("unknown-experiment", "unknown name", "bad.yaml", "unknown experiment 'nope'", "defined: tiny")
def _(w, t):
    return [*w.prepare(w.config()), "--experiment", "nope"]


@case("missing-config", "missing file", "missing.yaml", "config file not found")
def _(w, t):
    return w.prepare(w.root / "missing.yaml")


@case("config-not-utf8", "not UTF-8", "bad.yaml", "not UTF-8 text: byte 0xe9 at line 1, column 4")
def _(w, t):
    config = w.config()
    config.write_bytes("# r\u00e9sum\u00e9 caf\u00e9\n".encode("latin-1") + config.read_bytes())  # only a comment
    return w.train(config)


@case("alpha-nan", "not a finite number", "bad.yaml", "averaging.papa.alpha: nan is not a finite number")
def _(w, t):
    return w.train(w.config({"averaging": {"papa": {"alpha": float("nan")}}}))


@case("lr-infinite", "not a finite number", "bad.yaml", "train.optimizer.lr: inf is not a finite number")
def _(w, t):
    return w.train(w.config({"train": {"optimizer": {"lr": float("inf")}}}))


@case("weight-decay-nan", "not a finite number", "bad.yaml", "train.optimizer.weight_decay: nan is not a finite")
def _(w, t):
    return w.prepare(w.config({"train": {"optimizer": {"weight_decay": float("nan")}}}))


@case("name-ending-in-newline", "bad name", "bad.yaml", "experiments: 'tiny\\n' does not match")
def _(w, t):
    return w.prepare(w.config(text=yaml.safe_dump({"seeds": [1], "experiments": {"tiny\n": deep_merge(TINY, FAST)}})))


# data ---------------------------------------------------------------------------------------------------
def cifar(w: World) -> Path:
    write_cifar(w.root / "data", "cifar10")
    return w.config({"data": {"dataset": "cifar10", "root": str(w.root / "data")}})


@case("missing-data-directory", "missing data", "CIFAR-10 not found", "nowhere/cifar-10-batches-py")
def _(w, t):
    return w.prepare(w.config({"data": {"dataset": "cifar10", "root": str(w.root / "nowhere")}}))


@case("incomplete-cifar", "missing data", "CIFAR-10 incomplete", "expected file", "data_batch_3")
def _(w, t):
    config = cifar(w)
    os.remove(w.root / "data/cifar-10-batches-py/data_batch_3")
    return w.prepare(config)


@case("truncated-cifar", "corrupt data", "corrupt archive", "data_batch_2", "UnpicklingError")
def _(w, t):
    config = cifar(w)
    truncate(w.root / "data/cifar-10-batches-py/data_batch_2")
    return w.prepare(config)


@case("corrupt-cifar", "corrupt data", "corrupt archive", "test_batch")
def _(w, t):
    config = cifar(w)
    # a pickle FLOAT opcode whose "number" holds line breaks and control characters, which the unpickler's
    # error message quotes, then random bytes (fixed: a failure must reproduce)
    junk = b"F\x03\x1c\x85\r\x0b\x0cnot a float\n" + random.Random(0).randbytes(3000)
    (w.root / "data/cifar-10-batches-py/test_batch").write_bytes(junk)
    return w.prepare(config)


@case("cifar-wrong-shape", "corrupt data", "corrupt archive", "data_batch_1", "expected uint8 data of shape (N, 3072)",
      "found uint8 (4, 100)")
def _(w, t):
    import numpy as np

    config = cifar(w)
    batch = {"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}
    (w.root / "data/cifar-10-batches-py/data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    return w.prepare(config)


class _RunsCode:
    def __init__(self, witness: Path):
        self.witness = witness

    def __reduce__(self):
        return os.system, (f"touch {self.witness}",)


def _witness_absent(w: World) -> None:
    assert not (w.root / "pwned").exists()


@case("cifar-pickle-runs-code", "corrupt data", "refusing to load", "data_batch_1", "system", check=_witness_absent)
def _(w, t):
    config = cifar(w)
    batch = {"data": _RunsCode(w.root / "pwned"), "labels": []}
    (w.root / "data/cifar-10-batches-py/data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    return w.prepare(config)


def imagenet(w: World, train_images: int) -> Path:
    from PIL import Image

    for part in ("train", "val"):
        folder = w.root / "data" / part / "cat"
        folder.mkdir(parents=True)
        for i in range(train_images if part == "train" else 1):
            Image.new("RGB", (12, 12)).save(folder / f"{i}.png")
    (w.root / "data/val/cat/notes.txt").write_text("not an image")
    return w.config({"data": {"dataset": "imagenet", "root": str(w.root / "data"), "image_size": 8}})


@case("image-folder-without-images", "empty image folder", "ImageNet train", "no images found under", "data/train")
def _(w, t):
    return w.prepare(imagenet(w, train_images=0))


@case("image-folder-missing", "missing data", "ImageNet train not found", "elsewhere/train")
def _(w, t):
    return w.prepare(w.config({"data": {"dataset": "imagenet", "root": str(w.root / "elsewhere")}}))


# the validation split ---------------------------------------------------------------------------------
@case("missing-split", "missing file", "split file not found", "nosplit.json")
def _(w, t):
    return w.train(w.config(), "papa", w.root / "nosplit.json")


@case("split-of-another-dataset", "corrupt data", "split.json was made for 100 training items",
      "the dataset has 1438")
def _(w, t):
    doc = json.loads(w.split.read_text())
    doc["meta"]["n"] = 100
    w.split.write_text(json.dumps(doc))
    return w.train(w.config())


# checkpoints -------------------------------------------------------------------------------------------
@case("corrupt-checkpoint-resume", "corrupt checkpoint", "run/checkpoint.safetensors",
      "corrupt or truncated checkpoint", keep={"checkpoint.safetensors", "checkpoint.json"})
def _(w, t):
    ckpt = w.checkpoint(t)
    ckpt.write_bytes(random.Random(1).randbytes(ckpt.stat().st_size))
    return w.train(w.config({"train": {"epochs": 2}}))


@case("truncated-checkpoint-resume", "corrupt checkpoint", "run/checkpoint.safetensors",
      "corrupt or truncated checkpoint", keep={"checkpoint.safetensors", "checkpoint.json"})
def _(w, t):
    truncate(w.checkpoint(t))
    return w.train(w.config({"train": {"epochs": 2}}))


@case("checkpoint-other-variant-resume", "checkpoint of another run", "run/checkpoint.safetensors",
      "written by another run", "variant: the checkpoint has 'papa', this run has 'papa-all'",
      keep={"checkpoint.safetensors", "checkpoint.json"})
def _(w, t):
    w.checkpoint(t)
    return w.train(w.config({"train": {"epochs": 2}}), "papa-all")


@case("checkpoint-other-population-size-resume", "checkpoint of another run", "run/checkpoint.safetensors",
      "population.size", "checkpoint has 3", "this run has 4", keep={"checkpoint.safetensors", "checkpoint.json"})
def _(w, t):
    w.checkpoint(t)
    return w.train(w.config({"train": {"epochs": 2}, "population": {"size": 4}}))


@case("checkpoint-other-architecture-resume", "checkpoint of another run", "run/checkpoint.safetensors",
      "model.kwargs.width", "checkpoint has 8", "this run has 16", keep={"checkpoint.safetensors", "checkpoint.json"})
def _(w, t):
    w.checkpoint(t)
    return w.train(w.config({"train": {"epochs": 2}, "model": {"kwargs": {"width": 16}}}))


@case("truncated-population", "corrupt checkpoint", "run/population.safetensors", "corrupt or truncated checkpoint")
def _(w, t):
    truncate(w.run / "population.safetensors", 0.9)
    return w.soups(w.config())


@case("population-other-architecture", "checkpoint of another run", "run/population.safetensors",
      "conv1.weight", "expected shape (3, 16, 1, 3, 3)", "found (3, 8, 1, 3, 3)")
def _(w, t):
    return w.soups(w.config({"model": {"kwargs": {"width": 16}}}))


@case("population-other-size", "checkpoint of another run", "run/population.safetensors",
      "holds 3 x digits_cnn", "expects 4 x digits_cnn")
def _(w, t):
    for name in ("soups.safetensors", "soups.json"):
        shutil.copy(t / name, w.run / name)
    return w.evaluate(w.config({"population": {"size": 4}}))


@case("population-other-model", "checkpoint of another run", "run/population.safetensors",
      "holds 3 x digits_cnn", "expects 3 x logreg")
def _(w, t):
    return w.soups(w.config({"model": {"name": "logreg", "kwargs": {}}}))


@case("missing-population", "missing file", "run/population.safetensors",
      "not found; run `papa train` on this run first")
def _(w, t):
    for path in w.run.iterdir():
        path.unlink()
    return w.soups(w.config())


@case("soups-before-evaluate", "missing file", "run/soups.safetensors", "not found; run `papa soups` on this run first")
def _(w, t):
    return w.evaluate(w.config())


@case("corrupt-soups", "corrupt checkpoint", "run/soups.safetensors", "corrupt or truncated checkpoint")
def _(w, t):
    shutil.copy(t / "soups.json", w.run / "soups.json")
    (w.run / "soups.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")
    return w.evaluate(w.config())


def flip_bit(path: Path, tensor: str) -> None:
    """Flip one bit in the bytes of one tensor of a safetensors file, as a failing disk or memory would."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    data[8 + n + json.loads(data[8:8 + n])[tensor]["data_offsets"][0] + 3] ^= 0x10
    path.write_bytes(data)


@case("bit-flip-population", "corrupt checkpoint", "run/population.safetensors",
      "corrupt: its bytes do not match what was written", "run `papa train` on this run again")
def _(w, t):
    flip_bit(w.run / "population.safetensors", "conv1.weight")  # member 0's first weights
    return [*w.soups(w.config()), "--evaluate"]


@case("bit-flip-population-evaluate", "corrupt checkpoint", "run/population.safetensors",
      "corrupt: its bytes do not match what was written", "run `papa train` on this run again")
def _(w, t):
    for name in ("soups.safetensors", "soups.json"):  # the soups made from the population before the flip
        shutil.copy(t / name, w.run / name)
    flip_bit(w.run / "population.safetensors", "conv1.weight")  # not "different trainings": the bytes changed
    return w.evaluate(w.config())


@case("bit-flip-checkpoint-resume", "corrupt checkpoint", "run/checkpoint.safetensors",
      "corrupt: its bytes do not match what was written",
      "delete checkpoint.safetensors and checkpoint.json to start this run over")
def _(w, t):
    flip_bit(w.checkpoint(t), "pop.conv1.weight")
    return w.train(w.config({"train": {"epochs": 2}}))


def another_runs_outputs(w: World) -> Path:
    """A finished papa run of seed 1 where `papa train` will write: the outputs of the trained fixture."""
    shutil.copytree(w.run, w.out / "run")
    return w.out / "run"


@case("population-sidecar-deleted", "outputs of another run", "out/run holds the outputs of another run",
      "variant papa, seed 1, in population.safetensors", "give another --out")
def _(w, t):
    (another_runs_outputs(w) / "population.json").unlink()
    return w.train(w.config(), "baseline")


@case("population-sidecar-emptied", "outputs of another run", "out/run holds the outputs of another run",
      "variant papa, seed 1, in population.safetensors", "give another --out")
def _(w, t):
    (another_runs_outputs(w) / "population.json").write_text("")
    return w.train(w.config(), "baseline")


@case("interrupted-run-of-another-seed", "checkpoint of another run", "run/checkpoint.safetensors",
      "written by another run: seed: the checkpoint has 1, this run has 2")
def _(w, t):
    w.checkpoint(t)  # seed 1 stopped after its first epoch: its checkpoint and history so far
    shutil.copy(w.run / "history.csv", w.out / "run" / "history.csv")
    args = w.train(w.config({"train": {"epochs": 2}}))
    args[args.index("--seed") + 1] = "2"
    return args


# results the reports read ----------------------------------------------------------------------------------
@case("metrics-array", "malformed metrics", "metrics.json", "expected a JSON object of metrics, found an array")
def _(w, t):
    return w.aggregate(b"[]\n")


@case("metrics-null", "malformed metrics", "metrics.json", "expected a JSON object of metrics, found null")
def _(w, t):
    return w.aggregate(b"null\n")


@case("metrics-not-utf8", "malformed metrics", "metrics.json", "not UTF-8 text (byte 0xff at offset 10)")
def _(w, t):
    return w.aggregate(b'{"mean": "\xff"}\n')


@case("metrics-seed-not-a-number", "malformed metrics", "metrics.json", "seed: 'abc' is not an integer")
def _(w, t):
    return w.aggregate(json.dumps({"experiment": "tiny", "variant": "papa", "seed": "abc", "mean": 97.0}).encode())


@case("history-empty", "malformed history", "history.csv", "empty file, expected a history")
def _(w, t):
    return w.plot(b"")


@case("history-header-only", "malformed history", "history.csv", "no rows, only a header")
def _(w, t):
    return w.plot((w.run / "history.csv").read_bytes().splitlines(keepends=True)[0])


@case("history-garbage", "malformed history", "history.csv", "not a history: no column 'epoch', 'phase'")
def _(w, t):
    return w.plot(b"<html><body>502 Bad Gateway</body></html>\n")


@case("history-not-utf8", "malformed history", "history.csv", "not UTF-8 text (byte 0xff at offset 60)")
def _(w, t):
    data = bytearray((w.run / "history.csv").read_bytes())
    data[60] = 0xFF
    return w.plot(bytes(data))


@case("history-cut-mid-row", "malformed history", "history.csv", "cut short: its last line is incomplete")
def _(w, t):
    return w.plot((w.run / "history.csv").read_bytes()[:-5])


# divergence ---------------------------------------------------------------------------------------------
def _last_good_checkpoint_kept(w: World) -> None:
    meta = json.loads((w.out / "run" / "checkpoint.json").read_text())
    assert (meta["epoch"], meta["batch"]) == (1, 0)
    # the history of the epochs that checkpoint holds (rewritten after every epoch, issue 14), none of epoch 2
    with (w.out / "run" / "history.csv").open() as f:
        assert {row["epoch"] for row in csv.DictReader(f)} == {"1"}


@case("non-finite-loss", "non-finite loss", "non-finite loss", "member", "at epoch 2, step", "last good checkpoint",
      keep={"checkpoint.safetensors", "checkpoint.json", "history.csv"}, check=_last_good_checkpoint_kept)
def _(w, t):
    # the learning rate jumps by 1e30 after the first epoch: epoch 1 is fine, epoch 2 diverges
    schedule = {"name": "multistep", "milestones": [0.5], "gamma": 1.0e30}
    return w.train(w.config({"train": {"epochs": 2, "schedule": schedule}}))


# the tests ------------------------------------------------------------------------------------------------
def files(root: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@dataclass
class Outcome:
    world: World
    args: list[str]
    result: subprocess.CompletedProcess
    before: dict[Path, str]  # every file of the case's directory, before and after the command
    after: dict[Path, str]


@pytest.fixture(scope="module")
def outcomes(trained, tmp_path_factory) -> dict[str, Outcome]:
    """Every case run through the CLI, one process per core at a time (each command is mostly start-up)."""
    root = tmp_path_factory.mktemp("cases")
    ready = {}
    for name, c in CASES.items():
        world = World(root / name)
        world.root.mkdir()
        shutil.copy(trained / "split.json", world.split)
        shutil.copytree(trained / "run", world.run)
        args = c.make(world, trained)
        ready[name] = (world, args, files(world.root))
    with ThreadPoolExecutor(max(2, len(os.sched_getaffinity(0)))) as pool:
        results = dict(zip(ready, pool.map(lambda item: papa(*item[1]), ready.values()), strict=True))
    return {name: Outcome(w, args, results[name], before, files(w.root)) for name, (w, args, before) in ready.items()}


def test_error_messages_are_one_printable_line():
    """Messages quote what failed to parse, which can be any bytes: they still print as one line."""
    quoted = "could not convert 'a\nb\r\x85c\u2028d\x00e\x1b[31m'"
    text = str(PapaError(f"corrupt archive x: {quoted}"))
    assert text.splitlines() == [text] and text.isprintable()
    assert text == "corrupt archive x: could not convert 'a b c d\\x00e\\x1b[31m'"
    long = one_line("x" * 5000)
    assert len(long) == 1000 and long.endswith("…")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(name, outcomes):
    c, o = CASES[name], outcomes[name]
    result = o.result
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    # off a terminal, `papa train` logs progress lines (papa.train.Trainer.progress_line) before the error: one
    # error line, the last
    progress = re.compile(r"papa train: tiny/[\w-]+/seed\d+, epoch \d+/\d+")
    lines = [line for line in result.stderr.splitlines() if not progress.match(line)]
    assert len(lines) == 1 and result.stderr.splitlines()[-1] == lines[0], result.stderr
    assert lines[0].startswith(f"papa {o.args[0]}: error: "), lines[0]
    missing = [n for n in c.needles if n not in lines[0]]
    assert not missing, f"{lines[0]!r} does not name {missing}"
    new = {p.name for p in o.after.keys() - o.before.keys()}
    assert new <= c.keep, f"left behind: {sorted(new - c.keep)}"
    assert [p for p in o.before if o.before[p] != o.after.get(p)] == [], "an input was changed or removed"
    assert not list(o.world.root.rglob("*.tmp"))
    if c.check is not None:
        c.check(o.world)


def test_name_patterns_end_at_the_true_end_in_python_and_in_ecma_262():
    """The schemas' name patterns accept a name and refuse it with a newline after it, as jsonschema matches them
    (Python's re.search, where a bare `$` also matches before a final newline) and as JSON Schema specifies them
    (ECMA-262, checked with node where it is installed)."""
    from papa.config import schema

    top = schema("config")["properties"]
    patterns = {top["experiments"]["propertyNames"]["pattern"],
                *(top[kind]["items"]["properties"]["name"]["pattern"] for kind in ("tables", "figures"))}
    assert len(patterns) == 1
    pattern = patterns.pop()
    names = {"tiny": True, "a.b-c_1": True, "tiny\n": False, "tiny\n\n": False, "ti\nny": False, "-x": False, "": False}
    assert {n: bool(re.search(pattern, n)) for n in names} == names
    if shutil.which("node") is None:
        pytest.skip("node is not installed: ECMA-262 semantics not checked")
    script = (f"const p = new RegExp({json.dumps(pattern)});\n"
              f"console.log(JSON.stringify({json.dumps(list(names))}.map(n => p.test(n))))")
    done = subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == list(names.values())


KINDS = {
    "malformed YAML", "unknown key", "wrong type", "out of range", "unknown name", "missing file", "missing data",
    "corrupt data", "empty image folder", "corrupt checkpoint", "checkpoint of another run", "non-finite loss",
    "not UTF-8", "not a finite number", "bad name", "outputs of another run", "malformed metrics", "malformed history",
}


def test_every_kind_of_bad_input_is_tried():
    assert {c.kind for c in CASES.values()} == KINDS
    out_of_range = {k for k, c in CASES.items() if c.kind == "out of range"}
    assert {"population-below-1", "alpha-zero", "alpha-above-one", "every-zero", "negative-epochs",
            "window-outside-0-1"} <= out_of_range
    assert len(CASES) == 63
