import itertools

import pytest
import torch
from torch import nn

from papa.alignment import (
    UNSUPPORTED,
    align,
    align_population,
    correlations,
    invert,
    match,
    permutation_spec,
    permute,
    random_permutations,
)
from papa.errors import PapaError
from papa.models import create_model
from papa.models.resnet_cifar import CifarResNet
from papa.models.vgg import VGG
from papa.population import Population
from papa.repair import repair, reset_batchnorm
from papa.soups import aligned_average_soup, aligned_greedy_soup, average_soup, greedy_alignment, greedy_soup

pytestmark = pytest.mark.usefixtures("one_thread")


# networks -----------------------------------------------------------------------------------------
def narrow(name: str) -> nn.Module:
    """The registered architectures' classes at a fraction of the width (ResNet-20 is small already)."""
    if name == "vgg11_bn":
        return VGG([8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M"], 10)
    if name == "resnet18_cifar":
        return CifarResNet([2, 2, 2, 2], [8, 16, 32, 64], 10)
    return create_model(name, 10)


NAMES = ["vgg11_bn", "resnet20", "resnet18_cifar"]


def data(n: int = 2, size: int = 8, seed: int = 0, name: str = "resnet20") -> list[torch.Tensor]:
    """Random images: 32x32 for VGG (five max-pools), 16x16 for the ResNets (any size goes; small is fast)."""
    g = torch.Generator().manual_seed(seed)
    hw = 32 if name.startswith("vgg") else 16
    return [torch.randn(size, 3, hw, hw, generator=g) for _ in range(n)]


def net(name: str, seed: int, xs: list[torch.Tensor]) -> nn.Module:
    """A randomly initialized network whose BatchNorm statistics are those of ``xs`` (as after training:
    pre-activations normalized, so that no unit is dead on the data)."""
    torch.manual_seed(seed)
    return reset_batchnorm(narrow(name), xs).eval()


def same_tensors(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def close_tensors(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k].double(), sb[k].double(), atol=1e-6) for k in sa)


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# permutation specs --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "groups"), [("vgg11_bn", 8), ("vgg16_bn", 13), ("resnet20", 9 + 3), ("resnet18_cifar", 8 + 4)]
)
def test_spec_permutes_every_hidden_axis_once(name, groups):
    model = create_model(name, 10)
    spec = permutation_spec(model)
    assert len(spec) == groups
    axes = [a for g in spec for a in g.axes]
    assert len(axes) == len(set(axes))
    covered = {(n, ax) for n, ax in axes}
    first_conv = "features.0.weight" if name.startswith("vgg") else "conv1.weight"
    head = "classifier" if name.startswith("vgg") else "fc"
    for n, t in model.state_dict().items():
        if n.endswith("num_batches_tracked") or n == f"{head}.bias":
            expected = set()
        elif n == first_conv:
            expected = {0}  # its input is the image
        elif n == f"{head}.weight":
            expected = {1}  # its output is the logits
        elif t.dim() == 4:
            expected = {0, 1}
        else:
            expected = {0}  # BatchNorm weight, bias and statistics
        assert {ax for m, ax in covered if m == n} == expected, n


def test_resnet_stream_groups_follow_the_projections():
    spec = {g.name: g for g in permutation_spec(create_model("resnet20", 10))}
    assert sorted(n for n in spec if n.startswith("stream")) == ["stream:layer2.0", "stream:layer3.0", "stream:stem"]
    stem = set(spec["stream:stem"].axes)
    # the stem, every layer1 block's output, the skip into layer2's projection, all one permutation
    assert {("conv1.weight", 0), ("layer1.2.conv2.weight", 0), ("layer1.1.bn2.running_var", 0),
            ("layer1.0.conv1.weight", 1), ("layer2.0.conv1.weight", 1), ("layer2.0.downsample.0.weight", 1)} <= stem
    assert [t.module for t in spec["stream:stem"].taps] == ["bn1", "layer1.0", "layer1.1", "layer1.2"]
    last = set(spec["stream:layer3.0"].axes)
    assert {("layer3.0.downsample.0.weight", 0), ("layer3.0.downsample.1.bias", 0), ("layer3.2.bn2.weight", 0),
            ("layer3.1.conv1.weight", 1), ("fc.weight", 1)} <= last
    inner = spec["inner:layer2.1"]
    assert set(inner.axes) == {("layer2.1.conv1.weight", 0), ("layer2.1.bn1.weight", 0), ("layer2.1.bn1.bias", 0),
                               ("layer2.1.bn1.running_mean", 0), ("layer2.1.bn1.running_var", 0),
                               ("layer2.1.conv2.weight", 1)}


