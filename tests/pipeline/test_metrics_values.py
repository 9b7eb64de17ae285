"""Every number of metrics.json recomputed independently from the files a run leaves (population.safetensors,
soups.safetensors, split.json) and compared with what `papa evaluate` wrote.

The run is made so that the plausible wrong formulas give other numbers, and each test checks that they do:
a tiny PAPA population of 4 whose member 1 has a permuted classifier amplified 3x (the worst member, surer of
its wrong answers than the others of theirs: averaged logits, averaged probabilities and votes all score
differently; the greedy soup rejects it) and whose member 0 is member 2 with a halved classifier (the same
validation accuracy: a tie the greedy soup must keep, its soup scoring the same). The recomputation loads each
member into a fresh model of the registry, scores it on the test images with plain tensor code, and rebuilds
the soups from the stacked tensors; only REPAIR itself (tested on its own in test_repair.py) comes from the
library."""

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from papa import runs
from papa.checkpoint import load_tensors, save_tensors
from papa.data import Policy, load_split, make_stream
from papa.data.augment import eval_transform
from papa.models import create_model
from papa.population import Population
from papa.provenance import code_version
from papa.repair import repair
from tests.helpers import tiny_experiment

pytestmark = pytest.mark.usefixtures("one_thread")  # small convolutions lose with threads on busy cores

P = 4
SOUPS = ("avg_soup", "greedy_soup", "avg_soup_repair", "greedy_soup_repair")
EXPERIMENT = {
    "population": {"size": P},
    "train": {"epochs": 1, "batch_size": 128},
    "averaging": {"papa": {"every": 2, "alpha": 0.5}},
    # not REPAIR's defaults (5 batches, seed 666): a stage that ignored the config would be seen
    "soups": {"repair_iters": 3, "repair_seed": 5},
}


@dataclass
class Run:
    exp: dict
    split_path: Path
    dir: Path
    metrics: dict  # metrics.json as written
    returned: dict  # what runs.evaluate returned


def tamper(path: Path, head: str = "linear.", wrong: float = 3.0, right: float = 1.0) -> None:
    """Member 1: classifier (tensors named ``head``*) with its classes permuted (it predicts the wrong classes)
    and scaled by ``wrong`` (it is surer of them than the others of theirs); the others' classifiers scaled by
    ``right`` (same predictions, larger logits), member 0 being member 2 with half of member 2's classifier."""
    tensors, meta = load_tensors(path)
    for name, t in tensors.items():
        t = t.clone()
        t[0] = t[2]
        if name.startswith(head):
            t[1] = wrong * t[1][torch.roll(torch.arange(t.shape[1]), 1)]
            t[2:] *= right
            t[0] = 0.5 * t[2]
        tensors[name] = t
    save_tensors(path, tensors, meta)


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> Run:
    root = tmp_path_factory.mktemp("metrics")
    exp = tiny_experiment(**EXPERIMENT)
    # seed 3: a training whose tampered population has the properties above; where member 3 comes out best, the
    # greedy soup can be member 3 alone, and the tie and REPAIRed greedy soup go untested
    split_path, out = root / "split.json", root / "tiny" / "papa" / "seed3"
    runs.prepare(exp, split_path)
    runs.train(exp, "papa", 3, split_path, out, progress=False)
    tamper(out / "population.safetensors")
    runs.soups(exp, split_path, out)
    returned = runs.evaluate(exp, split_path, out)
    return Run(exp, split_path, out, json.loads((out / "metrics.json").read_text()), returned)


