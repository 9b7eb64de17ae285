"""Training batches of random patches from whole tiles (segmentation; paper A.1.3, after Audebert et al.).

An epoch of member j is ``epoch_size`` patches: each picks a training tile uniformly and a position
uniformly inside it, all drawn from the member's ``order`` generator; with the policy's ``flip`` every
patch is flipped vertically and mirrored horizontally, each with probability 1/2, together with its labels
(the member's ``augment`` generator). The rest of the policy (normalization, random erasing, mixup, CutMix,
label smoothing) is ``regularize``, which gives per-pixel soft targets (B, K, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from papa.data.augment import Policy, regularize, to_device
from papa.data.stream import STREAMS, MemberStream, set_members
from papa.data.vaihingen import TileDataset
from papa.errors import PapaError


def draw_patches(sizes: Sequence[tuple[int, int]], tiles: Tensor, patch: int, count: int,
                 generator: torch.Generator) -> list[tuple[int, int, int]]:
    """``count`` (tile, top, left) patch positions: a tile of ``tiles`` uniformly, then a position uniformly
    among the tile's (H - patch + 1) x (W - patch + 1)."""
    choice = tiles[torch.randint(len(tiles), (count,), generator=generator)]
    u = torch.rand(count, 2, generator=generator, dtype=torch.float64)
    out = []
    for t, (uy, ux) in zip(choice.tolist(), u.tolist(), strict=True):
        h, w = sizes[t]
        out.append((t, int(uy * (h - patch + 1)), int(ux * (w - patch + 1))))
    return out


class PatchStream(MemberStream):
    """The MemberStream interface over a TileDataset: tiles kept on ``device`` as uint8, patches cut and
    augmented there. ``indices`` are the training tiles; ``steps_per_epoch = epoch_size // batch_size``.
    ``epoch`` yields pairs (x (p, B, C, S, S) float32, targets (p, B, K, S, S) float32), and
    ``member_batches`` gives every member the same patches for generators with the same seed."""

    def __init__(self, train: TileDataset, indices, batch_size: int, policies: Sequence[Policy], seed: int,
                 device: str | torch.device = "cpu", base: Policy | None = None, per_batch: dict | None = None,
                 member_ids: Sequence[int] | None = None):
        self.indices = torch.as_tensor(list(indices), dtype=torch.int64)
        if not policies:
            raise PapaError("a stream needs at least one member policy")
        if not len(self.indices) or self.indices.min() < 0 or self.indices.max() >= len(train):
            raise PapaError(f"training tiles must be a non-empty subset of 0..{len(train) - 1}")
        if batch_size < 1 or batch_size > train.epoch_size:
            raise PapaError(f"batch size {batch_size} does not fit an epoch of {train.epoch_size} patches")
        for p in policies:
            if p.crop_padding or p.autoaugment:
                raise PapaError("segmentation patches take no crop_padding or autoaugment (they would move the "
                                "image away from its labels)")
        set_members(self, train, batch_size, policies, seed, device, base, per_batch, member_ids)
        self.images = [x.to(self.device) for x in train.images]
        self.labels = [y.to(self.device) for y in train.labels]
        self.sizes = [tuple(y.shape) for y in train.labels]
        self.patch, self.epoch_size = train.patch_size, train.epoch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.epoch_size // self.batch_size

    def _draw(self, generator: torch.Generator, count: int) -> list[tuple[int, int, int]]:
        return draw_patches(self.sizes, self.indices, self.patch, count, generator)

    @property
    def _epoch_draw(self) -> int:
        return self.steps_per_epoch * self.batch_size

    @property
    def _item_floats(self) -> int:
        return self.images[0].shape[0] * self.patch ** 2

    def _cut(self, positions) -> tuple[Tensor, Tensor]:
        s = self.patch
        images = torch.stack([self.images[t][:, y:y + s, x:x + s] for t, y, x in positions])
        labels = torch.stack([self.labels[t][y:y + s, x:x + s] for t, y, x in positions])
        return images, labels

    def _batch(self, policy: Policy, positions, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        images, labels = self._cut(positions)
        if policy.flip:
            flips = to_device(torch.rand(2, len(positions), generator=generator) < 0.5, self.device)
            for dim, flip in zip((-2, -1), flips, strict=True):  # vertical flip, then horizontal mirror
                images = torch.where(flip[:, None, None, None], images.flip(dim), images)
                labels = torch.where(flip[:, None, None], labels.flip(dim), labels)
        return regularize(policy, images, labels, self.num_classes, self.mean, self.std, generator)


STREAMS["segmentation"] = PatchStream
