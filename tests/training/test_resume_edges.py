"""Checkpoints a run cannot resume from, met as a user meets them: one written by an earlier papa (no digest)
whose population or SWA averages lack a tensor this run has, and the checkpoints of a two-process run that are
incomplete or stopped at different points. Each is one line naming the file, and the checkpoint is left as it
was. And Table 5's feature similarity of a one-member population."""

import json
import types
from pathlib import Path

import pytest
from safetensors.torch import save_file

from papa import runs
from papa.checkpoint import META_KEY
from papa.cli import main
from papa.data import load_split
from papa.errors import PapaError
from papa.train import Trainer
from tests.helpers import write_config
from tests.training.test_align_pipeline import experiment, permuted_run

pytestmark = pytest.mark.usefixtures("one_thread")

SWA = {"train": {"epochs": 2, "batch_size": 256, "swa": {"start": 0.5, "lr": 0.02, "anneal_epochs": 1}}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path, Trainer]:
    """A config with SWA, its split, and a trainer of its run whose state a case writes as a checkpoint."""
    root = tmp_path_factory.mktemp("resume")
    config = write_config(root / "c.yaml", SWA)
    assert main(["prepare", "--config", str(config), "--out", str(root / "split.json")]) == 0
    exp = runs.load_experiment(config, None)
    trainer = Trainer(exp, "papa", 1, runs.load_data(exp), load_split(root / "split.json"), progress=False)
    return config, root / "split.json", trainer


@pytest.mark.parametrize(("prefix", "problem"), [("pop.", ""), ("swa.", "SWA averages: ")])
def test_earlier_checkpoint_lacking_a_tensor_is_named_and_kept(prepared, tmp_path, capsys, prefix, problem):
    config, split, trainer = prepared
    tensors, meta = trainer.state()
    dropped = next(name for name in tensors if name.startswith(prefix))
    del tensors[dropped]
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "checkpoint.safetensors"
    save_file(tensors, str(ckpt), metadata={META_KEY: json.dumps(meta)})  # as papa wrote it before the digest
    before = ckpt.read_bytes()
    assert main(["train", "--config", str(config), "--variant", "papa", "--seed", "1", "--split", str(split),
                 "--out", str(run)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"papa train: error: {ckpt}: {problem}population state does not match the architecture: "
                           f"missing ['{dropped.removeprefix(prefix)}']")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.safetensors"] and ckpt.read_bytes() == before


def two_processes(out: Path, *stopped_at: tuple[int, int, int] | None) -> None:
    """The checkpoints of a two-process run in ``out``: each rank's tensors file, and its sidecar where given."""
    for rank, at in enumerate(stopped_at):
        (out / f"checkpoint.rank{rank}.safetensors").write_bytes(b"tensors")
        if at is not None:
            epoch, step, batch = at
            (out / f"checkpoint.rank{rank}.json").write_text(json.dumps({"epoch": epoch, "step": step,
                                                                         "batch": batch}))


@pytest.mark.parametrize(("rank1", "message"), [
    (None, "{out}/checkpoint.rank1.safetensors: incomplete checkpoint; delete the checkpoints to start over"),
    ((1, 12, 0), "{out}: the processes' checkpoints stopped at different points; delete them to start over"),
])
def test_two_processes_resume_only_from_checkpoints_at_one_point(tmp_path, rank1, message):
    """What each rank of a torchrun job checks before resuming: every rank's checkpoint, stopped at one step."""
    two_processes(tmp_path, (1, 11, 0), rank1)
    rank0 = types.SimpleNamespace(world_size=2, rank=0)
    with pytest.raises(PapaError) as e:
        runs._checkpoint(tmp_path, rank0)
    assert str(e.value) == message.format(out=tmp_path)
    two_processes(tmp_path, (1, 11, 0), (1, 11, 0))
    assert runs._checkpoint(tmp_path, rank0) == tmp_path / "checkpoint.rank0.safetensors"


def test_feature_similarity_of_a_one_member_population_is_refused(tmp_path):
    exp = experiment(tmp_path, "resnet20", population={"size": 1})
    run, split, _ = permuted_run(tmp_path, exp)
    with pytest.raises(PapaError) as e:
        runs.similarity(exp, split, run)
    assert str(e.value) == f"{run}: feature similarity needs a population of at least 2 members, found 1"
    assert sorted(p.name for p in run.iterdir()) == ["population.json", "population.safetensors"]
