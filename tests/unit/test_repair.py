import copy

import pytest
import torch
from torch import nn

from papa.averaging import mix_, mixing_matrix
from papa.population import Population
from papa.repair import (
    _batch_average,
    _chunk_moments,
    _find_layers,
    member_moments,
    repair,
    repair_population_,
    reset_batchnorm,
)
from papa.soups import average_soup

SEED = 666
P = 3


# small networks -----------------------------------------------------------------------------------
def _head(c: int, bias: bool = True) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c, 5, bias=bias)]


def biased_net():  # (a) convolutions with bias, no BatchNorm
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        *_head(8),
    )


def _random_affine(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    # Members must differ in their BatchNorm weights too, or the soup's BN layers would not need repair.
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.normal_(bn.bias, 0.0, 0.3)
    return bn


def bn_net():  # (b) bias-free convolutions followed by BatchNorm, with dropout in train mode
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), _random_affine(nn.BatchNorm2d(8)), nn.ReLU(),
        nn.Dropout(0.2),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), _random_affine(nn.BatchNorm2d(8)), nn.ReLU(), *_head(8),
    )


def bias_free_net():  # (c) bias-free layers and no BatchNorm: REPAIR must add the biases
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.ReLU(), *_head(8, bias=False),
    )


def grouped_net():  # (d) grouped and dilated convolutions
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=2, dilation=2), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=4), nn.ReLU(),
        nn.Conv2d(8, 8, 1, groups=8, bias=False), nn.ReLU(), *_head(8),
    )


class MixedNet(nn.Module):
    """Transposed grouped convolution (3 output channels per group, a kernel of 2: the weight's two axes told
    apart), Conv1d, Conv3d and a layer applied to two inputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.up = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2, bias=False)
        self.line = nn.Conv1d(6, 6, 3, padding=1)
        self.vol = nn.Conv3d(1, 2, 3, padding=1)
        self.shared = nn.Linear(6, 6)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.up(torch.relu(self.stem(x))))  # (n, 6, 16, 16)
        x = torch.relu(self.line(x.flatten(2)))  # (n, 6, 256)
        x = torch.relu(self.vol(x[:, None, :, :8].reshape(-1, 1, 6, 2, 4)))  # (n, 2, 6, 2, 4)
        x = x.mean((3, 4)).flatten(1)  # (n, 12)
        x = torch.relu(torch.cat([self.shared(x[:, :6]), self.shared(x[:, 6:] * 2.0)], 1))
        return self.fc(x)


class MixedNetWithBiases(MixedNet):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2)


FACTORIES = {"biased": biased_net, "bn": bn_net, "bias_free": bias_free_net, "grouped": grouped_net,
             "mixed": MixedNet}


def make_pop(factory) -> Population:
    return Population.from_factory(factory, P, seed=3)


def data(n: int = 5, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 8, 8, generator=g) + 0.5 for _ in range(n)]


# an independent measure: whole outputs, concatenated ----------------------------------------------
@torch.no_grad()
def eval_moments(model: nn.Module, xs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel output moments of every conv/linear pre-activation (the classifier producing the
    model's output is not one), pooled over ``xs`` in eval mode."""
    outs: dict[str, list[torch.Tensor]] = {}
    raw: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear | nn.modules.conv._ConvNd):
            def hook(mod, _, y, name=name):
                raw[name] = y
                y = y.double()
                # rows: samples (and positions), columns: channels
                channels_last = y if isinstance(mod, nn.Linear) else y.movedim(1, -1)
                y = channels_last.reshape(-1, y.shape[-1] if isinstance(mod, nn.Linear) else y.shape[1])
                outs.setdefault(name, []).append(y)
            hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    output_layers = set()
    for x in xs:
        out = model(x)
        output_layers |= {n for n, y in raw.items() if y is out}
    model.train(was)
    for h in hooks:
        h.remove()
    return {n: (torch.cat(v).mean(0), torch.cat(v).std(0, unbiased=False))
            for n, v in outs.items() if n not in output_layers}