# independent recomputation ------------------------------------------------------------------------------------
def fresh(exp: dict, state: dict[str, Tensor], num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A registry model of the experiment's architecture holding ``state`` (every tensor it has, and the biases
    REPAIR adds to a soup), in eval mode."""
    model = create_model(exp["model"]["name"], num_classes=num_classes, in_channels=in_channels,
                         **exp["model"]["kwargs"])
    assert set(model.state_dict()) <= set(state)
    for name, t in state.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if leaf in module._buffers:
            module._buffers[leaf] = t.clone()
        else:
            module._parameters[leaf] = nn.Parameter(t.clone(), requires_grad=False)
    return model.eval()


def members(run: Run) -> list[nn.Module]:
    tensors, _ = load_tensors(run.dir / "population.safetensors")
    return [fresh(run.exp, {k: v[j] for k, v in tensors.items()}) for j in range(P)]


def mean_state(stacked: dict[str, Tensor], chosen: list[int] | None = None) -> dict[str, Tensor]:
    """The uniform average of the members ``chosen`` (default all) of stacked tensors: floats averaged in
    float64, integer counters rounded."""
    state = {}
    for k, v in stacked.items():
        part = (v if chosen is None else v[chosen]).double().mean(0)
        state[k] = part.to(v.dtype) if v.is_floating_point() else part.round().to(v.dtype)
    return state


def soup_of(run: Run, chosen: list[int]) -> nn.Module:
    return fresh(run.exp, mean_state(load_tensors(run.dir / "population.safetensors")[0], chosen))


def stored_soup(run_dir: Path, name: str) -> dict[str, Tensor]:
    tensors, _ = load_tensors(run_dir / "soups.safetensors")
    return {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}


def data(run: Run, part: str) -> tuple[Tensor, Tensor]:
    """(normalized images, labels): the test set, or the held-out validation images of the training set."""
    splits = runs.load_data(run.exp)
    if part == "test":
        d, idx = splits.test, torch.arange(len(splits.test))
    else:
        d, idx = splits.train, torch.tensor(load_split(run.split_path)["val"])
    return eval_transform(d.images[idx], d.mean, d.std), d.labels[idx]


@torch.no_grad()
def logits_of(model: nn.Module, x: Tensor) -> Tensor:
    return model.eval()(x)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).sum().item() / len(labels)


def greedy(scores: list[float], soup_score, strict: bool = False) -> list[int]:
    """Algorithm 3: by validation accuracy, best first (ties in member order); a member stays when the
    soup's accuracy does not decrease (``strict``: when it increases, as the authors' code)."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    chosen, best = [order[0]], scores[order[0]]
    for j in order[1:]:
        s = soup_score([*chosen, j])
        if s > best or (s == best and not strict):
            chosen, best = [*chosen, j], s
    return chosen


def close_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].double(), b[k].double(), atol=1e-6) for k in a)


# the tests --------------------------------------------------------------------------------------------------
def test_written_file_is_what_evaluate_returned_with_its_identity(run):
    assert run.metrics == json.loads(json.dumps(run.returned))
    assert (run.metrics["experiment"], run.metrics["variant"], run.metrics["seed"]) == ("tiny", "papa", 3)
    assert run.metrics["population"] == P and run.metrics["soups_aligned"] is False


def test_every_file_of_the_run_records_the_code_that_made_it(run):
    code = code_version()
    assert run.metrics["code"] == code
    for name in ("population.json", "soups.json"):
        assert json.loads((run.dir / name).read_text())["code"] == code
        assert load_tensors(run.dir / name.replace(".json", ".safetensors"))[1]["code"] == code  # the header too


def test_members_are_each_members_test_accuracy(run):
    x, y = data(run, "test")
    expected = [accuracy(logits_of(m, x), y) for m in members(run)]
    assert run.metrics["members"] == pytest.approx(expected, rel=0, abs=1e-9)
    # in train mode (batch statistics) the members would score otherwise
    with torch.no_grad():
        train_mode = [accuracy(m.train()(x), y) for m in members(run)]
    assert train_mode != pytest.approx(expected, rel=0, abs=1e-9)


def test_mean_min_max_and_population_std_of_the_members(run):
    acc = run.metrics["members"]
    assert len(set(acc)) > 2  # unequal accuracies: every wrong statistic shows
    assert run.metrics["mean"] == pytest.approx(statistics.fmean(acc), rel=0, abs=1e-12)
    assert run.metrics["min"] == min(acc) and run.metrics["max"] == max(acc)
    # the README's promise: the population standard deviation over members, not the sample one
    assert run.metrics["std"] == pytest.approx(statistics.pstdev(acc), rel=0, abs=1e-12)
    assert abs(statistics.pstdev(acc) - statistics.stdev(acc)) > 1.0
    assert run.metrics["mean"] != pytest.approx(statistics.median(acc), abs=1e-6)


