"""Vaihingen segmentation (paper A.1.3, A.8) on tiny generated tiles in the real ISPRS layout: tile and
colour decoding, the fixed split, patch sampling, per-pixel targets and loss, the U-Net, accuracy and F1
math, one tiny train + soups + evaluate, Tables 10-11 rendering, and one-line errors for bad data."""

import contextlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from papa import runs
from papa.data import Policy, load_dataset, load_split, make_stream
from papa.data.augment import mix
from papa.data.vaihingen import CLASSES, TileDataset, decode_labels, tile_name
from papa.engines import soft_cross_entropy
from papa.errors import PapaError
from papa.models import create_model
from papa.report import aggregate, plan, tables
from papa.segmentation import confusion, f1_dict, f1_scores, pixel_accuracy, tile_confusions
from tests.helpers import papa, tiny_experiment, write_config
from tests.vaihingen_tiles import COLOURS, OPTIONS, TEST, TRAIN, VAL, tile_classes, write_tiles

UNET = {"name": "unet", "kwargs": {"width": 4, "depth": 2}}


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    return write_tiles(tmp_path_factory.mktemp("vaihingen") / "vaihingen")


def experiment(root, **overrides):
    base = {"data": {"dataset": "vaihingen", "root": str(root), "options": OPTIONS}, "model": UNET,
            "train": {"epochs": 2, "batch_size": 4, "optimizer": {"lr": 0.01}},
            "augment": {"flip": True, "grid": {"mixup": [0.0, 0.4], "label_smoothing": [0.0, 0.1],
                                               "cutmix": [0.0], "random_erasing": [0.0]}}}
    from papa.config import deep_merge

    return tiny_experiment(**deep_merge(base, overrides))


# data ------------------------------------------------------------------------------------------------
def test_tiles_and_labels_load_in_the_split_order(tiles):
    splits = load_dataset("vaihingen", tiles, **OPTIONS)
    assert splits.kind == "segmentation" and splits.num_classes == 6 and splits.in_channels == 3
    assert splits.train.tiles == TRAIN + VAL and splits.test.tiles == TEST
    assert splits.fixed_split == {"train": [0, 1, 2], "val": [3, 4]}
    for data in (splits.train, splits.test):
        for t, image, labels in zip(data.tiles, data.images, data.labels, strict=True):
            assert image.dtype == torch.uint8 and image.shape == (3, 64, 80)
            assert torch.equal(labels, torch.from_numpy(tile_classes(t)))
            on_disk = np.array(Image.open(tiles / "top" / tile_name(t)))
            assert torch.equal(image, torch.from_numpy(on_disk).permute(2, 0, 1))
    # mean/std over the training tiles only, per channel
    pixels = torch.cat([x.flatten(1) for x in splits.train.images[:3]], 1).double() / 255
    assert splits.mean == pytest.approx(pixels.mean(1).tolist())
    assert splits.std == pytest.approx(pixels.std(1).tolist())


def test_palette_labels_and_other_image_modes(tmp_path):
    root = write_tiles(tmp_path / "v", tiles=(1, 5, 2), h=40, w=40)
    label = root / "gts_for_participants" / tile_name(1)
    Image.open(label).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(label)
    options = {"train_tiles": [1], "val_tiles": [5], "test_tiles": [2], "patch_size": 16}
    splits = load_dataset("vaihingen", root, **options)
    assert torch.equal(splits.train.labels[0], torch.from_numpy(tile_classes(1, 40, 40)))
    Image.open(root / "top" / tile_name(5)).convert("L").save(root / "top" / tile_name(5))
    with pytest.raises(PapaError, match="expected a 3-channel 8-bit image, found mode L"):
        load_dataset("vaihingen", root, **options)
    with pytest.raises(PapaError, match="smaller than the 64x64 patches"):
        load_dataset("vaihingen", write_tiles(tmp_path / "w", tiles=(1, 5, 2), h=40, w=40),
                     **(options | {"patch_size": 64}))
    write_tiles(root, tiles=(5,), h=40, w=40)  # back to RGB
    (root / "gts_complete").rename(root / "test_labels")
    with pytest.raises(PapaError, match=r"no label for tile 2: .* \(or in gts_complete/\)"):
        load_dataset("vaihingen", root, **options)
    relabelled = load_dataset("vaihingen", root, **options, label_dirs=["gts_for_participants", "test_labels"])
    assert torch.equal(relabelled.test.labels[0], torch.from_numpy(tile_classes(2, 40, 40)))
    with pytest.raises(PapaError, match=r"tiles \[1\] are in more than one"):
        load_dataset("vaihingen", root, **(options | {"test_tiles": [1]}))


