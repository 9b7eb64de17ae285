"""Folding REPAIR's biases in a network whose forward returns several outputs (a dict as torchvision's segmentation
models, or a tuple or list, nested, possibly holding non-tensors): every tensor returned is an output the caller
reads, so a layer whose output is returned besides feeding a BatchNorm keeps its bias, and the folded network's
outputs are all its own."""

import pytest
import torch
from torch import nn

from papa.fold import batchnorm_feeds, fold_biases


class TwoHeads(nn.Module):
    """conv1 -> bn1 (foldable); conv2 -> bn2 and, unnormalized, one of the returned outputs (not foldable)."""

    def __init__(self, returns: str):
        super().__init__()
        self.returns = returns
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))

    def forward(self, x):
        y = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        out = self.head(torch.relu(self.bn2(y)))
        if self.returns == "dict":
            return {"out": out, "aux": y}
        return out, [y, None], "logits"


def _soup(returns: str) -> nn.Module:
    torch.manual_seed(0)
    net = TwoHeads(returns).eval()
    g = torch.Generator().manual_seed(1)
    for name in ("conv1", "conv2"):  # the biases REPAIR gives bias-free layers
        net.get_submodule(name).bias = nn.Parameter(torch.randn(4, generator=g))
    return net


@pytest.mark.parametrize("returns", ["dict", "tuple"])
def test_a_layer_whose_output_is_returned_keeps_its_bias(returns):
    soup, x = _soup(returns), torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    assert batchnorm_feeds(soup, x) == {"conv1": ["bn1"], "conv2": None, "head": None}
    folded, fold = fold_biases(soup, ["conv1", "conv2"], x)
    assert (fold.folded, fold.kept, fold.note) == ({"conv1": ["bn1"]}, ["conv2"], "")
    assert folded.conv1.bias is None and torch.equal(folded.conv2.bias, soup.conv2.bias)
    with torch.no_grad():
        got, expected = folded(x), soup(x)
    if returns == "dict":
        got, expected = [got["out"], got["aux"]], [expected["out"], expected["aux"]]
    else:
        assert got[1][1] is None and got[2] == "logits"
        got, expected = [got[0], got[1][0]], [expected[0], expected[1][0]]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