def test_ensemble_is_the_accuracy_of_the_averaged_logits(run):
    x, y = data(run, "test")
    logits = torch.stack([logits_of(m, x) for m in members(run)])
    expected = accuracy(logits.mean(0), y)
    assert run.metrics["ensemble"] == pytest.approx(expected, rel=0, abs=1e-9)
    # averaged probabilities and a majority vote give other numbers on this population
    probabilities = accuracy(logits.softmax(-1).mean(0), y)
    votes = accuracy(torch.nn.functional.one_hot(logits.argmax(-1), 10).sum(0).float(), y)
    assert abs(probabilities - expected) > 1.0 and abs(votes - expected) > 1.0


def test_average_soup_is_the_test_accuracy_of_the_members_mean(run):
    x, y = data(run, "test")
    soup = soup_of(run, list(range(P)))
    assert close_state(stored_soup(run.dir, "avg_soup"), soup.state_dict())
    expected = accuracy(logits_of(soup, x), y)
    assert run.metrics["avg_soup"] == pytest.approx(expected, rel=0, abs=1e-9)
    xv, yv = data(run, "val")
    assert expected != pytest.approx(accuracy(logits_of(soup, xv), yv), abs=1e-6)  # not the validation score


def test_greedy_soup_members_size_and_accuracy(run):
    xv, yv = data(run, "val")
    val = [accuracy(logits_of(m, xv), yv) for m in members(run)]
    chosen = greedy(val, lambda c: accuracy(logits_of(soup_of(run, c), xv), yv))
    assert run.metrics["greedy_soup_members"] == chosen
    assert run.metrics["greedy_soup_size"] == len(chosen) and 0 < len(chosen) < P  # the tampered member left out
    assert 1 not in chosen
    assert close_state(stored_soup(run.dir, "greedy_soup"), soup_of(run, chosen).state_dict())
    x, y = data(run, "test")
    assert run.metrics["greedy_soup"] == pytest.approx(accuracy(logits_of(soup_of(run, chosen), x), y), abs=1e-9)
    # ranked worst first, or keeping only improvements (member 0's tie with member 2), it would be another soup
    score = lambda c: accuracy(logits_of(soup_of(run, c), xv), yv)  # noqa: E731
    assert greedy([-v for v in val], score) != chosen and greedy(val, score, strict=True) != chosen


def test_validation_accuracies_of_the_members(run):
    xv, yv = data(run, "val")
    expected = [accuracy(logits_of(m, xv), yv) for m in members(run)]
    assert run.metrics["val_members"] == pytest.approx(expected, rel=0, abs=1e-9)
    assert expected != pytest.approx(run.metrics["members"], abs=1e-6)


def test_repaired_soups_are_repair_of_the_soups_with_the_configs_data_weights_and_seed(run):
    """REPAIR of the average soup (uniform targets) and of the greedy soup (targets weighted over its members
    only), on training batches of the base transform, ``soups.repair_iters`` of them from a generator seeded
    ``soups.repair_seed``; their test accuracies are what metrics.json reports."""
    exp, pop = run.exp, Population.from_modules(members(run))
    splits = runs.load_data(exp)
    base = Policy(crop_padding=exp["augment"]["crop_padding"], flip=exp["augment"]["flip"])
    stream = make_stream(splits, load_split(run.split_path)["train"], exp["train"]["batch_size"], [base] * P, 0)
    iters, seed = exp["soups"]["repair_iters"], exp["soups"]["repair_seed"]

    def batches(_member, gen):
        return stream.member_batches(None, gen, iters)

    chosen = run.metrics["greedy_soup_members"]
    weights = torch.zeros(P, dtype=torch.float64)
    weights[chosen] = 1.0 / len(chosen)
    expected = {
        "avg_soup_repair": repair(soup_of(run, list(range(P))), pop, batches, iters=iters, seed=seed),
        "greedy_soup_repair": repair(soup_of(run, chosen), pop, batches, iters=iters, seed=seed, weights=weights),
    }
    x, y = data(run, "test")
    for name, module in expected.items():
        assert close_state(stored_soup(run.dir, name), module.state_dict()), name
        soup = fresh(run.exp, module.state_dict())
        assert run.metrics[name] == pytest.approx(accuracy(logits_of(soup, x), y), rel=0, abs=1e-9)
    # the config's seed and the greedy weights matter here: the defaults or uniform weights give other soups
    default_seed = repair(soup_of(run, chosen), pop, batches, iters=iters, seed=666, weights=weights)
    uniform = repair(soup_of(run, chosen), pop, batches, iters=iters, seed=seed)
    for other in (default_seed, uniform):
        assert not close_state(other.state_dict(), expected["greedy_soup_repair"].state_dict())


