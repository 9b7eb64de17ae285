"""Fine-tuning pretrained models (paper §4.2, Table 1's fine-tuning rows): pretrained weights from a file or the
local Hugging Face hub cache, CIFAR batches resized to the model's input size, the pretrained model's
normalization, and Table 1's fine-tuning recipe run end to end on a tiny timm model."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from papa import config as cfg
from papa import runs
from papa.data import load_dataset, make_stream
from papa.data.augment import Policy, eval_transform
from papa.data.datasets import CIFAR100_MEAN
from papa.data.stream import eval_batches
from papa.errors import PapaError
from papa.models import create_model
from papa.models.pretrained import TIMM_CACHE, head_keys
from tests.unit.test_data import write_cifar

ROOT = Path(__file__).resolve().parents[2]
TINY_TIMM = "test_resnet"  # timm's tiny test ResNet (0.37M parameters); hub repo timm/test_resnet.r160_in1k
HUB_REPO = "timm/test_resnet.r160_in1k"


def save_state(model: torch.nn.Module, path: Path, drop: str | None = None) -> Path:
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != drop}
    save_file(state, path)
    return path


def pretrained_source(num_classes: int = 1000) -> torch.nn.Module:
    torch.manual_seed(123)
    return create_model(f"timm/{TINY_TIMM}", num_classes=num_classes)


def fake_hub_cache(cache: Path, model: torch.nn.Module) -> Path:
    """The layout huggingface_hub writes: refs/main names the snapshot holding model.safetensors."""
    repo = cache / f"models--{HUB_REPO.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    return save_state(model, repo / "snapshots" / commit / "model.safetensors")


def assert_body_loaded_head_fresh(tuned, source):
    head = set(head_keys(tuned))
    assert head == {"fc.weight", "fc.bias"}
    for key, value in source.state_dict().items():
        if key not in head:
            assert torch.equal(tuned.state_dict()[key], value), key
    assert tuned.fc.weight.shape == (7, tuned.fc.in_features)


# pretrained weights -----------------------------------------------------------------------------------------
def test_timm_model_from_a_safetensors_file_gets_a_fresh_head(tmp_path):
    source = pretrained_source()
    path = save_state(source, tmp_path / "w.safetensors")
    torch.manual_seed(0)
    fresh = create_model(f"timm/{TINY_TIMM}", num_classes=7).fc.weight.clone()
    torch.manual_seed(0)
    tuned = create_model(f"timm/{TINY_TIMM}", num_classes=7, pretrained=str(path))
    assert_body_loaded_head_fresh(tuned, source)
    assert torch.equal(tuned.fc.weight, fresh)  # the head is exactly a fresh initialization


def test_weights_read_from_the_local_hub_cache(tmp_path, monkeypatch):
    source = pretrained_source()
    fake_hub_cache(tmp_path / "hub", source)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    tuned = create_model(f"timm/{TINY_TIMM}", num_classes=7, pretrained=TIMM_CACHE)
    assert_body_loaded_head_fresh(tuned, source)
    # the tag may be spelled out in the model name
    tagged = create_model("timm/test_resnet.r160_in1k", num_classes=7, pretrained=TIMM_CACHE)
    assert torch.equal(tagged.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_absent_hub_cache_is_a_clean_error_saying_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(PapaError) as err:
        create_model(f"timm/{TINY_TIMM}", num_classes=7, pretrained=TIMM_CACHE)
    message = str(err.value)
    assert "\n" not in message
    assert all(s in message for s in ("model.safetensors", HUB_REPO, str(tmp_path / "empty"), "huggingface-cli"))
    with pytest.raises(PapaError, match="timm/<name> models only"):
        create_model("resnet20", num_classes=10, pretrained=TIMM_CACHE)


def test_absent_file_names_the_path(tmp_path):
    with pytest.raises(PapaError, match="absent.safetensors"):
        create_model(f"timm/{TINY_TIMM}", num_classes=7, pretrained=tmp_path / "absent.safetensors")


def test_weights_that_do_not_fit_the_body_are_refused(tmp_path):
    source = pretrained_source()
    missing = save_state(source, tmp_path / "missing.safetensors", drop="conv1.0.weight")
    with pytest.raises(PapaError, match=r"1 missing \(e\.g\. conv1\.0\.weight\)"):
        create_model(f"timm/{TINY_TIMM}", num_classes=7, pretrained=missing)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    state["extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "extra.safetensors")
    with pytest.raises(PapaError, match=r"1 unexpected \(e\.g\. extra\.weight\)"):
        create_model(f"timm/{TINY_TIMM}", num_classes=7, pretrained=tmp_path / "extra.safetensors")
    # another width: the body's shapes differ (the head alone may differ)
    wide = create_model(f"timm/{TINY_TIMM}", num_classes=7, in_channels=1)
    with pytest.raises(PapaError, match="of another shape .*conv1.0.weight"):
        load = save_state(wide, tmp_path / "gray.safetensors")
        create_model(f"timm/{TINY_TIMM}", num_classes=7, pretrained=load)


# resizing and normalization -------------------------------------------------------------------------------
def test_cifar_batches_are_resized_on_the_device_for_train_and_eval(tmp_path):
    write_cifar(tmp_path, "cifar10", per_file=8)
    splits = load_dataset("cifar10", tmp_path, image_size=40)
    assert splits.image_size == 40 and splits.train.images.shape[-1] == 32  # stored at 32, served at 40
    policies = [Policy(crop_padding=4, flip=True, cutout=8), Policy(randaugment="rand-m4-n1-mstd1.0-p1.0")]
    stream = make_stream(splits, range(32), 16, policies, seed=0)
    x, targets = next(iter(stream.epoch(0)))
    assert x.shape == (2, 16, 3, 40, 40) and targets.shape == (2, 16, 10)
    gen = torch.Generator().manual_seed(0)
    assert next(iter(stream.member_batches(1, gen, 1))).shape == (16, 3, 40, 40)
    xs, labels = next(iter(eval_batches(splits.test, batch_size=5)))
    assert xs.shape == (5, 3, 40, 40) and labels.shape == (5,)
    native = load_dataset("cifar10", tmp_path)
    assert next(iter(eval_batches(native.test, batch_size=5)))[0].shape == (5, 3, 32, 32)


def test_resize_is_bilinear_antialiased_and_commutes_with_normalization():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.4, 0.3)
    x = eval_transform(images, mean, std, 20)

    def expected(size: int, antialias: bool = True):
        pixels = torch.nn.functional.interpolate(images.float() / 255, size=(size, size), mode="bilinear",
                                                 align_corners=False, antialias=antialias)
        return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    assert x.shape == (2, 3, 20, 20) and torch.allclose(x, expected(20), atol=1e-5)
    small = eval_transform(images, mean, std, 4)  # shrinking averages (antialias), it does not skip pixels
    assert torch.allclose(small, expected(4), atol=1e-5) and not torch.allclose(small, expected(4, False), atol=1e-2)
    assert torch.equal(eval_transform(images, mean, std, 8), eval_transform(images, mean, std))


def test_pretrained_timm_models_get_their_own_normalization(tmp_path):
    write_cifar(tmp_path, "cifar100", per_file=10)
    exp = {"data": {"dataset": "cifar100", "root": str(tmp_path), "image_size": None,
                    "options": {}},
           "model": {"name": "timm/eva02_tiny_patch14_224.mim_in22k", "pretrained": TIMM_CACHE}}
    splits = runs.load_data(exp)
    clip_mean = (0.48145466, 0.4578275, 0.40821073)
    assert splits.mean == splits.train.mean == splits.test.mean == pytest.approx(clip_mean)
    exp["model"]["pretrained"] = None  # trained from scratch: the dataset's own statistics
    assert runs.load_data(exp).train.mean == pytest.approx((0.5071, 0.4865, 0.4409))


# Table 1's fine-tuning recipe, end to end -------------------------------------------------------------------
def test_finetune_config_runs_end_to_end_on_a_tiny_timm_model(tmp_path, one_thread):
    """The first experiment of config/paper/table1_finetune.yaml, shrunk (tiny timm model, 4 epochs, one of
    them head-only, fake CIFAR-100 served at 40 x 40), through prepare, train, soups and evaluate."""
    write_cifar(tmp_path / "data", "cifar100", per_file=120)
    source = pretrained_source()
    save_state(source, tmp_path / "pretrained.safetensors")
    config = cfg.load_config(ROOT / "config" / "paper" / "table1_finetune.yaml")
    config["experiments"] = {"ft": cfg.deep_merge(config["experiments"]["cifar100-convitti-ft-p5"], {
        "data": {"image_size": 40, "root": str(tmp_path / "data"), "val_fraction": 0.1},
        "model": {"name": f"timm/{TINY_TIMM}", "pretrained": str(tmp_path / "pretrained.safetensors")},
        "population": {"size": 2},
        "train": {"epochs": 4, "freeze_epochs": 1, "batch_size": 16, "eval_batch_size": 64, "device": "cpu",
                  "engine": "loop"},
        "averaging": {"papa-all": {"every": 2, "repair_iters": 1}},
        "soups": {"repair_iters": 1},
    })}
    exp = cfg.experiment(config, "ft")
    assert exp["train"]["optimizer"]["name"] == "adamw" and exp["train"]["schedule"]["lr_min"] == 1e-6
    runs.prepare(exp, tmp_path / "split.json")
    run = tmp_path / "run"
    trainer = runs.train(exp, "papa-all", 1, tmp_path / "split.json", run, progress=False)
    # the config runs the scripts' CIFAR normalization (fidelity finetune_normalization: authors), not the
    # pretrained network's (test_resnet's cfg: 0.5)
    assert trainer.stream.image_size == 40 and trainer.stream.mean == pytest.approx(CIFAR100_MEAN)
    assert trainer.stream.resize_pixels  # and resizes as PIL resized the uint8 image (finetune_resize: authors)
    rows = [r for r in trainer.progress.history if r["phase"] == "end"]
    assert [r["lr"] for r in rows][-1] == pytest.approx(1e-6, rel=1e-3)  # cosine 1e-4 -> 1e-6
    assert any(r["phase"] == "after_avg" for r in trainer.progress.history)  # averaged at epoch 2
    runs.soups(exp, tmp_path / "split.json", run)
    metrics = runs.evaluate(exp, tmp_path / "split.json", run)
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert all(0 <= metrics[k] <= 100 for k in ("ensemble", "avg_soup", "greedy_soup_repair"))
    # the body started from the pretrained weights and moved after the head-only epoch
    body = trainer.pop.params["layer1.0.conv1.weight"]
    assert not torch.equal(body[0], source.layer1[0].conv1.weight)


def test_head_only_epochs_keep_the_pretrained_body(tmp_path, one_thread):
    write_cifar(tmp_path / "data", "cifar10", per_file=24)
    source = pretrained_source()
    save_state(source, tmp_path / "pretrained.safetensors")
    from tests.helpers import tiny_experiment

    exp = tiny_experiment(
        data={"dataset": "cifar10", "root": str(tmp_path / "data"), "image_size": 24},
        model={"name": f"timm/{TINY_TIMM}", "pretrained": str(tmp_path / "pretrained.safetensors")},
        population={"size": 2},
        train={"epochs": 1, "freeze_epochs": 1, "batch_size": 16, "optimizer": {"name": "adamw", "lr": 1e-3}},
    )
    exp["model"]["kwargs"] = {}  # TINY's digits_cnn width
    splits = runs.load_data(exp)
    split = {"train": list(range(100)), "val": list(range(100, 120))}
    from papa.train import Trainer

    trainer = Trainer(exp, "baseline", 1, splits, split, progress=False)
    head_before = trainer.pop.params["fc.weight"].clone()
    trainer.fit()
    for name, value in source.state_dict().items():
        if name.startswith("fc.") or not value.is_floating_point() or name.endswith(("running_mean", "running_var")):
            continue
        assert torch.equal(trainer.pop.params[name][0], value), name
    assert not torch.equal(trainer.pop.params["fc.weight"], head_before)


@pytest.mark.slow
def test_cli_reports_absent_cached_weights_in_one_line(tmp_path, monkeypatch):
    """`papa train` with `pretrained: timm` and an empty hub cache: one line naming what was looked for, a
    non-zero exit and no output written. An option the timm architecture does not take is one line too."""
    from tests.helpers import papa, write_config

    config = write_config(tmp_path / "c.yaml", {
        "data": {"image_size": 16},
        "model": {"name": f"timm/{TINY_TIMM}", "pretrained": TIMM_CACHE},
        "population": {"size": 2},
    })
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    papa("prepare", "--config", str(config), "--out", str(tmp_path / "split.json"), check=True)
    train = ("train", "--config", str(config), "--variant", "baseline", "--seed", "1", "--split",
             str(tmp_path / "split.json"), "--out", str(tmp_path / "run"))
    bad = papa(*train)  # TINY's model.kwargs (digits_cnn's width) are still there
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "width" in bad.stderr, bad.stderr
    raw = yaml.safe_load(config.read_text())
    raw["experiments"]["tiny"]["model"]["kwargs"] = {}
    config.write_text(yaml.safe_dump(raw))
    result = papa(*train)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and HUB_REPO in lines[0] and "model.safetensors" in lines[0], result.stderr
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())
