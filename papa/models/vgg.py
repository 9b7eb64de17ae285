"""VGG with BatchNorm for 32x32 CIFAR images: 3x3 convolutions, five max-pools, a 512-d feature."""

from functools import partial

from torch import Tensor, nn

from papa.errors import PapaError
from papa.models.permutation import UNSUPPORTED, GroupBuilder, PermGroup, Tap
from papa.models.registry import register


class VGG(nn.Module):
    """``features`` is a flat Sequential of conv (with a bias, as the authors' models/vgg.py and torchvision's), BN,
    ReLU (and pools), so every conv is directly followed by its BN; ``classifier`` is one linear layer on the pooled
    512-d feature."""

    def __init__(self, config: list[int | str], num_classes: int, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # at 32x32 the map is already 1x1 here; other sizes get through
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))

    def permutation_groups(self) -> list[PermGroup]:
        """For alignment (papa.alignment): one group per convolution (its output channels and BatchNorm, the
        next convolution's or the classifier's input channels), matched on its post-ReLU features."""
        state, groups, current = self.state_dict(), [], None
        children = iter(self.features.named_children())
        for name, conv in children:
            if isinstance(conv, nn.MaxPool2d | nn.AvgPool2d):
                continue
            (bn_name, bn), (relu_name, relu) = next(children, ("", None)), next(children, ("", None))
            if not (isinstance(conv, nn.Conv2d) and conv.groups == 1 and isinstance(bn, nn.BatchNorm2d)
                    and isinstance(relu, nn.ReLU)):
                raise PapaError(f"{UNSUPPORTED}: VGG features.{name} is not a conv-BatchNorm-ReLU block")
            if current is not None:
                current.consumed_by(f"features.{name}")
                groups.append(current.build())
            current = GroupBuilder(f"features.{name}", conv.out_channels, state)
            current.produced_by(f"features.{name}", f"features.{bn_name}")
            current.taps.append(Tap(f"features.{relu_name}"))  # post-ReLU features
        if current is None or not isinstance(self.classifier, nn.Linear):
            raise PapaError(f"{UNSUPPORTED}: VGG without convolutions or a linear classifier")
        current.consumed_by("classifier")
        groups.append(current.build())
        return groups


# output channels of each 3x3 convolution; "M" is a 2x2 max-pool
vgg11_bn = register("vgg11_bn")(partial(VGG, [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]))
vgg16_bn = register("vgg16_bn")(partial(VGG, [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                              512, 512, 512, "M"]))
