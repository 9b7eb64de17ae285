"""A population: p members of one architecture, every parameter and buffer stacked on a member axis."""

import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Self

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from papa.rng import derive_seed, seeded


def for_averaging(t: Tensor) -> Tensor:
    """The values an average is computed from: a floating tensor as it is, an integer buffer (BatchNorm's
    num_batches_tracked) in float64, to be averaged like the weights and then ``rounded``."""
    return t if t.is_floating_point() else t.double()


def rounded(value: Tensor, dtype: torch.dtype) -> Tensor:
    """An average of ``for_averaging`` values as a tensor of ``dtype``: rounded for an integer dtype."""
    return value if dtype.is_floating_point else value.round().to(dtype)


class Population:
    """p members of one architecture: ``params[name]`` and ``buffers[name]`` have shape ``(p, *shape)``, so
    averaging is a reduction over axis 0 and one optimizer trains every member at once. ``template`` gives
    structure to functional calls; its own tensors are never read."""

    def __init__(self, template: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor]):
        sizes = {t.shape[0] for t in [*params.values(), *buffers.values()]}
        if len(sizes) != 1:
            raise ValueError(f"stacked tensors disagree on the population size: {sorted(sizes)}")
        self.template, self.params, self.buffers = template, params, buffers

    @classmethod
    def from_modules(cls, modules: Iterable[nn.Module]) -> Self:
        """Stack the parameters and buffers of modules sharing one architecture (copies them)."""
        modules = list(modules)
        if not modules:
            raise ValueError("a population needs at least one member")
        first = modules[0]
        pnames, bnames = [n for n, _ in first.named_parameters()], [n for n, _ in first.named_buffers()]
        for k, m in enumerate(modules[1:], start=1):
            if [n for n, _ in m.named_parameters()] != pnames or [n for n, _ in m.named_buffers()] != bnames:
                raise ValueError(f"member {k} does not have the architecture of member 0")
        params = {n: torch.stack([m.get_parameter(n).detach() for m in modules]) for n in pnames}
        buffers = {n: torch.stack([m.get_buffer(n).detach() for m in modules]) for n in bnames}
        return cls(copy.deepcopy(first), params, buffers)

    @classmethod
    def from_factory(cls, factory: Callable[[], nn.Module], size: int, seed: int = 0, same_init: bool = False,
                     members: Iterable[int] | None = None) -> Self:
        """``size`` members of ``factory()``, member j from its own seed (from ``seed`` and j; all from member 0's if
        ``same_init``); ``members``: only these (a rank's share), so that a split population starts as the whole one."""
        if size < 1:
            raise ValueError(f"population size must be at least 1, got {size}")
        modules = []
        for j in range(size) if members is None else members:
            with seeded(derive_seed("init", seed, 0 if same_init else j)):
                modules.append(factory())
        return cls.from_modules(modules)

    @property
    def size(self) -> int:
        return next(self.tensors())[1].shape[0]

    @property
    def device(self) -> torch.device:
        return next(self.tensors())[1].device

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        yield from self.params.items()
        yield from self.buffers.items()

    def member_tensors(self, j: int) -> dict[str, Tensor]:
        """Member j's parameters and buffers as views into the stacked storage (writes go through)."""
        return {n: t[j] for n, t in self.tensors()}

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.tensors())

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy stacked tensors in place; names, shapes and dtypes must match exactly."""
        own = self.state_dict()
        missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
        if missing or unexpected:
            raise ValueError(f"population state does not match the architecture: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
        for name, t in own.items():
            if state[name].shape != t.shape:
                raise ValueError(f"{name}: expected shape {tuple(t.shape)}, found {tuple(state[name].shape)}")
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(state[name])

    def module_from_state(self, state: dict[str, Tensor]) -> nn.Module:
        """A standalone module of the population's architecture holding copies of ``state``."""
        module = copy.deepcopy(self.template)
        for name, t in state.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            value = t.detach().clone()
            if name in self.buffers:
                owner._buffers[leaf] = value
            else:  # anything that is not a known buffer is a parameter: REPAIR may add biases to soups
                owner._parameters[leaf] = nn.Parameter(value, requires_grad=value.is_floating_point())
        return module

    def member(self, j: int) -> nn.Module:
        if not -self.size <= j < self.size:
            raise IndexError(f"member {j} out of range for a population of {self.size}")
        return self.module_from_state(self.member_tensors(j))

    def to_modules(self) -> list[nn.Module]:
        return [self.member(j) for j in range(self.size)]

    def combine(self, weights: Tensor) -> dict[str, Tensor]:
        """The weighted sum of members, sum_j weights[j] * theta_j, for every tensor (integer buffers rounded)."""
        w = torch.as_tensor(weights, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            return {name: rounded(torch.tensordot(w.to(for_averaging(t).dtype), for_averaging(t), dims=1), t.dtype)
                    for name, t in self.tensors()}

    def train(self, mode: bool = True) -> Self:
        self.template.train(mode)
        return self

    def eval(self) -> Self:
        return self.train(False)

    def to(self, device: str | torch.device) -> Self:
        self.template.to(device)
        self.params = {n: t.to(device) for n, t in self.params.items()}
        self.buffers = {n: t.to(device) for n, t in self.buffers.items()}
        return self

    def forward(self, j: int, *args, **kwargs):
        """Member j's forward pass, reading (and, for BatchNorm in train mode, updating) its slice."""
        return functional_call(self.template, self.member_tensors(j), args, kwargs)

    def forward_all(self, x: Tensor) -> Tensor:
        """Every member on its own input at once: ``x[j]`` goes through member j (one vmapped call, so each layer
        runs as one batched kernel). Dropout draws different masks per member."""
        members = vmap(lambda p, b, xj: functional_call(self.template, {**p, **b}, (xj,)), randomness="different")
        return members(self.params, self.buffers, x)

    def parameters(self) -> list[Tensor]:
        """The stacked parameters: one optimizer over them is p independent ones (SGD and AdamW are elementwise)."""
        return list(self.params.values())

    def requires_grad_(self, requires_grad: bool = True) -> Self:
        for t in self.params.values():
            t.requires_grad_(requires_grad and t.is_floating_point())
        return self

    def __repr__(self) -> str:
        n = sum(t[0].numel() for t in self.params.values())
        return f"Population(size={self.size}, {type(self.template).__name__}, {n} parameters per member)"