@pytest.mark.parametrize("model", [nn.Sequential(nn.Linear(2, 2)), "digits_cnn"])
def test_unsupported_architectures_are_refused(model):
    model = create_model(model, 10) if isinstance(model, str) else model
    with pytest.raises(PapaError, match=UNSUPPORTED):
        permutation_spec(model)
    with pytest.raises(PapaError, match=UNSUPPORTED):
        align(model, model, data(1, 2))


def test_permute_rejects_a_non_permutation():
    model = narrow("resnet20")
    perms = random_permutations(model)
    perms["inner:layer1.0"] = torch.zeros(16, dtype=torch.long)
    with pytest.raises(ValueError, match="not a permutation"):
        permute(model, perms)


# alignment ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_a_permuted_copy_is_aligned_back_exactly(name):
    xs = data(name=name)
    model = net(name, 1, xs)
    perms = random_permutations(model, torch.Generator().manual_seed(2))
    shuffled = permute(model, perms)
    assert not same_tensors(shuffled, model)
    torch.testing.assert_close(outputs(shuffled, xs[0]), outputs(model, xs[0]), rtol=1e-4, atol=1e-5)
    found = match(shuffled, model, xs)
    assert all(torch.equal(found[g], invert(perms)[g]) for g in perms)
    assert same_tensors(permute(shuffled, found), model)


