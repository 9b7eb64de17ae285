"""The fidelity options of PAPA-2's and PAPA-all's averagings (papa/fidelity.py) on small populations, with the
exact outcome of the authors' scripts (SamsungSAILMontreal/PAPA at 47ad83a) and of the paper's reading: each test
below fails under the other setting."""

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from papa import averaging, genetic, rng, smoke
from papa.averagers import Context, Replace, averager_for
from papa.checkpoint import Progress
from papa.config import check_averaging_fires
from papa.distributed import Local
from papa.errors import PapaError
from papa.models.resnet_cifar import CifarResNet
from papa.population import Population
from papa.variants import averaging_epochs, zero_based
from tests.helpers import tiny_experiment


def first_pairs(p: int) -> set[tuple[int, int]]:
    return set(itertools.islice(itertools.combinations(range(p), 2), p))


def row_pairs(m: torch.Tensor) -> list[tuple[int, int]]:
    return [tuple(sorted(torch.nonzero(row).flatten().tolist())) for row in m]


# papa2_pairs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [3, 4, 5, 10])
def test_first_pairs_are_exactly_the_first_p_lexicographic_pairs_in_a_random_order(p):
    orders = set()
    for seed in range(20):
        pairs = averaging.draw_pairs(p, torch.Generator().manual_seed(seed), pairs="first")
        rows = [tuple(r) for r in pairs.tolist()]
        assert len(rows) == p and set(rows) == first_pairs(p)  # each of them once, each (lower, higher)
        orders.add(tuple(rows))
    assert len(orders) > 1  # which member receives which child is drawn (the authors' randperm)


def test_at_ten_members_nine_children_of_ten_contain_member_0():
    m = averaging.mixing_matrix("pair-half", 10, torch.Generator().manual_seed(0), pairs="first")
    assert sum(m[:, 0] > 0) == 9
    assert sorted(row_pairs(m)) == [(0, j) for j in range(1, 10)] + [(1, 2)]


def test_two_members_average_their_one_pair_twice():
    pairs = averaging.draw_pairs(2, torch.Generator().manual_seed(0), pairs="first")
    assert pairs.tolist() == [[0, 1], [0, 1]]


def test_pair_75_keeps_a_random_child_of_each_first_pair():
    heavy_first = []
    for seed in range(20):
        m = averaging.mixing_matrix("pair-75", 5, torch.Generator().manual_seed(seed), pairs="first")
        assert set(row_pairs(m)) == first_pairs(5)
        assert sorted(m.flatten()[m.flatten() > 0].tolist()) == [0.25] * 5 + [0.75] * 5
        heavy_first += [bool(row[min(pair)] == 0.75) for row, pair in zip(m, row_pairs(m), strict=True)]
    assert any(heavy_first) and not all(heavy_first)  # either child of the pair: random.randint(0, 1)


@pytest.mark.parametrize("scheme", ["pair-half", "pair-75"])
def test_the_experiments_averager_takes_the_first_pairs_only_under_authors(scheme):
    p, ctx = 5, SimpleNamespace(comm=SimpleNamespace(p=5))
    seen = {}
    for setting in ("paper", "authors"):
        exp = tiny_experiment(population={"size": p}, fidelity={"papa2_pairs": setting},
                              averaging={"papa-2": {"scheme": scheme}})
        averager = averager_for("papa-2", exp)
        assert type(averager) is Replace
        matrices = [averager.matrix(ctx, torch.Generator().manual_seed(e)) for e in range(30)]
        seen[setting] = {pair for m in matrices for pair in row_pairs(m)}
    assert seen["authors"] == first_pairs(p)
    assert seen["paper"] == set(itertools.combinations(range(p), 2))  # every pair reachable: (2, 4) too


def test_the_genetic_ablations_children_follow_the_option():
    """Without tournament or elitism (the mutation rows) the authors' p children are the first p pairs; with
    elitism and p <= 13 they are every pair, in both settings."""
    p, losses = 5, [1.0, 2.0, 3.0, 4.0, 5.0]
    for setting, expected in (("authors", first_pairs(p)), ("paper", set(itertools.combinations(range(p), 2)))):
        exp = tiny_experiment(population={"size": p}, fidelity={"papa2_pairs": setting},
                              averaging={"papa-2": {"scheme": "pair-half"}, "genetic": {"mutation_std": 0.01}})
        assert averager_for("papa-2", exp).pairs == ("first" if setting == "authors" else "random")
        seen = {pair for seed in range(30) for pair in row_pairs(genetic.selection_matrix(
            p, losses, "pair-half", {"tournament": False, "elitism": False}, torch.Generator().manual_seed(seed),
            lambda rows: [], pairs=averager_for("papa-2", exp).pairs))}
        assert seen == expected
    scored = []
    genetic.selection_matrix(p, losses, "pair-half", {"tournament": False, "elitism": True},
                             torch.Generator().manual_seed(0), lambda rows: scored.extend(rows) or [0.0] * len(rows),
                             pairs="first")
    assert sorted(row_pairs(torch.stack(scored))) == list(itertools.combinations(range(p), 2))


