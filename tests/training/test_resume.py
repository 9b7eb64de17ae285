"""Resume and safety: a run killed (SIGKILL) or stopped (SIGTERM/SIGUSR1) in the middle of an epoch and run
again ends bit for bit where an uninterrupted run ends; outputs appear only when complete; concurrent runs
never share temporary files; nothing we load runs pickled code."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from papa.data.stream import MemberStream
from tests.helpers import REPO, papa, write_config

# 88 steps per epoch: long enough to kill a run in the middle of one
LONG = {"train": {"epochs": 3, "batch_size": 16}}
OUTPUTS = ("population.safetensors", "population.json", "history.csv")


def train_args(config: Path, split: Path, out: Path, variant: str = "papa", seed: int = 1) -> list[str]:
    return ["train", "--config", str(config), "--variant", variant, "--seed", str(seed), "--split", str(split),
            "--out", str(out)]


def start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "papa.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def checkpoint_epoch(run: Path) -> int | None:
    try:
        return json.loads((run / "checkpoint.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return None


def wait_for_epoch(run: Path, epoch: int, proc: subprocess.Popen, timeout: float = 300) -> float:
    """Poll until the checkpoint of ``epoch`` is written; the time it appeared."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (checkpoint_epoch(run) or 0) >= epoch:
            return time.monotonic()
        if proc.poll() is not None:
            raise AssertionError(f"training ended before epoch {epoch}: {proc.communicate()[1]}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"no checkpoint of epoch {epoch} after {timeout} s")


def evaluate(config: Path, split: Path, run: Path) -> None:
    papa("soups", "--config", str(config), "--split", str(split), "--run", str(run), check=True)
    papa("evaluate", "--config", str(config), "--split", str(split), "--run", str(run), check=True)


def same_files(a: Path, b: Path, names=("population.safetensors", "history.csv")) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@dataclass
class Reference:
    config: Path
    split: Path
    run: Path  # results/tiny/papa/seed1 of an uninterrupted run, soups and metrics.json included
    epoch_seconds: float  # how long its second epoch took


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "long.yaml", LONG)
    split = root / "split.json"
    papa("prepare", "--config", str(config), "--out", str(split), check=True)
    run = root / "tiny" / "papa" / "seed1"
    proc = start(*train_args(config, split, run))
    first = wait_for_epoch(run, 1, proc)
    second = wait_for_epoch(run, 2, proc)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert not (run / "checkpoint.safetensors").exists() and not (run / "checkpoint.json").exists()
    evaluate(config, split, run)
    return Reference(config, split, run, second - first)


# resume -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_gives_identical_results(reference, tmp_path):
    run = tmp_path / "tiny" / "papa" / "seed1"
    proc = start(*train_args(reference.config, reference.split, run))
    wait_for_epoch(run, 1, proc)
    time.sleep(0.3 * reference.epoch_seconds)  # well inside the second epoch
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta["epoch"] in (1, 2) and meta["batch"] == 0  # the last end-of-epoch checkpoint
    # outputs appear only when complete: a killed run leaves no population, nor any temporary file; the
    # history so far is rewritten after every epoch (one row per member and finished epoch)
    assert not [name for name in OUTPUTS[:2] if (run / name).exists()]
    assert not list(run.glob(".*.tmp"))
    assert len((run / "history.csv").read_text().splitlines()) == 1 + 3 * meta["epoch"]

    result = papa(*train_args(reference.config, reference.split, run), check=True)
    assert "trained 3 members for 3 epochs" in result.stdout
    assert not (run / "checkpoint.safetensors").exists() and not (run / "checkpoint.json").exists()
    evaluate(reference.config, reference.split, run)
    same_files(run, reference.run, ("metrics.json", "population.safetensors", "history.csv", "soups.safetensors"))


def signal_at(monkeypatch, signum: int, epoch: int, batch: int) -> None:
    """Send ``signum`` to this process while the stream yields batch ``batch`` (0-based) of ``epoch``."""
    original = MemberStream.epoch

    def epoch_with_signal(self, e):
        for i, item in enumerate(original(self, e)):
            if (e, i) == (epoch, batch):
                os.kill(os.getpid(), signum)
            yield item

    monkeypatch.setattr(MemberStream, "epoch", epoch_with_signal)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "epoch", "batch"),
                         [(signal.SIGTERM, 1, 40), (signal.SIGUSR1, 0, 5), (signal.SIGINT, 1, 10)])
