"""Bad arguments to the library's public functions, which researchers call directly (papa.population, papa.averaging,
papa.alignment, papa.genetic, papa.repair): each is refused with its exception and a message naming the bad value,
before anything is changed in place. Also a population of one, which alignment leaves as it is."""

import re

import pytest
import torch
from torch.nn.utils.parametrizations import weight_norm

from papa.alignment import align_members_, align_pairs, permute, running_soup_permutations
from papa.averaging import average_all_, draw_pairs, mix_, mixing_matrix
from papa.engines import Engine
from papa.errors import PapaError
from papa.genetic import select
from papa.models.resnet_cifar import CifarResNet
from papa.population import Population
from papa.repair import member_moments, repair, repair_population_
from tests.conftest import small_cnn

CNN_IMAGES = [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))]
RGB_IMAGES = [torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))]
NO_SELECTION = {"tournament": False, "elitism": False}


def cnns(p: int = 3) -> Population:
    """Three small CNNs with BatchNorm: a conv layer REPAIR rescales (``0``) and a classifier it leaves."""
    return Population.from_factory(small_cnn, p, seed=0)


def resnets(p: int = 3) -> Population:
    """Small CIFAR ResNets, a model alignment supports."""
    return Population.from_factory(lambda: CifarResNet([1], [4], 3), p, seed=0)


def weight_normed() -> Population:
    def factory():
        net = small_cnn()
        weight_norm(net[0])
        return net
    return Population.from_factory(factory, 2, seed=0)


def moments(pop: Population) -> list:
    return member_moments(pop, CNN_IMAGES, iters=1)


def refused(make, call, error, message):
    """``call(pop)`` on a new population ``make()`` raises ``error`` with ``message`` and leaves the population."""
    pop = make()
    before = {name: t.clone() for name, t in pop.state_dict().items()}
    with pytest.raises(error, match=re.escape(message)):
        call(pop)
    assert all(torch.equal(t, before[name]) for name, t in pop.state_dict().items())


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda pop: Population(pop.template, {"w": torch.zeros(2, 3)}, {"b": torch.zeros(3, 1)}), ValueError,
     "stacked tensors disagree on the population size: [2, 3]"),
    (lambda pop: Population.from_modules([]), ValueError, "a population needs at least one member"),
    (lambda pop: pop.load_state_dict({**{k: v for k, v in pop.state_dict().items() if k != "0.bias"},
                                      "0.scale": torch.ones(3)}), ValueError,
     "population state does not match the architecture: missing ['0.bias'], unexpected ['0.scale']"),
], ids=["sizes", "no-members", "state-names"])
def test_population_arguments(call, error, message):
    refused(cnns, call, error, message)


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda pop: mix_(pop, torch.eye(2)), ValueError, "mixing matrix must be 3x3, got (2, 2)"),
    (lambda pop: average_all_(pop, weights=[0.5, 0.5]), ValueError, "expected 3 weights, got 2"),
    (lambda pop: draw_pairs(1, torch.Generator()), ValueError, "pair averaging needs at least 2 members"),
    (lambda pop: draw_pairs(3, torch.Generator(), pairs="last"), ValueError,
     "unknown pairing 'last'; expected one of random, first"),
    (lambda pop: mixing_matrix("half", 3), ValueError,
     "unknown averaging scheme 'half'; expected one of all, pair-half, pair-75, many-half, many-75, dirichlet"),
], ids=["matrix-shape", "weights-count", "one-member-pairs", "pairing", "scheme"])
def test_averaging_arguments(call, error, message):
    refused(cnns, call, error, message)


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda pop: permute(pop.member(0), {"stem": torch.arange(4)}), ValueError,
     "permutations for ['stem']... do not match the groups"),
    (lambda pop: running_soup_permutations(pop, RGB_IMAGES, order=[0, 0, 1]), ValueError,
     "order must be a permutation of the 3 members, got [0, 0, 1]"),
    (lambda pop: align_members_(pop, RGB_IMAGES, target="soup"), ValueError,
     "unknown alignment target 'soup'; expected one of member, running-soup"),
    (lambda pop: align_pairs(pop, [(0, 1), (2, 2)], RGB_IMAGES), ValueError,
     "a pair needs two distinct members, got (2, 2)"),
], ids=["permutation-groups", "running-soup-order", "target", "pair"])
def test_alignment_arguments(call, error, message):
    refused(resnets, call, error, message)


