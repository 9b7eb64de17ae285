"""VGG with BatchNorm for 32x32 CIFAR images: 3x3 convolutions, five max-pools, a 512-d feature."""

from torch import Tensor, nn

from papa.models.registry import register

# output channels of each 3x3 convolution; "M" is a 2x2 max-pool
CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """``features`` is a flat Sequential of conv, BN, ReLU (and pools), as in torchvision, so every conv
    is directly followed by its BN; ``classifier`` is one linear layer on the pooled 512-d feature."""

    def __init__(self, config: list[int | str], num_classes: int, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                conv = nn.Conv2d(channels, item, 3, padding=1, bias=False)
                layers += [conv, nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        # at 32x32 the map is already 1x1 here; pooling lets other sizes through unchanged
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register("vgg11_bn")
def vgg11_bn(num_classes: int, in_channels: int = 3) -> VGG:
    return VGG(CONFIGS["vgg11"], num_classes, in_channels)


@register("vgg16_bn")
def vgg16_bn(num_classes: int, in_channels: int = 3) -> VGG:
    return VGG(CONFIGS["vgg16"], num_classes, in_channels)
