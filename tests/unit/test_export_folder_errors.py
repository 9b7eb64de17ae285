"""An export folder that cannot be written or read back: replacing an earlier export that fails at the last rename
puts the earlier one back; a timm model timm cannot describe is one PapaError and nothing written; an export missing
its config.json, with a config.json or model.safetensors that cannot be read, or keeping a bias for a layer its
architecture lacks is one PapaError naming it when ``papa.load_model`` reads it."""

import errno
import json
import os

import pytest
import torch
from torch import nn

from papa import export
from papa.errors import PapaError
from papa.models import create_model
from tests.pipeline.test_export_families import spec_of


def _spec(model="digits_cnn", kwargs=None, channels=1, side=8) -> dict:
    return spec_of(model, {"width": 4} if kwargs is None else kwargs, channels, side) | {
        "biases": {"folded": {}, "kept": [], "note": ""}}


def _export(out, spec=None) -> dict:
    spec = spec or _spec()
    torch.manual_seed(0)
    export.save(export.architecture(spec), spec, out)
    return spec


def _contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_failed_replacement_puts_the_earlier_export_back(tmp_path, monkeypatch):
    out = tmp_path / "export"
    _export(out)
    earlier = _contents(out)
    rename = os.replace

    def refuse_the_new_folder(src, dst):
        if str(src).endswith(".tmp") and not str(src).endswith(".old.tmp"):
            raise OSError(errno.EIO, "Input/output error", str(src))
        rename(src, dst)

    monkeypatch.setattr(export.os, "replace", refuse_the_new_folder)
    spec = _spec()
    spec["network"]["member"] = 1
    with pytest.raises(OSError, match="Input/output error"):
        _export(out, spec)
    assert _contents(out) == earlier and export.read_spec(out)["network"]["member"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # neither the new folder nor the moved-away one


def test_a_timm_model_timm_cannot_describe_is_refused_and_nothing_written(tmp_path):
    """timm's config.json records the model's arguments as JSON: a layer class given as one cannot be."""
    spec = _spec("timm/test_resnet", {"act_layer": nn.SiLU}, 3, 32)
    with pytest.raises(PapaError) as err:
        _export(tmp_path / "export", spec)
    assert str(err.value).startswith("timm cannot write timm/test_resnet: ") and "'act_layer'" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def _no_config(out):
    (out / export.CONFIG).unlink()


def _config_not_json(out):
    (out / export.CONFIG).write_text('{"papa": ')


def _no_weights(out):
    (out / export.WEIGHTS).unlink()


def _weights_cut_short(out):
    data = (out / export.WEIGHTS).read_bytes()
    (out / export.WEIGHTS).write_bytes(data[: len(data) // 2])


def _bias_for_an_absent_layer(out):
    spec = json.loads((out / export.CONFIG).read_text())
    spec["biases"]["kept"] = ["conv3"]
    (out / export.CONFIG).write_text(json.dumps(spec))


BAD = {
    "no-config": (_no_config, "{out}: not a papa export (no config.json)"),
    "config-not-json": (_config_not_json, "{out}/config.json: unreadable (Expecting value: line 1 column 10"),
    "no-weights": (_no_weights, "{out}/model.safetensors: unreadable ("),
    "weights-cut-short": (_weights_cut_short, "{out}/model.safetensors: unreadable ("),
    "bias-for-an-absent-layer": (_bias_for_an_absent_layer,
                                 "the export keeps a bias for layer 'conv3', which its architecture lacks"),
}


@pytest.mark.parametrize("case", BAD)
def test_an_export_that_cannot_be_read_back_is_one_error(tmp_path, case):
    out = tmp_path / "export"
    _export(out)
    assert isinstance(export.load_model(out), type(create_model("digits_cnn", 3, in_channels=1, width=4)))
    change, message = BAD[case]
    change(out)
    with pytest.raises(PapaError) as err:
        export.load_model(out)
    assert str(err.value).startswith(message.format(out=out)), str(err.value)
