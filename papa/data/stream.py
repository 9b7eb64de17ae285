"""Training batches for a whole population: step s yields every member's batch stacked on a member axis. Member
j sees the training items in its own order (``rng.generator(seed, "order", j, epoch)``) and draws its augmentations
from its own stream (``"augment"``), so its data depend neither on the population size nor on the others' policies."""

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from papa import rng
from papa.data.augment import Policy, apply, draw_policies, draw_seed, eval_transform, geometric, regularize, to_device
from papa.data.datasets import ArrayDataset, FolderDataset, Splits, folder_eval_transform, folder_train_transform
from papa.data.vaihingen import TileDataset
from papa.errors import PapaError


def _check(n_data: int, indices, batch_size: int) -> Tensor:
    idx = torch.as_tensor(list(indices), dtype=torch.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= n_data):
        raise PapaError(f"training indices outside 0..{n_data - 1}")
    if batch_size < 1 or len(idx) < batch_size:
        raise PapaError(f"batch size {batch_size} does not fit {len(idx)} training items")
    return idx


def batch_policy(stream, j: int, generator: torch.Generator) -> Policy:
    """Member j's policy for the next batch: fixed, or with ``per_batch`` (a grid) a fresh draw from the
    member's own augmentation stream, so one network sees every regularization (the paper's Table 2)."""
    if stream.per_batch is None:
        return stream.policies[j]
    return draw_policies(stream.per_batch, 1, generator, stream.policies[j].base().as_dict())[0]


