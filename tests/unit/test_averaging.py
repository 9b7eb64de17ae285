import itertools

import pytest
import torch

from papa.averaging import (
    SCHEMES,
    average_all_,
    draw_pairs,
    mix_,
    mixing_matrix,
    pair_average_,
    push_toward_average_,
    weighted_average_,
)
from papa.population import Population
from tests.conftest import small_cnn


def snapshot(pop):
    return {n: t.detach().clone() for n, t in pop.tensors()}


def test_average_all_is_the_mean_of_every_tensor(pop4):
    before = snapshot(pop4)
    average_all_(pop4)
    for name, t in pop4.tensors():
        if t.is_floating_point():
            expected = before[name].mean(0)
            for j in range(4):
                assert torch.allclose(t[j], expected, atol=1e-7), name
    # BatchNorm running statistics are averaged; the integer counter stays an integer
    assert torch.allclose(pop4.buffers["1.running_mean"][2], before["1.running_mean"].mean(0))
    assert pop4.buffers["1.num_batches_tracked"].dtype == torch.long
    assert pop4.buffers["1.num_batches_tracked"].tolist() == [16] * 4


def test_weighted_average_all(pop4):
    before = snapshot(pop4)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    average_all_(pop4, w)
    for name, t in pop4.params.items():
        expected = sum(w[j] * before[name][j] for j in range(4))
        assert torch.allclose(t[3], expected, atol=1e-6)
    with pytest.raises(ValueError):
        average_all_(pop4, [0.5, 0.5, 0.5, 0.5])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.99, 1.0])
def test_push_toward_average(pop4, alpha):
    before = snapshot(pop4)
    push_toward_average_(pop4, alpha)
    for name, t in pop4.params.items():
        mean = before[name].mean(0)
        for j in range(4):
            assert torch.allclose(t[j], alpha * before[name][j] + (1 - alpha) * mean, atol=1e-6)
    # the population mean is invariant under the push
    for name, t in pop4.params.items():
        assert torch.allclose(t.mean(0), before[name].mean(0), atol=1e-6)
    with pytest.raises(ValueError):
        push_toward_average_(pop4, 1.5)


def test_pair_average_averages_each_member_from_a_pair(pop4):
    before = snapshot(pop4)
    m = pair_average_(pop4, torch.Generator().manual_seed(0))
    assert m.shape == (4, 4)
    for i in range(4):
        partners = m[i].nonzero().flatten().tolist()
        assert len(partners) == 2 and m[i, partners].tolist() == [0.5, 0.5]
        a, b = partners
        for name, t in pop4.params.items():
            assert torch.allclose(t[i], (before[name][a] + before[name][b]) / 2, atol=1e-6)


@pytest.mark.parametrize("p", [3, 4, 5, 10])
def test_pairs_distinct_within_a_draw_and_every_pair_reachable(p):
    g = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(300):
        pairs = draw_pairs(p, g)
        rows = {tuple(sorted(r)) for r in pairs.tolist()}
        assert len(rows) == p, "pairs are drawn without replacement"
        assert all(a != b for a, b in rows)
        seen |= rows
    assert seen == set(itertools.combinations(range(p), 2))


def test_two_members_both_become_their_average():
    pairs = draw_pairs(2, torch.Generator().manual_seed(0))
    assert pairs.tolist() == [[0, 1], [0, 1]]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_mixing_matrices_are_row_stochastic_and_seeded(scheme):
    m1 = mixing_matrix(scheme, 5, torch.Generator().manual_seed(7))
    m2 = mixing_matrix(scheme, 5, torch.Generator().manual_seed(7))
    assert torch.equal(m1, m2)
    assert torch.allclose(m1.sum(1), torch.ones(5, dtype=torch.float64))
    assert (m1 >= 0).all()


def test_scheme_weights_match_table_14():
    g = torch.Generator().manual_seed(3)
    p = 5
    m = mixing_matrix("pair-75", p, g)
    for row in m:
        assert sorted(row[row > 0].tolist()) == [0.25, 0.75]
    m = mixing_matrix("many-half", p, g)
    for row in m:
        assert sorted(row.tolist()) == pytest.approx([0.125] * 4 + [0.5])
    m = mixing_matrix("many-75", p, g)
    for row in m:
        assert sorted(row.tolist()) == pytest.approx([0.0625] * 4 + [0.75])
    m = mixing_matrix("dirichlet", p, g)
    assert (m > 0).all() and m.std() > 0


