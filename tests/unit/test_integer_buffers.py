"""The value of every integer buffer (BatchNorm's num_batches_tracked) after every kind of averaging: PAPA's
push, PAPA-all (uniform and weighted), PAPA-2's pairs and every weighting scheme of Table 14, the soups, the
distributed communicator's math run in one process, and REPAIR's rebuilt statistics.

Integer buffers are mixed in float64 and rounded to the nearest integer (Python's and torch's rounding: half
to even). The counts below make every mixture land strictly between two integers, most of them above the
half, so truncation (or flooring) gives another answer; each test checks that it would."""

import socket

import pytest
import torch
import torch.distributed as dist

from papa import averaging
from papa.population import Population
from papa.repair import member_moments, repair, repair_population_
from papa.soups import average_soup, greedy_soup, subset_weights
from tests.conftest import small_cnn

COUNTS = [3, 8, 14, 22]  # mean 11.75
KEY = "1.num_batches_tracked"


def population() -> Population:
    pop = Population.from_factory(small_cnn, len(COUNTS), seed=3)
    pop.buffers[KEY].copy_(torch.tensor(COUNTS))
    return pop


def expected(matrix) -> list[int]:
    """Row i of ``matrix`` applied to COUNTS, rounded half to even (Python's round), computed in Python."""
    return [round(sum(float(w) * c for w, c in zip(row, COUNTS, strict=True))) for row in matrix.tolist()]


def truncated(matrix) -> list[int]:
    return [int(sum(float(w) * c for w, c in zip(row, COUNTS, strict=True))) for row in matrix.tolist()]


def check(pop: Population, matrix) -> None:
    """The counts after mixing by ``matrix`` are the rounded mixtures, and truncating would differ."""
    got = pop.buffers[KEY]
    assert got.dtype == torch.int64
    assert got.tolist() == expected(matrix)
    assert expected(matrix) != truncated(matrix)  # the case tells rounding from truncation


def uniform(p: int = len(COUNTS)) -> torch.Tensor:
    return torch.full((p, p), 1.0 / p, dtype=torch.float64)


@pytest.mark.parametrize("alpha", [0.9, 0.5, 0.0])
def test_push_rounds_the_counts(alpha):
    pop = population()
    averaging.push_toward_average_(pop, alpha)
    check(pop, alpha * torch.eye(4, dtype=torch.float64) + (1 - alpha) * uniform())


def test_papa_all_rounds_the_mean():
    pop = population()
    averaging.average_all_(pop)
    check(pop, uniform())
    assert pop.buffers[KEY].tolist() == [12] * 4  # 11.75


def test_weighted_papa_all_rounds_the_weighted_mean():
    pop = population()
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    averaging.average_all_(pop, w)
    check(pop, w.expand(4, -1))
    assert pop.buffers[KEY].tolist() == [15] * 4  # 0.3 + 1.6 + 4.2 + 8.8 = 14.9


def test_papa_2_pairs_round_their_means():
    pop = population()
    matrix = averaging.pair_average_(pop, torch.Generator().manual_seed(4))
    # pair means are k or k + 1/2: a count of 3 + 8 or 3 + 14 makes 5.5 and 8.5, which rounding and truncation
    # tell apart only at 5.5 (to 6); the assertion below holds whatever pairs were drawn
    assert pop.buffers[KEY].tolist() == expected(matrix)


@pytest.mark.parametrize("scheme", averaging.SCHEMES)
def test_every_weighting_scheme_rounds(scheme):
    """PAPA-all, PAPA-2 and the ablations of Table 14, through weighted_average_ (the trainer's path)."""
    pop = population()
    before = pop.buffers[KEY].clone()
    matrix = averaging.weighted_average_(pop, scheme, torch.Generator().manual_seed(11))
    assert pop.buffers[KEY].tolist() == expected(matrix)
    if scheme != "pair-half":  # pair means end in .0 or .5 only: some draws leave nothing to tell apart
        assert expected(matrix) != truncated(matrix)
    assert not torch.equal(pop.buffers[KEY], before)


def test_mix_rounds_any_matrix():
    pop = population()
    matrix = torch.tensor([[0.3, 0.7, 0, 0], [0, 0.5, 0.25, 0.25], [0.1, 0.1, 0.1, 0.7], [0.6, 0, 0, 0.4]],
                          dtype=torch.float64)
    averaging.mix_(pop, matrix)
    check(pop, matrix)  # 6.5, 13, 17.9, 10.6


def test_soups_round_the_counts():
    pop = population()
    assert average_soup(pop).get_buffer(KEY).item() == 12  # 11.75
    assert pop.combine(torch.tensor([0.0, 0.5, 0.0, 0.5])).get(KEY).item() == 15  # (8 + 22) / 2
    assert pop.combine(subset_weights(4, [0, 1, 3]))[KEY].item() == 11  # 33 / 3 = 11
    assert pop.combine(subset_weights(4, [1, 2, 3]))[KEY].item() == 15  # 44 / 3 = 14.67
    # greedy soup: members scored by their count (best first: 22, 8, 14, 3), every soup scores higher than
    # any member, so all are kept; the soups on the way count 15, 15 (14.67) and 12 (11.75)
    score = {3: 1.0, 8: 3.0, 14: 2.0, 22: 4.0}
    seen = []

    def by_count(module) -> float:
        seen.append(int(module.get_buffer(KEY)))
        return score.get(seen[-1], 5.0)

    soup, members = greedy_soup(pop, by_count)
    assert members == [3, 1, 2, 0] and seen[4:] == [15, 15, 12] and soup.get_buffer(KEY).item() == 12


def test_repair_rebuilds_the_counts_from_its_batches():
    """REPAIR resets BatchNorm statistics (Algorithm 5) from ``iters`` batches: the count is ``iters``, for the
    repaired soup and for a population repaired in place (member by member or all at once)."""
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(6, 1, 5, 5, generator=g) for _ in range(3)]

    def batches(member, gen):
        return iter(data)

    pop = population()
    soup = repair(average_soup(pop), pop, batches, iters=3)
    assert soup.get_buffer(KEY).item() == 3
    for stacked in (False, True):
        pop = population()
        moments = member_moments(pop, batches, 3)
        averaging.average_all_(pop)
        repair_population_(pop, uniform(), batches, moments, iters=3, stacked=stacked)
        assert pop.buffers[KEY].tolist() == [3] * 4


# the averaging through the torchrun communicator (papa.distributed) in one process: a gloo group of one rank --
@pytest.fixture
def one_rank():
    from papa.distributed import Distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield Distributed(len(COUNTS), torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_distributed_push_average_and_mix_round_the_counts(one_rank):
    pop = population()
    averaging.push_toward_average_(pop, 0.9, comm=one_rank)
    check(pop, 0.9 * torch.eye(4, dtype=torch.float64) + 0.1 * uniform())
    pop = population()
    averaging.average_all_(pop, comm=one_rank)
    check(pop, uniform())
    pop = population()
    matrix = torch.tensor([[0.3, 0.7, 0, 0], [0, 0.5, 0.25, 0.25], [0.1, 0.1, 0.1, 0.7], [0.6, 0, 0, 0.4]],
                          dtype=torch.float64)
    averaging.mix_(pop, matrix, comm=one_rank)
    check(pop, matrix)
    # the floating tensors agree with the single-process averaging
    ref = population()
    averaging.mix_(ref, matrix)
    for name, t in ref.tensors():
        torch.testing.assert_close(pop.state_dict()[name], t, rtol=0, atol=1e-6, msg=name)
