"""A small convolutional network for the 8x8 single-channel scikit-learn digits."""

from torch import Tensor, nn

from papa.models.registry import register


@register("digits_cnn")
class DigitsCNN(nn.Module):
    """conv3x3(w) -> BN -> ReLU -> conv3x3(2w) -> BN -> ReLU -> maxpool 2 -> linear on all ``2w x (s/2) x (s/2)``
    features (about 29k parameters for w=32 on 8x8 images): digits are small enough to keep positions."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32, image_size: int = 8):
        super().__init__()
        # no conv bias: the following BatchNorm's shift makes it redundant
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.linear = nn.Linear(2 * width * (image_size // 2) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        return self.linear(x.flatten(1))