def weighted_targets(pop, xs_of, weights):
    """Members' moments the slow way: a copy of each with its BatchNorms rebuilt on its own data."""
    per_member = []
    for j in range(pop.size):
        member = reset_batchnorm(pop.member(j), xs_of(j), seed=SEED)
        per_member.append(eval_moments(member, xs_of(j)))
    w = torch.as_tensor(weights, dtype=torch.float64)
    return {
        n: (sum(w[j] * per_member[j][n][0] for j in range(pop.size)),
            sum(w[j] * per_member[j][n][1] for j in range(pop.size)))
        for n in per_member[0]
    }


def assert_moments_match(got, want, rtol=1e-4):
    assert want and set(want) <= set(got)
    for name, (mean, std) in want.items():
        scale = std.abs().mean()
        torch.testing.assert_close(got[name][0], mean, rtol=rtol, atol=rtol * scale, msg=name)
        torch.testing.assert_close(got[name][1], std, rtol=rtol, atol=rtol * scale, msg=name)


def worst_std_gap(got, want) -> float:
    return max(float(((got[n][1] - s).abs() / s.abs().mean()).max()) for n, (_, s) in want.items())


# repair -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", FACTORIES)
@pytest.mark.parametrize("weights", [None, [0.5, 0.3, 0.2]])
def test_repair_matches_weighted_member_moments(kind, weights):
    pop, xs = make_pop(FACTORIES[kind]), data()
    w = [1 / P] * P if weights is None else weights
    soup = average_soup(pop, None if weights is None else torch.tensor(weights, dtype=torch.float64))
    want = weighted_targets(pop, lambda j: xs, w)

    before = eval_moments(reset_batchnorm(copy.deepcopy(soup), xs), xs)
    assert worst_std_gap(before, want) > 0.1  # averaging collapsed the variance: there is work to do

    repaired = repair(soup, pop, xs, weights=weights)
    assert_moments_match(eval_moments(repaired, xs), want)


def test_dead_channels_are_shifted_not_scaled():
    pop, xs = make_pop(biased_net), data()
    w = pop.params["0.weight"]
    w[:, 0] = torch.stack([w[0, 0], -w[0, 0], torch.zeros_like(w[0, 0])])  # the soup's channel 0 cancels out
    w[:, 1] = 0.0  # channel 1 is constant in every member
    want = weighted_targets(pop, lambda j: xs, [1 / P] * P)
    repaired = repair(average_soup(pop), pop, xs)
    assert all(torch.isfinite(t).all() for t in repaired.state_dict().values())
    got = eval_moments(repaired, xs)
    torch.testing.assert_close(got["0"][0], want["0"][0], rtol=1e-4, atol=1e-5)
    assert float(got["0"][1][:2].abs().max()) < 1e-6 and float(want["0"][1][0]) > 0.1  # no spread to rescale
    torch.testing.assert_close(got["0"][1][2:], want["0"][1][2:], rtol=1e-4, atol=1e-5)
    del got["0"], want["0"]
    assert_moments_match(got, want)  # the layers after it still match exactly


def test_a_channel_is_dead_when_its_spread_is_below_a_millionth_of_its_size():
    """The dead-channel rule, std <= 1e-6 sqrt(mean^2 + std^2): two channels around 1000 whose soup spreads a third
    of each member's (signs +, -, +). The one spreading about 3e-5 (rounding's scale in float32 at 1000) is left
    unscaled; the one spreading about 3e-3 (relative 3e-6) is scaled by about 3, to its members' spread."""
    def net():
        return nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(2 * 8 * 8, 2))

    pop, xs = make_pop(net), data()
    with torch.no_grad():
        for j, sign in enumerate((1.0, -1.0, 1.0)):
            pop.params["0.weight"][j] = sign * torch.tensor([1e-4, 1e-2]).view(2, 1, 1, 1) / 3**0.5
        pop.params["0.bias"].fill_(1000.0)
    soup = average_soup(pop)
    ratio = (repair(soup, pop, xs)[0].weight / soup[0].weight).detach()[:, 0, 0, 0]  # per output channel
    assert ratio[0] == 1.0 and ratio[1] == pytest.approx(3.0, rel=0.05)


def test_member_moments_are_each_members_own():
    pop, xs = make_pop(bn_net), data()
    moments = member_moments(pop, xs)
    assert len(moments) == P
    for j in range(P):
        want = eval_moments(reset_batchnorm(pop.member(j), xs, seed=SEED), xs)
        assert_moments_match(moments[j], want, rtol=1e-6)


