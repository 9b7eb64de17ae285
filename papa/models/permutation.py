"""How a model declares its permutation structure for alignment (papa.alignment), as timm models declare
``group_matcher``: its ``permutation_groups()`` method returns them, in forward order, built with ``GroupBuilder``."""

from dataclasses import dataclass

from torch import Tensor

from papa.errors import PapaError

UNSUPPORTED = "permutation alignment supports vgg11_bn, vgg16_bn, resnet18_cifar and resnet20"


@dataclass(frozen=True)
class Tap:
    """Where a group's features are read: the output of module ``module``, through a ReLU if ``relu``."""

    module: str
    relu: bool = False


@dataclass(frozen=True)
class PermGroup:
    """Channels permuted together: ``axes`` lists every (state_dict name, axis) indexed by them, ``taps``
    the activations whose units they are (their correlation matrices are summed before matching)."""

    name: str
    size: int
    taps: tuple[Tap, ...]
    axes: tuple[tuple[str, int], ...]


class GroupBuilder:
    """Accumulates one group's taps and axes over a model's ``state`` (its state_dict)."""

    def __init__(self, name: str, size: int, state: dict[str, Tensor]):
        self.name, self.size, self.state = name, size, state
        self.taps: list[Tap] = []
        self.axes: list[tuple[str, int]] = []

    def _add(self, name: str, axis: int) -> None:
        if name in self.state:  # else an absent bias, an affine-free or stat-free BatchNorm
            if (channels := self.state[name].shape[axis]) != self.size:
                raise PapaError(f"{name}: axis {axis} has {channels} channels, expected {self.size}")
            self.axes.append((name, axis))

    def produced_by(self, conv: str, bn: str) -> None:
        """``conv``'s output channels, through BatchNorm ``bn``."""
        for name in (f"{conv}.weight", f"{conv}.bias", f"{bn}.weight", f"{bn}.bias", f"{bn}.running_mean",
                     f"{bn}.running_var"):
            self._add(name, 0)

    def consumed_by(self, layer: str) -> None:
        """The input channels of conv or linear ``layer``."""
        self._add(f"{layer}.weight", 1)

    def build(self) -> PermGroup:
        return PermGroup(self.name, self.size, tuple(self.taps), tuple(self.axes))
