"""`papa fake-data`: random datasets in the real on-disk formats, read by the real loaders, and random weights
in the Hugging Face hub cache layout, marked fake (a warning outside smoke scale)."""

import pickle
from pathlib import Path

import pytest
import torch
import yaml

from papa import fakedata
from papa.data import load_dataset
from papa.errors import PapaError
from papa.models import create_model
from papa.models import pretrained as pretrained_module
from tests.helpers import REPO, papa, write_config

TINY_TIMM = "timm/test_resnet.r160_in1k"


def _config(tmp_path: Path) -> Path:
    """One config using every dataset format (one under its own data.root) and a timm model from the hub."""
    path = write_config(tmp_path / "c.yaml")
    raw = yaml.safe_load(path.read_text())
    tiny = raw["experiments"]["tiny"]
    raw["experiments"] = {
        "c10": {**tiny, "data": {"dataset": "cifar10"}},
        "uci": {**tiny, "data": {"dataset": "optdigits", "options": {"scaling": "raw"}}},
        "c100": {**tiny, "data": {"dataset": "cifar100", "root": "elsewhere/c100"}},
        "inet": {**tiny, "data": {"dataset": "imagenet"}},
        "tiles": {**tiny, "data": {"dataset": "vaihingen", "options": {"train_tiles": [1, 3], "val_tiles": [5],
                                                                         "test_tiles": [2, 40]}}},
        "ft": {**tiny, "model": {"name": TINY_TIMM, "pretrained": "timm"}},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fake")
    lines = fakedata.write_all(tmp / "data", [_config(tmp)], tmp / "hub")
    return tmp, lines


def test_every_dataset_a_config_uses_is_written_where_it_looks(written):
    tmp, lines = written
    data = tmp / "data"
    assert len(lines) == 6 and (data / "FAKE_DATA.txt").is_file()
    uci = load_dataset("optdigits", data / "optdigits", scaling="raw")
    assert (len(uci.train), len(uci.test), uci.num_classes) == (fakedata.OPTDIGITS_TRAIN, fakedata.OPTDIGITS_TEST, 10)
    c10 = load_dataset("cifar10", data / "cifar10")
    assert (len(c10.train), len(c10.test), c10.num_classes) == (fakedata.CIFAR_TRAIN, fakedata.CIFAR_TEST, 10)
    assert c10.train.images.dtype == torch.uint8 and c10.train.images.shape[1:] == (3, 32, 32)
    c100 = load_dataset("cifar100", data / "elsewhere" / "c100")
    assert c100.num_classes == 100 and int(c100.train.labels.max()) < 100
    inet = load_dataset("imagenet", data / "imagenet", image_size=32)
    assert inet.num_classes == fakedata.IMAGENET_CLASSES
    assert len(inet.train) == fakedata.IMAGENET_CLASSES * fakedata.IMAGENET_TRAIN
    assert all(Path(p).suffix == ".JPEG" for p, _ in inet.train.folder.samples)
    tiles = load_dataset("vaihingen", data / "vaihingen", train_tiles=[1, 3], val_tiles=[5], test_tiles=[2, 40],
                         patch_size=32)
    assert tiles.train.tiles == (1, 3, 5) and tiles.test.tiles == (2, 40)
    assert (data / "vaihingen" / "gts_complete" / "top_mosaic_09cm_area40.tif").is_file()  # a test tile's label
    assert all(len(torch.unique(y)) == 6 for y in tiles.train.labels)  # every class in every tile


def test_cifar_archives_are_python_pickles_as_released(written):
    base = written[0] / "data" / "cifar10" / "cifar-10-batches-py"
    assert sorted(p.name for p in base.iterdir()) == ["batches.meta", *[f"data_batch_{i}" for i in range(1, 6)],
                                                      "test_batch"]
    raw = (base / "data_batch_1").read_bytes()
    assert raw[:2] == b"\x80\x02"  # pickle protocol 2
    batch = pickle.loads(raw)
    assert batch["data"].shape == (fakedata.CIFAR_TRAIN // 5, 3072) and batch["data"].dtype.name == "uint8"
    # the keys of the released archives, CIFAR-100's superclasses included
    assert set(batch) == {"batch_label", "labels", "data", "filenames"}
    assert set(pickle.loads((base / "batches.meta").read_bytes())) == {"label_names", "num_cases_per_batch",
                                                                       "num_vis"}
    c100 = written[0] / "data" / "elsewhere" / "c100" / "cifar-100-python"
    for part in ("train", "test"):
        assert set(pickle.loads((c100 / part).read_bytes())) == {"batch_label", "fine_labels", "coarse_labels",
                                                                  "data", "filenames"}
    assert set(pickle.loads((c100 / "meta").read_bytes())) == {"fine_label_names", "coarse_label_names"}


def test_fake_weights_load_from_the_hub_cache_and_warn_outside_smoke_scale(written, monkeypatch, capsys):
    tmp, _ = written
    repo = tmp / "hub" / "models--timm--test_resnet.r160_in1k"
    link = repo / "snapshots" / fakedata.COMMIT / "model.safetensors"
    assert (repo / "refs" / "main").read_text() == fakedata.COMMIT and link.is_symlink()
    assert link.resolve().parent == (repo / "blobs").resolve()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp / "hub"))
    monkeypatch.setattr(pretrained_module, "_warned", set())
    create_model(TINY_TIMM, num_classes=7, pretrained="timm", fake_ok=True)
    assert capsys.readouterr().err == ""
    for _ in range(2):
        model = create_model(TINY_TIMM, num_classes=7, pretrained="timm")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "papa fake-data" in err and "smoke" in err  # one line, once per process
    from safetensors.torch import load_file

    weights = load_file(link)
    assert torch.equal(model.conv1[0].weight, weights["conv1.0.weight"])
    assert weights["fc.weight"].shape[0] == 1000  # the pretrained head, replaced for 7 classes
    real = tmp / "real.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, real)
    create_model(TINY_TIMM, num_classes=7, pretrained=real)
    assert capsys.readouterr().err == ""  # real weights: no warning


def test_fake_data_cli(tmp_path):
    config = write_config(tmp_path / "c.yaml", {"data": {"dataset": "cifar10"}})
    done = papa("fake-data", "--root", str(tmp_path / "d"), "--config", str(config), check=True)
    assert "CIFAR-10" in done.stdout and (tmp_path / "d" / "cifar10" / "cifar-10-batches-py").is_dir()
    assert not (tmp_path / "hub").exists()
    bad = papa("fake-data", "--root", str(tmp_path / "d"), "--config", str(tmp_path / "missing.yaml"))
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "missing.yaml" in bad.stderr
    with pytest.raises(PapaError, match="no config files"):
        fakedata.write_all(tmp_path / "d", [], None)


def test_fake_weights_are_the_same_bytes_every_time(tmp_path):
    """The blob is named by its SHA-256: the same model's fake weights must be the same file on every write."""
    blobs = {fakedata.write_hub_weights(tmp_path / str(i), TINY_TIMM.removeprefix("timm/")).resolve().read_bytes()
             for i in range(6)}
    assert len(blobs) == 1


def test_without_configs_it_reads_every_config_of_the_checkout_it_runs_in(monkeypatch):
    monkeypatch.chdir(REPO)
    configs = fakedata.default_configs()
    assert Path("config/config.yaml") in configs and Path("config/paper/a10.yaml") in configs
    assert configs == sorted(p.relative_to(REPO) for p in fakedata.default_configs(REPO))