def test_repair_adds_only_the_missing_biases_and_leaves_its_input_alone():
    pop, xs = make_pop(grouped_net), data()
    soup = average_soup(pop)
    before = {k: v.clone() for k, v in soup.state_dict().items()}
    repaired = repair(soup, pop, xs)
    assert soup.state_dict().keys() == before.keys()
    assert all(torch.equal(soup.state_dict()[k], v) for k, v in before.items())
    assert set(repaired.state_dict()) == set(before) | {"4.bias"}  # the bias-free depthwise convolution
    assert isinstance(repaired[4].bias, nn.Parameter)

    pop, soup = make_pop(bias_free_net), average_soup(make_pop(bias_free_net))
    # not the output layer "6"
    assert set(repair(soup, pop, xs).state_dict()) == set(soup.state_dict()) | {"0.bias", "2.bias"}


def test_repair_of_bias_free_layer_before_batchnorm_keeps_the_shift():
    pop, xs = make_pop(bn_net), data()
    repaired = repair(average_soup(pop), pop, xs)
    assert {"0.bias", "4.bias"} <= set(repaired.state_dict())
    assert_moments_match(eval_moments(repaired, xs), weighted_targets(pop, lambda j: xs, [1 / P] * P))


def test_repair_is_deterministic_and_reuses_moments():
    pop, xs = make_pop(bn_net), data()
    soup = average_soup(pop)
    a, b = repair(soup, pop, xs), repair(soup, pop, xs, moments=member_moments(pop, xs))
    for (ka, ta), (kb, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(ta, tb)


def test_repair_uses_only_the_first_iters_batches_of_an_iterator():
    pop, xs = make_pop(biased_net), data(n=8)
    soup = average_soup(pop)
    a = repair(soup, pop, iter(xs), iters=3)
    b = repair(soup, pop, xs[:3], iters=3)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def augmenting_batches(calls: list):
    """Member-specific augmentation drawn from the generator; records who asked and the generator's
    first draw."""
    base = data()

    def batches(member, generator):
        calls.append((member, torch.rand(1, generator=generator).item()))
        for x in base:
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            yield x * (1.0 + 0.2 * (member or 0)) + torch.randn(x.shape, generator=generator) * 0.1

    return batches


def test_callable_batches_get_member_and_a_freshly_seeded_generator():
    calls = []
    batches = augmenting_batches(calls)
    pop = make_pop(biased_net)
    moments = member_moments(pop, batches, seed=SEED)
    assert [m for m, _ in calls] == list(range(P))
    first_draw = torch.rand(1, generator=torch.Generator().manual_seed(SEED)).item()
    assert all(d == first_draw for _, d in calls)
    x0, x0_again = next(batches(1, torch.Generator().manual_seed(SEED))), next(
        batches(1, torch.Generator().manual_seed(SEED))
    )
    assert torch.equal(x0, x0_again)

    calls.clear()
    soup = average_soup(pop)
    repaired = repair(soup, pop, batches, moments=moments, target=2)
    assert calls == [(2, first_draw)]
    xs_of = lambda j: list(batches(j, torch.Generator().manual_seed(SEED)))  # noqa: E731
    want = weighted_targets(pop, xs_of, [1 / P] * P)
    assert_moments_match(eval_moments(repaired, xs_of(2)), want)
    again = repair(soup, pop, batches, moments=moments, target=2)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in repaired.state_dict().items())


def test_bad_inputs_are_reported():
    pop, xs = make_pop(biased_net), data()
    with pytest.raises(ValueError, match="weights"):
        repair(average_soup(pop), pop, xs, weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="no batches"):
        repair(average_soup(pop), pop, [])
    with pytest.raises(ValueError, match="no batches"):
        reset_batchnorm(bn_net(), [])


