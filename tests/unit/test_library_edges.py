"""Library functions called directly, as a researcher would, with values the config schema never lets through:
each refusal names the value; and the smoke scale's cap on SWA's BatchNorm batches, the lock taken again when its
file vanished under it, and the free space of a path no file system answers for."""

import os
import shutil

import pytest

from papa import fidelity, io, smoke
from papa.checkpoint import load_tensors, read_meta
from papa.distributed import from_env
from papa.errors import PapaError
from tests.helpers import tiny_experiment


@pytest.mark.parametrize(("value", "message"), [
    ({"setting": "paperr"}, "exp: fidelity.setting: 'paperr' is not one of paper, authors"),
    ({"setting": "authors", "last_batch": "mine"}, "exp: fidelity.last_batch: 'mine' is not one of paper, authors"),
    ("both", "exp: fidelity.setting: 'both' is not one of paper, authors"),
])
def test_fidelity_setting_outside_paper_and_authors_is_named(value, message):
    with pytest.raises(PapaError) as e:
        fidelity.resolve(value, "exp: fidelity")
    assert str(e.value) == message


def test_torchrun_on_a_device_neither_cuda_nor_cpu_is_refused(monkeypatch):
    """Before joining any process group: the job fails at once on every rank."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PapaError) as e:
        from_env(2, "meta")
    assert str(e.value) == "train.device 'meta': torchrun runs on CUDA (NCCL) or the CPU (gloo) only"
    import torch.distributed as dist
    assert not dist.is_initialized()


@pytest.mark.parametrize(("bn_batches", "kept"), [(1000, "steps"), (1, 1)])
def test_smoke_scale_caps_swa_batchnorm_batches_at_an_epoch(bn_batches, kept):
    """SWA's BatchNorm recomputation draws at most one smoke epoch of batches; fewer are kept as they are."""
    full = tiny_experiment(train={"epochs": 4, "swa": {"start": 0.5, "lr": 0.02, "anneal_epochs": 1,
                                                       "bn_batches": bn_batches}})
    small = smoke.scale_experiment(full)
    steps = smoke._steps_per_epoch(small)
    assert 1 < steps < 1000
    assert small["train"]["swa"]["bn_batches"] == (steps if kept == "steps" else kept)
    assert full["train"]["swa"]["bn_batches"] == bn_batches  # the full experiment is left as it was


def test_missing_checkpoint_is_named(tmp_path):
    path = tmp_path / "run" / "checkpoint.safetensors"
    for read in (load_tensors, read_meta):
        with pytest.raises(PapaError) as e:
            read(path)
        assert str(e.value) == f"{path}: checkpoint not found"


def test_a_lock_file_removed_between_its_open_and_its_lock_is_taken_again(tmp_path, monkeypatch):
    """The holder before us removed the file as it finished, after we opened it: a lock on that removed file locks
    nothing, so hold_lock opens the path again, and the descriptor of the removed file is closed."""
    lock = tmp_path / ".lock"
    flock, calls = io.fcntl.flock, []

    def holder_finishes_first(fd, op):
        if not calls:
            os.unlink(lock)  # what the earlier holder does as its block ends
        calls.append(fd)
        return flock(fd, op)

    monkeypatch.setattr(io.fcntl, "flock", holder_finishes_first)
    before = len(os.listdir("/proc/self/fd"))
    with io.hold_lock(lock, "busy: {holder}"):
        assert len(calls) == 2 and lock.read_text().startswith(f"process {os.getpid()} ")
        assert len(os.listdir("/proc/self/fd")) == before + 1  # the lock's descriptor only
    assert len(os.listdir("/proc/self/fd")) == before and not lock.exists()


def test_free_space_of_a_path_no_file_system_answers_for_is_unknown(tmp_path, monkeypatch):
    def refused(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "disk_usage", refused)
    assert io.free_space(tmp_path / "a" / "b") is None
    line = io.write_error(OSError(28, "No space left on device", str(tmp_path / "x")))
    assert line == f"{tmp_path / 'x'}: no space left on device; free some space and run the same command again"
