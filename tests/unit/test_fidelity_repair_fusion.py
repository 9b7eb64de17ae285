"""fidelity option ``repair_fusion``: REPAIR as the authors' recombine/repair.py computes and fuses it (47ad83a:
TrackLayers on the members in train mode, one train-mode pass of the soup through ResetLayers, fuse_conv_bn with
eps 1e-5 that drops a bias-free convolution's shift, no BatchNorm reset afterwards), against papa's exact REPAIR.

The reference below does it by hand with torch's own BatchNorm2d modules, as the scripts did."""

import copy

import pytest
import torch
from torch import nn

from papa.export import _module, architecture
from papa.fold import fold_biases
from papa.models import create_model
from papa.population import Population
from papa.repair import BN_EPS, member_moments, repair, repair_population_
from papa.soups import average_soup


class ActBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass, as timm's BatchNormAct2d: not ``type(m) == nn.BatchNorm2d`` for the scripts."""


def two_layer(groups: int = 1, dilation: int = 1, bn=nn.BatchNorm2d) -> nn.Module:
    """conv without bias -> BatchNorm -> relu -> conv with bias -> relu -> pool -> linear (the output)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), bn(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=dilation, dilation=dilation, groups=groups), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def population(factory=two_layer, p: int = 2) -> Population:
    pop = Population.from_factory(factory, p, seed=5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in pop.params.items():  # members far enough apart that their soup's moments collapse
            t.add_(torch.randn(t.shape, generator=g) * 0.3)
            if name.endswith("bias"):
                t.add_(torch.randn(t.shape, generator=g))
    return pop


def batches(n: int = 3, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(size, 3, 6, 6, generator=g) + 2.0 for _ in range(n)]


def _convs(net: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]


def _reset_own_bns(net: nn.Module) -> None:
    for m in net.modules():
        if type(m) is nn.BatchNorm2d:
            m.momentum = None
            m.reset_running_stats()


@torch.no_grad()
def tracked_stats(member: nn.Module, xs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The authors' TrackLayer: a BatchNorm2d (momentum None, freshly reset) watching every conv in train mode."""
    net = copy.deepcopy(member)
    _reset_own_bns(net)
    bns = {name: nn.BatchNorm2d(conv.out_channels, momentum=None) for name, conv in _convs(net)}
    hooks = [conv.register_forward_hook(lambda _m, _i, y, bn=bns[name]: (bn(y), None)[1]) for name, conv in _convs(net)]
    net.train()
    for x in xs:
        net(x)
    for h in hooks:
        h.remove()
    return {name: (bn.running_mean.clone(), bn.running_var.sqrt()) for name, bn in bns.items()}


@torch.no_grad()
def authors_by_hand(soup: nn.Module, members: list[nn.Module], weights: list[float], xs) -> nn.Module:
    """correct_neuron_stats_multiple then fuse_tracked_net, written out with torch's BatchNorm2d."""
    stats = [tracked_stats(m, xs) for m in members]
    net = copy.deepcopy(soup)
    _reset_own_bns(net)
    bns = {}
    for name, conv in _convs(net):
        bn = nn.BatchNorm2d(conv.out_channels, momentum=None)
        bn.bias.copy_(sum(w * s[name][0] for w, s in zip(weights, stats, strict=True)))
        bn.weight.copy_(sum(w * s[name][1] for w, s in zip(weights, stats, strict=True)))
        bns[name] = bn
    hooks = [conv.register_forward_hook(lambda _m, _i, y, bn=bns[name]: bn(y)) for name, conv in _convs(net)]
    net.train()
    for x in xs:
        net(x)
    for h in hooks:
        h.remove()
    for name, conv in _convs(net):  # fuse_conv_bn
        bn = bns[name]
        gamma = bn.weight / (bn.eps + bn.running_var).sqrt()
        conv.weight.mul_(gamma.view(-1, 1, 1, 1))
        if conv.bias is not None:
            conv.bias.copy_(bn.bias + gamma * (conv.bias - bn.running_mean))
    return net.eval()


def _logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(x)