@pytest.mark.parametrize("target", ["member", "running-soup"])
def test_aligning_a_population_of_one_changes_nothing(target):
    """A lone member is its own reference: no permutation, the member and its companions (momentum) as they were,
    and no pass over the data."""
    pop = resnets(1)
    before = {name: t.clone() for name, t in pop.state_dict().items()}
    momentum = {name: torch.randn_like(t) for name, t in pop.params.items()}
    kept = {name: t.clone() for name, t in momentum.items()}
    read = []

    def batches(member, generator):
        read.append(member)
        return RGB_IMAGES

    assert align_members_(pop, batches, reference=-1, companions=[momentum], target=target) == {}
    assert read == []
    assert all(torch.equal(t, before[name]) for name, t in pop.state_dict().items())
    assert all(torch.equal(t, kept[name]) for name, t in momentum.items())


@pytest.mark.parametrize("scheme", ["all", "dirichlet"])
def test_genetic_arguments(scheme):
    refused(cnns, lambda pop: select(3, [1.0] * 3, scheme, NO_SELECTION, torch.Generator(), lambda rows: [1.0] * 3),
            PapaError, f"genetic selection needs a pair scheme (pair-half, pair-75), not {scheme!r}")


@pytest.mark.parametrize(("make", "call", "message"), [
    (cnns, lambda pop: member_moments(pop, CNN_IMAGES, iters=0), "REPAIR needs at least one batch, got iters=0"),
    (cnns, lambda pop: repair(pop.member(0), pop, CNN_IMAGES, iters=1, weights=[0.5, 0.75, -0.25]),
     "REPAIR weights must be non-negative and sum to 1, got [0.5, 0.75, -0.25]"),
    (cnns, lambda pop: repair(pop.member(0), pop, CNN_IMAGES, iters=1, weights=[0.5, 0.5, 0.5]),
     "REPAIR weights must be non-negative and sum to 1, got [0.5, 0.5, 0.5]"),
    (weight_normed, lambda pop: repair(pop.member(0), pop, CNN_IMAGES, iters=1),
     "REPAIR cannot rescale 0: its weight is computed (parametrized)"),
    (cnns, lambda pop: repair_population_(pop, mixing_matrix("all", 3), CNN_IMAGES, [{}] * 3, iters=1),
     "no member moments for layers ['0']"),
    (cnns, lambda pop: repair(pop.member(0), pop, CNN_IMAGES, iters=1, moments=moments(pop)[:2]),
     "got moments for 2 members, expected 3"),
    (cnns, lambda pop: repair_population_(pop, mixing_matrix("all", 3), CNN_IMAGES, moments(pop)[:2] + [{}], iters=1),
     "members' moments cover different layers"),
    (cnns, lambda pop: repair_population_(pop, torch.eye(2), CNN_IMAGES, moments(pop), iters=1),
     "mixing matrix must be 3x3 (held members x all members), got (2, 2)"),
    (cnns, lambda pop: repair_population_(pop, mixing_matrix("all", 3), CNN_IMAGES, moments(pop), iters=1,
                                          members=[0, 1]),
     "got 2 member indices for a population of 3"),
], ids=["no-batches", "negative-weights", "weights-sum", "parametrized", "missing-layer", "moments-count",
        "moments-layers", "matrix-shape", "member-indices"])
def test_repair_arguments(make, call, message):
    refused(make, call, ValueError, message)


def test_reprs_name_what_they_hold():
    pop = cnns()
    # conv 1x4x3x3 + 4, BatchNorm 4 + 4, linear 16x3 + 3
    assert repr(pop) == "Population(size=3, Sequential, 99 parameters per member)"
    assert repr(Engine("stacked", compile=True)) == "Engine('stacked', compile=True, channels_last=False)"