def test_aligned_flag_comes_from_the_soups(run, tmp_path):
    """``soups_aligned`` says whether the soups were built from aligned members (soups.json's ``aligned``)."""
    import shutil

    copy = tmp_path / "tiny" / "papa" / "seed3"
    shutil.copytree(run.dir, copy)
    tensors, meta = load_tensors(copy / "soups.safetensors")
    save_tensors(copy / "soups.safetensors", tensors, {**meta, "aligned": True})
    assert runs.evaluate(run.exp, run.split_path, copy)["soups_aligned"] is True


# segmentation (Vaihingen, A.8): pixel accuracies and per-class F1 on whole tiles ----------------------------
SEG_CLASSES = 6


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory, one_thread) -> Run:
    """A tiny U-Net PAPA population on generated tiles (two epochs: BatchNorm's running statistics need them),
    tampered as ``tamper`` does through its head; one test tile is smaller than the other, so that counts
    pooled over pixels differ from per-tile averages."""
    from tests.vaihingen_tiles import OPTIONS, TEST, write_tiles

    root = tmp_path_factory.mktemp("vaihingen")
    tiles = write_tiles(root / "vaihingen")
    write_tiles(tiles, tiles=TEST[1:], h=40, w=56)
    exp = tiny_experiment(
        data={"dataset": "vaihingen", "root": str(tiles), "options": {**OPTIONS, "epoch_size": 48}},
        model={"name": "unet", "kwargs": {"width": 4, "depth": 2}}, population={"size": P},
        train={"epochs": 2, "batch_size": 4, "optimizer": {"lr": 0.05}},
        augment={"flip": True, "grid": {"mixup": [0.0], "label_smoothing": [0.0, 0.1], "cutmix": [0.0],
                                        "random_erasing": [0.0]}},
        averaging={"papa": {"every": 1, "alpha": 0.5}}, soups={"repair_iters": 2})
    split_path, out = root / "split.json", root / "seg" / "papa" / "seed1"
    runs.prepare(exp, split_path)
    runs.train(exp, "papa", 1, split_path, out, progress=False)
    tamper(out / "population.safetensors", "head.", wrong=40.0, right=10.0)  # the U-Net's logits are small
    runs.soups(exp, split_path, out)
    returned = runs.evaluate(exp, split_path, out)
    return Run(exp, split_path, out, json.loads((out / "metrics.json").read_text()), returned)


def counts(pred: Tensor, labels: Tensor) -> Tensor:
    """(K, K) confusion counts, row = true class, column = predicted class, by plain comparisons."""
    return torch.tensor([[int(((labels == t) & (pred == p)).sum()) for p in range(SEG_CLASSES)]
                         for t in range(SEG_CLASSES)], dtype=torch.float64)


def pixel_accuracy(c: Tensor) -> float:
    return 100.0 * c.trace().item() / c.sum().item()


def f1(c: Tensor) -> list[float]:
    """Per class 2 TP / (2 TP + FP + FN) in percent (0 when the class is neither present nor predicted)."""
    out = []
    for k in range(SEG_CLASSES):
        tp, fp, fn = c[k, k].item(), c[:, k].sum().item() - c[k, k].item(), c[k].sum().item() - c[k, k].item()
        out.append(200.0 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0)
    return out


@torch.no_grad()
def tile_logits(model: nn.Module, tiles, indices=None) -> list[Tensor]:
    """The model's logits on each whole tile of ``tiles`` (those at ``indices``), one forward pass per tile."""
    chosen = range(len(tiles)) if indices is None else indices
    return [model(eval_transform(tiles.images[i][None], tiles.mean, tiles.std))[0] for i in chosen]


