"""Stochastic weight averaging for a population (Izmailov et al., 2018; paper A.11): each member keeps the running
mean of its end-of-epoch iterates during the SWA phase, one stacked tensor per parameter (torch.optim.swa_utils'
multi-tensor update over the member axis); at the end the members become their averages and their BatchNorm
statistics are recomputed (papa.repair.reset_batchnorm_). The learning rate follows SWALR (papa.build.lr_factor)."""

import torch
from torch import Tensor
from torch.optim.swa_utils import get_swa_multi_avg_fn

from papa.population import Population


class SWA:
    """Every member's running average of its parameters (buffers are recomputed, as AveragedModel's
    ``use_buffers=False`` and ``update_bn`` do); ``average``, a Population, is mixed as the members are."""

    def __init__(self, pop: Population):
        self.average = Population(pop.template, {n: t.detach().clone() for n, t in pop.params.items()}, {})
        self.count = 0  # iterates averaged so far
        self._update = get_swa_multi_avg_fn()

    @torch.no_grad()
    def update(self, pop: Population) -> None:
        """Add the members' current parameters to their running means (the first update copies them)."""
        names = [n for n, t in pop.params.items() if t.is_floating_point()]
        self._update([self.average.params[n] for n in names], [pop.params[n].detach() for n in names], self.count)
        self.count += 1

    @torch.no_grad()
    def swap_into(self, pop: Population) -> None:
        """Replace the members' parameters by their averages (buffers untouched: recompute BN after)."""
        for name, t in pop.params.items():
            t.copy_(self.average.params[name])

    def state(self) -> tuple[dict[str, Tensor], int]:
        return {f"swa.{n}": t for n, t in self.average.params.items()}, self.count

    def load_state(self, tensors: dict[str, Tensor], count: int) -> None:
        self.average.load_state_dict({k.removeprefix("swa."): t for k, t in tensors.items()})
        self.count = count
