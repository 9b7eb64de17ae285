"""U-Net (Ronneberger et al., 2015) with BatchNorm, for the Vaihingen segmentation runs (paper A.1.3): per-pixel
logits (N, K, H, W). Sides that are not multiples of 2**depth are zero-padded (after normalization: the mean pixel)
at the bottom and right and the logits cropped back, so whole tiles of any size go through in one forward pass."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from papa.errors import PapaError
from papa.models.registry import register


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


@register("unet")
class UNet(nn.Module):
    """``width`` channels at full resolution, doubled at each of ``depth`` levels (64 and 4: the original)."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64, depth: int = 4):
        super().__init__()
        if width < 1 or depth < 1:
            raise PapaError(f"UNet needs width >= 1 and depth >= 1, got {width} and {depth}")
        chans = [width * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.stem = double_conv(in_channels, chans[0])
        self.down = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), double_conv(chans[i], chans[i + 1]))
                                  for i in range(depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth)))
        self.merge = nn.ModuleList(double_conv(2 * chans[i], chans[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    def get_classifier(self) -> nn.Module:
        """The per-pixel classifier (timm's name), which fine-tuning keeps training while the body is frozen."""
        return self.head

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        skips = [self.stem(F.pad(x, (0, -w % m, 0, -h % m)))]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up, merge in zip(self.up, self.merge, strict=True):
            y = merge(torch.cat([skips.pop(), up(y)], dim=-3))
        return self.head(y)[..., :h, :w]
