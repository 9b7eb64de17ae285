"""Where a population's members live: all in this process (``Local``), or spread over the ranks of a torch.distributed
job (``Distributed``, for `torchrun`), rank r holding the contiguous ``block(p, world_size, r)``. The averaging math
is papa.averaging's either way; these classes supply its communication and gather scores, REPAIR moments and the
final population, as tensors, never pickled: every member's mean is one all-reduce of per-dtype flat sums (float64
for integer buffers); the members a mixing matrix's rows read (PAPA-2, Table 14; the matrix is the same on every
rank) go point to point as one bit-exact byte buffer per peer; the rest is padded to the largest block and gathered."""

import os
from collections.abc import Callable
from typing import Self

import torch
import torch.distributed as dist
from torch import Tensor

from papa.averaging import member_means
from papa.build import resolve_device
from papa.errors import PapaError
from papa.population import Population, for_averaging

_ALIGN = 16  # bytes: every tensor's slot in a member buffer starts aligned, so views need no copy


def block(p: int, world_size: int, rank: int) -> list[int]:
    """The members rank ``rank`` holds: contiguous blocks whose sizes differ by at most one (any p)."""
    return torch.arange(p).tensor_split(world_size)[rank].tolist()


def _check_world(world: int, p: int) -> None:
    if world > p:
        raise PapaError(f"{world} processes for a population of {p} members: launch at most one process per member")


class Local:
    """The whole population in one process, on ``device``; the interface that ``Distributed`` shares."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, p: int, device: torch.device | str = "cpu"):
        self.p, self.members, self.device = p, list(range(p)), torch.device(device)

    def means(self, pop: Population) -> dict[str, Tensor]:
        """Every tensor's mean over all p members."""
        return member_means(pop)

    def sources(self, pop: Population, matrix: Tensor) -> tuple[Tensor, Callable[[str], Tensor]]:
        """The rows of the p x p ``matrix`` for the members held here, over the members they read, and those
        members' stacked tensors by name."""
        return matrix, pop.state_dict().__getitem__

    def all_moments(self, local: list) -> list:
        """Every member's REPAIR moments (layer -> (mean, std)), given those of the members held here."""
        return local

    def gather_scores(self, local: list[tuple[float, float]]) -> list[tuple[float, float]]:
        """Every member's (accuracy, loss) on every rank, given those of the members held here."""
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