# averaging_epochs ----------------------------------------------------------------------------------------------
def scheduled(setting: str, epochs: int, every: int, from_start: bool, window=(0.0, 1.0), variant="papa-2"):
    return tiny_experiment(fidelity={"averaging_epochs": setting}, train={"epochs": epochs},
                           averaging={"window": list(window), variant: {"every": every, "from_start": from_start}})


@pytest.mark.parametrize(("epochs", "every", "from_start", "window", "authors", "paper"), [
    (12, 5, True, (0.0, 1.0), [1, 6, 11], [1, 5, 10]),  # main.py's mix_from_start (on in all the authors' runs)
    (12, 5, False, (0.0, 1.0), [6, 11], [5, 10]),
    (11, 5, True, (0.0, 1.0), [1, 6], [1, 5, 10]),  # 11 is the last epoch: the scripts do not mix there (mix=False)
    (10, 1, False, (0.5, 1.0), [5, 6, 7, 8, 9], [6, 7, 8, 9]),  # the window's lower bound is inclusive
    (4, 1, False, (0.0, 1.0), [2, 3], [1, 2, 3]),  # without mix_from_start the scripts skip only e = 0
    (20, 5, True, (0.75, 1.0), [16], []),  # Table 14's [0.75, 1]: first averaging after epoch 0.75 E + 1
    (20, 5, True, (0.5, 1.0), [11, 16], [15]),
    (20, 5, True, (0.0, 0.25), [1], [1, 5]),
    (20, 5, False, (0.0, 0.25), [], [5]),
    (300, 5, True, (0.75, 1.0), list(range(226, 300, 5)), list(range(230, 300, 5))),
])
def test_the_scripts_average_after_epochs_1_k_plus_1_2k_plus_1(epochs, every, from_start, window, authors, paper):
    for setting, expected in (("authors", authors), ("paper", paper)):
        exp = scheduled(setting, epochs, every, from_start, window)
        assert averaging_epochs(exp, "papa-2") == expected
        averager = averager_for("papa-2", exp)  # the averager reads the same schedule, and under authors also
        # visits the last epoch when the scripts' test fires there (it mixes nothing then: main.py:271, 299-311)
        last = [epochs] if setting == "authors" and (epochs - 1) % every == 0 and window[1] == 1.0 else []
        assert [e for e in range(1, epochs + 1) if averager.due_after_epoch(e, epochs)] == expected + last


def test_an_averaging_the_scripts_never_reach_is_refused_under_authors():
    paper, authors = scheduled("paper", 6, 5, False), scheduled("authors", 6, 5, False)
    check_averaging_fires(paper, "papa-2")  # after epoch 5
    with pytest.raises(PapaError, match=r"averaging\.papa-2\.every: 5 \+ 1 >= train\.epochs \(6\)"):
        check_averaging_fires(authors, "papa-2")  # epoch 6 is the last
    window = scheduled("authors", 20, 5, False, (0.0, 0.25))
    with pytest.raises(PapaError, match=r"averaging\.window: "):
        check_averaging_fires(window, "papa-2")
    check_averaging_fires(scheduled("paper", 20, 5, False, (0.0, 0.25)), "papa-2")


def test_smoke_scale_keeps_the_scripts_averaging():
    """Smoke scale shrinks a run until its averagings still happen, counting them as the experiment does."""
    for setting in ("paper", "authors"):
        full = scheduled(setting, 300, 5, False, (0.75, 1.0), variant="papa-all")
        small = smoke.scale_experiment(full)
        assert averaging_epochs(small, "papa-all")
        assert zero_based(small) == (setting == "authors")


# elitism -------------------------------------------------------------------------------------------------------
def elitist_run(setting: str, children_win: bool):
    """One elitist generation of 4 linear members (6 children, pair-half, mutations, no REPAIR) under ``setting``:
    the members before and after, and the populations scored (the parents, then the children). The scores are
    fixed: the parents' losses 0.1-0.4 and the children's 1.0-1.5, or 0.0-0.05 with ``children_win``."""
    with rng.seeded(0):
        pop = Population.from_modules([nn.Linear(3, 2) for _ in range(4)])
    scored = []

    def val_scores(members: Population):
        scored.append({name: t.clone() for name, t in members.tensors()})
        if len(scored) == 1:
            return [(0.0, 0.1 * (i + 1)) for i in range(members.size)]
        return [(0.0, (0.0 if children_win else 1.0) + 0.01 * i) for i in range(members.size)]

    exp = tiny_experiment(population={"size": 4}, fidelity={"elitism": setting},
                          averaging={"papa-2": {"scheme": "pair-half", "repair": False},
                                     "genetic": {"elitism": True, "mutation_std": 0.5}})
    averager = averager_for("papa-2", exp)
    assert averager.elitism and averager.scripts_elitism == (setting == "authors")
    ctx = Context(pop=pop, comm=Local(4), optimizer=None, stream=None, swa=None, progress=Progress(epoch=1),
                  seed=3, stacked=False, val_scores=val_scores, val_accuracy=None, align_batches=None)
    before = {name: t.clone() for name, t in pop.tensors()}
    averager.average(ctx)
    return before, {name: t.clone() for name, t in pop.tensors()}, scored


