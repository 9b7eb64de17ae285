"""ResNets for 32x32 CIFAR images: a 3x3 stem without max-pool, then stages of BasicBlocks."""

import torch.nn.functional as F
from torch import Tensor, nn

from papa.errors import PapaError
from papa.models.permutation import UNSUPPORTED, GroupBuilder, PermGroup, Tap
from papa.models.registry import register

SHORTCUTS = ("projection", "zero-pad")
INITS = ("torch", "kaiming")


class ZeroPadShortcut(nn.Module):
    """He et al.'s option A: the identity, subsampled by ``stride`` and zero-padded with the extra channels
    split evenly on both sides (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride, self.before = stride, (planes - in_planes) // 2
        self.after = planes - in_planes - self.before

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.before, self.after))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs and a residual. When the shape changes, the shortcut is a 1x1 conv + BN projection
    (He et al.'s option B, ``"projection"``: plain weights that averaging and alignment handle alike) or option A
    (``"zero-pad"``), as in He et al.'s CIFAR ResNet-20, Cui et al.'s ESGD and the authors' models/resnet20.py."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "projection"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = ZeroPadShortcut(in_planes, planes, stride) if shortcut == "zero-pad" else nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """Stem conv3x3 + BN + ReLU, stages ``layer1..layerN`` (the first at stride 1, the others halving the
    resolution), global average pool, linear ``fc``; names follow torchvision's ResNet. ``init``: PyTorch's
    default, or ``kaiming`` (He normal, fan-in, on every conv and linear weight, as the authors' ResNet-20)."""

    def __init__(self, blocks: list[int], widths: list[int], num_classes: int, in_channels: int = 3,
                 shortcut: str = "projection", init: str = "torch"):
        super().__init__()
        if shortcut not in SHORTCUTS or init not in INITS:
            raise PapaError(f"CIFAR ResNet: shortcut must be one of {', '.join(SHORTCUTS)} and init one of "
                            f"{', '.join(INITS)}, got {shortcut!r} and {init!r}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        for i, (count, planes) in enumerate(zip(blocks, widths, strict=True), start=1):
            first = BasicBlock(in_planes, planes, stride=1 if i == 1 else 2, shortcut=shortcut)
            self.add_module(f"layer{i}", nn.Sequential(first, *(BasicBlock(planes, planes) for _ in range(count - 1))))
            in_planes = planes
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        if init == "kaiming":
            for m in self.modules():
                if isinstance(m, nn.Conv2d | nn.Linear):
                    nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            x = self.get_submodule(f"layer{i}")(x)
        return self.fc(self.avgpool(x).flatten(1))

    def permutation_groups(self) -> list[PermGroup]:
        """For alignment (papa.alignment). The residual stream is one group from the stem to the first projection,
        then one per projection (their conv/BN outputs, the blocks' conv2/bn2 outputs and conv1 inputs, up to the
        next projection's or the fc's input), matched on the post-ReLU stem and block outputs; each block's inner
        channels (conv1/bn1 out, conv2 in) are a group matched on post-ReLU bn1."""
        state, groups = self.state_dict(), []
        stream = GroupBuilder("stream:stem", self.conv1.out_channels, state)
        stream.produced_by("conv1", "bn1")
        stream.taps.append(Tap("bn1", relu=True))
        for i in range(1, self.num_stages + 1):
            for b, block in enumerate(self.get_submodule(f"layer{i}")):
                prefix = f"layer{i}.{b}"
                if not isinstance(block, BasicBlock):
                    raise PapaError(f"{UNSUPPORTED}: {prefix} is not a BasicBlock")
                inner = GroupBuilder(f"inner:{prefix}", block.conv1.out_channels, state)
                inner.produced_by(f"{prefix}.conv1", f"{prefix}.bn1")
                inner.taps.append(Tap(f"{prefix}.bn1", relu=True))
                inner.consumed_by(f"{prefix}.conv2")
                groups.append(inner.build())
                stream.consumed_by(f"{prefix}.conv1")
                if isinstance(block.downsample, ZeroPadShortcut):
                    raise PapaError(f"{UNSUPPORTED} with projection shortcuts, not zero-padded ones ({prefix})")
                if (ds := block.downsample) is not None:
                    if not (len(ds) == 2 and isinstance(ds[0], nn.Conv2d) and isinstance(ds[1], nn.BatchNorm2d)):
                        raise PapaError(f"{UNSUPPORTED}: {prefix}.downsample is not a conv-BatchNorm projection")
                    stream.consumed_by(f"{prefix}.downsample.0")
                    groups.append(stream.build())
                    stream = GroupBuilder(f"stream:{prefix}", ds[0].out_channels, state)
                    stream.produced_by(f"{prefix}.downsample.0", f"{prefix}.downsample.1")
                stream.produced_by(f"{prefix}.conv2", f"{prefix}.bn2")
                stream.taps.append(Tap(prefix))  # the block's output, after the residual sum and ReLU
        stream.consumed_by("fc")
        groups.append(stream.build())
        return groups


@register("resnet18_cifar")
def resnet18_cifar(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-18 for CIFAR: about 11.2M parameters, 0.56G multiply-adds per 32x32 image."""
    return CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels)


@register("resnet20")
def resnet20(num_classes: int, in_channels: int = 3, shortcut: str = "projection", init: str = "torch") -> CifarResNet:
    """ResNet-20 of He et al. (2016) for CIFAR: 3 stages x 3 blocks, widths 16/32/64, with projection
    shortcuts by default; ``shortcut="zero-pad", init="kaiming"`` is the authors' and Cui et al.'s (Table 12)."""
    return CifarResNet([3, 3, 3], [16, 32, 64], num_classes, in_channels, shortcut, init)
