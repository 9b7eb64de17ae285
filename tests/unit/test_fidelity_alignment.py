"""Fidelity options alignment_target and (its last epoch) averaging_epochs on small populations of ResNet-20s that
are exact permutations of each other, so the expected alignments are known: under ``authors`` PAPA-2 aligns within
each pair in turn (recombine/permutations.py:47-52), PAPA-all each member to the running soup and REPAIRs toward
the unpermuted members (models/combined.py:232-255, permutations.py:133), and an averaging after the last epoch
mixes nothing but swaps in unmerged pair members (main.py:271, 299-311). Each test fails under ``paper``."""

import copy

import pytest
import torch

from papa import averaging
from papa.alignment import align, align_members_, align_pairs, permute, random_permutations
from papa.averagers import Context, averager_for
from papa.checkpoint import Progress
from papa.distributed import Local
from papa.errors import PapaError
from papa.population import Population
from papa.repair import member_moments, repair_population_
from papa.rng import generator
from papa.soups import average_soup
from papa.variants import scripts_last_epoch
from tests.helpers import tiny_experiment
from tests.unit.test_alignment import data, net, same_tensors, shuffled_copies

pytestmark = pytest.mark.usefixtures("one_thread")


def close(a, b, atol=1e-5) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.allclose(sa[k].double(), sb[k].double(), atol=atol) for k in sa)


class Stream:
    """member_batches as a stream gives them: the same fixed images for every member."""

    def __init__(self, xs):
        self.xs = xs

    def member_batches(self, j, g, n):
        return iter(self.xs[:n])


def context(pop, xs, epoch=1, epochs=10, optimizer=None, seed=3):
    optimizer = optimizer or torch.optim.SGD(list(pop.params.values()), lr=0.1, momentum=0.9)
    return Context(pop=pop, comm=Local(pop.size), optimizer=optimizer, stream=Stream(xs), swa=None,
                   progress=Progress(epoch=epoch), seed=seed, stacked=False, val_scores=None, val_accuracy=None,
                   align_batches=lambda _images: xs, epochs=epochs)


def experiment(setting, variant, **cfg):
    return tiny_experiment(population={"size": 3}, fidelity={"alignment_target": setting},
                           averaging={variant: {"align": True, "repair": False, **cfg}})


# core -------------------------------------------------------------------------------------------------------
def test_pairs_align_their_second_member_to_the_first_and_keep_it_for_later_pairs():
    xs = data()
    a = net("resnet20", 1, xs)
    s1, s2 = shuffled_copies(a, 2)
    pop = Population.from_modules([a, s1, s2])
    parents = align_pairs(pop, [(1, 2), (0, 1), (1, 2)], xs)
    # (1, 2): 2 matched to 1 as it stands (s1); (0, 1): 1 matched to a and kept; (1, 2) again: now both a
    expected = [s1, s1, a, a, a, a]
    assert all(same_tensors(parents.member(k), m) for k, m in enumerate(expected))
    assert same_tensors(pop.member(1), s1)  # the population itself is unchanged
    plain = align_pairs(pop, [(1, 2)], None)
    assert same_tensors(plain.member(0), s1) and same_tensors(plain.member(1), s2)


def test_the_running_soup_target_matches_each_member_to_the_average_before_it():
    """Member 2 is a shuffled copy of the average of member 0 and aligned member 1: aligned to that running soup
    it becomes the soup itself; aligned to member 0 (the paper's target) it does not."""
    xs = data()
    a = net("resnet20", 1, xs)
    b = copy.deepcopy(a)  # a noisy, shuffled copy of a, so the soup keeps every unit alive
    with torch.no_grad():
        for t in b.parameters():
            t.add_(1.0 * t.std() * torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())))
    b = permute(b, random_permutations(b, torch.Generator().manual_seed(5)))
    soup = average_soup(Population.from_modules([a, align(b, a, xs)]))
    c = permute(soup, random_permutations(soup, torch.Generator().manual_seed(7)))
    for target in ("running-soup", "member"):
        pop = Population.from_modules([a, b, c])
        align_members_(pop, xs, target=target)
        assert close(pop.member(2), soup) == (target == "running-soup")
        assert same_tensors(pop.member(0), a)


# averagers --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", ["authors", "paper"])
def test_the_greedy_scheme_tries_each_member_aligned_to_the_greedy_soup_under_authors(setting):
    """Three exact permutations, member 0 the best: under authors the greedy averaging tries each member aligned to
    the greedy soup so far (models/combined.py:263-279), and the members become those aligned copies, all member
    0's network; under paper they were aligned to member 0 before (``align_``) and the matrix leaves them be."""
    xs = data()
    a = net("resnet20", 1, xs)
    pop = Population.from_modules([a, *shuffled_copies(a, 2)])
    averager = averager_for("papa-all", experiment(setting, "papa-all", scheme="greedy"))
    ctx = context(pop, xs)
    ctx.val_scores = lambda members: [(90.0 - j, 0.0) for j in range(members.size)]
    ctx.val_accuracy = lambda soup: 90.0  # every soup ties with the best member: all are kept (>=)
    assert torch.equal(averager.matrix(ctx, generator(0)), torch.full((3, 3), 1 / 3, dtype=torch.float64))
    assert all(same_tensors(pop.member(j), a) for j in range(3)) == (setting == "authors")


