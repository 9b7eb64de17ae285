"""``fidelity.repair_images``: under ``authors`` REPAIR's images are drawn as the scripts drew them. Their multiple
REPAIR (correct_neuron_stats_multiple, same_repair=False: PAPA-all, Table 14's many-/dirichlet/greedy schemes, the
soups) gives every parent and every repaired network images of its own, new at every averaging; their pair REPAIR
(correct_neuron_stats, same_repair=True: PAPA-2, pair-75, the genetic children) one draw for parents and child, new
at every averaging. Here: averaging e's seed from the key (seed, "repair-images", e), network k of a multiple REPAIR
from derive_seed(that seed, "repair-images", role, k). The paper setting keeps Algorithm 5's 666 for every network."""

import pytest
import torch

from papa import runs
from papa.data.stream import MemberStream
from papa.population import Population
from papa.repair import member_moments, repair, repair_population_
from papa.rng import derive_seed
from tests.keys import pinned
from tests.training.test_schedule_events import logreg, split_path, train  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def network() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def recorded() -> tuple[list, object]:
    """Callable REPAIR batches recording (member, the seed of the generator they were called with)."""
    calls = []

    def batches(member, generator):
        calls.append((member, generator.initial_seed()))
        return [torch.randn(16, 3, generator=generator)]

    return calls, batches


def seed_of(key: tuple) -> int:
    return derive_seed(*key)


def test_own_images_give_each_network_the_seed_of_its_role_and_index():
    pop = Population.from_modules([network() for _ in range(3)])
    calls, batches = recorded()
    moments = member_moments(pop, batches, iters=1, seed=7, own_images=True)
    assert [j for j, _ in calls] == [0, 1, 2]
    for j, seed in calls:
        pinned(seed_of, (7, "repair-images", "member", j), seed)

    calls.clear()
    repair_population_(pop, torch.full((3, 3), 1 / 3, dtype=torch.float64), batches, moments, 1, seed=7,
                       own_images=True)
    for j, seed in calls:
        pinned(seed_of, (7, "repair-images", "repaired", j), seed)

    calls.clear()
    repair(network(), pop, batches, iters=1, seed=7, own_images=True)  # a soup: the members, then the soup (None)
    assert [j for j, _ in calls] == [0, 1, 2, None]
    soup = seed_of((7, "repair-images", "repaired", None))
    assert calls[-1][1] == soup and soup not in {seed_of((7, "repair-images", role, None)) for role in ("member", "")}

    calls.clear()
    repair(network(), pop, batches, iters=1, seed=7)  # the paper setting: every network from the one seed
    assert calls == [(0, 7), (1, 7), (2, 7), (None, 7)]


def record_streams(monkeypatch) -> list:
    """Every MemberStream.member_batches call (REPAIR's data in training): (member, the generator's seed)."""
    calls, original = [], MemberStream.member_batches

    def recording(stream, j, generator, n):
        calls.append((j, generator.initial_seed()))
        return original(stream, j, generator, n)

    monkeypatch.setattr(MemberStream, "member_batches", recording)
    return calls


@pytest.mark.parametrize("variant", ["papa-all", "papa-2"])
def test_training_repairs_draw_from_each_averagings_key(split_path, tmp_path, monkeypatch, variant):  # noqa: F811
    """Averagings after epochs 1 and 2 of 3, p = 3: under authors PAPA-all measures member j on the seed of
    (averaging's seed, "repair-images", "member", j) and repairs child i on its "repaired" one; PAPA-2 measures every
    parent and child on the averaging's seed. Under paper every call gets 666."""
    seed = 1
    for setting in ("authors", "paper"):
        calls = record_streams(monkeypatch)
        exp = logreg(population={"size": 3}, train={"epochs": 3, "batch_size": 256},
                     fidelity={"repair_images": setting},
                     averaging={variant: {"every": 1, "repair": True, "repair_iters": 1}})
        train(exp, variant, split_path, tmp_path / setting / variant)
        monkeypatch.undo()
        if setting == "paper":
            assert calls and {s for _, s in calls} == {666}
            continue
        assert len(calls) == 2 * 6  # two averagings: three members' moments, three children
        for e, averaging in zip((1, 2), (calls[:6], calls[6:]), strict=True):
            averaging_seed = seed_of((seed, "repair-images", e))
            if variant == "papa-2":
                assert {s for _, s in averaging} == {averaging_seed}
                pinned(seed_of, (seed, "repair-images", e), averaging[0][1])
                continue
            for (j, s), role in zip(averaging, ["member"] * 3 + ["repaired"] * 3, strict=True):
                pinned(seed_of, (averaging_seed, "repair-images", role, j), s)
        assert [j for j, _ in calls[:6]] == [0, 1, 2, 0, 1, 2]


def test_the_soups_job_gives_each_member_and_soup_its_own_images(split_path, tmp_path, monkeypatch):  # noqa: F811
    """The baseline's REPAIRed soups under authors: each member measured once (on its own augmentation: fidelity
    soup_repair_data), on its own draw of soups.repair_seed's, and each soup on the "repaired" draw; under paper, all
    on soups.repair_seed."""
    for setting in ("authors", "paper"):
        exp = logreg(population={"size": 3}, train={"epochs": 1, "batch_size": 256},
                     fidelity={"repair_images": setting, "soup_repair_data": "authors"}, soups={"repair_iters": 1})
        train(exp, "baseline", split_path, tmp_path / setting)
        run = tmp_path / setting / "baseline"
        calls = record_streams(monkeypatch)
        runs.soups(exp, split_path, run)
        monkeypatch.undo()
        s = exp["soups"]["repair_seed"]
        if setting == "paper":
            assert {seed for _, seed in calls} == {s}
            continue
        members = [(j, seed) for j, seed in calls if j is not None]
        assert [j for j, _ in members] == [0, 1, 2]  # once for both soups
        for j, seed in members:
            pinned(seed_of, (s, "repair-images", "member", j), seed)
        soups = [seed for j, seed in calls if j is None]
        assert soups and {seed for seed in soups} == {seed_of((s, "repair-images", "repaired", None))}