def test_the_authors_fusion_is_the_scripts_computation_by_hand_and_not_the_exact_repair():
    pop, xs = population(), batches()
    soup = average_soup(pop)
    authors = repair(soup, pop, xs, iters=3, layers="conv", fusion="authors")
    expected = authors_by_hand(soup, pop.to_modules(), [0.5, 0.5], xs)
    assert set(authors.state_dict()) == set(soup.state_dict())  # no bias added to the bias-free conv
    for k, v in expected.state_dict().items():
        torch.testing.assert_close(authors.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)

    exact = repair(soup, pop, xs, iters=3, layers="conv")
    assert "0.bias" in exact.state_dict()  # the exact REPAIR keeps the shift (bias added, folded away on export)
    z = torch.randn(32, 3, 6, 6, generator=torch.Generator().manual_seed(9)) + 2.0
    gap = (_logits(authors[:2], z) - _logits(exact[:2], z)).abs().max()  # BatchNorm 1's output, of scale ~4
    assert gap > 0.2, gap
    assert not torch.allclose(_logits(authors, z), _logits(exact, z), atol=1e-2)


def test_the_fusion_divides_by_the_scripts_batchnorm_eps_where_outputs_vary_less_than_it():
    """Inputs scaled by 1e-3: conv 0's outputs vary less than the eps (variance ~2e-6), which then sets its fused
    weight (under half of what the exact REPAIR gives it). The scripts' temporary BatchNorm2d had torch's default
    eps, and so must the fusion; at the scale above, the eps moves the weights by less than the tolerance."""
    pop, xs = population(), [x * 1e-3 for x in batches()]
    soup = average_soup(pop)
    authors = repair(soup, pop, xs, iters=3, layers="conv", fusion="authors")
    expected = authors_by_hand(soup, pop.to_modules(), [0.5, 0.5], xs)
    for k, v in expected.state_dict().items():
        torch.testing.assert_close(authors.state_dict()[k], v, rtol=1e-4, atol=1e-7, msg=k)
    exact = repair(soup, pop, xs, iters=3, layers="conv")
    ratio = (authors[0].weight / exact[0].weight).flatten()
    assert (ratio < 0.5).all(), ratio  # the eps, not the outputs' spread, decides conv 0's scale