def test_label_colours_decode_to_the_six_classes():
    rgb = np.array([[c for c in CLASSES.values()]], dtype=np.uint8)  # (1, 6, 3)
    assert decode_labels(rgb).tolist() == [[0, 1, 2, 3, 4, 5]]
    rgb[0, 4] = (10, 20, 30)
    with pytest.raises(PapaError, match=r"unknown label colour \(10, 20, 30\) at pixel \(x=4, y=0\)"):
        decode_labels(rgb, "gt.tif")


def test_prepare_writes_the_fixed_validation_tiles(tiles, tmp_path):
    exp = experiment(tiles)
    runs.prepare(exp, tmp_path / "split.json")
    split = load_split(tmp_path / "split.json", expect_n=5)
    assert (split["train"], split["val"]) == ([0, 1, 2], [3, 4]) and split["meta"]["fixed"]


# patches ---------------------------------------------------------------------------------------------
def coded_tiles(n=3, h=40, w=48) -> TileDataset:
    """Tiles whose first channel is 40 x the label: any patch's image tells its labels."""
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(6, (h + 8 * i, w), generator=g) for i in range(n)]
    images = [torch.stack([y * 40, torch.full_like(y, 7), y * 0 + i]).to(torch.uint8) for i, y in enumerate(labels)]
    return TileDataset(images, labels, tuple(range(1, n + 1)), 6, (0.0,) * 3, (1 / 255,) * 3, "coded",
                       tuple(CLASSES), patch_size=16, epoch_size=20)


def test_patches_are_seeded_per_member_and_keep_labels_on_their_pixels():
    data = coded_tiles()
    policies = [Policy(flip=True), Policy(flip=True, label_smoothing=0.1)]
    stream = make_stream_for(data, policies, seed=5)
    assert stream.steps_per_epoch == 5
    batches = list(stream.epoch(0))
    assert len(batches) == 5
    x, t = batches[0]
    assert x.shape == (2, 4, 3, 16, 16) and t.shape == (2, 4, 6, 16, 16)
    assert torch.allclose(t.sum(2), torch.ones(2, 4, 16, 16))
    for x, t in batches:  # unnormalized (mean 0, std 1/255): the first channel is 40 x label
        assert torch.equal(t[0].argmax(1), (x[0, :, 0] / 40).round().long())
        assert torch.equal(t[1].argmax(1), (x[1, :, 0] / 40).round().long())
        assert set(x[:, :, 2].unique().tolist()) <= {0.0, 1.0}  # tile 2 is validation: never drawn
    again = list(make_stream_for(data, policies, seed=5).epoch(0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    other_seed = next(make_stream_for(data, policies, seed=6).epoch(0))[0]
    assert not torch.equal(other_seed, batches[0][0])
    assert not torch.equal(next(stream.epoch(1))[0], batches[0][0])
    # a member's patches do not depend on the other members
    alone = next(make_stream_for(data, policies[:1], seed=5).epoch(0))[0]
    assert torch.equal(alone[0], batches[0][0][0])
    # flips happen, both ways: some patch of the epoch differs from its unflipped cut
    flat = list(make_stream_for(data, [Policy(), Policy()], seed=5).epoch(0))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(batches, flat, strict=True))


def test_patches_of_policies_that_draw_nothing_are_cut_as_one_call_per_step_cuts_them(monkeypatch):
    """Patch streams share MemberStream's many-steps-at-once path: the same patches, bitwise."""
    from papa.data import stream as streams

    policies = [Policy(), Policy(label_smoothing=0.1)]
    fixed = list(make_stream_for(coded_tiles(), policies, seed=5).epoch(0))
    monkeypatch.setattr(streams, "draws_nothing", lambda _: False)
    per_step = list(make_stream_for(coded_tiles(), policies, seed=5).epoch(0))
    assert len(fixed) == len(per_step) == 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(fixed, per_step, strict=True))


