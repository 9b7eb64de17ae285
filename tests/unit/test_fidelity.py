"""What the authors ran (fidelity review, issue 13): the Table 14 weightings, one-member soups, the greedy
criterion, the policy deal, REPAIR's layer set, the genetic selection rules and the option-A ResNet-20."""

import itertools

import pytest
import torch
from torch import nn

from papa import averaging, genetic
from papa.data import draw_policies
from papa.models import create_model
from papa.population import Population
from papa.repair import repair
from papa.soups import _greedy, make_soups

GRID = {"mixup": [0.0, 0.5, 1.0], "label_smoothing": [0.0, 0.05, 0.1], "cutmix": [0.0, 0.5, 1.0],
        "random_erasing": [0.0, 0.15, 0.35]}


# 3. Table 14 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("scheme", "heavy"), [("many-half", 0.5), ("many-75", 0.75)])
def test_many_weightings_keep_the_heavy_weight_on_the_member_itself(scheme, heavy):
    """The authors' many_half/many_75: identity plus uniform (every lineage survives), not a random heavy member."""
    p = 5
    for seed in range(5):
        m = averaging.mixing_matrix(scheme, p, torch.Generator().manual_seed(seed))
        expected = torch.full((p, p), (1 - heavy) / (p - 1), dtype=torch.float64)
        expected.fill_diagonal_(heavy)
        assert torch.allclose(m, expected)


def test_greedy_scheme_replaces_every_member_by_the_greedy_soup():
    m = averaging.greedy_matrix([3, 1], 4)
    assert torch.equal(m, torch.tensor([[0.0, 0.5, 0.0, 0.5]] * 4, dtype=torch.float64))


# 2. one-member soups ---------------------------------------------------------------------------------------------
def _bn_pop(p: int = 3) -> Population:
    torch.manual_seed(0)
    return Population.from_modules([
        nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
        for _ in range(p)])


def test_a_one_member_greedy_soup_is_that_member_untouched():
    """No REPAIR and no BatchNorm rebuild: the GreedySoup of a population whose best member accepts nobody is
    exactly the best member (the authors REPAIR a soup only when n > 1)."""
    pop = _bn_pop()
    xs = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    best = 1

    def score(module) -> float:  # member 1 is best; any soup is worse
        same = all(torch.equal(a, b) for a, b in zip(module.state_dict().values(),
                                                       pop.member(best).state_dict().values(), strict=True))
        return 1.0 if same else 0.0

    made, members = make_soups(pop, score, xs, iters=2)
    assert members == [best]
    for name, t in pop.member(best).state_dict().items():
        assert torch.equal(made["greedy_soup_repair"].state_dict()[name], t), name
    # the average soup of several members is still REPAIRed: its BatchNorm statistics are rebuilt
    assert not torch.equal(made["avg_soup_repair"][1].running_var, made["avg_soup"][1].running_var)


# 5. greedy criterion ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("criterion", "kept"), [(">=", [0, 1, 2]), (">", [0, 2])])
def test_greedy_criterion_decides_ties(criterion, kept):
    """Algorithm 3 keeps a member whose soup ties the best score; the authors' code needs a strict gain."""
    gains = {(0, 1): 0.5, (0, 1, 2): 0.7, (0, 2): 0.7}
    included, _ = _greedy([0.5, 0.4, 0.3], lambda members: gains[tuple(sorted(members))],
                          lambda members, _: members, criterion)
    assert included == kept


def test_greedy_criterion_is_checked():
    with pytest.raises(ValueError, match="criterion"):
        _greedy([1.0, 0.0], lambda m: 0.0, lambda m, _: m, "=>")


# 4. member policies ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [3, 5, 10, 81])
def test_policies_are_distinct_combinations_while_any_remain(p):
    """Dealt from the shuffled product of the grid (the authors' main.py): p <= 81 members, 81 distinct
    combinations, for every seed (independent draws repeat a combination in 44% of p = 10 populations)."""
    for seed in range(20 if p < 81 else 2):
        policies = draw_policies(GRID, p, torch.Generator().manual_seed(seed), {"crop_padding": 4, "flip": True})
        combos = {(q.mixup, q.label_smoothing, q.cutmix, q.random_erasing) for q in policies}
        assert len(combos) == p
        assert combos <= set(itertools.product(*(GRID[k] for k in sorted(GRID))))
        assert all(q.crop_padding == 4 and q.flip for q in policies)


def test_policies_wrap_around_the_grid_and_keep_continuous_draws():
    grid = {"mixup": [0.0, 1.0], "label_smoothing": {"uniform": [0.0, 0.1]}}
    policies = draw_policies(grid, 5, torch.Generator().manual_seed(0))
    mixups = [q.mixup for q in policies]
    assert sorted(mixups[:2]) == [0.0, 1.0] and mixups[2:4] == mixups[:2] and mixups[4] == mixups[0]
    assert len({q.label_smoothing for q in policies}) == 5
    assert all(0.0 <= q.label_smoothing <= 0.1 for q in policies)