def test_the_last_layer_feeds_no_batchnorm_even_when_a_function_follows_it():
    """Where the last layer's output goes through a function (a pooling, a scale) to the model's output, it feeds
    no BatchNorm and is not the output layer (so a population's REPAIR, adding no bias, leaves it alone if it has
    none, and rescales it if it has one)."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(self.bn(self.conv(x))).mean((2, 3)) * 2

    found = {layer.name: layer for layer in _find_layers(Scaled(), torch.randn(2, 3, 8, 8))}
    assert found["conv"].feeds_bn and not found["conv"].is_output
    assert not found["head"].feeds_bn and not found["head"].is_output


# per-channel moments ------------------------------------------------------------------------------
def test_moments_of_low_precision_outputs_are_exact_about_a_rounded_centre():
    """A bfloat16 output is centred at its mean rounded to bfloat16 (a temporary no bigger than the output), and
    the sum of squares corrected for that rounding: 1000, 1000, 1000, 1008 (mean 1002, between two bfloat16
    values) give the exact moments."""
    y = torch.tensor([1000.0, 1000.0, 1000.0, 1008.0], dtype=torch.bfloat16).view(4, 1)
    n, mean, m2 = _chunk_moments(y, 1)
    assert (n, mean.tolist(), m2.tolist()) == (4, [1002.0], [48.0])


def test_batch_averages_are_a_momentum_none_batchnorms_statistics_even_for_batches_of_two():
    """The authors' fusion measures like a BatchNorm with momentum None: the plain average over batches of each
    batch's mean and unbiased variance (divided by n - 1, here 1)."""
    g = torch.Generator().manual_seed(0)
    bn, batches = nn.BatchNorm1d(3, momentum=None), [torch.randn(2, 3, generator=g) * k for k in (1, 2, 5)]
    for x in batches:
        bn(x)
    mean, std = _batch_average([_chunk_moments(x, 1) for x in batches])
    torch.testing.assert_close(mean.float(), bn.running_mean)
    torch.testing.assert_close((std**2).float(), bn.running_var)


# reset_batchnorm ----------------------------------------------------------------------------------
def test_reset_batchnorm_is_a_plain_average_of_batch_statistics():
    net, xs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3)), data(n=4)
    net.eval()
    reset_batchnorm(net, iter(xs))
    bn, feats = net[1], [net[0](x).detach() for x in xs]
    torch.testing.assert_close(bn.running_mean, torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([f.var((0, 2, 3)) for f in feats]).mean(0))
    assert bn.momentum == 0.3 and not net.training and int(bn.num_batches_tracked) == 4


# repair_population_ -------------------------------------------------------------------------------
def mixed_population(factory, matrix):
    pop = make_pop(factory)
    pre = Population.from_modules(pop.to_modules())
    return pre, mix_(pop, matrix)


@pytest.mark.parametrize("kind", ["biased", "mixed_biased", "bn"])
def test_repair_population_matches_repair_per_row(kind):
    factory = {"biased": biased_net, "bn": bn_net, "mixed_biased": MixedNetWithBiases}[kind]
    matrix = mixing_matrix("dirichlet", P, torch.Generator().manual_seed(1))
    batches = augmenting_batches([])
    pre, pop = mixed_population(factory, matrix)
    moments = member_moments(pre, batches)
    expected = [
        repair(pop.member(i), pre, batches, weights=matrix[i], target=i, moments=moments) for i in range(P)
    ]
    keys = set(pop.state_dict())
    assert repair_population_(pop, matrix, batches, moments) is pop
    assert set(pop.state_dict()) == keys
    for i in range(P):
        xs = list(batches(i, torch.Generator().manual_seed(SEED)))
        got, want = pop.member(i).eval(), expected[i].eval()
        with torch.no_grad():
            torch.testing.assert_close(got(xs[0]), want(xs[0]), rtol=1e-4, atol=1e-4)
        for name, t in got.state_dict().items():
            if "running_mean" not in name:  # differs by the shift the BatchNorm absorbs
                torch.testing.assert_close(t, want.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("stacked", [False, True])
def test_repair_population_leaves_bias_free_layers_outside_batchnorm_alone(stacked):
    """Members keep their architecture, so a bias-free layer whose output no BatchNorm takes cannot be
    shifted in place: it is left as it is (timm's ConViT has such layers), and the layers after it are still
    repaired."""
    def relu_then_bn():  # the BatchNorm does not see the first convolution's output itself
        return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(8),
                             nn.Conv2d(8, 8, 3), nn.ReLU(), *_head(8))

    for factory, fixed, repaired in ((bias_free_net, ["0.weight", "2.weight"], []),
                                     (relu_then_bn, ["0.weight"], ["3.weight", "3.bias"])):
        pre, pop = mixed_population(factory, torch.full((P, P), 1.0 / P, dtype=torch.float64))
        moments, before = member_moments(pre, data()), {k: v.clone() for k, v in pop.state_dict().items()}
        repair_population_(pop, torch.full((P, P), 1.0 / P), data(), moments, stacked=stacked)
        assert pop.state_dict().keys() == before.keys()
        assert all(torch.equal(pop.params[k], before[k]) for k in fixed)
        assert all(not torch.equal(pop.params[k], before[k]) for k in repaired)


