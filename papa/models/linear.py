"""Logistic regression: the single-layer model of the paper's appendix A.10 (digits, 64 inputs)."""

from torch import Tensor, nn

from papa.models.registry import register


@register("logreg")
class LogisticRegression(nn.Module):
    """Flatten the image, then one linear layer giving the logits (softmax lives in the loss)."""

    def __init__(self, num_classes: int, in_channels: int = 1, image_size: int = 8):
        super().__init__()
        self.linear = nn.Linear(in_channels * image_size**2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))
