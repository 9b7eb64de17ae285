"""The CLI (papa.cli.main, in this process) met with bad input a user can give: a config that is a folder or
defines several experiments, a CUDA device on a machine without one, an output path that is a folder or lies under
a file, a run directory of outputs naming no run, a timm model without hub weights for `papa fake-data`; each is one
line on stderr, exit status 2, and nothing written. A second Ctrl-C stops training at once: status 130, no
checkpoint. An OSError that is neither is not dressed up as one."""

import errno
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from papa import runs
from papa.cli import main
from papa.data.stream import MemberStream
from tests.helpers import write_config

FAST = {"train": {"epochs": 1, "batch_size": 256}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """A one-epoch config and its split."""
    root = tmp_path_factory.mktemp("cli")
    config = write_config(root / "c.yaml", FAST)
    assert main(["prepare", "--config", str(config), "--out", str(root / "split.json")]) == 0
    return config, root / "split.json"


def train_args(config: Path, split: Path, out: Path) -> list[str]:
    return ["train", "--config", str(config), "--variant", "papa", "--seed", "1", "--split", str(split), "--out",
            str(out)]


def fails(capsys, argv: list[str]) -> str:
    """The one line a failing command prints, once its status is known to be 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def everything(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_config_that_is_a_folder_is_named(tmp_path, capsys):
    line = fails(capsys, ["prepare", "--config", str(tmp_path), "--out", str(tmp_path / "split.json")])
    assert line == f"papa prepare: error: {tmp_path}: cannot read config (Is a directory)"
    assert everything(tmp_path) == []


def test_config_of_several_experiments_needs_one_chosen(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    raw = yaml.safe_load(config.read_text())
    raw["experiments"]["other"] = raw["experiments"]["tiny"]
    config.write_text(yaml.safe_dump(raw))
    line = fails(capsys, ["prepare", "--config", str(config), "--out", str(tmp_path / "split.json")])
    assert line == f"papa prepare: error: {config}: several experiments defined; choose one with --experiment"
    assert everything(tmp_path) == ["c.yaml"]
    assert main(["prepare", "--config", str(config), "--experiment", "other", "--out", str(tmp_path / "s.json")]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_training_on_cuda_without_a_cuda_device_is_refused(prepared, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", {**FAST, "train": {**FAST["train"], "device": "cuda"}})
    line = fails(capsys, train_args(config, prepared[1], tmp_path / "run"))
    assert line == ("papa train: error: device 'cuda' (train.device, or papa bench --device) but no CUDA device is "
                    "available")
    assert everything(tmp_path) == ["c.yaml"]


@pytest.mark.parametrize(("command", "out", "message"), [
    ("prepare", "afile/split.json", "afile: exists and is not a folder"),
    ("prepare", "afolder", "afolder: is a folder, not a file"),
    ("train", "afile/run", "afile/run: a part of this path is a file, not a folder"),
])
def test_output_path_that_is_a_folder_or_under_a_file_is_named(prepared, tmp_path, capsys, monkeypatch, command, out,
                                                                message):
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("kept\n")
    Path("afolder").mkdir()
    config, split = prepared
    argv = ["prepare", "--config", str(config), "--out", out] if command == "prepare" else train_args(config, split,
                                                                                                       Path(out))
    assert fails(capsys, argv) == f"papa {command}: error: {message}"
    assert everything(tmp_path) == ["afile", "afolder"] and Path("afile").read_text() == "kept\n"


def test_run_directory_of_outputs_naming_no_run_is_left_alone(prepared, tmp_path, capsys):
    """A population file that cannot be read names no run: training there would delete what may be another run's."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "population.safetensors").write_bytes(b"\0" * 40)
    (run / "history.csv").write_text("epoch\n0\n")
    line = fails(capsys, train_args(*prepared, run))
    assert line == (f"papa train: error: {run} holds outputs (population.safetensors, history.csv) that name no "
                    "run: population.safetensors and population.json are missing or unreadable; give another --out, "
                    "or delete them to train this run there")
    assert everything(run) == ["history.csv", "population.safetensors"]
    assert (run / "population.safetensors").read_bytes() == b"\0" * 40


def test_fake_data_for_a_timm_model_without_hub_weights_writes_nothing(tmp_path, capsys):
    """Refused before any dataset is written: the data root stays as it was."""
    config = write_config(tmp_path / "c.yaml", {"data": {"dataset": "optdigits"},
                                                "model": {"name": "timm/nosuch", "pretrained": "timm"}})
    line = fails(capsys, ["fake-data", "--config", str(config), "--root", str(tmp_path / "data"), "--hub-cache",
                          str(tmp_path / "hub")])
    assert line == "papa fake-data: error: fake-data: timm/nosuch has no Hugging Face hub weights to stand in for"
    assert everything(tmp_path) == ["c.yaml"]


def test_an_oserror_that_is_no_refused_write_is_raised_as_it_is(prepared, tmp_path, monkeypatch):
    """An I/O error of the disk is neither bad input nor a full disk: its traceback is what tells what failed."""
    def broken_disk(*args):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / "split.json"))

    monkeypatch.setattr(runs, "prepare", broken_disk)
    with pytest.raises(OSError) as e:
        main(["prepare", "--config", str(prepared[0]), "--out", str(tmp_path / "split.json")])
    assert e.value.errno == errno.EIO


def test_a_second_ctrl_c_stops_training_at_once_without_a_checkpoint(prepared, tmp_path, capsys, monkeypatch):
    """The first Ctrl-C asks for a checkpoint after the step; a second one before it is taken stops there: status
    130, one line, no checkpoint and no outputs, and the run's signal handlers are gone."""
    original = MemberStream.epoch

    def two_ctrl_c(self, e):
        for i, item in enumerate(original(self, e)):
            if i == 2:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            yield item

    monkeypatch.setattr(MemberStream, "epoch", two_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    run = tmp_path / "run"
    assert main(train_args(*prepared, run)) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "papa train: interrupted"
    assert everything(tmp_path) == []  # not even the run directory, which the run made
    assert signal.getsignal(signal.SIGINT) == handler