def test_the_bias_free_convs_shift_is_dropped_and_its_batchnorm_keeps_the_targets_statistics():
    """What makes the two differ: conv 0's fused output is only rescaled, so its eval-mode mean is not the target
    mean, while BatchNorm 1 (not reset after the fusion) subtracts the target mean it saw in the ResetLayer pass."""
    pop, xs = population(), batches()
    soup = average_soup(pop)
    targets = [tracked_stats(m, xs)["0"] for m in pop.to_modules()]
    goal_mean, goal_std = ((targets[0][k] + targets[1][k]) / 2 for k in range(2))
    authors = repair(soup, pop, xs, iters=3, layers="conv", fusion="authors")
    # the ResetLayer's output had batch mean goal_mean and biased variance goal_std^2 v / (v + eps), every batch
    torch.testing.assert_close(authors[1].running_mean, goal_mean, rtol=1e-4, atol=1e-5)
    # conv 0 alone: its weight times goal_std / sqrt(running var + eps), nothing else
    with torch.no_grad():
        ys = torch.cat([soup[0](x) for x in xs])
        per_batch_var = torch.stack([soup[0](x).var((0, 2, 3)) for x in xs]).mean(0)
    gamma = goal_std / torch.sqrt(per_batch_var + BN_EPS)
    torch.testing.assert_close(authors[0].weight, soup[0].weight * gamma.view(-1, 1, 1, 1), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        fused_mean = torch.cat([authors[0](x) for x in xs]).mean((0, 2, 3))
    torch.testing.assert_close(fused_mean, gamma * ys.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert (fused_mean - goal_mean).abs().max() > 0.05  # the dropped shift


def test_the_authors_member_moments_are_trainmode_batch_averages():
    pop, xs = population(), batches()
    moments = member_moments(pop, xs, iters=3, fusion="authors")
    for j, member in enumerate(pop.to_modules()):
        by_hand = tracked_stats(member, xs)
        for name in ("0", "3"):
            torch.testing.assert_close(moments[j][name][0].float(), by_hand[name][0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(moments[j][name][1].float(), by_hand[name][1], rtol=1e-4, atol=1e-5)
    exact = member_moments(pop, xs, iters=3)
    assert not torch.allclose(exact[0]["3"][1], moments[0]["3"][1], rtol=1e-3)  # eval mode, all values at once


def test_in_place_repair_of_a_population_matches_the_soup_repair_and_adds_no_bias():
    """repair_population_ (averaging-time REPAIR) with the authors' fusion: each member as ``repair`` of that
    member toward its row's moments; loop and vmapped passes agree; members keep their architecture."""
    pop, xs = population(p=3), batches()
    moments = member_moments(pop, xs, iters=3, fusion="authors")
    matrix = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    mixed = Population.from_modules([pop.module_from_state(pop.combine(row)) for row in matrix])
    keys = set(mixed.params)
    looped, stacked = copy.deepcopy(mixed), copy.deepcopy(mixed)
    repair_population_(looped, matrix, xs, moments, iters=3, members=[0, 0, 0], layers="conv", fusion="authors")
    repair_population_(stacked, matrix, xs, moments, iters=3, members=[0, 0, 0], stacked=True, layers="conv",
                       fusion="authors")
    assert set(looped.params) == keys
    for i, row in enumerate(matrix):
        one = repair(mixed.member(i), pop, xs, iters=3, weights=row, moments=moments, layers="conv", fusion="authors")
        for k, v in one.state_dict().items():
            torch.testing.assert_close(looped.member(i).state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)
            torch.testing.assert_close(stacked.member(i).state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_grouped_and_dilated_convolutions_keep_their_groups_and_dilation():
    """The scripts rebuild each fused conv as a plain nn.Conv2d (no groups, no dilation): a depthwise conv would
    then fail, a dilated one compute something else. papa rescales in place, so the layer keeps both."""
    pop, xs = population(lambda: two_layer(groups=4, dilation=2)), batches()
    soup = average_soup(pop)
    authors = repair(soup, pop, xs, iters=3, layers="conv", fusion="authors")
    assert (authors[3].groups, authors[3].dilation) == (4, (2, 2))
    expected = authors_by_hand(soup, pop.to_modules(), [0.5, 0.5], xs)
    torch.testing.assert_close(_logits(authors, xs[0]), _logits(expected, xs[0]), rtol=1e-4, atol=1e-5)


def test_a_batchnorm_subclass_is_not_reset_but_updates_with_its_momentum():
    """reset_bn_stats resets ``type(m) == nn.BatchNorm2d`` only: a subclass keeps the soup's averaged statistics
    and moves them with momentum 0.1 over the pass (and a member's in the TrackLayer pass, which train mode
    ignores)."""
    pop, xs = population(lambda: two_layer(bn=ActBatchNorm)), batches()
    with torch.no_grad():
        pop.buffers["1.running_mean"].uniform_(-1, 1, generator=torch.Generator().manual_seed(4))
    soup = average_soup(pop)
    authors = repair(soup, pop, xs, iters=3, layers="conv", fusion="authors")
    expected = authors_by_hand(soup, pop.to_modules(), [0.5, 0.5], xs)
    for k, v in expected.state_dict().items():
        torch.testing.assert_close(authors.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert int(authors[1].num_batches_tracked) == int(soup[1].num_batches_tracked) + 3


def test_an_authors_fusion_soup_exports_as_the_stock_architecture_exactly():
    """papa export folds REPAIR's added biases; the authors' fusion adds none, so the soup's tensors are the stock
    architecture's as they are: nothing to fold, nothing kept, the exported network's outputs the soup's."""
    spec = {"model": "digits_cnn", "kwargs": {"width": 4}, "classes": [0, 1, 2],
            "input": {"kind": "classification", "channels": 1, "size": [8, 8]}}
    pop = Population.from_factory(lambda: create_model("digits_cnn", 3, 1, width=4), 2, seed=0)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 1, 8, 8, generator=g) for _ in range(2)]
    soup = repair(average_soup(pop), pop, xs, iters=2, layers="conv", fusion="authors").eval()
    module, added = _module(architecture(spec), soup.state_dict(), "soup")
    assert added == []
    folded, fold = fold_biases(module, added, xs[0])
    assert fold.folded == {} and fold.kept == [] and not fold.note
    architecture(spec).load_state_dict(folded.state_dict(), strict=True)
    z = torch.randn(8, 1, 8, 8, generator=g)
    assert torch.equal(_logits(folded, z), _logits(soup, z))


def test_an_unknown_fusion_is_refused():
    pop, xs = population(), batches()
    with pytest.raises(ValueError, match="fusion must be one of exact, authors"):
        repair(average_soup(pop), pop, xs, iters=3, fusion="scripts")