@pytest.mark.parametrize("setting", ["authors", "paper"])
def test_papa_2_children_follow_the_order_of_the_pairs(setting):
    """Three exact permutations of one network: under paper every member is first aligned to member 0, so every
    child is member 0's network; under authors a child is its pair's first member as it then stands (the pair
    (1, 2) before (0, 1) leaves member 1 in its own order)."""
    xs = data()
    a = net("resnet20", 1, xs)
    s1, s2 = shuffled_copies(a, 2)
    pop = Population.from_modules([a, s1, s2])
    averager = averager_for("papa-2", experiment(setting, "papa-2", scheme="pair-half"))
    assert averager.scripts_alignment == (setting == "authors")
    seed = next(s for s in range(100) if [tuple(r.nonzero().flatten().tolist()) for r in averaging.mixing_matrix(
        "pair-half", 3, generator(s, "average", 1), averager.pairs)].index((1, 2)) == 0)
    matrix = averaging.mixing_matrix("pair-half", 3, generator(seed, "average", 1), averager.pairs)
    current, expected = [a, s1, s2], []
    for row in matrix:
        i, j = row.nonzero().flatten().tolist()
        current[j] = current[i]  # an exact permutation aligns onto its partner's tensors
        expected.append(current[i])
    averager.average(context(pop, xs, seed=seed))
    got = [pop.member(k) for k in range(3)]
    if setting == "authors":
        assert all(same_tensors(g, e) for g, e in zip(got, expected, strict=True))
        assert not all(same_tensors(g, a) for g in got)
    else:
        assert all(close(g, a) for g in got)


@pytest.mark.parametrize("setting", ["authors", "paper"])
def test_papa_all_repairs_the_aligned_soup_toward_the_unpermuted_members(setting):
    """Three exact permutations of one network average, once aligned, to that network. Under paper REPAIR then
    meets the aligned members' moments, its own: the members stay the network. Under authors the moments are the
    unpermuted members' (channel c of member j > 0 is another unit), and the members' optimizer state is never
    permuted."""
    xs = data()
    a = net("resnet20", 1, xs)
    copies = shuffled_copies(a, 2)
    pop = Population.from_modules([a, *copies])
    original = Population.from_modules([a, *copies])
    optimizer = torch.optim.SGD(list(pop.params.values()), lr=0.1, momentum=0.9)
    for p in pop.params.values():
        optimizer.state[p]["momentum_buffer"] = p.detach().clone()
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in pop.params.values()]
    exp = experiment(setting, "papa-all", repair=True, repair_iters=2)
    averager_for("papa-all", exp).average(context(pop, xs, optimizer=optimizer))
    kept = all(torch.equal(optimizer.state[p]["momentum_buffer"], m) for p, m in zip(pop.params.values(), momentum,
                                                                                     strict=True))
    assert kept == (setting == "authors")
    if setting == "paper":
        assert all(close(pop.member(k), a, atol=1e-4) for k in range(3))
        return
    expected = Population.from_modules([a, a, a])
    fusion = averager_for("papa-all", exp).repair_fusion
    moments = member_moments(original, lambda j, g: iter(xs[:2]), 2, fusion=fusion)
    repair_population_(expected, torch.full((3, 3), 1 / 3, dtype=torch.float64), lambda j, g: iter(xs[:2]),
                       moments, 2, layers=exp["repair"]["layers"], fusion=fusion)
    assert all(close(pop.member(k), expected.member(k)) for k in range(3))
    assert not close(pop.member(0), a, atol=1e-3)


def test_alignment_permutes_adams_moments_with_the_weights_and_leaves_the_rest_of_the_state():
    """Under paper the optimizer state shaped like a weight follows its permutation (Adam's two moments here, set
    to the weight and its square); the step count and a weight without state are left as they are."""
    xs = data()
    a = net("resnet20", 1, xs)
    pop = Population.from_modules([a, *shuffled_copies(a, 2)])
    optimizer = torch.optim.AdamW(list(pop.params.values()))
    *stateful, bare = pop.params.values()
    for p in stateful:
        optimizer.state[p].update(step=torch.tensor(3.0), exp_avg=p.detach().clone(), exp_avg_sq=p.detach() ** 2)
    averager_for("papa-all", experiment("paper", "papa-all")).align_(context(pop, xs, optimizer=optimizer))
    assert all(same_tensors(pop.member(j), a) for j in range(3))  # aligned: each member is a again
    for p in stateful:
        state = optimizer.state[p]
        assert torch.equal(state["exp_avg"], p) and torch.equal(state["exp_avg_sq"], p**2)
        assert torch.equal(state["step"], torch.tensor(3.0))
    assert bare not in optimizer.state


