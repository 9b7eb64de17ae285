"""The counting rules and the ranking of the genetic ablations (papa.genetic, Tables 15-17), at the population sizes
where the plausible roundings disagree: elitism makes min(6p, p(p-1)/2) children (capped at the distinct pairs from
p = 13 on) and keeps the int(0.6 p) best candidates in rank order (the authors' int(n_pop * elitism_p): at p = 3 a
rounded 1.8 would keep 2, at p = 4 a ceiling 3), then the next ranked up to p in a random order. What the ranks
are made of (validation cross-entropies) is checked in tests/training/test_selection_inputs.py."""

import itertools
from collections import Counter

import pytest
import torch

from papa import genetic
from papa.errors import PapaError


@pytest.mark.parametrize(("p", "n"), [(2, 1), (3, 3), (4, 6), (5, 10), (12, 66), (13, 78), (14, 84), (20, 120)])
def test_elitism_makes_min_6p_and_all_pairs_children(p, n):
    assert genetic.n_children(p, elitism=True) == n
    assert genetic.n_children(p, elitism=False) == p


@pytest.mark.parametrize(("p", "elite"), [(3, 1), (4, 2), (5, 3), (7, 4), (8, 4)])
def test_elitism_keeps_int_0_6_p_best_in_order_then_the_next_ranked_in_random_order(p, elite):
    """Candidates (children first, then the parents) with distinct losses: the survivors are the p best; the first
    int(0.6 p) in rank order, every later position held by each of the next ranks in some generation."""
    assert int(p * genetic.ELITE_FRACTION) == elite
    n = genetic.n_children(p, elitism=True)
    losses = torch.linspace(1.0, 2.0, p).tolist()[::-1]  # parent j's loss: the later parents are better
    child_losses = torch.linspace(0.5, 2.5, n).tolist()  # some children better than every parent, some worse
    ranked = sorted(range(n + p), key=lambda c: (child_losses + losses)[c])
    seen = [Counter() for _ in range(p)]
    for seed in range(60):
        rows = []

        def children_losses(children, rows=rows):
            rows.append(children)
            assert len(children) == n
            return child_losses

        m = genetic.selection_matrix(p, losses, "pair-half", {"tournament": False, "elitism": True},
                                     torch.Generator().manual_seed(seed), children_losses)
        candidates = torch.cat([rows[0], torch.eye(p, dtype=torch.float64)])
        for position, row in enumerate(m):
            (k,) = [c for c in ranked[:p] if torch.equal(candidates[c], row)]
            seen[position][ranked.index(k)] += 1
    for position in range(elite):
        assert set(seen[position]) == {position}, (position, seen[position])
    for position in range(elite, p):
        assert set(seen[position]) == set(range(elite, p)), (position, seen[position])


def test_children_are_distinct_pairs_and_every_pair_once_when_capped():
    """Without tournament the children are drawn without replacement among the p(p-1)/2 pairs: all of them when
    6p exceeds their number (p = 5: 10 children), distinct ones otherwise (p = 14: 84 of the 91)."""
    for p in (5, 14):
        seen = []

        def children_losses(rows, seen=seen):
            seen.append(rows)
            return [1.0] * len(rows)

        genetic.selection_matrix(p, [1.0] * p, "pair-half", {"tournament": False, "elitism": True},
                                 torch.Generator().manual_seed(0), children_losses)
        pairs = [tuple(row.nonzero().flatten().tolist()) for row in seen[0]]
        assert len(pairs) == len(set(pairs)) == genetic.n_children(p, True)
        assert all(len(pair) == 2 for pair in pairs)
        if p == 5:
            assert set(pairs) == set(itertools.combinations(range(5), 2))


def test_tournament_prefers_low_losses_and_never_pairs_a_parent_with_itself():
    """Both parents of a tournament pair are drawn without replacement with weights 1 / (1e-5 + loss): the pair
    {0, 1} of the two lowest losses is the most frequent, in proportion to w0 w1 (1 / (1 - w0) + 1 / (1 - w1))."""
    losses = [0.5, 1.0, 2.0, 4.0]
    pairs = genetic.tournament_pairs(losses, 5000, torch.Generator().manual_seed(3))
    assert (pairs[:, 0] != pairs[:, 1]).all()
    w = torch.tensor([1 / (1e-5 + x) for x in losses], dtype=torch.float64)
    w = w / w.sum()
    counts = Counter(tuple(sorted(pair)) for pair in pairs.tolist())
    for a, b in itertools.combinations(range(4), 2):
        expected = w[a] * w[b] * (1 / (1 - w[a]) + 1 / (1 - w[b]))
        assert counts[(a, b)] / len(pairs) == pytest.approx(expected.item(), abs=0.025), (a, b)


def equal_losses(rows: torch.Tensor) -> list[float]:
    """The children's validation losses, all equal."""
    return [1.0] * len(rows)


@pytest.mark.parametrize(("scheme", "heavy"), [("pair-half", 0.5), ("pair-75", 0.75)])
def test_each_child_weighs_its_two_parents_by_the_scheme(scheme, heavy):
    """A child row of ``pair-75`` puts 3/4 on one parent and 1/4 on the other, the heavier one at random."""
    heavier = Counter()
    for seed in range(40):
        rows, chosen = genetic.select(5, [1.0] * 5, scheme, {"tournament": False, "elitism": False},
                                      torch.Generator().manual_seed(seed), equal_losses)
        assert chosen == list(range(5)) and rows.shape == (5, 5)
        for row in rows:
            weights = sorted(row[row > 0].tolist())
            assert weights == pytest.approx(sorted([heavy, 1.0 - heavy]))
            heavier[int(row.argmax() == row.nonzero().flatten().max())] += 1
    if heavy != 0.5:  # the later parent of a pair is the heavier about half the time
        assert 0.35 < heavier[1] / (heavier[0] + heavier[1]) < 0.65


def test_tournament_needs_three_members():
    rows, chosen = genetic.select(3, [1.0, 2.0, 3.0], "pair-half", {"tournament": True, "elitism": False},
                                  torch.Generator().manual_seed(0), equal_losses)
    assert rows.shape == (3, 3) and chosen == [0, 1, 2]
    with pytest.raises(PapaError, match="tournament selection needs at least 3 members"):
        genetic.select(2, [1.0, 2.0], "pair-half", {"tournament": True, "elitism": False},
                       torch.Generator().manual_seed(0), equal_losses)


def test_a_child_tied_with_a_parent_ranks_first():
    """Candidates of equal loss keep the authors' order, children before parents (their sort is stable): with every
    loss equal, the int(0.6 p) elite are the first children, mixtures of two parents."""
    p = 5
    for seed in range(5):
        candidates, chosen = genetic.select(p, [1.0] * p, "pair-half", {"tournament": False, "elitism": True},
                                            torch.Generator().manual_seed(seed), equal_losses)
        assert chosen[:3] == [0, 1, 2]
        assert [int((candidates[c] > 0).sum()) for c in chosen[:3]] == [2, 2, 2]
