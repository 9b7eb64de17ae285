"""Every architecture family of the paper configs, exported: a population of two, its REPAIRed average soup (REPAIR
as the configs run it: ``repair.layers``), exported, loaded into a freshly built stock network with
``strict=True`` (timm models through ``timm.create_model("local-dir:...")`` too) and giving the soup's logits.

Members start from one initialization and are then perturbed, as fine-tuned or PAPA-trained members are close to
one another: the average of two unrelated random networks collapses its features to almost nothing, and REPAIR
then divides by (almost) zero."""

import pytest
import torch
from safetensors.torch import load_file

import papa
from papa import export
from papa.models import create_model
from papa.population import Population
from papa.soups import make_soups

# model, kwargs, channels, side, repair.layers of the paper config, soup biases folded (None: any number > 0)
FAMILIES = {
    "digits_cnn": ("digits_cnn", {"width": 4}, 1, 8, "conv+linear", 2),  # config/config.yaml
    "logreg": ("logreg", {}, 1, 8, "conv+linear", 0),  # config/paper/a10.yaml: the logits only, nothing to repair
    "vgg-bn": ("vgg11_bn", {}, 3, 32, "conv", 0),  # its convolutions have biases: REPAIR adds none
    "resnet18-cifar": ("resnet18_cifar", {}, 3, 8, "conv", 20),
    "resnet20": ("resnet20", {"shortcut": "zero-pad", "init": "kaiming"}, 3, 8, "conv", 19),  # table12.yaml
    "resnet50": ("resnet50", {}, 3, 32, "conv", 53),
    "unet": ("unet", {"width": 4, "depth": 2}, 3, 16, "conv+linear", 10),
    "convit-ti": ("timm/convit_tiny.fb_in1k", {"img_size": 32}, 3, 32, "conv", 0),  # table1_finetune.yaml
    "eva02-ti": ("timm/eva02_tiny_patch14_224.mim_in22k", {"img_size": 28}, 3, 28, "conv", 0),
    "efficientnetv2-s": ("timm/tf_efficientnetv2_s.in21k", {}, 3, 32, "conv", 110),
}
SLOW = {"efficientnetv2-s"}  # REPAIR rescales its 171 convolutions one after another: about a minute on one core
FLOAT64 = {"efficientnetv2-s"}
"""Built, repaired, exported and compared in float64: at random initialization on tiny images this network is so
sensitive that its float32 logits differ from its float64 ones by as much as their size (measured: 1.7e5 on
logits of 2.2e5), so float32 could not tell an exact fold from a wrong one."""


def spec_of(model: str, kwargs: dict, channels: int, side: int, classes: int = 3) -> dict:
    """What papa.export.run_spec gives for a run of this model (and a model card's worth of description)."""
    kind = "segmentation" if model == "unet" else "array"
    return {
        "format": export.FORMAT, "library": "papa", "model": model, "kwargs": kwargs,
        "input": {"dataset": "synthetic", "kind": kind, "channels": channels, "size": [side, side],
                  "mean": [0.5] * channels, "std": [0.25] * channels, "interpolation": None, "crop_pct": 1.0},
        "classes": [f"class{k}" for k in range(classes)],
        "network": {"experiment": "families", "variant": "papa", "seed": 0, "population": 2,
                    "soup": "avg_soup_repair", "member": None, "members": [0, 1], "repaired": True, "aligned": False,
                    "metric": "accuracy", "test_accuracy": None, "val_accuracy": None},
        "config": {"model": {"name": model, "kwargs": kwargs, "pretrained": None}}, "versions": {},
    }


