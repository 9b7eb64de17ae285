"""The architectures' own checks: a CIFAR ResNet's shortcut and init options and a U-Net's width and depth are
PapaErrors naming the values given, and permutation alignment refuses, naming the layer, a network whose structure
is not the one it declares groups for (zero-padded shortcuts, a block or layer swapped for another kind, a layer
whose channels do not match its group's)."""

import pytest
from torch import nn

from papa.alignment import UNSUPPORTED, permutation_spec
from papa.errors import PapaError
from papa.models import create_model
from papa.models.resnet_cifar import CifarResNet
from papa.models.vgg import VGG


@pytest.mark.parametrize("kwargs, found", [({"shortcut": "identity"}, "'identity' and 'torch'"),
                                           ({"init": "xavier"}, "'projection' and 'xavier'")])
def test_cifar_resnet_options_are_checked(kwargs, found):
    with pytest.raises(PapaError, match="^CIFAR ResNet: shortcut must be one of projection, zero-pad and init one of "
                                        rf"torch, kaiming, got {found}$"):
        create_model("resnet20", 10, **kwargs)


@pytest.mark.parametrize("kwargs, found", [({"width": 0}, "0 and 4"), ({"width": 4, "depth": 0}, "4 and 0"),
                                           ({"depth": -1}, "64 and -1")])
def test_unet_width_and_depth_are_checked(kwargs, found):
    with pytest.raises(PapaError, match=f"^UNet needs width >= 1 and depth >= 1, got {found}$"):
        create_model("unet", 6, **kwargs)


def test_zero_padded_shortcuts_cannot_be_aligned():
    """Table 12's ResNet-20 (the authors' zero-padded shortcuts) has no projection to carry a permutation across."""
    model = create_model("resnet20", 10, shortcut="zero-pad", init="kaiming")
    with pytest.raises(PapaError) as err:
        permutation_spec(model)
    assert str(err.value) == f"{UNSUPPORTED} with projection shortcuts, not zero-padded ones (layer2.0)"


def _block_replaced(model: CifarResNet) -> None:
    model.layer2[1] = nn.Identity()


def _projection_with_a_relu(model: CifarResNet) -> None:
    model.layer3[0].downsample.append(nn.ReLU())


def _projection_bn_resized(model: CifarResNet) -> None:
    model.layer2[0].downsample[1] = nn.BatchNorm2d(16)


@pytest.mark.parametrize("change, message", [
    (_block_replaced, f"{UNSUPPORTED}: layer2.1 is not a BasicBlock"),
    (_projection_with_a_relu, f"{UNSUPPORTED}: layer3.0.downsample is not a conv-BatchNorm projection"),
    (_projection_bn_resized, "layer2.0.downsample.1.weight: axis 0 has 16 channels, expected 32"),
])
def test_a_modified_resnet_is_refused_naming_the_layer(change, message):
    model = create_model("resnet20", 10)
    change(model)
    with pytest.raises(PapaError) as err:
        permutation_spec(model)
    assert str(err.value) == message


@pytest.mark.parametrize("change, message", [
    (lambda m: m.features.__setitem__(2, nn.GELU()),
     f"{UNSUPPORTED}: VGG features.0 is not a conv-BatchNorm-ReLU block"),
    (lambda m: m.features.__setitem__(4, nn.Conv2d(4, 8, 3, groups=2)),
     f"{UNSUPPORTED}: VGG features.4 is not a conv-BatchNorm-ReLU block"),
    (lambda m: setattr(m, "classifier", nn.Sequential(nn.Linear(8, 5))),
     f"{UNSUPPORTED}: VGG without convolutions or a linear classifier"),
])
def test_a_modified_vgg_is_refused_naming_the_layer(change, message):
    model = VGG([4, "M", 8], num_classes=5)
    change(model)
    with pytest.raises(PapaError) as err:
        permutation_spec(model)
    assert str(err.value) == message


def test_a_vgg_without_convolutions_is_refused():
    with pytest.raises(PapaError, match=f"^{UNSUPPORTED}: VGG without convolutions or a linear classifier$"):
        permutation_spec(VGG(["M"], num_classes=5))