def make_stream_for(data, policies, seed):
    from papa.data.datasets import Splits

    splits = Splits("coded", data, data, 6, 3, 16, "segmentation", data.mean, data.std)
    return make_stream(splits, [0, 1], 4, policies, seed)


def test_repair_batches_share_patches_across_members():
    data = coded_tiles()
    stream = make_stream_for(data, [Policy(mixup=0.4), Policy()], seed=1)
    a = list(stream.member_batches(0, torch.Generator().manual_seed(666), 2))
    b = list(stream.member_batches(None, torch.Generator().manual_seed(666), 2))
    assert [x.shape for x in a] == [(4, 3, 16, 16)] * 2
    assert all(torch.equal(x, y) for x, y in zip(b, stream.member_batches(1, torch.Generator().manual_seed(666), 2),
                                                 strict=True))  # same policy -> same inputs
    assert not torch.equal(a[0], b[0])  # member 0 mixes up


def test_segmentation_patches_refuse_transforms_that_move_pixels():
    with pytest.raises(PapaError, match="crop_padding"):
        make_stream_for(coded_tiles(), [Policy(crop_padding=4)], seed=1)


def test_dense_mixup_cutmix_and_smoothing_give_per_pixel_soft_targets():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 8, 8, generator=g)
    labels = torch.randint(6, (6, 8, 8), generator=g)
    _, smooth = mix(Policy(label_smoothing=0.1), x, labels, 6, g)
    assert smooth.shape == (6, 6, 8, 8)
    assert torch.allclose(smooth.gather(1, labels[:, None]), torch.full((6, 1, 8, 8), 0.9 + 0.1 / 6))
    mixed, targets = mix(Policy(mixup=1.0), x, labels, 6, g)
    assert torch.allclose(targets.sum(1), torch.ones(6, 8, 8))
    cut_x, cut_t = mix(Policy(cutmix=1.0), x, labels, 6, g)
    # CutMix on dense labels: every pixel keeps a one-hot target, the one of the image it now shows (in the box,
    # its mirror's in the batch, sample B - 1 - i)
    assert torch.equal(cut_t.max(1).values, torch.ones(6, 8, 8))
    pasted = (cut_x != x).any(1)
    assert pasted.any() and torch.equal(cut_t.argmax(1), torch.where(pasted, labels.flip(0), labels))


def test_per_pixel_soft_cross_entropy_is_cross_entropy_on_hard_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 5, 7, generator=g)
    labels = torch.randint(6, (2, 5, 7), generator=g)
    targets = F.one_hot(labels, 6).movedim(-1, 1).float()
    assert soft_cross_entropy(logits, targets) == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


# model -----------------------------------------------------------------------------------------------
def test_unet_gives_per_pixel_logits_for_any_tile_size():
    model = create_model("unet", num_classes=6, width=4, depth=3).eval()
    for h, w in ((64, 80), (37, 50)):
        assert model(torch.randn(1, 3, h, w)).shape == (1, 6, h, w)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with pytest.raises(PapaError, match="unet"):
        create_model("unet", num_classes=6, widht=4)