@pytest.mark.parametrize("name", ["vgg11_bn", "vgg16_bn", "resnet20", "resnet18_cifar"])
def test_alignment_preserves_the_function_at_full_size(name):
    torch.manual_seed(0)
    a, b = create_model(name, 10).eval(), create_model(name, 10).eval()
    x = data(1, 2, name=name)[0]
    before = {k: v.clone() for k, v in b.state_dict().items()}
    aligned = align(b, a, [x])
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())  # a copy; b is untouched
    assert not same_tensors(aligned, b)
    torch.testing.assert_close(outputs(aligned, x), outputs(b, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet20", "vgg11_bn"])
def test_alignment_preserves_the_function_of_independent_networks(name):
    xs = data(name=name)
    a, b = net(name, 1, xs), net(name, 2, xs)
    aligned = align(b, a, xs)
    x = data(1, 8, seed=5, name=name)[0]
    torch.testing.assert_close(outputs(aligned, x), outputs(b, x), rtol=1e-4, atol=1e-5)


def test_correlations_are_pearson_over_every_position_of_every_image():
    """A group's matrix is the sum over its taps of the correlation of reference unit i with model unit j, every
    position of every image a sample: the running sums over batches give torch.corrcoef of all of them at once."""
    xs = data()
    a, b = net("resnet20", 1, xs), net("resnet20", 2, xs)

    def units(model: nn.Module, module: str, relu: bool) -> torch.Tensor:
        out = []
        handle = model.get_submodule(module).register_forward_hook(lambda _, __, y: out.append(y.relu() if relu else y))
        with torch.no_grad():
            for x in xs:
                model(x)
        handle.remove()
        y = torch.cat(out)
        return y.transpose(0, 1).reshape(y.shape[1], -1).double()

    corr = correlations(a, [b], xs)[0]
    for group in permutation_spec(a):
        expected = sum(torch.corrcoef(torch.cat([units(a, t.module, t.relu), units(b, t.module, t.relu)]))
                       [: group.size, group.size:].nan_to_num() for t in group.taps)  # a constant unit: 0
        torch.testing.assert_close(corr[group.name], expected, rtol=1e-6, atol=1e-9)


def test_matching_maximizes_the_total_correlation():
    xs = data()
    a, b = net("resnet20", 1, xs), net("resnet20", 2, xs)
    corr = correlations(a, [b], xs)[0]
    found = match(b, a, xs)
    for name, c in corr.items():
        matched = c[torch.arange(len(found[name])), found[name]].sum()
        assert matched >= c.trace() - 1e-9
        # no other assignment of a few units does better (a local check of optimality)
        for i, j in itertools.combinations(range(4), 2):
            swapped = found[name].clone()
            swapped[[i, j]] = swapped[[j, i]]
            assert matched >= c[torch.arange(len(swapped)), swapped].sum() - 1e-9
    # aligned units are more correlated than the unaligned ones
    after = correlations(a, [align(b, a, xs)], xs)[0]
    assert sum(c.trace() for c in after.values()) > sum(c.trace() for c in corr.values())


@pytest.mark.parametrize("name", ["resnet20", "vgg11_bn"])
def test_alignment_makes_a_permuted_perturbed_network_averageable(name):
    """B is A with noise on every weight, then shuffled: averaging A and B only works once B is aligned."""
    xs = data(name=name)
    a = net(name, 1, xs)
    g = torch.Generator().manual_seed(3)
    noisy = permute(a, random_permutations(a))
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.1 * p.std() * torch.randn(p.shape, generator=g))
    pop = Population.from_modules([a, noisy])
    plain = average_soup(pop)
    aligned = average_soup(Population.from_modules([a, align(noisy, a, xs)]))
    x = data(1, 8, seed=5, name=name)[0]
    ya = outputs(a, x)

    def error(m):
        return float(((outputs(m, x) - ya) ** 2).mean() / (ya**2).mean())

    # (the relative errors are about 0.02 against 0.4 for ResNet-20, 0.08 against 0.75 for VGG-11)
    assert error(aligned) < 0.25 * error(plain)
    assert error(aligned) < error(noisy)  # averaging with A halves the noise


# populations and soups ----------------------------------------------------------------------------
def shuffled_copies(model: nn.Module, n: int) -> list[nn.Module]:
    return [permute(model, random_permutations(model, torch.Generator().manual_seed(10 + k))) for k in range(n)]


def test_align_population_aligns_every_member_to_the_reference():
    xs = data()
    a = net("resnet20", 1, xs)
    copies = shuffled_copies(a, 2)
    pop = Population.from_modules([a, *copies])
    aligned = align_population(pop, iter(xs))  # a one-shot iterator is enough: one pass
    assert aligned is not pop and aligned.size == 3
    assert all(same_tensors(aligned.member(j), a) for j in range(3))
    assert same_tensors(pop.member(1), copies[0])  # the population is untouched
    to_second = align_population(pop, xs, reference=1)
    assert all(same_tensors(to_second.member(j), copies[0]) for j in range(3))
    to_last = align_population(pop, xs, reference=-1)  # indexed as a sequence: -1 is the last member
    assert all(same_tensors(to_last.member(j), copies[1]) for j in range(3))
    assert all(same_tensors(align_population(pop, xs, reference=-3).member(j), a) for j in range(3))
    for reference in (3, -4):
        with pytest.raises(IndexError, match=f"reference member {reference} out of range for a population of 3"):
            align_population(pop, xs, reference=reference)


def test_aligned_average_soup_of_shuffled_copies_is_the_network():
    xs = data()
    a = net("resnet20", 1, xs)
    copies = shuffled_copies(a, 2)
    pop = Population.from_modules([a, *copies])
    assert close_tensors(aligned_average_soup(pop, iter(xs)), a)  # one-shot iterator: kept for every pass
    assert close_tensors(aligned_average_soup(pop, xs, order=[2, 0, 1]), copies[1])
    assert not close_tensors(average_soup(pop), a)


def test_aligned_greedy_soup_aligns_each_member_to_the_soup_before_trying_it():
    xs = data()
    a, b = net("resnet20", 1, xs), net("resnet20", 2, xs)
    (copy,) = shuffled_copies(a, 1)
    pop = Population.from_modules([b, a, copy])
    x = data(1, 8, seed=5)[0]
    target = outputs(a, x)
    calls = []

    def score(m) -> float:  # closeness to A's function: A and its shuffled copy are (about) best
        calls.append(m)
        return -float(((outputs(m, x) - target) ** 2).mean())

    soup, included = aligned_greedy_soup(pop, score, xs)
    # sorted by score: A (member 1), its copy (2), B (0); the copy, aligned to the soup A, leaves the soup
    # unchanged (kept: >=); B, aligned, still moves the soup away from A (rejected)
    assert included == [1, 2]
    assert same_tensors(soup, a)
    assert len(calls) == 3 + 2
    assert score(soup) == 0.0
    aligned_pop, included2, soup2 = greedy_alignment(pop, score, xs)
    assert included2 == included and same_tensors(soup2, soup)
    assert same_tensors(aligned_pop.member(2), a)  # the copy, as aligned to the soup
    assert same_tensors(aligned_pop.member(1), a)
    assert not same_tensors(aligned_pop.member(0), b)  # B permuted, as aligned to the soup A
    torch.testing.assert_close(outputs(aligned_pop.member(0), x), outputs(b, x), rtol=1e-4, atol=1e-5)
    # without alignment, the shuffled copy ruins the soup and is rejected
    assert greedy_soup(pop, score)[1] == [1]


def test_aligned_greedy_soup_is_the_best_member_alone_or_the_last_soup_kept():
    xs = data()
    a, b = net("resnet20", 1, xs), net("resnet20", 2, xs)
    pop = Population.from_modules([a, b])
    x = data(1, 8, seed=5)[0]
    target = outputs(a, x)
    soup, included = aligned_greedy_soup(pop, lambda m: -float(((outputs(m, x) - target) ** 2).mean()), xs)
    assert included == [0] and same_tensors(soup, a)  # B, aligned, moves the soup away from A: A alone
    aligned_pop, included, soup = greedy_alignment(pop, lambda m: 1.0, xs)  # ties: B kept
    assert included == [0, 1] and same_tensors(soup, average_soup(aligned_pop))
    assert not same_tensors(soup, a)


def test_aligned_greedy_soup_keeps_ties_in_member_order():
    xs = data()
    a = net("resnet20", 1, xs)
    pop = Population.from_modules([a, *shuffled_copies(a, 2)])
    soup, included = aligned_greedy_soup(pop, lambda m: 1.0, xs)
    assert included == [0, 1, 2]
    assert close_tensors(soup, a)


def test_batches_may_be_a_callable_as_for_repair():
    xs = data()
    a = net("resnet20", 1, xs)
    copy = shuffled_copies(a, 1)[0]

    def batches(member, generator):  # REPAIR's convention: fresh seeded generator on every call
        assert member is None
        return [(torch.randn(8, 3, 16, 16, generator=generator), None) for _ in range(2)]

    pop = Population.from_modules([a, copy])
    assert same_tensors(align_population(pop, batches).member(1), a)
    assert same_tensors(aligned_average_soup(pop, batches), a)
    with pytest.raises(ValueError, match="no batches"):
        align(copy, a, [])


def test_a_member_aligns_to_a_repaired_soup():
    xs = data()
    a = net("resnet20", 1, xs)
    pop = Population.from_modules([a, *shuffled_copies(a, 1)])
    aligned = align_population(pop, xs)
    soup = repair(average_soup(aligned), aligned, xs, iters=2)  # gains conv biases
    assert "conv1.bias" in soup.state_dict()
    assert same_tensors(align(pop.member(1), soup, xs), a)
    with pytest.raises(PapaError, match="different architectures"):
        align(narrow("resnet18_cifar"), a, xs)