def set_members(stream, train, batch_size: int, policies: Sequence[Policy], seed: int, device, base: Policy | None,
                 per_batch: dict | None, member_ids: Sequence[int] | None, items: int, keep_last: bool) -> None:
    """The attributes every stream shares. ``ids``: each held member's index in the whole population, which names
    its random streams, so a rank holding members 3 and 4 draws exactly what one process holding all draws.
    ``items``: what an epoch draws from (training items, or patches)."""
    if not policies:
        raise PapaError("a stream needs at least one member policy")
    stream.per_batch = per_batch
    stream.ids = list(range(len(policies))) if member_ids is None else [int(j) for j in member_ids]
    if len(stream.ids) != len(policies):
        raise PapaError(f"{len(stream.ids)} member ids for {len(policies)} policies")
    stream.device = torch.device(device)
    stream.num_classes, stream.mean, stream.std = train.num_classes, train.mean, train.std
    stream.batch_size, stream.policies, stream.seed = batch_size, list(policies), seed
    stream.size = len(stream.policies)
    stream.base = base if base is not None else stream.policies[0].base()
    # an epoch: the ``items`` in full batches, and with ``keep_last`` one more of the rest (fidelity.last_batch)
    stream.items_per_epoch = items if keep_last else items - items % batch_size
    stream.steps_per_epoch = -(-stream.items_per_epoch // batch_size)


CHUNK_FLOATS = 1 << 24  # input floats (all members, 64 MiB) MemberStream transforms at once when no policy draws


def draws_nothing(policy: Policy) -> bool:
    """Whether a policy transforms each image on its own without a random draw (label smoothing at most)."""
    return policy == Policy(label_smoothing=policy.label_smoothing)


def _stacked(pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Every member's (inputs, targets) of one step stacked on a member axis."""
    return torch.stack([x for x, _ in pairs]), torch.stack([t for _, t in pairs])


def _orders(indices: Tensor, generator: torch.Generator, count: int) -> Tensor:
    """``count`` items of ``indices``: back-to-back random permutations, all drawn before anything else."""
    reps = math.ceil(count / len(indices))
    return torch.cat([indices[torch.randperm(len(indices), generator=generator)] for _ in range(reps)])[:count]


class MemberStream:
    """Batches of an in-memory dataset kept on ``device`` as uint8 and augmented there. ``indices`` are the training
    items; an epoch drops the incomplete last batch, or with ``keep_last`` ends with it (every member's of one size)."""

    def __init__(self, train: ArrayDataset, indices, batch_size: int, policies: Sequence[Policy], seed: int,
                 device: str | torch.device = "cpu", base: Policy | None = None, per_batch: dict | None = None,
                 member_ids: Sequence[int] | None = None, keep_last: bool = False):
        self.indices = _check(len(train), indices, batch_size)
        set_members(self, train, batch_size, policies, seed, device, base, per_batch, member_ids, len(self.indices),
                    keep_last)
        self.images = train.images.to(self.device)  # moved once; indexing happens on the device
        self.labels = train.labels.to(self.device)
        self.image_size, self.resize, self.resize_pixels = train.image_size, train.resize, train.resize_pixels
        _, c, h, w = train.images.shape
        self._item_floats = c * (self.image_size ** 2 if self.image_size else h * w)  # one item's floats at the model

    def _batch(self, policy: Policy, idx: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return apply(policy, self.images[idx], self.labels[idx], self.num_classes, self.mean, self.std, generator,
                     self.image_size, self.resize, self.resize_pixels)

    def _draw(self, generator: torch.Generator, count: int) -> Tensor:
        return to_device(_orders(self.indices, generator, count), self.device)

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``steps_per_epoch`` pairs (x (p, B, C, H, W) float32, targets (p, B, K) float32)."""
        b = self.batch_size
        orders = [self._draw(rng.generator(self.seed, "order", j, epoch), self.items_per_epoch) for j in self.ids]
        augment = [rng.generator(self.seed, "augment", j, epoch) for j in self.ids]
        if self.per_batch is None and all(map(draws_nothing, self.policies)):
            yield from self._fixed_epoch(orders)
            return
        for s in range(self.steps_per_epoch):
            yield _stacked([self._batch(batch_policy(self, j, augment[j]), orders[j][s * b:(s + 1) * b], augment[j])
                            for j in range(self.size)])

    def _fixed_epoch(self, orders: list[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of members whose policies draw nothing, transformed many steps (about CHUNK_FLOATS input
        floats) at a time: bitwise what a call per step gives, without the per-step overhead of small batches."""
        b, steps = self.batch_size, self.items_per_epoch // self.batch_size  # the full batches
        chunk = max(1, CHUNK_FLOATS // (self.size * b * self._item_floats))
        generator = torch.Generator()  # never drawn from: these policies draw nothing
        for start in range(0, steps, chunk):
            stop = min(start + chunk, steps)
            pairs = [self._batch(policy, order[start * b:stop * b], generator)
                     for policy, order in zip(self.policies, orders, strict=True)]
            # (steps, p, B, ...): every step's batch is one contiguous block, as torch.stack makes it
            x = torch.stack([x.unflatten(0, (stop - start, b)) for x, _ in pairs], dim=1)
            t = torch.stack([t.unflatten(0, (stop - start, b)) for _, t in pairs], dim=1)
            yield from zip(x, t, strict=True)
        if steps < self.steps_per_epoch:  # the last, incomplete batch
            yield _stacked([self._batch(policy, order[steps * b:], generator) for policy, order in
                            zip(self.policies, orders, strict=True)])

    def member_batches(self, j: int | None, generator: torch.Generator, n: int) -> Iterator[Tensor]:
        """``n`` input batches for member j's policy (j=None: the base transform). The order is drawn from
        ``generator`` first, so generators with the same seed (REPAIR's 666) give every member the same images."""
        b = self.batch_size
        order = self._draw(generator, n * b)
        augment = torch.Generator().manual_seed(draw_seed(generator))
        policy = self.base if j is None else self.policies[self.ids.index(j)]
        for i in range(n):
            yield self._batch(policy, order[i * b:(i + 1) * b], augment)[0]


class _SeededImages(torch.utils.data.Dataset):
    """Items are (index, seed): each image's random transform runs under its own seed, whichever worker loads it."""

    def __init__(self, dataset: FolderDataset, transform):
        self.folder, self.transform = dataset.folder, transform

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int]:
        index, seed = item
        path, label = self.folder.samples[index]
        image = self.folder.loader(path)
        with rng.seeded_globals(seed):  # torchvision draws from torch's RNG, timm's RandAugment from random/numpy
            return self.transform(image), label


def _items(order: Tensor, generator: torch.Generator) -> list[tuple[int, int]]:
    seeds = torch.randint(2**62, (len(order),), generator=generator)
    return list(zip(order.tolist(), seeds.tolist(), strict=True))


class FolderStream:
    """The MemberStream interface over an ImageFolder: a DataLoader per member (``num_workers`` each) decodes and
    transforms images on the CPU (``folder_train_transform``, no ``crop_padding``), the rest runs on ``device``."""

    def __init__(self, train: FolderDataset, indices, batch_size: int, policies: Sequence[Policy], seed: int,
                 device: str | torch.device = "cpu", base: Policy | None = None, num_workers: int = 0,
                 per_batch: dict | None = None, member_ids: Sequence[int] | None = None, keep_last: bool = False):
        self.indices = _check(len(train), indices, batch_size)
        set_members(self, train, batch_size, policies, seed, device, base, per_batch, member_ids, len(self.indices),
                    keep_last)
        self.train, self.num_workers, self.keep_last = train, num_workers, keep_last
        self.samplers = [[] for _ in self.policies]  # (index, seed) items, refilled in place for the persistent workers
        self.loaders = [self._loader(policy, sampler, persistent=num_workers > 0)
                        for policy, sampler in zip(self.policies, self.samplers, strict=True)]

    def _loader(self, policy: Policy, sampler, persistent: bool):
        transform = folder_train_transform(self.train.image_size, policy.flip, policy.autoaugment,
                                           policy.randaugment, self.mean)
        return torch.utils.data.DataLoader(
            _SeededImages(self.train, transform), batch_size=self.batch_size, sampler=sampler,
            drop_last=not self.keep_last, num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=persistent)

    def _regularize(self, policy: Policy, images: Tensor, labels: Tensor, generator: torch.Generator):
        # pinned host batches copy asynchronously; the rest of the policy then runs on the device
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        return regularize(policy, images, labels, self.num_classes, self.mean, self.std, generator)

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        augment = [rng.generator(self.seed, "augment", j, epoch) for j in self.ids]
        for j, sampler in enumerate(self.samplers):
            order = _orders(self.indices, rng.generator(self.seed, "order", self.ids[j], epoch), len(self.indices))
            sampler[:] = _items(order, augment[j])
        for batches in zip(*self.loaders, strict=True):
            yield _stacked([self._regularize(batch_policy(self, j, augment[j]), *batch, augment[j])
                            for j, batch in enumerate(batches)])

    def member_batches(self, j: int | None, generator: torch.Generator, n: int) -> Iterator[Tensor]:
        order = _orders(self.indices, generator, n * self.batch_size)
        augment = torch.Generator().manual_seed(draw_seed(generator))
        policy = self.base if j is None else self.policies[self.ids.index(j)]
        for images, labels in self._loader(policy, _items(order, augment), persistent=False):
            yield self._regularize(policy, images, labels, augment)[0]


def draw_patches(sizes: Sequence[tuple[int, int]], tiles: Tensor, patch: int, count: int,
                 generator: torch.Generator) -> list[tuple[int, int, int]]:
    """``count`` (tile, top, left) patch positions: a tile of ``tiles``, then a position in it, each uniformly."""
    choice = tiles[torch.randint(len(tiles), (count,), generator=generator)]
    u = torch.rand(count, 2, generator=generator, dtype=torch.float64)
    return [(t, int(uy * (sizes[t][0] - patch + 1)), int(ux * (sizes[t][1] - patch + 1)))
            for t, (uy, ux) in zip(choice.tolist(), u.tolist(), strict=True)]


class PatchStream(MemberStream):
    """The MemberStream interface over a TileDataset (paper A.1.3, after Audebert et al.): tiles kept on ``device``,
    ``epoch_size`` patches per member and epoch cut and augmented there (``flip`` flips and mirrors the labels
    alike); ``indices`` are the training tiles, targets are per pixel (p, B, K, S, S)."""

    def __init__(self, train: TileDataset, indices, batch_size: int, policies: Sequence[Policy], seed: int,
                 device: str | torch.device = "cpu", base: Policy | None = None, per_batch: dict | None = None,
                 member_ids: Sequence[int] | None = None, keep_last: bool = False):
        self.indices = torch.as_tensor(list(indices), dtype=torch.int64)
        if not len(self.indices) or self.indices.min() < 0 or self.indices.max() >= len(train):
            raise PapaError(f"training tiles must be a non-empty subset of 0..{len(train) - 1}")
        if batch_size < 1 or batch_size > train.epoch_size:
            raise PapaError(f"batch size {batch_size} does not fit an epoch of {train.epoch_size} patches")
        if any(p.crop_padding or p.autoaugment for p in policies):
            raise PapaError("segmentation patches take no crop_padding or autoaugment (they would move the "
                            "image away from its labels)")
        set_members(self, train, batch_size, policies, seed, device, base, per_batch, member_ids, train.epoch_size,
                    keep_last)
        self.images = [x.to(self.device) for x in train.images]
        self.labels = [y.to(self.device) for y in train.labels]
        self.sizes = [tuple(y.shape) for y in train.labels]
        self.patch = train.patch_size
        self._item_floats = self.images[0].shape[0] * self.patch ** 2

    def _draw(self, generator: torch.Generator, count: int) -> list[tuple[int, int, int]]:
        return draw_patches(self.sizes, self.indices, self.patch, count, generator)

    def _batch(self, policy: Policy, positions, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        s = self.patch
        images = torch.stack([self.images[t][:, y:y + s, x:x + s] for t, y, x in positions])
        labels = torch.stack([self.labels[t][y:y + s, x:x + s] for t, y, x in positions])
        if policy.flip:
            flips = to_device(torch.rand(2, len(positions), generator=generator) < 0.5, self.device)
            for dim, flip in zip((-2, -1), flips, strict=True):  # vertical flip, then horizontal mirror
                images = torch.where(flip[:, None, None, None], images.flip(dim), images)
                labels = torch.where(flip[:, None, None], labels.flip(dim), labels)
        return regularize(policy, images, labels, self.num_classes, self.mean, self.std, generator)


STREAMS = {"array": MemberStream, "folder": FolderStream, "segmentation": PatchStream}


def make_stream(splits: Splits, indices, batch_size: int, policies: Sequence[Policy], seed: int,
                device: str | torch.device = "cpu", **options) -> MemberStream | FolderStream | PatchStream:
    """The stream for ``splits.kind`` over ``splits.train``; options ``base``, ``per_batch``, ``member_ids``,
    ``keep_last`` and ``num_workers`` (folders only)."""
    return STREAMS[splits.kind](splits.train, indices, batch_size, policies, seed, device, **options)


@torch.no_grad()
def eval_batches(dataset: ArrayDataset | FolderDataset, indices=None, batch_size: int = 500,
                 device: str | torch.device = "cpu", num_workers: int = 0, augment: Policy | None = None,
                 generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """(x normalized float32, labels) over ``indices`` (default: all) in order, the last batch maybe smaller:
    unaugmented, or with ``augment`` through its crop and flip (folders: RandomResizedCrop and its flip) drawn from
    ``generator`` (``fidelity.val_images: authors``)."""
    device = torch.device(device)
    idx = torch.arange(len(dataset)) if indices is None else torch.as_tensor(list(indices), dtype=torch.int64)
    if isinstance(dataset, FolderDataset):  # items (index, seed): seed 0 for the eval transform, which draws nothing
        items = [(i, 0) for i in idx.tolist()] if augment is None else _items(idx, generator)
        transform = folder_eval_transform(dataset.image_size) if augment is None else \
            folder_train_transform(dataset.image_size, augment.flip)
        loader = torch.utils.data.DataLoader(
            _SeededImages(dataset, transform), batch_size=batch_size, num_workers=num_workers,
            sampler=items, pin_memory=device.type == "cuda")
        chunks = ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)
    else:
        chunks = ((dataset.images[c].to(device), dataset.labels[c].to(device)) for c in idx.split(batch_size))
        if augment is not None:
            chunks = ((geometric(augment.base(), images, generator), labels) for images, labels in chunks)
    mode, pixels = getattr(dataset, "resize", "bilinear"), getattr(dataset, "resize_pixels", False)
    for images, labels in chunks:
        yield eval_transform(images, dataset.mean, dataset.std, dataset.image_size, mode, pixels), labels