def test_surviving_parents_are_left_as_they_are_under_authors():
    """The four parents outrank the six children, so the four survivors are the parents: the scripts swap them
    in as they are; the paper's reading mixes them by their identity rows and then mutates them."""
    for setting in ("authors", "paper"):
        before, after, _ = elitist_run(setting, children_win=False)
        unchanged = all(torch.equal(before[name].sort(0).values, after[name].sort(0).values) for name in before)
        assert unchanged == (setting == "authors")


def test_children_are_mutated_before_they_are_scored_under_authors():
    """The children outrank the parents: under authors the children scored are the mutated pair averages, and
    the members become exactly the children scored (no second mutation); under paper the children are scored as
    plain pair averages and the survivors mutated afterwards."""
    for setting in ("authors", "paper"):
        before, after, scored = elitist_run(setting, children_win=True)
        assert len(scored) == 2 and torch.equal(scored[0]["weight"], before["weight"])  # parents, then children
        children = scored[1]["weight"]  # (6, 2, 3): pair averages of the parents, mutated or not
        plain = [(before["weight"][a] + before["weight"][b]) / 2 for a, b in itertools.combinations(range(4), 2)]
        exact = [any(torch.allclose(child, avg, atol=1e-6) for avg in plain) for child in children]
        assert not any(exact) if setting == "authors" else all(exact)
        survivors_scored = [any(torch.equal(member, child) for child in children) for member in after["weight"]]
        assert all(survivors_scored) == (setting == "authors")


@pytest.mark.parametrize(("variant", "averaging", "fidelity", "world", "refused"), [
    ("papa-all", {"papa-all": {"align": True}}, {}, 2, r"averaging\.papa-all\.align runs in a single process only"),
    ("papa", {"papa": {"align": True}}, {}, 2, r"averaging\.papa\.align runs in a single process only"),
    ("papa-all", {"papa-all": {"scheme": "greedy"}}, {}, 2, r"averaging\.papa-all\.scheme greedy runs in a single "),
    ("papa-2", {"genetic": {"tournament": True}}, {}, 2, "the genetic-algorithm ablations .* single process only"),
    ("papa-2", {"papa-2": {"align": True}, "genetic": {"elitism": True}}, {"alignment_target": "authors"}, 1,
     r"averaging\.papa-2\.align with averaging\.genetic: the scripts' pairwise alignment"),
    ("papa-2", {"papa-2": {"every": 2}}, {"averaging_epochs": "authors"}, 2,  # (5 - 1) % 2 == 0: the scripts' test
     r"averaging\.papa-2: the scripts' averaging after the last epoch .* single process only"),
    # accepted: the scripts' alignment target without align, the paper's with it, one process, no last-epoch test
    ("papa-2", {"genetic": {"elitism": True}}, {"alignment_target": "authors"}, 1, None),
    ("papa-2", {"papa-2": {"align": True}, "genetic": {"elitism": True}}, {}, 1, None),
    ("papa-all", {"papa-all": {"align": True}}, {}, 1, None),
    ("papa-all", {"papa-all": {"scheme": "greedy"}}, {}, 1, None),
    ("papa-2", {"papa-2": {"every": 2}}, {"averaging_epochs": "authors"}, 1, None),
    ("papa-2", {"papa-2": {"every": 3}}, {"averaging_epochs": "authors"}, 2, None),
    ("papa-2", {"papa-2": {"every": 2}}, {}, 2, None),
])
def test_settings_one_process_or_the_paper_alone_supports_are_refused_before_training(variant, averaging, fidelity,
                                                                                       world, refused):
    exp = tiny_experiment(population={"size": 4}, train={"epochs": 5}, averaging=averaging, fidelity=fidelity)
    with rng.seeded(0):  # a one-block ResNet: a network alignment supports
        pop = Population.from_modules([CifarResNet([1], [4], 2, 3)] * 2)
    ctx = SimpleNamespace(comm=SimpleNamespace(world_size=world), pop=pop, epochs=5, swa=None)  # no train.swa
    if refused is None:
        averager_for(variant, exp).check(ctx)
    else:
        with pytest.raises(PapaError, match=refused):
            averager_for(variant, exp).check(ctx)