# scores ----------------------------------------------------------------------------------------------
def test_accuracy_and_f1_on_hand_made_predictions():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2, 0, 0])
    conf = confusion(pred, labels, 5)
    assert conf[0].tolist() == [2, 1, 0, 0, 0] and conf[2].tolist() == [1, 0, 3, 0, 0]
    assert pixel_accuracy(conf) == pytest.approx(60.0)
    # class 0: TP 2, FP 2, FN 1; class 1: TP 1, FP 1, FN 1; class 2: TP 3, FP 1, FN 1; 3: TP 0; 4: absent
    expected = [2 * 2 / (4 + 3), 2 * 1 / (2 + 2), 2 * 3 / (4 + 4), 0.0, 0.0]
    assert f1_scores(conf).tolist() == pytest.approx([100 * e for e in expected])
    names = ("a", "b", "c", "d", "e")
    scores = f1_dict(conf, names)
    assert scores["average"] == pytest.approx(100 * sum(expected) / 5)


def test_whole_tile_confusions_and_the_logit_ensemble():
    data = coded_tiles(n=2)
    truth = [F.one_hot(y, 6).movedim(-1, 0)[None].float() for y in data.labels]
    index = {}

    def right(x):  # the ground truth's logits, whichever tile this is
        i = index["tile"] = int(x[0, 2, 0, 0])
        return truth[i] * 2.0

    def wrong(x):  # predicts class 0 everywhere with a weaker logit than `right`
        out = torch.zeros_like(truth[index["tile"]])
        out[:, 0] = 1.0
        return out

    confs, losses = tile_confusions([right, wrong], data, None, ensemble=True)
    n = sum(y.numel() for y in data.labels)
    assert pixel_accuracy(confs[0]) == 100.0 and int(confs[0].sum()) == n
    zeros = sum(int((y == 0).sum()) for y in data.labels)
    assert pixel_accuracy(confs[1]) == pytest.approx(100 * zeros / n)
    assert pixel_accuracy(confs[2]) == 100.0  # mean logits: 1 on the true class, 0.5 on class 0
    expected = F.cross_entropy(torch.cat([(t * 2).movedim(1, -1).reshape(-1, 6) for t in truth]),
                               torch.cat([y.flatten() for y in data.labels]))
    assert losses[0] == pytest.approx(expected.item(), rel=1e-5)
    only_one = tile_confusions([right], data, [1])[0][0]
    assert int(only_one.sum()) == data.labels[1].numel()


# end to end ------------------------------------------------------------------------------------------
def test_tiny_vaihingen_run_trains_soups_and_scores_per_class(tiles, tmp_path, one_thread):
    exp = experiment(tiles, data={"options": {**OPTIONS, "epoch_size": 48}}, train={"optimizer": {"lr": 0.05}})
    runs.prepare(exp, tmp_path / "split.json")
    for variant in ("baseline", "papa-2"):
        run = tmp_path / variant
        trainer = runs.train(exp, variant, 1, tmp_path / "split.json", run, progress=False)
        assert trainer.stream.steps_per_epoch == 12  # 48 patches of batch 4
        runs.soups(exp, tmp_path / "split.json", run)
        m = runs.evaluate(exp, tmp_path / "split.json", run)
        assert json.loads((run / "metrics.json").read_text()) == m
        assert m["classes"] == list(CLASSES) and len(m["members"]) == 3 and len(m["f1_members"]) == 3
        assert m["mean"] == pytest.approx(sum(m["members"]) / 3)
        assert m["mean"] > 40  # learned: the most frequent class covers about a quarter of the pixels
        for model in ("mean", "ensemble", "avg_soup", "greedy_soup", "avg_soup_repair", "greedy_soup_repair"):
            per_class = [m[f"{model}_f1_{c}"] for c in CLASSES]
            assert all(0 <= f <= 100 for f in per_class)
            assert m[f"{model}_f1_average"] == pytest.approx(sum(per_class) / 6)
        for c in (*CLASSES, "average"):
            assert m[f"mean_f1_{c}"] == pytest.approx(sum(f[c] for f in m["f1_members"]) / 3)
        history = (run / "history.csv").read_text().splitlines()
        assert len(history) == 1 + 3 * 2 + (3 * 2 if variant == "papa-2" else 0)
        # the member scores match an independent whole-tile evaluation of the saved population
        splits = runs.load_data(exp)
        pop, _ = runs.load_population(exp, splits, run / "population.safetensors")
        pop.eval()
        fns = [lambda x, j=j, pop=pop: pop.forward(j, x) for j in range(3)]
        assert [pixel_accuracy(c) for c in tile_confusions(fns, splits.test)[0]] == pytest.approx(m["members"])


