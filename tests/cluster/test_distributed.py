"""The population spread over processes (papa.distributed, for torchrun): every collective operation
on 2 gloo ranks matches papa.averaging on the whole population, for blocks of unequal size; and
`torchrun --nproc-per-node 2 -m papa.cli train` gives the population of the single-process run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from papa import averaging, distributed
from papa.errors import PapaError
from papa.population import Population
from tests.conftest import small_cnn
from tests.helpers import papa, write_config

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def whole_population(p: int) -> Population:
    """p small CNNs with distinct BatchNorm statistics and step counters."""
    pop = Population.from_factory(small_cnn, p, seed=3)
    for j in range(p):
        pop.buffers["1.running_mean"][j].uniform_(-1, 1, generator=torch.Generator().manual_seed(j))
        pop.buffers["1.num_batches_tracked"][j] = 10 * j + 1
    return pop


def share(pop: Population, members: list[int]) -> Population:
    """The members ``members`` of ``pop`` as a population of their own (one rank's share)."""
    idx = torch.tensor(members)
    return Population(pop.template, {n: t[idx].clone() for n, t in pop.params.items()},
                      {n: t[idx].clone() for n, t in pop.buffers.items()})


def assert_matches(held: Population, whole: Population, members: list[int], what: str) -> None:
    for name, t in held.tensors():
        expected = whole.state_dict()[name][members]
        if t.is_floating_point():
            torch.testing.assert_close(t, expected, rtol=0, atol=1e-6, msg=f"{what}: {name}")
        else:
            assert torch.equal(t, expected), (what, name, t, expected)


def check_ops(comm) -> None:
    """Every operation of ``comm`` against the single-process result on the whole population."""
    p, members = comm.p, comm.members
    whole = whole_population(p)

    def run(what: str, local_op, whole_op) -> None:
        held, ref = share(whole, members), share(whole, list(range(p)))
        local_op(held)
        whole_op(ref)
        assert_matches(held, ref, members, what)

    run("push", lambda pop: averaging.push_toward_average_(pop, 0.7, comm=comm),
        lambda pop: averaging.push_toward_average_(pop, 0.7))
    run("average_all", lambda pop: averaging.average_all_(pop, comm=comm), averaging.average_all_)
    for scheme in ("pair-half", "dirichlet", "many-75"):
        m = averaging.mixing_matrix(scheme, p, torch.Generator().manual_seed(p))
        run(scheme, lambda pop, m=m: averaging.mix_(pop, m, comm), lambda pop, m=m: averaging.mix_(pop, m))
    eye = torch.eye(p, dtype=torch.float64)  # nothing to exchange
    run("identity", lambda pop: averaging.mix_(pop, eye, comm), lambda pop: averaging.mix_(pop, eye))

    def moments(j: int) -> dict:
        return {"conv": (torch.full((4,), j + 0.5, dtype=torch.float64), torch.arange(4.0, dtype=torch.float64) + j),
                "fc": (torch.full((2, 3), -j, dtype=torch.float64), torch.full((2, 3), j / 3, dtype=torch.float64))}

    got = comm.all_moments([moments(j) for j in members])
    assert len(got) == p
    for j, m in enumerate(got):
        assert m.keys() == moments(j).keys()
        for name, (mean, std) in moments(j).items():
            assert torch.equal(m[name][0], mean) and torch.equal(m[name][1], std), (j, name)

    assert comm.gather_scores([(100.0 * j / 7, j / 3) for j in members]) == [(100.0 * j / 7, j / 3) for j in range(p)]

    state = comm.gather_state(share(whole, members))
    if comm.is_main:
        assert state.keys() == whole.state_dict().keys()
        for name, t in whole.state_dict().items():
            assert state[name].dtype == t.dtype and torch.equal(state[name], t), name
    else:
        assert state is None

    assert comm.anyone(comm.rank == WORLD - 1) and not comm.anyone(False)
    comm.barrier()


def ops_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from papa.distributed import Distributed

    comm = Distributed.from_env(3, "cpu")  # ranks hold members [0, 1] and [2]
    try:
        assert (comm.rank, comm.world_size, comm.members) == (rank, WORLD, [[0, 1], [2]][rank])
        assert comm.device == torch.device("cpu") and dist.get_backend() == "gloo"
        check_ops(comm)
        comm5 = Distributed(5, torch.device("cpu"))  # [0, 1, 2] and [3, 4]
        assert comm5.members == [[0, 1, 2], [3, 4]][rank]
        check_ops(comm5)
    finally:
        comm.close()


def test_blocks_cover_any_population():
    for p in range(1, 12):
        for world in range(1, p + 1):
            blocks = [distributed.block(p, world, r) for r in range(world)]
            assert sum(blocks, []) == list(range(p))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_more_processes_than_members_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(PapaError, match="4 processes for a population of 3"):
        distributed.from_env(3, "cpu")


@pytest.mark.slow
def test_collectives_on_two_ranks_match_the_whole_population():
    """p = 3 and p = 5 on 2 gloo ranks (blocks of unequal size)."""
    mp.spawn(ops_worker, args=(free_port(),), nprocs=WORLD, join=True)


# end to end ---------------------------------------------------------------------------------------
def torchrun(*args: str, cwd) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node 2 -m papa.cli ARGS` (one CPU thread per rank)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
           "-m", "papa.cli", *args]
    return subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{out}\n{err}")
    return out


def assert_same_population(run, reference) -> None:
    got, expected = load_file(run / "population.safetensors"), load_file(reference / "population.safetensors")
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        torch.testing.assert_close(got[name], t, rtol=0, atol=1e-5, msg=name)
    assert (run / "history.csv").read_text() == (reference / "history.csv").read_text()
    assert not list(run.glob("checkpoint*"))


def prepared(tmp_path, epochs: int):
    config = write_config(tmp_path / "config.yaml", {"train": {"epochs": epochs}})
    split = tmp_path / "split.json"
    papa("prepare", "--config", str(config), "--out", str(split), check=True)
    return config, split


def single_and_torchrun(tmp_path, config, variant: str) -> tuple:
    """``papa train`` of ``variant`` (seed 1) with ``config`` in one process, then on 2 torchrun ranks: the two
    run directories."""
    split = tmp_path / "split.json"
    papa("prepare", "--config", str(config), "--out", str(split), check=True)
    single, multi = tmp_path / "single", tmp_path / "torchrun"
    common = ["--config", str(config), "--variant", variant, "--seed", "1", "--split", str(split)]
    papa("train", *common, "--out", str(single), check=True)
    finished(torchrun("train", *common, "--out", str(multi), cwd=tmp_path))
    return single, multi


@pytest.mark.slow
def test_torchrun_train_matches_the_single_process_run(tmp_path):
    """PAPA-2 with REPAIR, p = 3 on 2 ranks (members [0, 1] and [2]), 2 epochs, one averaging (PAPA's push
    is covered by the resume test below). The populations agree to float rounding (here they are in fact
    bit-identical) and the histories, from gathered float64 scores, are identical. Soups and metrics come
    from the same single-process code on both populations, so they could differ only where rounding noise
    flips a prediction: compared to within one point."""
    config, split = prepared(tmp_path, epochs=2)
    single, multi = tmp_path / "single", tmp_path / "torchrun"
    common = ["--config", str(config), "--variant", "papa-2", "--seed", "1", "--split", str(split)]
    papa("train", *common, "--out", str(single), check=True)
    out = finished(torchrun("train", *common, "--out", str(multi), cwd=tmp_path))
    assert out.count("trained 3 members for 2 epochs") == 1, out  # the summary comes from rank 0 alone
    assert_same_population(multi, single)
    side = {run: json.loads((run / "population.json").read_text()) for run in (single, multi)}
    assert side[multi]["processes"] == 2 and side[multi]["population"] == 3
    assert side[multi]["policies"] == side[single]["policies"]
    metrics = {}
    for run in (single, multi):
        papa("soups", "--config", str(config), "--split", str(split), "--run", str(run), check=True)
        papa("evaluate", "--config", str(config), "--split", str(split), "--run", str(run), check=True)
        metrics[run] = json.loads((run / "metrics.json").read_text())
    for key in ("mean", "ensemble", "avg_soup", "greedy_soup", "avg_soup_repair", "greedy_soup_repair"):
        assert metrics[multi][key] == pytest.approx(metrics[single][key], abs=1.0), key


@pytest.mark.slow
def test_torchrun_analytic_engine_matches_the_single_process_run(tmp_path):
    """Logistic regression (the analytic engine, A.10's model) with PAPA-all, p = 3 on 2 ranks, batch 4: each
    rank's closed-form steps over its own members give the single-process population bit for bit."""
    import yaml

    config = write_config(tmp_path / "config.yaml", {"train": {"epochs": 2, "batch_size": 4, "engine": "auto"},
                                                     "averaging": {"papa-all": {"every": 1, "repair": False}}})
    raw = yaml.safe_load(config.read_text())
    raw["experiments"]["tiny"]["model"] = {"name": "logreg", "kwargs": {}}
    config.write_text(yaml.safe_dump(raw))
    single, multi = single_and_torchrun(tmp_path, config, "papa-all")
    side = {run: json.loads((run / "population.json").read_text()) for run in (single, multi)}
    assert side[single]["engine"] == side[multi]["engine"] == "analytic" and side[multi]["processes"] == 2
    got, expected = load_file(multi / "population.safetensors"), load_file(single / "population.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[n], t) for n, t in expected.items())
    assert (multi / "history.csv").read_text() == (single / "history.csv").read_text()


@pytest.mark.slow
def test_torchrun_stops_on_sigterm_and_resumes_with_the_same_number_of_processes(tmp_path):
    """SIGTERM to torchrun (what SLURM sends) reaches both ranks, which agree on one step to stop at and
    checkpoint there; a single process refuses those checkpoints; the same torchrun command resumes to
    the population of an uninterrupted single-process run (PAPA: pushes every 4 steps)."""
    config, split = prepared(tmp_path, epochs=3)
    common = ["--config", str(config), "--variant", "papa", "--seed", "1", "--split", str(split)]
    run = tmp_path / "run"
    proc = torchrun("train", *common, "--out", str(run), cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.rank1.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the checkpoint of epoch 1
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and err.count("papa train: stopped by SIGTERM") == WORLD, (out, err)
    points = {json.dumps({k: json.loads((run / f"checkpoint.rank{r}.json").read_text())[k]
                          for k in ("epoch", "step", "batch")}) for r in range(WORLD)}
    assert len(points) == 1 and json.loads(points.pop())["epoch"] < 3

    refused = papa("train", *common, "--out", str(run))
    assert refused.returncode == 2 and "not written by a run of 1 process(es)" in refused.stderr, refused.stderr

    finished(torchrun("train", *common, "--out", str(run), cwd=tmp_path))
    papa("train", *common, "--out", str(tmp_path / "single"), check=True)
    assert_same_population(run, tmp_path / "single")


@pytest.mark.slow
def test_torchrun_swa_with_papa_all_matches_the_single_process_run(tmp_path):
    """SWA from epoch 1 of 3 with PAPA-all at epochs 1 and 2: the averaging at epoch 2 mixes the SWA averages
    held on the two ranks, and the final BatchNorm recomputation runs on each rank's own members."""
    swa = {"start": 1, "lr": 0.02, "anneal_epochs": 1, "bn_batches": 2}
    config = write_config(tmp_path / "config.yaml", {"train": {"epochs": 3, "swa": swa}})
    single, multi = single_and_torchrun(tmp_path, config, "papa-all")
    assert_same_population(multi, single)
    assert "swa" in (single / "history.csv").read_text()