def test_genetic_ablations_refuse_the_scripts_alignment():
    exp = tiny_experiment(population={"size": 3}, fidelity={"alignment_target": "authors"},
                          averaging={"papa-2": {"align": True}, "genetic": {"tournament": True}})
    xs = data()
    pop = Population.from_modules([net("resnet20", k, xs) for k in range(3)])
    with pytest.raises(PapaError, match="alignment_target"):
        averager_for("papa-2", exp).check(context(pop, xs))


# the last epoch (averaging_epochs) -----------------------------------------------------------------------------
def last_epoch_experiment(setting, variant="papa-2", **cfg):
    return tiny_experiment(population={"size": 4}, fidelity={"averaging_epochs": setting}, train={"epochs": 6},
                           averaging={variant: {"every": 1, "from_start": True, "repair": True, **cfg}})


def linear_population(p=4):
    torch.manual_seed(0)
    return Population.from_modules([torch.nn.Linear(3, 2) for _ in range(p)])


def test_the_scripts_test_fires_after_the_last_epoch_when_its_index_is_a_multiple_of_k():
    assert scripts_last_epoch(6, 6, 1, True, (0.0, 1.0)) and scripts_last_epoch(11, 11, 5, True, (0.0, 1.0))
    assert not scripts_last_epoch(300, 300, 5, True, (0.0, 1.0)) and not scripts_last_epoch(5, 6, 1, True, (0, 1))
    for setting in ("authors", "paper"):
        averager = averager_for("papa-2", last_epoch_experiment(setting))
        assert averager.due_after_epoch(6, 6) == (setting == "authors")


@pytest.mark.parametrize("scheme", ["pair-half", "pair-75"])
def test_after_the_last_epoch_each_member_becomes_one_unmerged_member_of_its_pair(scheme):
    """Exact permutations of one network, under the scripts' alignment target but with align off: each member
    becomes one member of its pair as it is (aligned, it would be member 0's network)."""
    xs = data()
    a = net("resnet20", 1, xs)
    pop = Population.from_modules([a, *shuffled_copies(a, 3)])
    before = [pop.member(j) for j in range(4)]
    exp = last_epoch_experiment("authors", scheme=scheme)
    exp["fidelity"]["alignment_target"] = "authors"
    averager = averager_for("papa-2", exp)
    ctx = context(pop, xs, epoch=6, epochs=6)
    ctx.stream = None  # nothing is REPAIRed: reading training data would fail
    averager.average(ctx)
    gen = generator(3, "average", 6)
    matrix = averaging.mixing_matrix(scheme, 4, gen, averager.pairs)
    second = torch.rand(4, generator=gen) < 0.5
    for k, row in enumerate(matrix):
        i, j = row.nonzero().flatten().tolist()
        assert same_tensors(pop.member(k), before[j if second[k] else i])
    assert ctx.progress.generation == 1


def test_after_the_last_epoch_mutations_still_run_and_papa_all_mixes_nothing():
    pop = linear_population()
    before = {n: t.clone() for n, t in pop.tensors()}
    averager = averager_for("papa-all", last_epoch_experiment("authors", "papa-all"))
    averager.average(context(pop, None, epoch=6, epochs=6))
    assert all(torch.equal(before[n], t) for n, t in pop.tensors())
    averager.average(context(pop, None, epoch=1, epochs=1))  # a one-epoch run: its first epoch is its last
    assert all(torch.equal(before[n], t) for n, t in pop.tensors())
    exp = last_epoch_experiment("authors", "papa-all")
    exp["averaging"]["genetic"]["mutation_std"] = 0.1
    averager_for("papa-all", exp).average(context(pop, None, epoch=6, epochs=6))
    assert not torch.equal(before["weight"], pop.params["weight"])


@pytest.mark.parametrize("elitism", ["paper", "authors"])
def test_genetic_ablations_after_the_last_epoch_keep_unmerged_members(elitism):
    pop = linear_population()
    before = [pop.member(j) for j in range(4)]
    exp = last_epoch_experiment("authors", scheme="pair-half")
    exp["fidelity"]["elitism"] = elitism
    exp["averaging"]["genetic"].update(tournament=True, elitism=True)
    averager = averager_for("papa-2", exp)
    ctx = context(pop, None, epoch=6, epochs=6)
    ctx.stream = None
    ctx.val_scores = lambda members: [(0.0, 0.1 * (i + 1)) for i in range(members.size)]
    averager.average(ctx)
    for k in range(4):
        assert any(same_tensors(pop.member(k), b) for b in before)