def test_segmentation_scores_are_pooled_pixel_counts_of_whole_tiles(seg_run):
    m, exp = seg_run.metrics, seg_run.exp
    assert m == json.loads(json.dumps(seg_run.returned))
    test = runs.load_data(exp).test
    names = list(test.classes)
    assert m["classes"] == names and len(names) == SEG_CLASSES
    tensors, _ = load_tensors(seg_run.dir / "population.safetensors")
    member_logits = [tile_logits(fresh(exp, {k: v[j] for k, v in tensors.items()}, SEG_CLASSES, 3), test)
                     for j in range(P)]

    def conf(logits: list[Tensor]) -> Tensor:
        return sum(counts(z.argmax(0), y) for z, y in zip(logits, test.labels, strict=True))

    member_conf = [conf(z) for z in member_logits]
    # validation: the dataset's own validation tiles (split.json), scored the same way
    train_tiles, val_idx = runs.load_data(exp).train, load_split(seg_run.split_path)["val"]
    val_labels = [train_tiles.labels[i] for i in val_idx]
    val = [pixel_accuracy(sum(counts(z.argmax(0), y) for z, y in zip(
        tile_logits(fresh(exp, {k: v[j] for k, v in tensors.items()}, SEG_CLASSES, 3), train_tiles, val_idx),
        val_labels, strict=True))) for j in range(P)]
    assert m["val_members"] == pytest.approx(val, rel=0, abs=1e-9)
    ensemble = [torch.stack(per_tile).mean(0) for per_tile in zip(*member_logits, strict=True)]
    models = {"ensemble": conf(ensemble)}
    soups, _ = load_tensors(seg_run.dir / "soups.safetensors")
    for name in SOUPS:
        state = {k[len(name) + 1:]: v for k, v in soups.items() if k.startswith(f"{name}.")}
        models[name] = conf(tile_logits(fresh(exp, state, SEG_CLASSES, 3), test))

    acc = [pixel_accuracy(c) for c in member_conf]
    assert m["members"] == pytest.approx(acc, rel=0, abs=1e-9)
    assert (m["mean"], m["min"], m["max"]) == pytest.approx(
        (statistics.fmean(acc), min(acc), max(acc)), rel=0, abs=1e-12)
    assert m["std"] == pytest.approx(statistics.pstdev(acc), rel=0, abs=1e-12)
    for name, c in models.items():
        assert m[name] == pytest.approx(pixel_accuracy(c), rel=0, abs=1e-9), name
        per_class = f1(c)
        for k, cls in enumerate(names):
            assert m[f"{name}_f1_{cls}"] == pytest.approx(per_class[k], rel=0, abs=1e-9), (name, cls)
        assert m[f"{name}_f1_average"] == pytest.approx(statistics.fmean(per_class), rel=0, abs=1e-9), name
    member_f1 = [f1(c) for c in member_conf]
    for j, scores in enumerate(m["f1_members"]):
        assert scores == pytest.approx({**dict(zip(names, member_f1[j], strict=True)),
                                        "average": statistics.fmean(member_f1[j])}, rel=0, abs=1e-9)
    for k, cls in enumerate(names):  # the population mean: the members' F1 averaged
        assert m[f"mean_f1_{cls}"] == pytest.approx(statistics.fmean(f[k] for f in member_f1), rel=0, abs=1e-9)
    assert m["mean_f1_average"] == pytest.approx(statistics.fmean(statistics.fmean(f) for f in member_f1), abs=1e-9)

    # the case tells the plausible wrong formulas apart: per-tile averages, averaged probabilities, F1 of the
    # pooled members, F1 averaged over the present classes weighted by their pixels
    per_tile = statistics.fmean(pixel_accuracy(counts(z.argmax(0), y))
                                for z, y in zip(member_logits[3], test.labels, strict=True))
    assert abs(per_tile - acc[3]) > 1e-3
    probs = [torch.stack(t).softmax(1).mean(0) for t in zip(*member_logits, strict=True)]
    assert abs(pixel_accuracy(conf(probs)) - m["ensemble"]) > 1e-3
    pooled = f1(sum(member_conf))
    assert any(abs(pooled[k] - m[f"mean_f1_{cls}"]) > 1e-3 for k, cls in enumerate(names))
    support = member_conf[3].sum(1)
    weighted = sum(f * s for f, s in zip(member_f1[3], support.tolist(), strict=True)) / support.sum().item()
    assert abs(weighted - m["f1_members"][3]["average"]) > 1e-3


