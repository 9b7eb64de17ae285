"""The model registry: every architecture builds and gives logits; errors are one-line PapaErrors."""

import pytest
import torch
from safetensors.torch import save_file

from papa.errors import PapaError
from papa.models import available_models, create_model, register

# (in_channels, image size) per registered model; a new registration without an entry fails the test below
INPUTS = {
    "digits_cnn": (1, 8),
    "logreg": (1, 8),
    "vgg11_bn": (3, 32),
    "vgg16_bn": (3, 32),
    "resnet18_cifar": (3, 32),
    "resnet20": (3, 32),
    "resnet50": (3, 64),
    "unet": (3, 32),
}
DENSE = {"unet"}  # per-pixel logits (N, K, H, W)


def test_every_registered_model_has_an_input_spec():
    assert set(available_models()) == set(INPUTS)


def test_every_module_that_registers_a_model_is_imported_by_the_package():
    """A module of papa/models/ with an ``@register`` that papa.models does not import would leave its model
    unknown, found only when a config names it."""
    import sys
    from pathlib import Path

    import papa.models

    folder = Path(papa.models.__file__).parent
    registering = {p.stem for p in folder.glob("*.py") if "@register(" in p.read_text()}
    assert registering and {m for m in registering if f"papa.models.{m}" not in sys.modules} == set()


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_model_gives_logits(name):
    in_channels, size = INPUTS[name]
    model = create_model(name, num_classes=7, in_channels=in_channels)
    logits = model(torch.randn(2, in_channels, size, size))
    assert logits.shape == ((2, 7, size, size) if name in DENSE else (2, 7))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet20", "resnet50"])
def test_other_input_channels(name):
    model = create_model(name, num_classes=3, in_channels=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_timm_prefix(name):
    model = create_model(f"timm/{name}", num_classes=5)
    model.eval()
    assert model(torch.randn(2, 3, 160, 160)).shape == (2, 5)


@pytest.mark.parametrize("name", ["no_such_net", "timm/no_such_net"])
def test_unknown_name_is_a_one_line_papa_error(name):
    with pytest.raises(PapaError) as err:
        create_model(name, num_classes=10)
    message = str(err.value)
    assert "no_such_net" in message and "\n" not in message
    if not name.startswith("timm/"):
        assert "digits_cnn" in message and "timm/<name>" in message


def test_unknown_argument_is_a_papa_error():
    with pytest.raises(PapaError, match="digits_cnn"):
        create_model("digits_cnn", num_classes=10, in_channels=1, widht=16)


def test_registry_has_no_duplicates():
    names = available_models()
    assert len(names) == len(set(names))
    with pytest.raises(ValueError, match="already registered"):
        register("digits_cnn")(lambda num_classes, in_channels=3: torch.nn.Identity())
    assert available_models() == names


def test_digits_cnn_size_and_width():
    def count(model):
        return sum(p.numel() for p in model.parameters())

    default = count(create_model("digits_cnn", num_classes=10, in_channels=1))
    assert 20_000 <= default <= 60_000
    assert count(create_model("digits_cnn", num_classes=10, in_channels=1, width=8)) < default // 4


def test_resnet20_is_the_cifar_resnet20():
    model = create_model("resnet20", num_classes=10)
    # about 0.27M parameters in He et al. (2016); projection shortcuts add a few thousand
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.29e6
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]


@pytest.mark.parametrize(("name", "config"), [
    ("vgg11_bn", [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]),
    ("vgg16_bn", [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"])])
def test_vgg_is_the_authors_vgg_with_biased_convolutions(name, config):
    """The authors' models/vgg.py (kuangliu's CIFAR VGG): 3x3 convolutions with a bias (nn.Conv2d's default), each
    followed by a BatchNorm and a ReLU, and one linear classifier on the 512-d feature."""
    model = create_model(name, num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(conv.bias is not None for conv in convs)
    widths = [c for c in config if c != "M"]
    expected = sum(i * o * 9 + o + 2 * o for i, o in zip([3, *widths[:-1]], widths, strict=True)) + 512 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == expected


def test_pretrained_loads_backbone_and_reinitializes_a_new_head(tmp_path):
    source = create_model("resnet20", num_classes=10)
    path = tmp_path / "resnet20.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)

    same = create_model("resnet20", num_classes=10, pretrained=path)
    for key, value in source.state_dict().items():
        assert torch.equal(same.state_dict()[key], value), key

    torch.manual_seed(0)
    fresh_head = create_model("resnet20", num_classes=4).fc.weight.clone()
    torch.manual_seed(0)
    tuned = create_model("resnet20", num_classes=4, pretrained=str(path))
    assert torch.equal(tuned.conv1.weight, source.conv1.weight)
    assert torch.equal(tuned.layer3[2].bn2.running_mean, source.layer3[2].bn2.running_mean)
    assert tuned.fc.weight.shape == (4, 64)
    assert torch.equal(tuned.fc.weight, fresh_head)


def test_missing_weight_file_is_a_papa_error(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(PapaError, match="absent.safetensors"):
        create_model("digits_cnn", num_classes=10, in_channels=1, pretrained=path)


def test_weights_of_another_model_are_a_papa_error(tmp_path):
    path = tmp_path / "logreg.safetensors"
    save_file(create_model("logreg", num_classes=10).state_dict(), path)
    with pytest.raises(PapaError, match=r"do not fit CifarResNet outside its classifier head: 126 missing"):
        create_model("resnet20", num_classes=10, pretrained=path)
