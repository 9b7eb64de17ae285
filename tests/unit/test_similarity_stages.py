"""Feature similarity compares networks stage by stage, unit for unit: networks with different stages, or whose
stages output features of different shapes, are refused by name instead of compared."""

import pytest
import torch

from papa.errors import PapaError
from papa.models import create_model
from papa.models.resnet_cifar import CifarResNet
from papa.similarity import cosine_similarity, pairwise_similarity


def test_networks_with_different_stages_are_not_compared():
    """ResNet-20 (3 stages) against a ResNet-18 (4 stages): a PapaError before any batch is read, whichever comes
    first."""
    torch.manual_seed(0)
    resnet20, resnet18 = create_model("resnet20", 10), CifarResNet([2, 2, 2, 2], [8, 16, 32, 64], 10)
    for a, b in ((resnet20, resnet18), (resnet18, resnet20)):
        with pytest.raises(PapaError, match="^cannot compare the features of networks with different stages$"):
            cosine_similarity(a, b, iter(()))
    with pytest.raises(PapaError, match="different stages"):
        pairwise_similarity([resnet18, resnet18, resnet20], [(0, 1)], iter(()))


def test_networks_whose_stages_output_other_shapes_are_not_compared():
    """A ResNet-18 half as wide as another has the same stages but not the same features: refused by name instead
    of a torch error on the first batch; one as wide compares, stage by stage."""
    torch.manual_seed(0)
    a, b = CifarResNet([1, 1, 1, 1], [8, 16, 32, 64], 10).eval(), CifarResNet([1, 1, 1, 1], [4, 8, 16, 32], 10).eval()
    batches = [torch.randn(2, 3, 16, 16)]
    with pytest.raises(PapaError, match="^cannot compare the features of networks whose stages output different "
                                        "shapes$"):
        cosine_similarity(a, b, batches)
    assert len(cosine_similarity(a, CifarResNet([1, 1, 1, 1], [8, 16, 32, 64], 10).eval(), batches)) == 4
