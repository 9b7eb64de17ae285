import pytest
import torch

from papa.alignment import align, align_population, permute, random_permutations
from papa.errors import PapaError
from papa.models import create_model
from papa.population import Population
from papa.repair import repair
from papa.similarity import (
    BETWEEN_NETWORKS,
    NETWORK_AND_SOUP,
    _stage_outputs,
    cosine_similarity,
    population_similarity,
    stages,
)
from papa.soups import average_soup
from tests.unit.test_alignment import narrow, net

pytestmark = pytest.mark.usefixtures("one_thread")


def data(n: int = 2, size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 16, 16, generator=g) for _ in range(n)]


def shuffled(model, seed: int = 7):
    return permute(model, random_permutations(model, torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize(("name", "shapes"), [
    ("resnet20", [(16, 16, 16), (32, 8, 8), (64, 4, 4)]),
    ("resnet18_cifar", [(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]),  # the narrow ResNet-18
])
def test_stage_outputs_are_the_stage_outputs(name, shapes):
    xs = data()
    model = net(name, 1, xs)
    feats = _stage_outputs(model, stages(model), xs[0])
    assert [tuple(f.shape) for f in feats] == [(8, *s) for s in shapes]
    with torch.no_grad():
        y = model.relu(model.bn1(model.conv1(xs[0])))
        for k, f in enumerate(feats, start=1):
            y = model.get_submodule(f"layer{k}")(y)
            torch.testing.assert_close(f, y)


def test_similarity_of_identical_shuffled_and_independent_networks():
    xs = data()
    a, b = net("resnet18_cifar", 1, xs), net("resnet18_cifar", 2, xs)
    assert cosine_similarity(a, a, xs) == pytest.approx([100.0] * 4, abs=1e-9)
    copy = shuffled(a)
    assert all(s < 90 for s in cosine_similarity(a, copy, xs))  # unit i of one is not unit i of the other
    assert cosine_similarity(a, align(copy, a, xs), xs) == pytest.approx([100.0] * 4, abs=1e-6)
    independent = cosine_similarity(a, b, xs)
    aligned = cosine_similarity(a, align(b, a, xs), xs)
    assert all(0 < s < 90 for s in independent + aligned)
    # matching raises the similarity of independent networks at every stage (here by 2 to 20 points)
    assert all(s > t for s, t in zip(aligned, independent, strict=True))


def test_population_of_shuffled_copies_shares_every_feature():
    xs = data()
    a = net("resnet20", 1, xs)
    pop = Population.from_modules([a, shuffled(a), shuffled(a, seed=8)])
    sims = population_similarity(pop, xs, repair_iters=2)
    assert set(sims) == {"all", "first-two"} and set(sims["all"]) == {BETWEEN_NETWORKS, NETWORK_AND_SOUP}
    # aligned, the members are one network; the soup is that network, REPAIRed on the data its statistics
    # came from, so the same up to rounding
    assert sims["all"][BETWEEN_NETWORKS] == pytest.approx([100.0] * 3, abs=1e-6)
    assert sims["all"][NETWORK_AND_SOUP] == pytest.approx([100.0] * 3, abs=1e-3)
    unaligned = population_similarity(pop, xs, align=False, repair=False)
    assert all(s < 90 for s in unaligned["all"][BETWEEN_NETWORKS])


def test_population_of_independent_networks_is_less_similar_and_alignment_helps():
    xs = data()
    pop = Population.from_modules([net("resnet20", seed, xs) for seed in (1, 2, 3)])
    sims = population_similarity(pop, xs, repair_iters=2)
    plain = population_similarity(pop, xs, align=False, repair=False)
    for row in (BETWEEN_NETWORKS, NETWORK_AND_SOUP):
        assert all(0 < s < 90 for s in sims["all"][row])
    assert all(s > t for s, t in zip(sims["all"][BETWEEN_NETWORKS], plain["all"][BETWEEN_NETWORKS], strict=True))
    # by hand: the mean over the 3 pairs of aligned members, and over members against the REPAIRed soup
    aligned = align_population(pop, xs)
    members = aligned.to_modules()
    pairs = [cosine_similarity(members[i], members[j], xs) for i, j in [(0, 1), (0, 2), (1, 2)]]
    assert sims["all"][BETWEEN_NETWORKS] == pytest.approx(torch.tensor(pairs, dtype=torch.float64).mean(0).tolist(),
                                                   abs=1e-9)
    soup = repair(average_soup(aligned), aligned, xs, iters=2)
    to_soup = [cosine_similarity(m, soup, xs) for m in members]
    assert sims["all"][NETWORK_AND_SOUP] == pytest.approx(torch.tensor(to_soup, dtype=torch.float64).mean(0).tolist(),
                                                   abs=1e-9)
    # the authors' measure (correlation_est): members 0 and 1, and member 0 against the soup
    assert sims["first-two"][BETWEEN_NETWORKS] == pytest.approx(pairs[0], abs=1e-9)
    assert sims["first-two"][NETWORK_AND_SOUP] == pytest.approx(to_soup[0], abs=1e-9)
    assert sims["first-two"][BETWEEN_NETWORKS] != pytest.approx(sims["all"][BETWEEN_NETWORKS], abs=1e-6)


def test_similarity_refuses_other_architectures_and_small_populations():
    vgg = narrow("vgg11_bn")
    with pytest.raises(PapaError, match="feature similarity supports resnet18_cifar and resnet20"):
        cosine_similarity(vgg, vgg, data(1, 2))
    with pytest.raises(ValueError, match="at least 2"):
        population_similarity(Population.from_modules([create_model("resnet20", 10)]), data(1, 2))
    with pytest.raises(ValueError, match="feature similarity got no batches"):
        cosine_similarity(net("resnet20", 1, data()), net("resnet20", 2, data()), [])
    two = Population.from_modules([net("resnet20", 1, data()), net("resnet20", 2, data())])
    sims = population_similarity(two, data(1, 2), align=False, repair=False)["all"]  # two members: one pair
    assert len(sims[BETWEEN_NETWORKS]) == len(sims[NETWORK_AND_SOUP]) == 3
