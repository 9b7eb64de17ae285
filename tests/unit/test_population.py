import pytest
import torch
from torch import nn

from papa.population import Population
from tests.conftest import small_cnn


def test_from_modules_round_trip():
    mods = [small_cnn() for _ in range(3)]
    pop = Population.from_modules(mods)
    assert pop.size == 3
    assert pop.params["0.weight"].shape == (3, 4, 1, 3, 3)
    x = torch.randn(5, 1, 8, 8)
    for j, (m, back) in enumerate(zip(mods, pop.to_modules(), strict=True)):
        for (n, a), (n2, b) in zip(m.state_dict().items(), back.state_dict().items(), strict=True):
            assert n == n2 and torch.equal(a, b)
        m.eval()
        pop.eval()
        assert torch.allclose(pop.forward(j, x), m(x), atol=1e-6)
    # member(j) is a copy: changing it leaves the population alone
    member = pop.member(0)
    with torch.no_grad():
        member[0].weight.add_(1.0)
    assert not torch.equal(member[0].weight, pop.params["0.weight"][0])


def test_factory_seeds_and_same_init():
    a = Population.from_factory(small_cnn, 3, seed=1)
    b = Population.from_factory(small_cnn, 3, seed=1)
    c = Population.from_factory(small_cnn, 3, seed=2)
    same = Population.from_factory(small_cnn, 3, seed=1, same_init=True)
    w = "0.weight"
    assert torch.equal(a.params[w], b.params[w])
    assert not torch.equal(a.params[w], c.params[w])
    assert not torch.equal(a.params[w][0], a.params[w][1])
    assert torch.equal(same.params[w][0], same.params[w][1]) and torch.equal(same.params[w][1], same.params[w][2])


def test_architecture_mismatch_is_rejected():
    with pytest.raises(ValueError, match="architecture"):
        Population.from_modules([small_cnn(), small_cnn(bn=False)])
    pop = Population.from_factory(small_cnn, 2)
    state = pop.state_dict()
    state["0.weight"] = torch.zeros(3, 4, 1, 3, 3)
    with pytest.raises(ValueError, match="shape"):
        pop.load_state_dict(state)


def test_members_are_indexed_as_a_sequence_and_sizes_checked():
    pop = Population.from_factory(small_cnn, 2)
    assert torch.equal(pop.member(-2)[0].weight, pop.member(0)[0].weight)
    for j in (2, -3):
        with pytest.raises(IndexError, match=f"member {j} out of range for a population of 2"):
            pop.member(j)
    assert Population.from_factory(small_cnn, 1).size == 1
    with pytest.raises(ValueError, match="population size must be at least 1, got 0"):
        Population.from_factory(small_cnn, 0)
    with pytest.raises(ValueError, match="member 2 does not have the architecture of member 0"):
        Population.from_modules([small_cnn(), small_cnn(), small_cnn(bn=False)])
    pop.requires_grad_(False)
    assert not any(t.requires_grad for t in pop.params.values())
    pop.requires_grad_()
    assert all(t.requires_grad for t in pop.params.values())


def test_forward_in_train_mode_updates_the_members_own_statistics():
    pop = Population.from_factory(small_cnn, 3, seed=0).train()
    before = pop.buffers["1.running_mean"].clone()
    pop.forward(1, torch.randn(4, 1, 8, 8) + 3)
    after = pop.buffers["1.running_mean"]
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert not torch.equal(after[1], before[1])
    assert pop.buffers["1.num_batches_tracked"].tolist() == [0, 1, 0]


def test_combine_keeps_integer_buffers_integer(pop4):
    out = pop4.combine(torch.tensor([0.25, 0.25, 0.25, 0.25]))
    assert out["1.num_batches_tracked"].dtype == torch.long
    assert out["1.num_batches_tracked"].item() == round((1 + 11 + 21 + 31) / 4)
    assert isinstance(pop4.module_from_state(out), nn.Sequential)


def test_forward_all_matches_each_member_and_trains_all_at_once():
    pop = Population.from_factory(small_cnn, 3, seed=0).requires_grad_()
    x = torch.randn(3, 5, 1, 8, 8)
    pop.eval()
    out = pop.forward_all(x)
    for j in range(3):
        assert torch.allclose(out[j], pop.forward(j, x[j]), atol=1e-6)
    pop.train()
    loss = pop.forward_all(x).pow(2).mean()
    loss.backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in pop.parameters())
    assert pop.buffers["1.num_batches_tracked"].tolist() == [1, 1, 1]