# tables ----------------------------------------------------------------------------------------------
def fake_segmentation_metrics(results, variant):
    data = {"experiment": "seg", "variant": variant, "seed": 1, "population": 8, "mean": 85.0, "ensemble": 86.0,
            "avg_soup": 40.0, "greedy_soup": 85.5, "avg_soup_repair": 84.0, "greedy_soup_repair": 85.7}
    for k, model in enumerate(("mean", "ensemble", "avg_soup", "greedy_soup", "avg_soup_repair",
                               "greedy_soup_repair")):
        f1 = {c: 70.0 + k + i for i, c in enumerate(CLASSES)}
        data |= {f"{model}_f1_{c}": v for c, v in f1.items()} | {f"{model}_f1_average": sum(f1.values()) / 6}
    file = aggregate.run_dir(results, "seg", variant, 1) / "metrics.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data))


def test_segmentation_table_shows_accuracy_and_per_class_f1(tmp_path):
    for v in ("baseline", "papa-all"):
        fake_segmentation_metrics(tmp_path / "results", v)
    frame = aggregate.aggregate(aggregate.find_metrics(tmp_path / "results"))
    rows = [{"label": "Baseline: Population mean", "experiment": "seg", "variant": "baseline", "model": "mean"},
            {"label": "Baseline: AvgSoup", "experiment": "seg", "variant": "baseline", "model": "avg_soup"},
            {"label": "PAPA-all: AvgSoup", "experiment": "seg", "variant": "papa-all", "model": "avg_soup",
             "group": "PAPA-all"}]
    table = {"name": "table10", "layout": "segmentation", "caption": "Vaihingen", "rows": rows,
             "repair": ["baseline"], "paper": "table10"}
    grid = tables.cells(table, frame, ["baseline", "papa-all"], [1])
    assert list(dict.fromkeys(grid["column"])) == ["Accuracy", "Roads", "Buildings", "Vegetation", "Trees", "Cars",
                                                   "Clutter", "Average F1"]

    def text(row, column):
        return grid[(grid["row"] == row) & (grid["column"] == column)].iloc[0]["text"]

    assert text("Baseline: Population mean", "Accuracy") == "85.00"
    assert text("Baseline: Population mean", "Roads") == "70.00"
    assert text("Baseline: Population mean", "Clutter") == "75.00"
    assert text("Baseline: Population mean", "Average F1") == "72.50"
    assert text("Baseline: AvgSoup", "Accuracy") == "84.00"  # REPAIRed for the baseline
    assert text("Baseline: AvgSoup", "Cars") == "78.00"  # avg_soup_repair is model 4
    assert text("PAPA-all: AvgSoup", "Accuracy") == "40.00" and text("PAPA-all: AvgSoup", "Cars") == "76.00"
    tables.render(table, frame, ["baseline", "papa-all"], [1], tmp_path / "t.md", tmp_path / "t.csv")
    md = (tmp_path / "t.md").read_text()
    assert "Test pixel accuracy and F1-scores (%) on whole tiles" in md and "**PAPA-all**" in md
    assert "| Baseline: Population mean (paper) |" not in md  # no such label in the paper's rows


