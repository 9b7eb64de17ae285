import pytest
import torch
from torch import nn

from papa.population import Population
from papa.soups import average_soup, ensemble_logits, greedy_soup


def scalar_population(values):
    mods = []
    for v in values:
        m = nn.Linear(1, 1, bias=False)
        nn.init.constant_(m.weight, v)
        mods.append(m)
    return Population.from_modules(mods)


def closeness(target):
    return lambda m: -float((m.weight.item() - target) ** 2)


def test_average_soup_is_the_mean(pop4):
    soup = average_soup(pop4)
    for name, t in soup.state_dict().items():
        stacked = pop4.state_dict()[name]
        if t.is_floating_point():
            assert torch.allclose(t, stacked.mean(0), atol=1e-7)
        else:
            assert t.dtype == stacked.dtype
    w = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
    assert torch.equal(average_soup(pop4, w)[0].weight, pop4.params["0.weight"][0])


def test_greedy_soup_rejects_members_that_lower_the_score():
    pop = scalar_population([0.0, 1.0, 2.0, 10.0])
    soup, members = greedy_soup(pop, closeness(1.2))
    assert members == [1]
    assert soup.weight.item() == 1.0


def test_greedy_soup_adds_members_in_score_order():
    pop = scalar_population([0.0, 1.0, 2.0, 10.0])
    calls = []

    def score(m):
        calls.append(m.weight.item())
        return closeness(1.5)(m)

    soup, members = greedy_soup(pop, score)
    # members 1 and 2 tie (score -0.25): member order breaks the tie; their average scores 0, kept
    assert members == [1, 2]
    assert soup.weight.item() == 1.5
    # first the p members, then candidates: {1,2} -> 1.5, {1,2,0} -> 1.0, {1,2,3} -> 13/3
    assert calls[:4] == [0.0, 1.0, 2.0, 10.0]
    assert calls[4:] == pytest.approx([1.5, 1.0, 13 / 3])


def test_greedy_soup_keeps_a_member_when_the_score_does_not_decrease():
    pop = scalar_population([1.0, 1.0, 3.0])
    _, members = greedy_soup(pop, closeness(1.0))
    assert members == [0, 1]  # equal score is accepted (>=), as in the paper


def test_ensemble_is_the_mean_of_member_logits(pop4):
    x = torch.randn(6, 1, 8, 8)
    expected = torch.stack([m.eval()(x) for m in pop4.to_modules()]).mean(0)
    assert torch.allclose(ensemble_logits(pop4, x), expected, atol=1e-6)
    assert pop4.template.training  # mode restored