def repaired_soup(model: str, kwargs: dict, channels: int, side: int, layers: str,
                  dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The REPAIRed average soup of a population of two (papa.soups.make_soups, one REPAIR batch)."""
    pop = Population.from_factory(
        lambda: create_model(model, num_classes=3, in_channels=channels, **kwargs).to(dtype), 2, seed=0, same_init=True
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in pop.params.values():
            if t.is_floating_point():
                t[1].add_(torch.randn(t[1].shape, generator=g), alpha=0.02 * float(t[0].std().nan_to_num(0.1)) + 1e-3)
    batches = [torch.randn(4, channels, side, side, generator=g, dtype=dtype)]
    scores = iter([1.0, 1.0, 0.0])  # both members, then the pair scoring lower: the greedy soup is one member
    soups, _ = make_soups(pop, lambda _m: next(scores), batches, iters=1, layers=layers)
    return soups["avg_soup_repair"].eval()


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in FAMILIES])
def test_the_exported_soup_loads_into_the_stock_architecture(family, tmp_path, one_thread):
    model, kwargs, channels, side, layers, n_folded = FAMILIES[family]
    dtype = torch.float64 if family in FLOAT64 else torch.float32
    soup = repaired_soup(model, kwargs, channels, side, layers, dtype)
    spec = spec_of(model, kwargs, channels, side)
    folded, fold = export.to_architecture(soup.state_dict(), spec)
    assert len(fold.folded) == n_folded and fold.kept == []
    added = set(soup.state_dict()) - set(create_model(model, num_classes=3, in_channels=channels,
                                                      **kwargs).state_dict())
    assert added == {f"{name}.bias" for name in fold.folded}  # every bias REPAIR added is folded
    spec["biases"] = {"folded": fold.folded, "kept": fold.kept, "note": fold.note}
    export.save(folded, spec, tmp_path / "export")

    x = torch.randn(3, channels, side, side, generator=torch.Generator().manual_seed(2), dtype=dtype)
    expected = _logits(soup, x)
    # float32 rounding: the soup's own logits differ from its float64 ones by up to 3e-5 of the largest (ResNet-50)
    tol = {"rtol": 1e-4, "atol": 1e-4 * max(1.0, float(expected.abs().max()))}
    stock = create_model(model, num_classes=3, in_channels=channels, **kwargs).to(dtype)
    stock.load_state_dict(load_file(tmp_path / "export" / "model.safetensors"), strict=True)
    torch.testing.assert_close(_logits(stock, x), expected, **tol)
    torch.testing.assert_close(_logits(papa.load_model(tmp_path / "export"), x), expected, **tol)
    if model.startswith("timm/"):
        import timm

        local = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True, dtype=dtype)
        torch.testing.assert_close(_logits(local, x), expected, **tol)
        cfg = timm.data.resolve_data_config({}, model=local)  # the run's input size and normalization
        assert cfg["input_size"] == (channels, side, side) and tuple(cfg["mean"]) == (0.5,) * channels
        assert local.num_classes == 3 and local.pretrained_cfg["label_names"] == spec["classes"]
    assert (tmp_path / "export" / "README.md").read_text().startswith("---\n")


def test_biases_that_feed_no_batchnorm_are_kept_and_papa_load_model_restores_them(tmp_path, one_thread):
    """REPAIR of linear layers too (repair.layers: conv+linear) gives ConViT's bias-free query-key and value
    projections a bias no BatchNorm follows: the export keeps and lists them, timm alone refuses the file, and
    papa.load_model gives those layers a bias first."""
    model, kwargs = "timm/convit_tiny.fb_in1k", {"img_size": 32}
    soup = repaired_soup(model, kwargs, 3, 32, "conv+linear")
    spec = spec_of(model, kwargs, 3, 32)
    folded, fold = export.to_architecture(soup.state_dict(), spec)
    assert fold.folded == {}
    stock = create_model(model, num_classes=3, **kwargs)
    bias_free = [n for n, m in stock.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is None]
    assert len(bias_free) == 22 and fold.kept == bias_free  # blocks 0-9: qk, v; the class-attention blocks: qkv
    spec["biases"] = {"folded": fold.folded, "kept": fold.kept, "note": fold.note}
    export.save(folded, spec, tmp_path / "export")
    assert export.read_spec(tmp_path / "export")["biases"]["kept"] == fold.kept
    card = (tmp_path / "export" / "README.md").read_text()
    assert "blocks.0.attn.qk" in card and "papa.load_model" in card
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(papa.load_model(tmp_path / "export"), x), _logits(soup, x))
    import timm

    with pytest.raises(RuntimeError, match="Unexpected key"):
        timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True)