def test_segmentation_rows_must_name_their_model():
    config = {"experiments": {"seg": {}}, "variants": ["baseline"],
              "tables": [{"name": "t", "layout": "segmentation",
                          "rows": [{"label": "x", "experiment": "seg", "variant": "baseline"}]}], "figures": []}
    with pytest.raises(PapaError, match=r"tables.0.rows.0.model: required by the segmentation layout"):
        plan.check(config)
    config["tables"][0]["layout"] = "main"
    config["tables"][0]["rows"][0]["model"] = "mean"
    with pytest.raises(PapaError, match="only the segmentation layout"):
        plan.check(config)


# bad data through the CLI ------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["missing_tile", "missing_label", "bad_colour"])
def test_bad_vaihingen_data_is_a_one_line_error(tmp_path, damage):
    root = write_tiles(tmp_path / "vaihingen")
    if damage == "missing_tile":
        (root / "top" / tile_name(VAL[0])).unlink()
        expected = f"Vaihingen: tile {VAL[0]} not found"
    elif damage == "missing_label":
        (root / "gts_complete" / tile_name(TEST[1])).unlink()
        expected = f"no label for tile {TEST[1]}"
    else:
        labels = COLOURS[tile_classes(TRAIN[1])]
        labels[10, 20] = (1, 2, 3)
        Image.fromarray(labels, "RGB").save(root / "gts_for_participants" / tile_name(TRAIN[1]))
        expected = "unknown label colour (1, 2, 3) at pixel (x=20, y=10)"
    config = write_config(tmp_path / "c.yaml", {"data": {"dataset": "vaihingen", "root": str(root),
                                                         "options": OPTIONS}, "model": UNET})
    done = papa("prepare", "--config", str(config), "--out", str(tmp_path / "split.json"))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and expected in done.stderr, done.stderr
    assert not (tmp_path / "split.json").exists()


def test_unknown_or_malformed_dataset_options_are_named(tiles):
    with pytest.raises(PapaError, match="has no option 'tile_size'"):
        load_dataset("vaihingen", tiles, tile_size=3)
    with pytest.raises(PapaError, match="option test_tiles: expected a non-empty list of distinct tile numbers"):
        load_dataset("vaihingen", tiles, **(OPTIONS | {"test_tiles": 2}))


def test_stacked_engine_matches_the_loop_on_unet_patches():
    """vmap over members (grouped convolutions, transposed convolutions, padding, BatchNorm) gives the
    loop's per-pixel losses and gradients."""
    from papa.engines import loop_step, stacked_step
    from papa.population import Population

    def factory():
        return create_model("unet", num_classes=6, width=4, depth=2)

    x, t = next(make_stream_for(coded_tiles(), [Policy(flip=True), Policy(mixup=0.4)], seed=2).epoch(0))
    grads, losses = [], []
    for step in (loop_step, stacked_step):
        pop = Population.from_factory(factory, 2, seed=0)
        pop.train()
        for p in pop.params.values():
            p.requires_grad_(True)
        losses.append(step(pop, x / 40, t, contextlib.nullcontext))
        grads.append({n: p.grad.clone() for n, p in pop.params.items()})
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-4), n


def test_vaihingen_training_resumes_to_the_same_population(tiles, tmp_path, one_thread):
    from papa.train import Trainer

    exp = experiment(tiles, population={"size": 2}, averaging={"papa-2": {"every": 1}})
    runs.prepare(exp, tmp_path / "split.json")
    splits, split = runs.load_data(exp), load_split(tmp_path / "split.json")
    whole = Trainer(exp, "papa-2", 3, splits, split, progress=False)
    whole.fit()
    first = Trainer(exp, "papa-2", 3, splits, split, progress=False)
    first.run_epoch()
    resumed = Trainer(exp, "papa-2", 3, splits, split, progress=False)
    resumed.load_state(*first.state())
    resumed.fit()
    for name, t in whole.pop.state_dict().items():
        assert torch.equal(t, resumed.pop.state_dict()[name]), name
    assert whole.progress.history == resumed.progress.history
