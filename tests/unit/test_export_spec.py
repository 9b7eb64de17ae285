"""What population.json records of a run's input and classes (papa.runs.input_spec), for every kind of dataset,
read off the data exactly as the run's stream and evaluation prepare it."""

import re
from types import SimpleNamespace

import pytest
import torch

from papa import runs
from papa.data.datasets import CIFAR100_MEAN, IMAGENET_MEAN, IMAGENET_STD
from papa.errors import PapaError
from papa.export import architecture, describe, probe, to_architecture
from papa.runs import input_spec
from tests.helpers import tiny_experiment
from tests.unit.test_data import _write_images, write_cifar
from tests.vaihingen_tiles import OPTIONS, write_tiles


def _spec(**overrides) -> dict:
    exp = tiny_experiment(**overrides)
    return input_spec(exp, runs.load_data(exp))


def test_digits_at_their_own_size_are_not_resized():
    spec = _spec()
    assert spec["classes"] == [str(d) for d in range(10)]
    i = spec["input"]
    assert (i["dataset"], i["kind"], i["channels"], i["size"], i["interpolation"], i["crop_pct"]) == (
        "digits", "array", 1, [8, 8], None, 1.0)
    assert 0.2 < i["mean"][0] < 0.4 and 0.3 < i["std"][0] < 0.5  # measured on the training part
    assert tuple(probe(spec).shape) == (2, 1, 8, 8)


def test_cifar_resized_for_a_pretrained_timm_model_takes_the_models_normalization(tmp_path):
    write_cifar(tmp_path, "cifar100")
    spec = _spec(data={"dataset": "cifar100", "root": str(tmp_path), "image_size": 24, "resize": "bicubic"},
                 model={"name": "timm/convit_tiny.fb_in1k", "pretrained": "timm", "kwargs": {}})
    i = spec["input"]
    assert (i["kind"], i["channels"], i["size"], i["interpolation"]) == ("array", 3, [24, 24], "bicubic")
    assert i["mean"] == pytest.approx(IMAGENET_MEAN) and i["std"] == pytest.approx(IMAGENET_STD)  # not CIFAR's
    assert len(spec["classes"]) == 100 and spec["classes"][0] != "0"  # the archive's class names
    plain = _spec(data={"dataset": "cifar100", "root": str(tmp_path)})
    assert plain["input"]["mean"] == pytest.approx(CIFAR100_MEAN) and plain["input"]["interpolation"] is None


def test_an_image_folder_is_resized_then_centre_cropped(tmp_path):
    for part in ("train", "val"):
        for cls in ("cat", "dog"):
            _write_images(tmp_path / part / cls, 2)
    spec = _spec(data={"dataset": "imagenet", "root": str(tmp_path), "image_size": 224})
    i = spec["input"]
    assert (i["kind"], i["size"], i["interpolation"], i["crop_pct"]) == ("folder", [224, 224], "bilinear", 0.875)
    assert spec["classes"] == ["cat", "dog"]


def test_segmentation_takes_whole_tiles(tmp_path):
    write_tiles(tmp_path)
    spec = _spec(data={"dataset": "vaihingen", "root": str(tmp_path), "options": OPTIONS},
                 model={"name": "unet", "kwargs": {"width": 4, "depth": 2}})
    i = spec["input"]
    assert (i["kind"], i["channels"], i["size"], i["interpolation"]) == ("segmentation", 3, [32, 32], None)
    assert spec["classes"][0] == "impervious_surfaces" and len(spec["classes"]) == 6
    assert tuple(probe(spec).shape) == (2, 3, 32, 32)


def test_the_probe_of_a_network_taking_whole_tiles_is_at_most_64_pixels_a_side():
    """papa.fold checks the folded network on two random images: of the input size, or for a segmentation network
    (which takes any size) at most PROBE_SIDE a side, so a large training patch costs no more."""
    big = {"channels": 3, "size": [256, 48]}
    assert tuple(probe({"input": big | {"kind": "segmentation"}}).shape) == (2, 3, 64, 48)
    assert tuple(probe({"input": big | {"kind": "array"}}).shape) == (2, 3, 256, 48)


def test_tensors_that_do_not_fit_the_architecture_are_one_error_naming_them():
    """A bias REPAIR gave a bias-free layer is taken (and folded); any other tensor the stock architecture lacks, or
    lacks room for, is named, up to three of each kind, in one error."""
    spec = _spec() | {"model": "digits_cnn", "kwargs": {"width": 4}}
    does_not_fit = "run: the tensors do not fit the run's architecture: "
    state = architecture(spec).state_dict()
    _, fold = to_architecture(state | {"conv1.bias": torch.zeros(4)}, spec)
    assert fold.folded == {"conv1": ["bn1"]} and fold.kept == []
    for bad, named in [
        ({k: v for k, v in state.items() if k != "linear.weight"}, "missing ['linear.weight']"),
        (state | {"nope.bias": torch.zeros(4)}, "unexpected ['nope.bias']"),  # no such layer
        (state | {"relu.bias": torch.zeros(4)}, "unexpected ['relu.bias']"),  # a layer with no weight to repair
        (state | {"linear.bias": torch.zeros(3)}, "of another shape ['linear.bias']"),
    ]:
        with pytest.raises(PapaError, match=f"^{re.escape(does_not_fit + named)}$"):
            to_architecture(bad, spec, "run")


def test_a_one_member_soup_is_not_called_repaired_and_a_run_without_alignment_not_aligned():
    """config.json's description of a soup from what metrics.json and the soups' metadata say; a one-member greedy
    soup is that member (papa.soups never REPAIRs it); a member of a run whose metrics predate ``val_members`` has no
    validation accuracy."""
    metrics = {"members": [90.0, 80.0, 70.0], "greedy_soup_repair": 90.0, "avg_soup_repair": 50.0}
    files = SimpleNamespace(metrics=metrics, meta={"experiment": "e", "variant": "papa", "seed": 1},
                            soups_meta={"greedy_soup_members": [0], "val_accuracy": {"greedy_soup_repair": 88.0}})
    greedy = describe(files, "greedy_soup_repair", None)
    assert greedy["members"] == [0] and greedy["repaired"] is greedy["aligned"] is False
    assert greedy["val_accuracy"] == 88.0
    average = describe(files, "avg_soup_repair", None)
    assert (average["members"], average["repaired"], average["val_accuracy"]) == ([0, 1, 2], True, None)
    member = describe(files, None, 2)
    assert (member["members"], member["test_accuracy"], member["val_accuracy"]) == ([2], 70.0, None)
