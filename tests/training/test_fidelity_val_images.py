"""``fidelity.val_images``: under ``authors`` the validation split is scored as the scripts scored it, on the
training split's base transform (crop and flip; folders: RandomResizedCrop and flip) drawn again at every scoring
(data/data.py:22, 37-38), here from generators keyed by the run seed and the scoring: in training
(seed, "validation", e, n) for the n-th scoring after epoch e's steps, in the soups job (seed, "soups-validation",
n) and for metrics.json (seed, "evaluate-validation"). The test split and the paper setting are untouched."""

import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from papa import rng, runs
from papa.build import validation_view
from papa.data import ArrayDataset, Policy, eval_batches, load_dataset, load_split
from papa.data.augment import eval_transform, geometric
from papa.data.datasets import folder_train_transform
from papa.train import Trainer
from tests.helpers import tiny_experiment
from tests.keys import pinned
from tests.unit.test_random_keys import _image, _write_folder

pytestmark = pytest.mark.usefixtures("one_thread")
METRICS = importlib.import_module("papa.metrics")
AUTHORS = {"fidelity": {"val_images": "authors"}, "augment": {"crop_padding": 1, "flip": True}}


@pytest.fixture(scope="module")
def split_path(tmp_path_factory, one_thread) -> Path:
    path = tmp_path_factory.mktemp("val-images") / "split.json"
    runs.prepare(tiny_experiment(), path)
    return path


def arrays(n: int = 10) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, torch.arange(n) % 2, 2, (0.5,) * 3, (0.25,) * 3, "arrays")


def batches(*args, **kwargs) -> list:
    return [x for x, _ in eval_batches(*args, **kwargs)]


