"""ImageNet architectures taken from torchvision, always randomly initialized."""

from torch import nn

from papa.models.registry import register


@register("resnet50")
def resnet50(num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    """torchvision's ResNet-50; extra keyword arguments (e.g. ``zero_init_residual``) go to torchvision."""
    import torchvision  # here: it adds seconds to every CLI start that never builds this model
    model = torchvision.models.resnet50(weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model
