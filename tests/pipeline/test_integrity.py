"""Outputs are bound to what made them: soups.json, metrics.json and similarity.json record the SHA-256 of the
population (and metrics.json of the soups) they were made from; `papa soups`/`evaluate` refuse in one line,
naming both files, to combine outputs of different trainings; `papa train` into a finished run directory
clears the earlier training's outputs first, one training at a time; a full disk is one line."""

import json
import os
import re
import shutil
import socket

import pytest

from papa.checkpoint import load_tensors, save_tensors
from papa.cli import main
from papa.io import file_digest, hold_lock
from papa.runs import LOCK
from tests.helpers import SmallDisk, write_config

SMALL = {"population": {"size": 2}, "train": {"epochs": 1}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    config = write_config(root / "c.yaml", SMALL)
    split = root / "split.json"
    assert main(["prepare", "--config", str(config), "--out", str(split)]) == 0
    return root, config, split


def run(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as e:  # pragma: no cover - a stop is a failure here
        return e.code


def train(config, split, out, seed=1):
    assert run("train", "--config", config, "--variant", "papa", "--seed", seed, "--split", split,
               "--out", out) == 0


def finished(config, split, out, seed=1):
    train(config, split, out, seed)
    assert run("soups", "--config", config, "--split", split, "--run", out) == 0
    assert run("evaluate", "--config", config, "--split", split, "--run", out) == 0


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_outputs_record_the_digests_of_what_made_them(setup, tmp_path):
    _, config, split = setup
    out = tmp_path / "a"
    finished(config, split, out)
    population = file_digest(out / "population.safetensors")
    assert json.loads((out / "population.json").read_text())["split_sha256"] == file_digest(split)
    assert json.loads((out / "soups.json").read_text())["population_sha256"] == population
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["population_sha256"] == population
    assert metrics["soups_sha256"] == file_digest(out / "soups.safetensors")


def test_soups_with_evaluate_writes_what_soups_then_evaluate_write(setup, tmp_path, capsys):
    """The pipeline's soups job (`papa soups --evaluate`, one process) and the two commands one after the other
    write the same bytes, and print the same lines."""
    _, config, split = setup
    one, two = tmp_path / "one", tmp_path / "two"
    train(config, split, one)
    shutil.copytree(one, two)
    capsys.readouterr()
    assert run("soups", "--config", config, "--split", split, "--run", one, "--evaluate") == 0
    together = capsys.readouterr().out.replace(str(one), "RUN")
    assert run("soups", "--config", config, "--split", split, "--run", two) == 0
    assert run("evaluate", "--config", config, "--split", split, "--run", two) == 0
    assert together == capsys.readouterr().out.replace(str(two), "RUN")
    assert "RUN/metrics.json: members " in together
    for name in ("soups.safetensors", "soups.json", "metrics.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_evaluate_refuses_soups_of_another_training(setup, tmp_path, capsys):
    _, config, split = setup
    a, b = tmp_path / "a", tmp_path / "b"
    finished(config, split, a, seed=1)
    train(config, split, b, seed=2)
    for name in ("soups.safetensors", "soups.json"):
        shutil.copy(a / name, b / name)
    capsys.readouterr()
    assert run("evaluate", "--config", config, "--split", split, "--run", b) == 2
    assert error_line(capsys) == (
        f"papa evaluate: error: {b / 'soups.safetensors'} and {b / 'population.safetensors'} come from different "
        "trainings: the soups were made from another population; run `papa soups` on this run again")
    assert not (b / "metrics.json").exists()


def test_evaluate_refuses_soups_that_lack_a_soup(setup, tmp_path, capsys):
    """soups.safetensors of this population, but one soup's tensors gone (a hand-edited or foreign file)."""
    _, config, split = setup
    out = tmp_path / "a"
    train(config, split, out)
    assert run("soups", "--config", config, "--split", split, "--run", out) == 0
    tensors, meta = load_tensors(out / "soups.safetensors")
    save_tensors(out / "soups.safetensors", {k: v for k, v in tensors.items() if not k.startswith("avg_soup.")},
                 meta)
    capsys.readouterr()
    assert run("evaluate", "--config", config, "--split", split, "--run", out) == 2
    assert error_line(capsys) == f"papa evaluate: error: {out / 'soups.safetensors'}: no tensors for avg_soup"
    assert not (out / "metrics.json").exists()


def test_soups_and_evaluate_refuse_a_split_the_population_was_not_trained_with(setup, tmp_path, capsys):
    root, config, split = setup
    other = tmp_path / "other.json"
    config2 = write_config(tmp_path / "c2.yaml", {**SMALL, "data": {"split_seed": 7}})
    assert run("prepare", "--config", config2, "--out", other) == 0
    out = tmp_path / "a"
    finished(config, split, out)
    for command in ("soups", "evaluate"):
        capsys.readouterr()
        assert run(command, "--config", config, "--split", other, "--run", out) == 2
        line = error_line(capsys)
        assert line.startswith(f"papa {command}: error: {other} and {out / 'population.safetensors'} come from "
                               "different trainings"), line


def test_training_into_a_finished_run_clears_its_outputs_first(setup, tmp_path, capsys):
    _, config, split = setup
    out = tmp_path / "a"
    finished(config, split, out)
    (out / "similarity.json").write_text("{}")
    old = file_digest(out / "population.safetensors")
    capsys.readouterr()
    longer = write_config(tmp_path / "longer.yaml", {**SMALL, "train": {"epochs": 2}})
    train(longer, split, out)
    err = capsys.readouterr().err
    assert (f"papa train: {out}: removed the outputs of an earlier training (soups.safetensors, soups.json, "
            "metrics.json, similarity.json, population.safetensors, population.json, history.csv)\n") in err
    assert not any((out / n).exists() for n in ("soups.safetensors", "soups.json", "metrics.json", "similarity.json"))
    assert file_digest(out / "population.safetensors") != old
    assert json.loads((out / "population.json").read_text())["epochs"] == 2


def test_papa_train_writes_progress_lines_off_a_terminal(setup, tmp_path, capsys, monkeypatch):
    """Off a terminal, a line per epoch and (here every step) lines within the epoch, with every field."""
    import papa.train

    _, config, split = setup
    monkeypatch.setattr(papa.train, "PROGRESS_LINE_SECONDS", 0.0)
    train(config, split, tmp_path / "a")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("papa train: tiny/papa/seed1")]
    within, end = lines[:-1], lines[-1]
    assert len(within) == 22  # 1409 images at batch 64: 22 steps, a line after each
    assert "epoch 1/1 batch 1/22, step 1/22, loss " in within[0] and ", val -, " in within[0]
    assert end.startswith("papa train: tiny/papa/seed1, epoch 1/1, step 22/22, loss ")
    for field in ("lr ", "val ", " img/s", "elapsed 0:", "ETA 0:"):
        assert field in end, field
    assert ", val -," not in end  # the epoch's validation accuracy


def test_room_to_train_counts_the_space_the_earlier_outputs_free(tmp_path, monkeypatch):
    """Training refuses to start when its next file would not fit in the free space plus what it removes first."""
    from papa import runs
    from papa.errors import DiskError

    monkeypatch.setattr(runs, "free_space", lambda path: 600)
    runs.check_room(tmp_path, 1000, "the population", freed=400)  # fits exactly
    with pytest.raises(DiskError, match=r"no room to train: 600 B free on its file system, but the population takes "
                                        r"1 kB; free some space"):
        runs.check_room(tmp_path, 1000, "the population", freed=399)
    monkeypatch.setattr(runs, "free_space", lambda path: None)  # unknown: not judged
    runs.check_room(tmp_path, 10**15, "the population")


def test_a_progress_line_reports_the_rate_and_time_left_since_training_started_here(monkeypatch, capsys):
    """Rate and ETA count only the steps since this process started (a resumed run's earlier steps are not its);
    images per second are the population's; the validation accuracy is the mean over the last epoch's members."""
    from types import SimpleNamespace

    import papa.train
    from papa.checkpoint import Progress

    rows = [{"epoch": e, "phase": phase, "val_accuracy": acc}
            for e, phase, acc in ((1, "end", 80.0), (1, "end", 90.0), (1, "before_avg", 10.0), (0, "end", 5.0))]
    trainer = SimpleNamespace(progress=Progress(epoch=1, step=30, batch=5, history=rows), variant="papa", seed=3,
                              exp={"name": "e", "train": {"epochs": 4, "batch_size": 8}}, lr=0.1, last_loss=0.5,
                              stream=SimpleNamespace(steps_per_epoch=10), comm=SimpleNamespace(p=2), clock=(100.0, 10))
    monkeypatch.setattr(papa.train.time, "monotonic", lambda: 140.0)  # 20 steps in 40 s: 0.5 step/s
    papa.train.Trainer.progress_line(trainer)
    assert capsys.readouterr().err == ("papa train: e/papa/seed3, epoch 2/4 batch 5/10, step 30/40, loss 0.5000, "
                                       "lr 0.1, val 85.00%, 8 img/s, elapsed 0:00:40, ETA 0:00:20\n")
    assert trainer.last_line == 140.0 and papa.train._clock(3725.4) == "1:02:05"


def test_training_into_another_runs_directory_is_refused(setup, tmp_path, capsys):
    """A mistyped --out never deletes another run's results: one line, and they stay."""
    _, config, split = setup
    out = tmp_path / "a"
    finished(config, split, out, seed=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert run("train", "--config", config, "--variant", "baseline", "--seed", 1, "--split", split, "--out",
               out) == 2
    assert error_line(capsys) == (f"papa train: error: {out} holds the outputs of another run (experiment tiny, "
                                  "variant papa, seed 1, in population.safetensors); give another --out, or delete "
                                  "them to train this run there")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# one training at a time in a run directory ----------------------------------------------------------------
def test_a_second_training_into_a_run_directory_stops_in_one_line_and_touches_nothing(setup, tmp_path, capsys):
    """While a `papa train` works in a run directory (holding its lock), another one there (a rerun meeting an
    orphaned trainer, a second terminal) stops at once naming it; the lock goes with the trainer."""
    _, config, split = setup
    out = tmp_path / "a"
    train(config, split, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # flock locks belong to an open file: a second open here is another holder, as another process would be
    with hold_lock(out / LOCK, "held"):
        capsys.readouterr()
        assert run("train", "--config", config, "--variant", "papa", "--seed", 1, "--split", split, "--out", out) == 2
        assert error_line(capsys) == (f"papa train: error: {out} is being trained by another `papa train` (process "
                                      f"{os.getpid()} on {socket.gethostname()}); wait for it to finish, or stop it")
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK} == before
    train(config, split, out)  # the holder gone: trains, and leaves no lock file
    assert not (out / LOCK).exists()


# a full disk -----------------------------------------------------------------------------------------------
def disk_error(capsys, command: str, path) -> str:
    """The one line of a write the disk refused: the path, why, the room left."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = error_line(capsys) if not err.strip() else err.strip().splitlines()[-1]
    assert line.startswith(f"papa {command}: error: {path}"), line
    assert re.search(r"\d[\d.]* [kMGT]?B free on its file system.*; free some space and run the same command again$",
                     line), line
    return line


def test_a_full_disk_is_one_line_naming_the_path_and_the_room_left(setup, tmp_path, capsys):
    """`papa prepare`, `train`, `aggregate` and `render` on a disk without room (a tmpfs, else a file size limit):
    exit status 4 and one line; an earlier metrics.csv stays whole (`papa aggregate` writes it atomically)."""
    _, config, split = setup
    done = tmp_path / "done"
    finished(config, split, done)
    assert run("aggregate", done / "metrics.json", "--out", tmp_path / "m.csv") == 0
    report = write_config(tmp_path / "report.yaml", SMALL, tables=[
        {"name": "t", "layout": "main", "caption": "c", "rows": [{"label": "cnn", "experiment": "tiny"}]}])
    many = []  # metrics of 20 runs: a CSV of some 40 kB
    for seed in range(20):
        many.append(tmp_path / "runs" / f"seed{seed}" / "metrics.json")
        many[-1].parent.mkdir(parents=True)
        many[-1].write_text(json.dumps({"experiment": "tiny", "variant": "papa", "seed": seed,
                                        **{f"m{i}": 1.0 * i for i in range(50)}}))
    with SmallDisk(tmp_path / "disk", 4096) as disk:
        good = disk.path / "metrics.csv"
        assert run("aggregate", done / "metrics.json", "--out", good) == 0
        kept = good.read_bytes()
        with disk.limited():
            assert run("aggregate", *many, "--out", good) == 4
        disk_error(capsys, "aggregate", good)
        assert good.read_bytes() == kept

        with disk.limited():
            assert run("prepare", "--config", config, "--out", disk.path / "split.json") == 4
        disk_error(capsys, "prepare", disk.path / "split.json")

        with disk.limited():  # a tmpfs: no room for the population; a size limit: the first checkpoint fails
            assert run("train", "--config", config, "--variant", "papa", "--seed", 1, "--split", split, "--out",
                       disk.path / "run") == 4
        line = disk_error(capsys, "train", disk.path / "run")
        assert "no room to train: " in line if disk.tmpfs else "checkpoint.safetensors: file too large" in line

        disk.fill(leave=0)
        with disk.limited(0):
            assert run("render", "--config", report, "--table", "t", "--metrics", tmp_path / "m.csv",
                       "--md", disk.path / "t.md") == 4
        disk_error(capsys, "render", disk.path / "t.")
        assert sorted(p.name for p in disk.path.iterdir()) == ["filler", "metrics.csv"][not disk.tmpfs:]
