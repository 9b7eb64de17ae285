"""The model card of an export (papa.card) for each kind of network it describes: a member or a soup, an image
classifier, an image-folder or a segmentation network, a network trained from scratch or fine-tuned from timm's
weights, with REPAIR's biases folded, kept or neither. The end-to-end export test reads one card of each run; these
build the description by hand to reach every case."""

import pytest
import yaml

from papa.card import PROJECT_LICENSE, front_matter, model_card

DIGITS = {"dataset": "digits", "kind": "array", "channels": 1, "size": [8, 8], "interpolation": None,
          "crop_pct": 1.0, "mean": [0.3], "std": [0.4]}


def spec(network=None, input=None, model="digits_cnn", pretrained=None, biases=None) -> dict:
    """A config.json description as papa.export writes it: a repaired greedy soup of digits_cnn unless told."""
    n = {"experiment": "tiny", "variant": "papa", "seed": 1, "population": 3, "soup": "greedy_soup_repair",
         "member": None, "members": [0, 2], "repaired": True, "aligned": False, "metric": "accuracy",
         "test_accuracy": 91.23456, "val_accuracy": 90.0} | (network or {})
    config = {"model": {"name": model, "kwargs": {}} | ({"pretrained": pretrained} if pretrained else {})}
    return {"model": model, "kwargs": {"width": 8}, "input": DIGITS | (input or {}),
            "classes": [str(c) for c in range(10)], "network": n, "config": config, "versions": {"torch": "2.0"},
            "code": {"commit": "abc", "changed": False},
            "biases": {"folded": {}, "kept": [], "note": ""} | (biases or {})}


def test_a_soup_is_named_with_its_members_and_repair():
    card = model_card(spec())
    assert "# tiny / papa / seed 1: greedy soup with REPAIR\n" in card
    assert "The greedy soup with REPAIR: the uniform average of members 0, 2 of 3, then REPAIRed." in card
    assert "| Test accuracy | 91.23% (metrics.json of the run) |" in card and "| REPAIR | yes |" in card
    plain = model_card(spec({"soup": "avg_soup", "members": [0, 1, 2], "repaired": False, "aligned": True}))
    assert "The average soup: the uniform average of members 0, 1, 2 of 3, each permutation-aligned" in plain
    assert "then REPAIRed" not in plain and "| REPAIR | no |" in plain
    one = model_card(spec({"members": [1], "repaired": False}))
    assert "(a one-member soup is that member, not REPAIRed)." in one


def test_a_member_is_named_as_a_member():
    card = model_card(spec({"soup": None, "member": 2, "members": [2], "repaired": False}))
    assert "# tiny / papa / seed 1: member 2\n" in card and "Member 2 of the population, as trained." in card
    assert "| Network | `member`: Member 2" in card and "uniform average" not in card
    assert yaml.safe_load(card.split("---\n")[1])["model-index"][0]["name"] == "tiny-papa-seed1-member2"


def test_front_matter_names_the_task_and_metric_of_each_kind_of_network():
    matter = front_matter(spec())
    assert matter["pipeline_tag"] == "image-classification" and matter["license"] == PROJECT_LICENSE
    assert matter["tags"] == ["papa", "model-soup", "weight-averaging", "digits", "repair"]
    result = matter["model-index"][0]["results"][0]
    assert result["metrics"][0] == {"type": "accuracy", "value": 91.2346, "name": "Test accuracy (%)"}
    seg = front_matter(spec({"metric": "pixel accuracy", "repaired": False},
                            {"dataset": "vaihingen", "kind": "segmentation", "channels": 3}))
    assert seg["pipeline_tag"] == "image-segmentation" and "repair" not in seg["tags"]
    assert seg["model-index"][0]["results"][0]["task"] == {"type": "image-segmentation"}
    assert seg["model-index"][0]["results"][0]["metrics"][0]["type"] == "pixel_accuracy"
    assert "model-index" not in front_matter(spec({"test_accuracy": None}))  # nothing measured, nothing claimed


@pytest.mark.parametrize(("model", "pretrained", "license"), [
    ("digits_cnn", None, PROJECT_LICENSE),  # trained from scratch: the project's
    ("timm/resnet18.a1_in1k", "timm", "apache-2.0"),  # timm's weights: their license
    ("timm/cpubone_b0_bfrobust.r224_in1k", "timm", "other"),  # timm records none
    ("timm/resnet18.a1_in1k", "weights.safetensors", "other"),  # a file of unknown origin
    ("resnet20", "timm", "other"),  # not a timm model, whatever it says
])
def test_the_license_is_the_projects_only_for_a_network_trained_from_scratch(model, pretrained, license):
    matter = front_matter(spec(model=model, pretrained=pretrained))
    assert matter["license"] == license
    assert matter["library_name"] == ("timm" if model.startswith("timm/") else "pytorch")


def test_the_input_section_says_how_each_kind_of_data_is_shaped():
    assert "- Input: float32 (N, C, H, W), 1 x 8 x 8.\n" in model_card(spec())
    resized = model_card(spec(input={"channels": 3, "size": [24, 24], "interpolation": "bicubic"}))
    assert "3 x 24 x 24 (resized bicubic)." in resized
    folder = model_card(spec(input={"kind": "folder", "channels": 3, "size": [224, 224], "interpolation": "bilinear",
                                    "crop_pct": 0.875}))
    assert "3 x 224 x 224: resized (bilinear) so the crop is 0.875 of the shorter side, then centre-cropped" in folder
    seg = model_card(spec(input={"dataset": "vaihingen", "kind": "segmentation", "channels": 3, "size": [32, 32]}))
    assert "whole tiles of any size (3 channels; trained on 32x32 patches); logits per pixel" in seg
    assert "(scikit-learn's 8x8 digits" in model_card(spec()) and "8-bit values divided by 255" in seg


def test_the_biases_section_says_what_became_of_repairs_biases():
    assert "exactly its architecture's tensors" in model_card(spec())
    folded = model_card(spec(biases={"folded": {"conv1": ["bn1"]}}))
    assert "REPAIR gave 1 bias-free layers a bias b" in folded and "Kept" not in folded
    assert "exactly its architecture's tensors" not in folded
    kept = model_card(spec(biases={"kept": ["fc1"], "note": "fc1 feeds a ReLU"}))
    assert "Kept (fc1 feeds a ReLU): the biases of fc1." in kept and "REPAIR gave" not in kept
    assert "exactly its architecture's tensors" not in kept
    timm_kept = model_card(spec(model="timm/resnet18.a1_in1k", biases={"kept": ["fc1"]}))
    assert 'papa.load_model("PATH")' in timm_kept and "timm alone refuses it" in timm_kept
    assert 'timm.create_model("local-dir:PATH"' in model_card(spec(model="timm/resnet18.a1_in1k"))