# similarity.json (Table 5, A.5): per-stage cosine similarities -----------------------------------------------
@torch.no_grad()
def stage_outputs(model: nn.Module, x: Tensor, stages: list[str]) -> list[Tensor]:
    """Eval-mode outputs of the named stages on ``x``, each flattened per image, in float64."""
    out = {}
    hooks = [model.get_submodule(s).register_forward_hook(lambda _m, _i, y, s=s: out.__setitem__(s, y))
             for s in stages]
    model.eval()(x)
    for h in hooks:
        h.remove()
    return [out[s].flatten(1).double() for s in stages]


def cosine(a: Tensor, b: Tensor) -> float:
    """Mean over images of the cosine similarity of two (images, features) tensors, in percent."""
    return 100.0 * ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean().item()


@dataclass
class ResnetRun:
    exp: dict
    split_path: Path
    dir: Path
    modules: list[nn.Module]  # the members
    align_batches: list[Tensor]  # the first 48 training-split images, in batches of eval_batch_size


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory, one_thread) -> ResnetRun:
    """Three independently initialized resnet20 (the architectures alignment supports) with the BatchNorm
    statistics of training images, saved as a run of `papa train`; their validation accuracies rank them 0, 2, 1
    (not member order)."""
    from papa.build import build_population
    from papa.repair import reset_batchnorm

    root = tmp_path_factory.mktemp("resnet")
    exp = tiny_experiment(model={"name": "resnet20"}, population={"size": 3},
                          train={"batch_size": 16, "eval_batch_size": 16},  # REPAIR's batches: batch_size
                          similarity={"align_images": 48, "test_images": 20, "repair_iters": 2},
                          soups={"align_images": 48, "repair_iters": 2})
    exp["model"]["kwargs"] = {}
    split_path, run = root / "split.json", root / "tiny" / "papa-2" / "seed2"
    runs.prepare(exp, split_path)
    splits, train_idx = runs.load_data(exp), load_split(split_path)["train"]
    images = splits.train.images[torch.tensor(train_idx[:48])]
    align_batches = [eval_transform(images[i:i + 16], splits.train.mean, splits.train.std) for i in (0, 16, 32)]
    pop = build_population(exp, splits, seed=3)
    modules = [reset_batchnorm(m, align_batches).eval() for m in pop.to_modules()]
    meta = {"experiment": "tiny", "variant": "papa-2", "seed": 2, "model": "resnet20", "population": 3}
    save_tensors(run / "population.safetensors", Population.from_modules(modules).state_dict(), meta)
    return ResnetRun(exp, split_path, run, modules, align_batches)


def test_similarity_json_is_the_mean_cosine_of_the_stage_outputs(resnet_run):
    """between_networks: per stage, the mean over the pairs of distinct members of the mean over test images of
    the cosine similarity of their flattened stage outputs; network_and_avg_soup: the same between each member
    and the average soup, averaged over members. With ``align`` the members are first aligned to member 0 on the
    first ``align_images`` training-split images, with ``repair`` the soup is REPAIRed on them."""
    from papa.alignment import align_population
    from papa.config import deep_merge

    exp, split_path, run = resnet_run.exp, resnet_run.split_path, resnet_run.dir
    modules, align_batches = resnet_run.modules, resnet_run.align_batches
    test = runs.load_data(exp).test
    test_x = eval_transform(test.images[:20], test.mean, test.std)
    stages = ["layer1", "layer2", "layer3"]

    for align, repaired in ((False, False), (True, True)):
        e = deep_merge(exp, {"similarity": {"align": align, "repair": repaired}})
        written = json.loads(json.dumps(runs.similarity(e, split_path, run)))
        assert written == json.loads((run / "similarity.json").read_text())
        assert (written["experiment"], written["variant"], written["seed"]) == ("tiny", "papa-2", 2)
        assert (written["stages"], written["aligned"], written["repaired"]) == (stages, align, repaired)
        assert (written["repair_iters"], written["test_images"]) == (2, 20)
        assert written["code"] == code_version()

        members = Population.from_modules(modules)
        if align:
            members = align_population(members, align_batches, reference=0)
        soup = fresh(exp, mean_state(members.state_dict()))
        if repaired:
            soup = repair(soup, members, align_batches, iters=2, seed=exp["soups"]["repair_seed"])
        feats = [stage_outputs(m, test_x, stages) for m in [*members.to_modules(), soup]]
        pairs = [(0, 1), (0, 2), (1, 2)]
        for s, stage in enumerate(stages):
            between = statistics.fmean(cosine(feats[i][s], feats[j][s]) for i, j in pairs)
            with_soup = statistics.fmean(cosine(feats[j][s], feats[3][s]) for j in range(3))
            assert written["between_networks"][stage] == pytest.approx(between, rel=0, abs=1e-9), (align, stage)
            # the soup: float32 weights summed in another order than ours, hence the looser tolerance
            assert written["network_and_avg_soup"][stage] == pytest.approx(with_soup, rel=0, abs=1e-5), (align, stage)
            # self-pairs counted, or one cosine of whole flattened batches, would read otherwise
            with_self = statistics.fmean(cosine(feats[i][s], feats[j][s]) for i in range(3) for j in range(3))
            whole = statistics.fmean(cosine(feats[i][s].reshape(1, -1), feats[j][s].reshape(1, -1)) for i, j in pairs)
            assert abs(with_self - between) > 1.0 and abs(whole - between) > 1e-3
        if repaired:  # the unrepaired soup's features would read otherwise
            other = stage_outputs(fresh(exp, mean_state(members.state_dict())), test_x, stages)
            assert any(abs(statistics.fmean(cosine(feats[j][s], other[s]) for j in range(3))
                           - written["network_and_avg_soup"][stage]) > 1e-3 for s, stage in enumerate(stages))