def from_env(p: int, device: str = "auto") -> "Local | Distributed":
    """``Distributed`` when launched by torchrun (WORLD_SIZE > 1), else ``Local``; ``device``: train.device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return Distributed.from_env(p, device)
    return Local(p, resolve_device(device))


class _Layout:
    """Where each tensor of one member lies in a flat byte buffer."""

    def __init__(self, pop: Population):
        self.slots = []  # (name, dtype, member shape, offset, bytes)
        offset = 0
        for name, t in pop.tensors():
            nbytes = t[0].numel() * t.element_size()
            self.slots.append((name, t.dtype, t.shape[1:], offset, nbytes))
            offset += nbytes + -nbytes % _ALIGN
        self.nbytes = max(offset, _ALIGN)

    def pack(self, pop: Population, local: list[int], rows: int | None = None) -> Tensor:
        """Members ``local`` (positions in ``pop``) as a (rows, nbytes) uint8 buffer (zero padded)."""
        buf = torch.zeros(rows or len(local), self.nbytes, dtype=torch.uint8, device=pop.device)
        idx = torch.tensor(local, device=pop.device)
        for (*_, offset, nbytes), (_, t) in zip(self.slots, pop.tensors(), strict=True):
            flat = t.index_select(0, idx).reshape(len(local), -1)
            buf[: len(local), offset:offset + nbytes] = flat.view(torch.uint8)
        return buf

    def unpack(self, buf: Tensor) -> dict[str, Tensor]:
        """Views of a (k, nbytes) buffer as stacked (k, ...) tensors."""
        return {name: buf[:, offset:offset + nbytes].view(dtype).view(len(buf), *shape)
                for name, dtype, shape, offset, nbytes in self.slots}


class Distributed:
    """The members of rank ``dist.get_rank()`` in a job of ``dist.get_world_size()`` processes, on ``device``.
    Needs an initialized default process group (``from_env`` makes one)."""

    def __init__(self, p: int, device: torch.device):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        _check_world(self.world_size, p)
        self.p, self.is_main, self.device = p, self.rank == 0, torch.device(device)
        self.blocks = [block(p, self.world_size, r) for r in range(self.world_size)]
        self.members = self.blocks[self.rank]
        self.owner = [r for r, b in enumerate(self.blocks) for _ in b]
        self.most = max(len(b) for b in self.blocks)  # rows of every padded gather
        nccl = dist.get_backend() == "nccl"
        self.comm_device = self.device if nccl else torch.device("cpu")
        # scalar control messages are CPU tensors: through this gloo group under NCCL, else the default one
        self.control = dist.new_group(backend="gloo") if nccl else None

    @classmethod
    def from_env(cls, p: int, device: str = "auto") -> Self:
        """Join the job torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL with one
        GPU per process (cuda:LOCAL_RANK) when training runs on CUDA, gloo on the CPU otherwise."""
        world, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
        _check_world(world, p)  # refused before joining, identically on every rank
        want = resolve_device(device)
        if want.type == "cuda":
            if local >= torch.cuda.device_count():
                raise PapaError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible): launch "
                                "at most one process per GPU")
            dev, backend = torch.device("cuda", local), "nccl"
            torch.cuda.set_device(dev)
        elif want.type == "cpu":
            dev, backend = torch.device("cpu"), "gloo"
        else:
            raise PapaError(f"train.device {device!r}: torchrun runs on CUDA (NCCL) or the CPU (gloo) only")
        if not dist.is_initialized():
            dist.init_process_group(backend, device_id=dev if backend == "nccl" else None)
        return cls(p, dev)

    def means(self, pop: Population) -> dict[str, Tensor]:
        sums = {name: for_averaging(t).sum(0) for name, t in pop.tensors()}
        means = {}
        for dtype in dict.fromkeys(s.dtype for s in sums.values()):
            names = [name for name, s in sums.items() if s.dtype == dtype]
            flat = torch.cat([sums[name].flatten() for name in names]).to(self.comm_device)
            dist.all_reduce(flat)
            parts = flat.to(pop.device).div_(self.p).split([sums[name].numel() for name in names])
            means.update({name: m.view_as(sums[name]) for name, m in zip(names, parts, strict=True)})
        return means

    def _needs(self, matrix: Tensor, rank: int) -> list[int]:
        """The members (global ids, ascending) that rank ``rank``'s rows of ``matrix`` read."""
        return (matrix[self.blocks[rank]] != 0).any(0).nonzero().flatten().tolist()

    @torch.no_grad()
    def sources(self, pop: Population, matrix: Tensor) -> tuple[Tensor, Callable[[str], Tensor]]:
        layout, start, held = _Layout(pop), self.members[0], pop.state_dict()
        needs = self._needs(matrix, self.rank)
        ops, received = [], []
        for peer in range(self.world_size):
            if peer == self.rank:
                continue
            if give := [j - start for j in self._needs(matrix, peer) if self.owner[j] == self.rank]:
                ops.append(dist.P2POp(dist.isend, layout.pack(pop, give).to(self.comm_device), peer))
            if take := [j for j in needs if self.owner[j] == peer]:
                buf = torch.empty(len(take), layout.nbytes, dtype=torch.uint8, device=self.comm_device)
                ops.append(dist.P2POp(dist.irecv, buf, peer))
                received.append((take, buf))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        rows = {j: (held, j - start) for j in needs if self.owner[j] == self.rank}  # global id -> (tensors, row)
        for take, buf in received:
            views = layout.unpack(buf.to(pop.device))
            rows.update({j: (views, i) for i, j in enumerate(take)})
        return matrix[self.members][:, needs], lambda name: torch.stack([t[name][i] for t, i in map(rows.get, needs)])

    def _all_gather_rows(self, rows: Tensor, group=None) -> list[Tensor]:
        """Each rank's (held members, ...) tensor, padded to the largest block for the collective."""
        padded = torch.cat([rows, rows.new_zeros(self.most - len(rows), *rows.shape[1:])])
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded, group=group)
        return [o[: len(b)] for o, b in zip(out, self.blocks, strict=True)]

    def all_moments(self, local: list) -> list:
        names = list(local[0])
        shapes = [local[0][n][0].shape for n in names]  # of each layer's mean and std, sent in turn as float64
        flat = torch.stack([torch.cat([x.flatten().double() for n in names for x in moments[n]])
                            for moments in local])
        rows = torch.cat(self._all_gather_rows(flat.to(self.comm_device))).to(local[0][names[0]][0].device)
        sizes = [2 * s.numel() for s in shapes]
        return [{n: part.view(2, *s).unbind() for n, s, part in zip(names, shapes, row.split(sizes), strict=True)}
                for row in rows]

    def gather_scores(self, local: list[tuple[float, float]]) -> list[tuple[float, float]]:
        rows = torch.tensor(local, dtype=torch.float64).view(len(local), 2)  # float64: exact
        return [tuple(row) for row in torch.cat(self._all_gather_rows(rows, group=self.control)).tolist()]

    @torch.no_grad()
    def gather_state(self, pop: Population) -> dict[str, Tensor] | None:
        layout = _Layout(pop)
        buf = layout.pack(pop, list(range(pop.size)), rows=self.most).to(self.comm_device)
        out = [torch.empty_like(buf) for _ in range(self.world_size)] if self.is_main else None
        dist.gather(buf, out, dst=0)
        if not self.is_main:
            return None
        views = [layout.unpack(o[: len(b)]) for o, b in zip(out, self.blocks, strict=True)]
        return {name: torch.cat([v[name] for v in views]) for name, _ in pop.tensors()}

    def anyone(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], device="cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
