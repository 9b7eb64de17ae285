"""Where pretrained weights come from and what is refused: the hub cache is found as huggingface_hub finds it
(HF_HUB_CACHE, else HF_HOME/hub, else XDG_CACHE_HOME/huggingface/hub), a timm model without hub weights, an
unreadable weights file and a network without a classifier head are one PapaError each, and a timm architecture
with no pretrained config keeps the dataset's own normalization."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from papa import runs
from papa.data import load_dataset
from papa.errors import PapaError
from papa.models import create_model
from papa.models.pretrained import TIMM_CACHE, load_pretrained, pretrained_normalization
from tests.training.test_finetune import HUB_REPO, TINY_TIMM, fake_hub_cache, pretrained_source
from tests.unit.test_data import write_cifar


@pytest.mark.parametrize("variable, cache", [("HF_HOME", "hub"), ("XDG_CACHE_HOME", "huggingface/hub")])
def test_the_hub_cache_is_found_where_huggingface_hub_looks(tmp_path, monkeypatch, variable, cache):
    for name in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, str(tmp_path / "home"))
    with pytest.raises(PapaError) as err:
        create_model(f"timm/{TINY_TIMM}", num_classes=7, pretrained=TIMM_CACHE)
    assert f"in the hub cache {tmp_path / 'home' / cache};" in str(err.value)
    source = pretrained_source()
    fake_hub_cache(tmp_path / "home" / cache, source)
    tuned = create_model(f"timm/{TINY_TIMM}", num_classes=7, pretrained=TIMM_CACHE)
    assert torch.equal(tuned.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_the_hub_cache_defaults_to_the_home_folders_cache(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(PapaError, match=f"{HUB_REPO} in the hub cache {tmp_path / '.cache/huggingface/hub'};"):
        create_model(f"timm/{TINY_TIMM}", num_classes=7, pretrained=TIMM_CACHE)


def test_a_timm_model_without_hub_weights_is_refused():
    with pytest.raises(PapaError) as err:
        create_model("timm/test_vit4", num_classes=7, pretrained=TIMM_CACHE)
    assert str(err.value) == ("model.pretrained: timm: timm/test_vit4 has no Hugging Face hub weights; export weights "
                              "to a safetensors file and set model.pretrained to its path")


@pytest.mark.parametrize("content", [b"", b"not a safetensors file", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}"])
def test_an_unreadable_weights_file_is_named(tmp_path, content):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(content)
    with pytest.raises(PapaError, match=f"^cannot read pretrained weights {path}: "):
        create_model("digits_cnn", num_classes=10, pretrained=path)


def test_a_network_without_a_classifier_head_is_refused(tmp_path):
    """The head is what may differ from the file (a new number of classes): a network with none cannot say."""
    body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 1))
    save_file({k: v.contiguous() for k, v in body.state_dict().items()}, tmp_path / "w.safetensors")
    with pytest.raises(PapaError, match="^Sequential has no Linear classifier head$"):
        load_pretrained(body, tmp_path / "w.safetensors")


def test_an_architecture_without_a_pretrained_config_keeps_the_datasets_normalization(tmp_path):
    """timm knows no normalization for an architecture registered without pretrained configs (as a user's own): the
    run normalizes with the dataset's statistics, as from scratch."""
    write_cifar(tmp_path, "cifar10", per_file=4)
    exp = {"data": {"dataset": "cifar10", "root": str(tmp_path), "image_size": None, "options": {}},
           "model": {"name": "timm/papa_users_own_net", "pretrained": str(tmp_path / "w.safetensors")}}
    assert pretrained_normalization(exp["model"]["name"], exp["model"]["pretrained"]) is None
    splits = runs.load_data(exp)
    assert splits.mean == splits.test.mean == load_dataset("cifar10", tmp_path).mean
    exp["model"]["name"] = f"timm/{TINY_TIMM}"  # one timm has a pretrained config for: its statistics
    assert runs.load_data(exp).test.mean == (0.5, 0.5, 0.5) != splits.mean
