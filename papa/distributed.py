"""Where a population's members live: all in this process (``Local``), or spread over the ranks of a
torch.distributed job (``Distributed``, for `torchrun`). The trainer talks to members only through these
few collective operations, so its algorithm reads the same in both cases."""

from __future__ import annotations

import torch
from torch import Tensor

from papa import averaging
from papa.build import resolve_device
from papa.population import Population


def block(p: int, world_size: int, rank: int) -> list[int]:
    """The members rank ``rank`` holds: contiguous blocks whose sizes differ by at most one (any p)."""
    base, extra = divmod(p, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))


class Local:
    """The whole population in one process."""

    rank, world_size = 0, 1

    def __init__(self, p: int, device: torch.device | str = "cpu"):
        self.p = p
        self.members = list(range(p))
        self.device = torch.device(device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def push_(self, pop: Population, alpha: float) -> None:
        averaging.push_toward_average_(pop, alpha)

    def average_all_(self, pop: Population) -> None:
        averaging.average_all_(pop)

    def mix_(self, pop: Population, matrix: Tensor) -> None:
        """Apply the rows of the p x p ``matrix`` that belong to the members held here."""
        averaging.mix_(pop, matrix)

    def all_moments(self, local: list) -> list:
        """Every member's REPAIR moments, given those of the members held here."""
        return local

    def gather_scores(self, local: list[tuple[float, float]]) -> list[tuple[float, float]]:
        """Every member's (accuracy, loss), given those of the members held here (all ranks get all)."""
        return local

    def gather_state(self, pop: Population) -> dict[str, Tensor] | None:
        """The whole stacked population on the main rank (None elsewhere)."""
        return pop.state_dict()

    def anyone(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (a stop requested by a signal, for one)."""
        return flag

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


def from_env(p: int, device: str = "auto"):
    """``Distributed`` when launched by torchrun (WORLD_SIZE > 1), else ``Local``. ``device`` is the
    config's train.device: CUDA means NCCL and one GPU per process, the CPU means gloo."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from papa.distributed_ops import Distributed

        return Distributed.from_env(p, device)
    return Local(p, resolve_device(device))


__all__ = ["Local", "block", "from_env", "torch"]
