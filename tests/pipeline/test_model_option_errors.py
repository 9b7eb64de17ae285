"""A model a config describes wrongly stops the command in one line, exit status 2, with nothing written: a U-Net
``model.kwargs`` width or depth below 1 (`papa train`), and a timm model name whose pretrained tag the
architecture has no weights under (`papa prepare`, which reads the pretrained model's normalization, and
`papa train` of the architecture trained from scratch, which timm builds from the same tagged config)."""

from tests.helpers import run_cli, write_config
from tests.vaihingen_tiles import OPTIONS, write_tiles


def test_a_unet_without_width_is_refused_by_papa_train(tmp_path, capsys):
    tiles = write_tiles(tmp_path / "vaihingen")
    config = write_config(tmp_path / "config.yaml", {
        "data": {"dataset": "vaihingen", "root": str(tiles), "options": OPTIONS},
        "model": {"name": "unet", "kwargs": {"width": 0, "depth": 2}}, "population": {"size": 2},
        "train": {"epochs": 1, "batch_size": 4},
        "augment": {"grid": {"mixup": [0.0], "label_smoothing": [0.0], "cutmix": [0.0], "random_erasing": [0.0]}}})
    split = tmp_path / "split.json"
    assert run_cli(capsys, "prepare", "--config", str(config), "--out", str(split))[0] == 0
    before = sorted(tmp_path.rglob("*"))
    code, out, err = run_cli(capsys, "train", "--config", str(config), "--variant", "baseline", "--seed", "1",
                          "--split", str(split), "--out", str(tmp_path / "run"))
    assert (code, out) == (2, "")
    assert err == "papa train: error: UNet needs width >= 1 and depth >= 1, got 0 and 2\n"
    assert sorted(tmp_path.rglob("*")) == before


def test_a_timm_tag_without_weights_is_refused_by_papa_prepare(tmp_path, capsys):
    config = write_config(tmp_path / "config.yaml", {
        "model": {"name": "timm/test_resnet.no_such_tag", "kwargs": {}, "pretrained": "timm"}})
    code, out, err = run_cli(capsys, "prepare", "--config", str(config), "--out", str(tmp_path / "split.json"))
    assert (code, out) == (2, "")
    assert err == ("papa prepare: error: timm/test_resnet.no_such_tag: Invalid pretrained tag (no_such_tag) for "
                   "test_resnet.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_a_timm_tag_without_weights_is_refused_by_papa_train_from_scratch(tmp_path, capsys):
    config = write_config(tmp_path / "config.yaml", {
        "model": {"name": "timm/test_resnet.no_such_tag", "kwargs": {}, "pretrained": None}})
    split = tmp_path / "split.json"
    assert run_cli(capsys, "prepare", "--config", str(config), "--out", str(split))[0] == 0
    code, out, err = run_cli(capsys, "train", "--config", str(config), "--variant", "baseline", "--seed", "1",
                          "--split", str(split), "--out", str(tmp_path / "run"))
    assert (code, out) == (2, "")
    assert err == ("papa train: error: timm/test_resnet.no_such_tag: Invalid pretrained tag (no_such_tag) for "
                   "test_resnet.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "split.json"]