def test_the_classifier_producing_the_output_is_not_rescaled():
    pop, xs = make_pop(FACTORIES["biased"]), data()
    soup = average_soup(pop)
    repaired = repair(soup, pop, xs)
    last = [n for n, m in soup.named_modules() if isinstance(m, nn.Linear)][-1]
    assert torch.equal(repaired.get_submodule(last).weight, soup.get_submodule(last).weight)
    assert torch.equal(repaired.get_submodule(last).bias, soup.get_submodule(last).bias)


# the stacked (vmapped) passes -----------------------------------------------------------------------
def bn_net_no_dropout():  # (b) without dropout, whose masks the stacked pass draws differently
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), _random_affine(nn.BatchNorm2d(8)), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), _random_affine(nn.BatchNorm2d(8)), nn.ReLU(), *_head(8),
    )


STACKABLE = {"biased": biased_net, "bn": bn_net_no_dropout, "grouped": grouped_net, "mixed": MixedNet}


@pytest.mark.parametrize("kind", STACKABLE)
def test_stacked_member_moments_equal_the_per_member_ones(kind):
    pop = make_pop(STACKABLE[kind])
    batches = augmenting_batches([])
    before = {k: v.clone() for k, v in pop.state_dict().items()}
    loop = member_moments(pop, batches)
    stacked = member_moments(pop, batches, stacked=True)
    for j in range(P):
        assert stacked[j].keys() == loop[j].keys()
        assert_moments_match(stacked[j], loop[j], rtol=1e-4)
    assert all(torch.equal(pop.state_dict()[k], v) for k, v in before.items())  # measured on copies


@pytest.mark.parametrize("kind", ["biased", "mixed_biased", "bn"])
def test_stacked_repair_population_equals_the_per_member_repair(kind):
    factory = {"biased": biased_net, "bn": bn_net_no_dropout, "mixed_biased": MixedNetWithBiases}[kind]
    matrix = mixing_matrix("dirichlet", P, torch.Generator().manual_seed(1))
    batches = augmenting_batches([])
    pre, loop = mixed_population(factory, matrix)
    _, stacked = mixed_population(factory, matrix)
    moments = member_moments(pre, batches, stacked=True)
    repair_population_(loop, matrix, batches, moments)
    assert repair_population_(stacked, matrix, batches, moments, stacked=True) is stacked
    for name, t in loop.state_dict().items():
        if t.is_floating_point():
            torch.testing.assert_close(stacked.state_dict()[name], t, rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(stacked.state_dict()[name], t), name


def test_stacked_repair_runs_dropout_models_deterministically():
    matrix = mixing_matrix("pair-half", P, torch.Generator().manual_seed(2))
    batches = augmenting_batches([])
    results = []
    for _ in range(2):
        pre, pop = mixed_population(bn_net, matrix)
        moments = member_moments(pre, batches, stacked=True)
        results.append(repair_population_(pop, matrix, batches, moments, stacked=True).state_dict())
    for name, t in results[0].items():
        assert torch.equal(results[1][name], t), name


def test_repair_needs_every_members_batches_alike():
    pop = make_pop(biased_net)

    def ragged(member, generator):
        yield torch.randn(4 + min(member or 0, 1), 3, 8, 8, generator=generator)  # two shapes

    with pytest.raises(ValueError, match="same count and shapes"):
        member_moments(pop, ragged, iters=1, stacked=True)

    def uneven(member, generator):  # member 0 runs out after 1 batch, the others after 2
        yield from (torch.randn(4, 3, 8, 8, generator=generator) for _ in range(1 + min(member or 0, 1)))

    for stacked in (False, True):
        with pytest.raises(ValueError, match="same count"):
            member_moments(pop, uneven, iters=3, stacked=stacked)