def test_signal_mid_epoch_checkpoints_exits_3_and_resumes_identically(
        reference, tmp_path, monkeypatch, capsys, signum, epoch, batch):
    """The CLI in this process, with a real signal delivered to it in the middle of an epoch: the handler
    asks the trainer to stop after the step, which writes a mid-epoch checkpoint (global RNG state
    included) and exits with status 3; the same command then finishes the run exactly as if uninterrupted."""
    from papa.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference's subprocess
    try:
        run = tmp_path / "run"
        args = train_args(reference.config, reference.split, run)
        handler = signal.getsignal(signum)
        signal_at(monkeypatch, signum, epoch, batch)
        with pytest.raises(SystemExit) as stopped:
            main(args)
        assert stopped.value.code == 3
        err = capsys.readouterr().err.strip().splitlines()  # progress lines (not a terminal), then the stop
        name = signal.Signals(signum).name  # Ctrl-C (SIGINT) takes the same path as SIGTERM
        assert err[-1] == (f"papa train: stopped by {name} at epoch {epoch + 1}, batch {batch + 1}; checkpoint "
                           f"saved in {run}, run the same command to resume")
        meta = json.loads((run / "checkpoint.json").read_text())
        assert (meta["epoch"], meta["batch"], meta["step"]) == (epoch, batch + 1, 88 * epoch + batch + 1)
        assert len(meta["history"]) == 3 * epoch  # one row per member and finished epoch
        assert not [name for name in OUTPUTS[:2] if (run / name).exists()]
        assert signal.getsignal(signum) == handler  # the run's handlers are gone

        monkeypatch.undo()
        assert main(args) == 0
        err = capsys.readouterr().err
        assert f"papa train: {run}: resumed from epoch {epoch + 1}, batch {batch + 1}\n" in err
    finally:
        torch.set_num_threads(threads)
    assert not (run / "checkpoint.safetensors").exists()
    same_files(run, reference.run)


# concurrency ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_concurrent_runs_in_one_results_directory_do_not_clobber_each_other(reference, tmp_path):
    """What Snakemake does with --cores > 1: two `papa prepare` writing the same split, then two trainings
    (another variant and seed) into sibling run directories, at the same time; both equal sequential runs."""
    config, results = reference.config, tmp_path / "results" / "tiny"
    split = results / "split.json"
    prepares = [start("prepare", "--config", str(config), "--out", str(split)) for _ in range(2)]
    assert [p.wait() for p in prepares] == [0, 0]
    assert split.read_bytes() == reference.split.read_bytes()

    jobs = [("papa", 1), ("papa-all", 2)]
    runs_dirs = [results / variant / f"seed{seed}" for variant, seed in jobs]
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda job: papa(*train_args(config, split, job[1], *job[0])),
                             zip(jobs, runs_dirs, strict=True)))
    assert [r.returncode for r in done] == [0, 0], [r.stderr for r in done]
    assert not list(results.rglob("*.tmp")) and not list(results.rglob("checkpoint*"))
    same_files(runs_dirs[0], reference.run)
    alone = tmp_path / "alone"
    papa(*train_args(config, split, alone, "papa-all", 2), check=True)
    same_files(runs_dirs[1], alone)


def test_a_kill_between_the_checkpoint_and_its_sidecar_still_resumes_consistently(tmp_path, monkeypatch):
    """The two files of a checkpoint cannot be replaced together atomically: the metadata in the tensors
    file's own header is what a resume reads, so new tensors never meet the counters of the old sidecar."""
    from papa import checkpoint

    path = tmp_path / "checkpoint.safetensors"
    checkpoint.save_tensors(path, {"w": torch.zeros(2)}, {"epoch": 1})

    def killed(*args):
        raise KeyboardInterrupt  # the process dies after the tensors, before the sidecar

    monkeypatch.setattr(checkpoint, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_tensors(path, {"w": torch.ones(2)}, {"epoch": 2})
    assert json.loads(checkpoint.sidecar_path(path).read_text())["epoch"] == 1  # stale
    for _ in range(2):
        tensors, meta = checkpoint.load_tensors(path)
        assert meta["epoch"] == 2 and torch.equal(tensors["w"], torch.ones(2))
        checkpoint.sidecar_path(path).unlink(missing_ok=True)  # and without any sidecar


# safety --------------------------------------------------------------------------------------------------
def test_nothing_we_load_runs_pickled_code():
    """Checkpoints are safetensors; the only unpickler is the restricted one for CIFAR archives."""
    restricted = REPO / "papa" / "data" / "datasets.py"
    writer = REPO / "papa" / "fakedata.py"  # writes CIFAR archives (pickle.dumps); the patterns catch any load
    offenders = []
    for path in sorted((REPO / "papa").rglob("*.py")):
        text = path.read_text()
        where = path.relative_to(REPO)
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                offenders.append(f"{where}: torch.load without weights_only=True")
        for pattern in (r"\bpickle\.loads?\(", r"\bcloudpickle\b", r"\bdill\b", r"\bjoblib\b", r"\bmarshal\.loads?\(",
                        r"allow_pickle\s*=\s*True", r"\bshelve\b"):
            if re.search(pattern, text):
                offenders.append(f"{where}: {pattern}")
        if path not in (restricted, writer) and re.search(r"\bimport pickle\b|\bUnpickler\b", text):
            offenders.append(f"{where}: unpickling outside the restricted CIFAR unpickler")
    assert offenders == []
    text = restricted.read_text()
    # the restricted unpickler resolves globals from an allow-list, and is the only one that loads
    assert re.search(r"class _ArrayUnpickler\(pickle\.Unpickler\):.*?def find_class", text, re.S)
    assert re.findall(r"(\w+)\(.*\)\.load\(\)", text) == ["_ArrayUnpickler"]