def test_mix_applies_any_matrix_and_rounds_integers(pop4):
    before = snapshot(pop4)
    m = mixing_matrix("dirichlet", 4, torch.Generator().manual_seed(0))
    mix_(pop4, m)
    for name, t in pop4.params.items():
        expected = torch.tensordot(m.float(), before[name], dims=1)
        assert torch.allclose(t, expected, atol=1e-6)
    assert pop4.buffers["1.num_batches_tracked"].dtype == torch.long
    weighted_average_(pop4, "all")
    assert torch.allclose(pop4.params["0.weight"][0], pop4.params["0.weight"][3])


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_mix_equals_the_contraction_for_every_scheme_and_size(scheme, p):
    """Whichever path ``mix_`` takes (pair rows gathered, or the contraction), member i's parameters and float
    buffers become sum_j M[i, j] member j's: at p = 3 the ``many`` rows have three non-zero weights, at p = 2 every
    scheme's rows have two."""
    pop = Population.from_factory(small_cnn, p, seed=1)
    pop.buffers["1.running_mean"].uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    before = snapshot(pop)
    m = mixing_matrix(scheme, p, torch.Generator().manual_seed(p))
    mix_(pop, m)
    for name, t in pop.tensors():
        if t.is_floating_point():
            assert torch.allclose(t, torch.tensordot(m.float(), before[name], dims=1), atol=1e-6), name


@pytest.mark.parametrize(("alpha", "lr_ratio", "weight"), [(0.9, 0.5, 0.05), (0.9, 20.0, 1.0), (0.5, 3.0, 1.0)])
def test_the_push_follows_the_learning_rate_and_stops_at_the_mean(pop4, alpha, lr_ratio, weight):
    """PAPA's push with lr_t / lr_0: the mean's weight is (1 - alpha) lr_ratio, capped at 1 (PAPA-all)."""
    before = snapshot(pop4)
    push_toward_average_(pop4, alpha, lr_ratio)
    for name, t in pop4.params.items():
        assert torch.allclose(t, (1 - weight) * before[name] + weight * before[name].mean(0), atol=1e-6), name


def test_weights_may_leave_members_out(pop4):
    before = snapshot(pop4)
    average_all_(pop4, [0.5, 0.0, 0.5, 0.0])
    for name, t in pop4.params.items():
        assert torch.allclose(t, ((before[name][0] + before[name][2]) / 2).expand_as(t), atol=1e-6), name


@pytest.mark.parametrize("scheme", ["pair-half", "pair-75", "dirichlet"])
def test_a_random_scheme_without_a_generator_is_refused(scheme):
    """A random scheme never falls back to torch's global RNG: every draw comes from a run's generator."""
    with pytest.raises(ValueError, match=f"scheme {scheme!r} is random and needs a generator"):
        mixing_matrix(scheme, 4)


@pytest.mark.parametrize(("scheme", "own"), [("many-half", 0.5), ("many-75", 0.75)])
def test_the_many_schemes_from_two_members(scheme, own):
    assert mixing_matrix(scheme, 2).tolist() == [[own, 1 - own], [1 - own, own]]
    with pytest.raises(ValueError, match=f"scheme {scheme!r} needs at least 2 members"):
        mixing_matrix(scheme, 1)


