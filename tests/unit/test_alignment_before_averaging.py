"""Alignment before averaging in training (averaging.<variant>.align): every member is permuted to match member 0,
with what follows it (its optimizer state, its SWA average). With the genetic ablations under the authors' elitism
(averaging.genetic.elitism, fidelity option elitism) this happens before the children are made, scored and selected,
so that the children are averages of aligned parents."""

import pytest
import torch

from papa import rng
from papa.alignment import align_members_, permute, random_permutations
from papa.averagers import Context, averager_for
from papa.checkpoint import Progress
from papa.distributed import Local
from papa.errors import PapaError
from papa.models.resnet_cifar import CifarResNet
from papa.population import Population
from papa.swa import SWA
from tests.helpers import tiny_experiment

P = 4


def permuted_copies() -> tuple[torch.nn.Module, Population]:
    """A small CIFAR ResNet and a population of it (member 0) and randomly permuted copies (the same function)."""
    with rng.seeded(0):
        network = CifarResNet([1], [8], 3, init="kaiming").eval()
    g = torch.Generator().manual_seed(1)
    return network, Population.from_modules([network, *(permute(network, random_permutations(network, g))
                                                         for _ in range(P - 1))])


def generation(pop: Population, align: bool, mutation_std: float) -> Population:
    """One elitist generation of ``pop`` (papa-2, pair-half, no REPAIR) under the authors' elitism, the children
    outranking the parents (fixed validation losses), with an SGD momentum buffer on every parameter that alignment
    permutes with it. Returns the momentum as a population of the same layout."""
    exp = tiny_experiment(population={"size": P}, fidelity={"elitism": "authors"},
                          averaging={"papa-2": {"scheme": "pair-half", "repair": False, "align": align},
                                     "genetic": {"elitism": True, "mutation_std": mutation_std}})
    averager = averager_for("papa-2", exp)
    assert averager.elitism and averager.scripts_elitism and averager.align == align
    optimizer = torch.optim.SGD(pop.requires_grad_().parameters(), lr=0.1, momentum=0.9)
    for p in pop.parameters():  # the momentum of member j: its own parameters (permuted as they are)
        optimizer.state[p]["momentum_buffer"] = p.detach().clone()
    calls = []

    def val_scores(members: Population):
        calls.append(members.size)
        return [(0.0, (0.1 * (i + 1) if len(calls) == 1 else 0.01 * i)) for i in range(members.size)]

    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ctx = Context(pop=pop, comm=Local(P), optimizer=optimizer, stream=None, swa=None, progress=Progress(epoch=1),
                  seed=3, stacked=False, val_scores=val_scores, val_accuracy=None, align_batches=lambda n: [x])
    averager.check(ctx)
    with torch.no_grad():
        averager.average(ctx)
    assert calls == [P, 6]  # the parents, then the six children (every pair of four)
    return Population(pop.template, {n: optimizer.state[p]["momentum_buffer"] for n, p in pop.params.items()}, {})


def test_aligned_children_of_permuted_copies_are_the_network():
    """Parents that are permuted copies of one network: aligned first, every child (a pair average) is that network,
    so every survivor is; unaligned, the children average unrelated units."""
    network, pop = permuted_copies()
    generation(pop, align=True, mutation_std=0.0)
    for j in range(P):
        for name, t in network.state_dict().items():
            torch.testing.assert_close(pop.member_tensors(j)[name], t, rtol=1e-5, atol=1e-6, msg=f"{j} {name}")
    network, plain = permuted_copies()
    generation(plain, align=False, mutation_std=0.0)
    assert not torch.allclose(plain.params["fc.weight"][0], network.fc.weight)