def test_arrays_pass_the_base_crop_and_flip_drawn_from_the_scorings_generator():
    data, indices, policy = arrays(), [7, 1, 4, 2, 9], Policy(crop_padding=2, flip=True, mixup=0.4, cutout=3)
    actual = batches(data, indices, 2, augment=policy, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    chunks = torch.tensor(indices).split(2)
    expected = [eval_transform(geometric(Policy(crop_padding=2, flip=True), data.images[c], g), data.mean, data.std)
                for c in chunks]  # the regularization (mixup, cutout) left out: the scripts' re=0, no hyperparams
    assert all(torch.equal(a, b) for a, b in zip(actual, expected, strict=True))
    other = batches(data, indices, 2, augment=policy, generator=torch.Generator().manual_seed(6))
    plain = batches(data, indices, 2)
    assert any(not torch.equal(a, b) for a, b in zip(actual, other, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(actual, plain, strict=True))
    # without crop and flip (digits, A.10) the scripts' transform is the evaluation one: the same images
    same = batches(data, indices, 2, augment=Policy(), generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(same, plain, strict=True))


def test_folders_pass_random_resized_crop_and_flip_under_per_image_seeds_of_the_generator(tmp_path):
    _write_folder(tmp_path)
    train = load_dataset("imagenet", tmp_path, image_size=8).train
    indices = [4, 0, 3, 1]
    g = torch.Generator().manual_seed(2)
    actual = torch.cat(batches(train, indices, 3, augment=Policy(flip=True), generator=g))
    seeds = torch.randint(2**62, (len(indices),), generator=torch.Generator().manual_seed(2)).tolist()
    transform = folder_train_transform(8, flip=True)
    images = []
    for i, seed in zip(indices, seeds, strict=True):
        with rng.seeded_globals(seed):
            images.append(transform(_image(train, i)))
    assert torch.equal(actual, eval_transform(torch.stack(images), train.mean, train.std, 8))
    assert not torch.equal(actual, torch.cat(batches(train, indices, 3)))


def test_only_the_authors_setting_and_not_segmentation_tiles_change_the_view():
    g = torch.Generator()
    authors, paper = tiny_experiment(**AUTHORS), tiny_experiment(augment=AUTHORS["augment"])
    view = validation_view(authors, SimpleNamespace(kind="array"), g)
    assert view == {"augment": Policy(crop_padding=1, flip=True), "generator": g}
    assert validation_view(paper, SimpleNamespace(kind="array"), g) == {}
    assert validation_view(authors, SimpleNamespace(kind="segmentation"), g) == {}  # tiles are scored whole


def record_scorings(monkeypatch) -> list:
    """Every eval_batches call of papa.metrics: (the data's size, the generator's state before it drew, or None)."""
    calls, original = [], METRICS.eval_batches

    def recording(data, indices=None, *args, generator=None, **kwargs):
        calls.append((len(data) if indices is None else len(indices),
                      None if generator is None else generator.get_state().clone()))
        return original(data, indices, *args, generator=generator, **kwargs)

    monkeypatch.setattr(METRICS, "eval_batches", recording)
    return calls


def state(key: tuple) -> torch.Tensor:
    return rng.generator(*key).get_state()


def test_training_scores_the_validation_split_from_each_epochs_scoring_keys(monkeypatch, split_path):
    """PAPA-all averaging after epoch 1 of 2: the epoch's scoring (n = 1) and the one after the averaging (n = 2),
    then epoch 2's; the test split every time as evaluation sees it. A trainer resumed after epoch 1 draws epoch
    2's scoring from the same key."""
    seed = 3
    exp = tiny_experiment(model={"name": "logreg"}, train={"epochs": 2}, **AUTHORS)
    exp["model"]["kwargs"] = {}
    split = load_split(split_path)
    t = Trainer(exp, "papa-all", seed, runs.load_data(exp), split, progress=False)
    t.run_epoch()
    saved = t.state()
    calls = record_scorings(monkeypatch)
    t.run_epoch()
    n_val, n_test = len(split["val"]), 359
    assert [(n, g is None) for n, g in calls] == [(n_test, True), (n_val, False)]  # test first (Trainer.evaluate)
    pinned(state, (seed, "validation", 2, 1), calls[1][1], equal=torch.equal)

    calls.clear()
    resumed = Trainer(exp, "papa-all", seed, runs.load_data(exp), split, progress=False)
    resumed.load_state(*saved)
    resumed.run_epoch()
    assert torch.equal(calls[1][1], state((seed, "validation", 2, 1)))

    calls.clear()
    again = Trainer(exp, "papa-all", seed, runs.load_data(exp), split, progress=False)
    again.run_epoch()
    scored = [g for n, g in calls if n == n_val]
    assert len(scored) == 2 and all(g is not None for g in scored)
    for n, g in enumerate(scored, 1):
        pinned(state, (seed, "validation", 1, n), g, equal=torch.equal)


def test_the_paper_setting_scores_the_validation_split_unaugmented(monkeypatch, split_path):
    exp = tiny_experiment(model={"name": "logreg"}, train={"epochs": 1}, augment=AUTHORS["augment"])
    exp["model"]["kwargs"] = {}
    calls = record_scorings(monkeypatch)
    Trainer(exp, "baseline", 1, runs.load_data(exp), load_split(split_path), progress=False).run_epoch()
    assert calls and all(g is None for _, g in calls)


def test_the_soups_job_scores_each_candidate_and_metrics_from_their_own_keys(monkeypatch, split_path, tmp_path):
    """Every greedy candidate and soup scored on the validation split draws (seed, "soups-validation", n), n = 1, 2,
    ... in order, and metrics.json's val_members (seed, "evaluate-validation")."""
    seed = 2
    exp = tiny_experiment(train={"epochs": 1}, soups={"align": False}, **AUTHORS)
    runs.train(exp, "baseline", seed, split_path, tmp_path / "run", progress=False)
    calls = record_scorings(monkeypatch)
    runs.soups_and_metrics(exp, split_path, tmp_path / "run")
    n_val = len(load_split(split_path)["val"])
    val = [g for n, g in calls if n == n_val]
    assert val and all(g is not None for g in val)
    *soups, metrics = val
    for n, g in enumerate(soups, 1):
        pinned(state, (seed, "soups-validation", n), g, equal=torch.equal)
    pinned(state, (seed, "evaluate-validation"), metrics, equal=torch.equal)
    assert all(g is None for n, g in calls if n != n_val)  # the test split as evaluation sees it