# the distributions of the random schemes (Table 14, PAPA-2) ---------------------------------------------------
def _draws(scheme: str, p: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([mixing_matrix(scheme, p, g) for _ in range(n)])  # (n, p, p)


@pytest.mark.parametrize("p", [3, 4, 5, 6])
def test_papa2_rows_are_uniform_over_all_pairs_and_distinct_within_a_draw(p):
    """PAPA-2: row i's two partners are each of the p(p-1)/2 pairs with probability 1 / (p(p-1)/2), whatever i
    (a member is not bound to be one of its own partners), and no two rows of a draw share a pair. The authors'
    first-p-pairs, pairs built around member i, or pairs drawn with replacement all fail this."""
    m = _draws("pair-half", p, 2000)
    assert ((m == 0.5).sum(2) == 2).all() and ((m == 0).sum(2) == p - 2).all()
    partners = (m > 0).to(torch.int64).topk(2, dim=2, sorted=False).indices.sort(2).values  # (n, p, 2), a < b
    codes = partners[..., 0] * p + partners[..., 1]  # (n, p): the pair of each row
    assert (codes.sort(1).values.diff(dim=1) != 0).all()  # no pair twice in a draw
    pairs = torch.tensor([a * p + b for a, b in itertools.combinations(range(p), 2)])
    for i in range(p):
        counts = torch.bincount(codes[:, i], minlength=p * p)
        assert counts[pairs].sum() == len(m)  # every pair drawn is one of the p(p-1)/2
        freq = counts[pairs].double() / len(m)
        assert torch.allclose(freq, torch.full_like(freq, 1 / len(pairs)), atol=0.03), (i, freq.tolist())


def test_pair_75_gives_the_heavier_weight_to_either_partner_at_random():
    """pair-75: 3/4 to one partner and 1/4 to the other, the heavier one either of the pair with probability 1/2,
    so each member is row i's heavier partner with probability 1/p, as often as the lighter one."""
    p, m = 5, _draws("pair-75", 5, 2000)
    assert ((m == 0.75).sum(2) == 1).all() and ((m == 0.25).sum(2) == 1).all()
    heavy, light = (m == 0.75).float().argmax(2), (m == 0.25).float().argmax(2)  # (n, p)
    assert (heavy < light).double().mean().item() == pytest.approx(0.5, abs=0.02)
    for who in (heavy, light):
        freq = torch.stack([(who == k).double().mean(0) for k in range(p)])  # (member, row)
        assert torch.allclose(freq, torch.full_like(freq, 1 / p), atol=0.035)


def _flat_dirichlet(m: torch.Tensor) -> bool:
    """Whether rows (n, p) look like flat Dirichlet draws: each entry Beta(1, p - 1) (mean 1/p, variance
    (p-1) / (p^2 (p+1)), P(w < x) = 1 - (1 - x)^(p-1)), two entries of a row with covariance -1 / (p^2 (p+1)),
    the member's own weight like any other."""
    n, p = m.shape
    var, cov = (p - 1) / (p**2 * (p + 1)), -1 / (p**2 * (p + 1))
    cdf = all(abs((m < x).double().mean().item() - (1 - (1 - x) ** (p - 1))) < 0.012 for x in (0.05, 0.2, 0.5))
    c = torch.cov(m.T)
    return (abs(m.mean().item() - 1 / p) < 0.003 and abs(m.var().item() - var) < 0.06 * var and cdf
            and abs(c[0, 1].item() - cov) < 0.15 * abs(cov))


@pytest.mark.parametrize("p", [2, 4, 5])
def test_dirichlet_rows_are_flat_dirichlet_draws(p):
    draws = _draws("dirichlet", p, 6000 // p)
    rows = draws.reshape(-1, p)
    assert _flat_dirichlet(rows)
    own = draws.diagonal(dim1=1, dim2=2).flatten()
    assert own.mean().item() == pytest.approx(1 / p, abs=0.01)
    # the plausible wrong weightings fail the same check: normalized uniforms, a softmax of Gaussians, a
    # Dirichlet of another concentration
    g = torch.Generator().manual_seed(2)
    u = torch.rand(len(rows), p, generator=g, dtype=torch.float64)
    e = -torch.log(torch.rand(len(rows), p, generator=g, dtype=torch.float64))
    gamma2 = -torch.log(torch.rand(len(rows), p, 2, generator=g, dtype=torch.float64)).sum(2)
    for wrong in (u / u.sum(1, keepdim=True), torch.softmax(torch.randn(len(rows), p, generator=g,
                                                                        dtype=torch.float64), 1),
                  gamma2 / gamma2.sum(1, keepdim=True), (e / e.sum(1, keepdim=True)) ** 1.5):
        assert not _flat_dirichlet(wrong)