def test_alignment_precedes_selection_and_permutes_the_momentum():
    """The generation with alignment (and mutations) is exactly member-0 alignment done by hand followed by the same
    generation without alignment; the momentum buffers (set to the parameters) are permuted as the hand alignment
    permutes the parameters."""
    _, pop = permuted_copies()
    momentum = generation(pop, align=True, mutation_std=0.5)

    _, by_hand = permuted_copies()
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    hand_momentum = {n: t.clone() for n, t in by_hand.params.items()}
    perms = align_members_(by_hand, [x], reference=0, companions=[hand_momentum])
    assert sorted(perms) == [1, 2, 3]
    generation(by_hand, align=False, mutation_std=0.5)
    for name, t in pop.state_dict().items():
        torch.testing.assert_close(t, by_hand.state_dict()[name], rtol=0, atol=0, msg=name)
    for name, t in momentum.params.items():
        torch.testing.assert_close(t, hand_momentum[name], rtol=0, atol=0, msg=name)


def test_swa_averages_are_permuted_with_their_members():
    """PAPA-all with alignment during SWA (averages mixed with the members, train.swa.mix_averages): each member's
    SWA average (here its one iterate so far) is permuted with it, so that the averages of permuted copies are
    averaged aligned too and stay the members' running means: both are the network after the averaging."""
    network, pop = permuted_copies()
    exp = tiny_experiment(population={"size": P}, train={"epochs": 4, "swa": {"start": 0.5, "lr": 0.01}},
                          averaging={"papa-all": {"repair": False, "align": True}})
    averager = averager_for("papa-all", exp)
    assert averager.align and averager.mix_swa
    swa = SWA(pop)
    swa.update(pop)
    optimizer = torch.optim.SGD(pop.requires_grad_().parameters(), lr=0.1)
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ctx = Context(pop=pop, comm=Local(P), optimizer=optimizer, stream=None, swa=swa, progress=Progress(epoch=3),
                  seed=3, stacked=False, val_scores=None, val_accuracy=None, align_batches=lambda n: [x])
    with torch.no_grad():
        averager.average(ctx)
    for name, t in network.named_parameters():
        for j in range(P):
            torch.testing.assert_close(pop.params[name][j], t, rtol=1e-5, atol=1e-6, msg=f"member {j} {name}")
            torch.testing.assert_close(swa.average.params[name][j], t, rtol=1e-5, atol=1e-6, msg=f"SWA {j} {name}")


def _check(variant: str, scheme: str, target: str) -> None:
    """Replace.check of ``variant`` with ``scheme``, alignment as ``target`` says (fidelity alignment_target) and
    SWA on."""
    _, pop = permuted_copies()
    exp = tiny_experiment(population={"size": P}, train={"epochs": 4, "swa": {"start": 0.5, "lr": 0.01}},
                          fidelity={"alignment_target": target},
                          averaging={variant: {"scheme": scheme, "repair": False, "align": True}})
    averager = averager_for(variant, exp)
    assert averager.scripts_alignment == (target == "authors")
    ctx = Context(pop=pop, comm=Local(P), optimizer=None, stream=None, swa=SWA(pop), progress=Progress(),
                  seed=3, stacked=False, val_scores=None, val_accuracy=None, align_batches=None)
    averager.check(ctx)


@pytest.mark.parametrize(("variant", "scheme"), [("papa-2", "pair-half"), ("papa-all", "greedy")])
def test_the_scripts_alignment_of_members_alone_is_refused_with_swa(variant, scheme):
    """The scripts' alignment within pairs or to the greedy soup (fidelity alignment_target: authors) replaces
    members by aligned copies and cannot take their SWA averages along: refused before training, naming the key."""
    with pytest.raises(PapaError, match=rf"^averaging\.{variant}\.align with train\.swa: the scripts' alignment of "
                                        rf"the {scheme} scheme"):
        _check(variant, scheme, "authors")


@pytest.mark.parametrize(("variant", "scheme", "target"), [("papa-all", "all", "authors"),
                                                           ("papa-all", "many-half", "authors"),
                                                           ("papa-2", "pair-half", "paper"),
                                                           ("papa-all", "greedy", "paper")])
def test_alignment_that_takes_the_swa_averages_along_is_accepted(variant, scheme, target):
    """PAPA-all's alignment to the running soup, the scripts' alignment of the many-member schemes to member 0, and
    every alignment to member 0 (the paper's) permute the SWA averages with the members: SWA runs beside them."""
    _check(variant, scheme, target)