# 5. REPAIR's layers --------------------------------------------------------------------------------------
def test_repair_layers_conv_leaves_hidden_linears_alone():
    torch.manual_seed(0)

    def net():
        return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(108, 16), nn.ReLU(),
                             nn.Linear(16, 3))

    pop = Population.from_modules([net(), net()])
    xs = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    soup = pop.module_from_state(pop.combine(torch.tensor([0.5, 0.5], dtype=torch.float64)))
    conv_only = repair(soup, pop, xs, iters=2, layers="conv")
    both = repair(soup, pop, xs, iters=2, layers="conv+linear")
    assert not torch.equal(conv_only[0].weight, soup[0].weight)
    assert torch.equal(conv_only[3].weight, soup[3].weight) and torch.equal(conv_only[3].bias, soup[3].bias)
    assert not torch.equal(both[3].weight, soup[3].weight)
    for model in (conv_only, both):  # never the output layer
        assert torch.equal(model[5].weight, soup[5].weight)
    with pytest.raises(ValueError, match="layers"):
        repair(soup, pop, xs, iters=2, layers="linear")


# 6. genetic selection -----------------------------------------------------------------------------------------
def test_tournament_draws_parents_in_proportion_to_inverse_validation_loss():
    losses = [1.0, 2.0, 4.0, 4.0]
    pairs = genetic.tournament_pairs(losses, 20000, torch.Generator().manual_seed(0))
    assert (pairs[:, 0] != pairs[:, 1]).all()
    first = torch.bincount(pairs[:, 0], minlength=4).double() / len(pairs)
    inv = torch.tensor([1 / x for x in losses], dtype=torch.float64)
    assert torch.allclose(first, inv / inv.sum(), atol=0.01)


@pytest.mark.parametrize(("p", "n"), [(3, 3), (5, 10), (10, 45), (20, 120)])
def test_elitism_makes_min_6p_and_all_pairs_children(p, n):
    assert genetic.n_children(p, elitism=True) == n
    assert genetic.n_children(p, elitism=False) == p


@pytest.mark.parametrize("tournament", [False, True])
def test_elitism_keeps_the_lowest_validation_losses(tournament):
    p, seen = 5, []

    def children_losses(rows):
        seen.append(rows)
        return [0.1 * (k + 1) for k in range(len(rows))]  # child k: loss 0.1 (k + 1)

    losses = [0.25, 5.0, 5.0, 5.0, 0.05]
    m = genetic.selection_matrix(p, losses, "pair-half", {"tournament": tournament, "elitism": True},
                                 torch.Generator().manual_seed(1), children_losses)
    (children,) = seen
    assert len(children) == 10 and all(sorted(r.tolist()) == [0, 0, 0, 0.5, 0.5] for r in children)
    # ranked: parent 4 (0.05), child 0 (0.1), child 1 (0.2), parent 0 (0.25), child 2 (0.3)
    assert torch.equal(m[0], torch.eye(p, dtype=torch.float64)[4])
    assert torch.equal(m[1], children[0]) and torch.equal(m[2], children[1])
    rest = {tuple(r.tolist()) for r in m[3:]}
    assert rest == {tuple(torch.eye(p, dtype=torch.float64)[0].tolist()), tuple(children[2].tolist())}


def test_pair_children_give_the_heavy_weight_to_either_parent():
    rows = genetic.child_rows(torch.tensor([[0, 1]] * 400), 3, 0.75, torch.Generator().manual_seed(0))
    heavy_first = (rows[:, 0] == 0.75).double().mean()
    assert 0.4 < heavy_first < 0.6 and torch.allclose(rows.sum(1), torch.ones(400, dtype=torch.float64))


# 1. ResNet-20 of the authors and Cui et al. ---------------------------------------------------------------------------
def test_resnet20_option_a_has_no_shortcut_parameters_and_kaiming_init():
    a = create_model("resnet20", 10, shortcut="zero-pad", init="kaiming")
    b = create_model("resnet20", 10)
    n_a = sum(t.numel() for t in a.parameters())
    assert n_a == 269_722  # He et al.'s 0.27M
    assert sum(t.numel() for t in b.parameters()) > n_a
    x = torch.randn(2, 3, 32, 32)
    assert a(x).shape == (2, 10)
    # the zero-padded shortcut: the first block of stage 2 passes x[:, :, ::2, ::2] padded by 8 channels each side
    block = a.layer2[0]
    y = block.downsample(torch.ones(1, 16, 32, 32))
    assert y.shape == (1, 32, 16, 16) and y[0, :8].abs().sum() == 0 and y[0, 24:].abs().sum() == 0
    assert (y[0, 8:24] == 1).all()
    torch.manual_seed(0)
    w = create_model("resnet20", 10, init="kaiming").layer3[0].conv2.weight
    assert w.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)  # He normal, fan-in