def test_aligned_soups_are_made_of_members_aligned_in_validation_order(resnet_run):
    """soups.align (Appendix A.4): the average soup averages the members aligned one after another to the
    running average, best validation accuracy first; the greedy soup aligns each candidate to the current soup
    (papa.soups.greedy_alignment, the same greedy rule); their REPAIR takes its targets from the aligned
    members (the greedy soup's from its own members only). Alignment itself comes from the library (tested in
    test_alignment.py); the order, the data and the populations are checked here."""
    from papa.config import deep_merge
    from papa.soups import greedy_alignment, sequential_alignment

    exp = deep_merge(resnet_run.exp, {"soups": {"align": True}})
    info = runs.soups(exp, resnet_run.split_path, resnet_run.dir)
    assert info["aligned"] is True
    splits, split = runs.load_data(exp), load_split(resnet_run.split_path)
    xv, yv = eval_transform(splits.train.images[split["val"]], splits.train.mean, splits.train.std), \
        splits.train.labels[split["val"]]
    pop, data = Population.from_modules(resnet_run.modules), resnet_run.align_batches
    val = [accuracy(logits_of(m, xv), yv) for m in resnet_run.modules]
    order = sorted(range(3), key=lambda j: (-val[j], j))
    assert order == [0, 2, 1]
    avg_pop = sequential_alignment(pop, data, order)
    stored = {name: stored_soup(resnet_run.dir, name) for name in SOUPS}
    assert close_state(stored["avg_soup"], mean_state(avg_pop.state_dict()))
    assert not close_state(stored["avg_soup"], mean_state(sequential_alignment(pop, data).state_dict()))  # member order

    greedy_pop, chosen, greedy = greedy_alignment(pop, lambda m: accuracy(logits_of(m, xv), yv), data, scores=val)
    assert info["greedy_soup_members"] == chosen
    assert close_state(stored["greedy_soup"], greedy.state_dict())

    base = Policy(crop_padding=exp["augment"]["crop_padding"], flip=exp["augment"]["flip"])
    stream = make_stream(splits, split["train"], exp["train"]["batch_size"], [base] * 3, 0)

    def batches(_member, gen):
        return stream.member_batches(None, gen, 2)

    weights = torch.zeros(3, dtype=torch.float64)
    weights[chosen] = 1.0 / len(chosen)
    seed = exp["soups"]["repair_seed"]
    avg = fresh(exp, mean_state(avg_pop.state_dict()))
    assert close_state(stored["avg_soup_repair"], repair(avg, avg_pop, batches, iters=2, seed=seed).state_dict())
    # targets from the members before alignment would give another soup
    assert not close_state(stored["avg_soup_repair"], repair(avg, pop, batches, iters=2, seed=seed).state_dict())
    greedy_repaired = repair(greedy, greedy_pop, batches, iters=2, seed=seed, weights=weights)
    assert close_state(stored["greedy_soup_repair"], greedy_repaired.state_dict())
