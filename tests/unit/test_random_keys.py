"""Every random draw of a run comes from a generator the run owns (papa.rng), under a key naming the run seed, the
draw's purpose and, where they apply, the member and the epoch. Here the draws made around training proper: the
validation split, the digits test split, the member policies, the members' initial weights, each member's data
order and augmentation in each epoch (in-memory arrays, image folders and segmentation patches), the batches
REPAIR and SWA read from a caller's generator, REPAIR's train-mode randomness and the augmentations' own seeds.
tests/training/test_draw_keys.py pins the draws of a training run (averaging partners and weights, mutations,
the global seed of each epoch, REPAIR's and SWA's generators).

Each test recomputes the draw from its key spelled out and checks that every wrong key (tests/keys.py: a
component dropped, changed or swapped) gives another draw. ``test_every_key_making_call_is_pinned`` keeps the list
of the library's key-making calls complete: a new one fails it until its key is pinned."""

import ast
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from papa import rng, runs
from papa.build import build_population, member_policies
from papa.data import ArrayDataset, MemberStream, Policy, draw_policies, load_dataset, load_split, make_split
from papa.data.augment import apply, regularize
from papa.data.datasets import _digits_arrays, folder_train_transform, stratified_holdout
from papa.data.stream import draw_patches, make_stream
from papa.models import create_model
from papa.repair import reset_batchnorm
from tests.helpers import REPO, tiny_experiment
from tests.keys import PURPOSES, pinned, same, wrong_keys
from tests.unit.test_data import CIFAR_GRID

pytestmark = pytest.mark.usefixtures("one_thread")


# the validation split and the digits test split --------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 3])
def test_the_validation_split_is_drawn_from_its_seeds_key(seed):
    n, fraction = 1438, 0.02
    n_val = round(fraction * n)

    def draw(key):
        return sorted(torch.randperm(n, generator=rng.generator(*key))[:n_val].tolist())

    pinned(draw, ("validation-split", seed), make_split(n, fraction, seed)["val"])


def test_prepare_holds_out_the_configs_split_seed(tmp_path):
    """The split's seed is ``data.split_seed``, not the run's seed nor a constant."""
    for seed in (0, 5):
        exp = tiny_experiment(data={"split_seed": seed})
        runs.prepare(exp, tmp_path / f"{seed}.json")
        # digits: 1438 training images
        assert load_split(tmp_path / f"{seed}.json")["val"] == make_split(1438, 0.02, seed)["val"]
    assert load_split(tmp_path / "0.json")["val"] != load_split(tmp_path / "5.json")["val"]


def test_the_digits_test_split_is_drawn_class_by_class_from_seed_0():
    """stratified_holdout: one generator seeded ``seed``, a permutation per class in increasing class order, the
    first round(fraction * n_c) of it held out. The digits test set (every digits number, A.10's included, is
    measured on it) is the one of seed 0, whatever the run."""
    _, labels = _digits_arrays()
    labels = torch.as_tensor(labels)

    def draw(seed):
        g, test = torch.Generator().manual_seed(seed), []
        for c in range(10):
            members = torch.nonzero(labels == c).flatten()
            test.append(members[torch.randperm(len(members), generator=g)[:round(0.2 * len(members))]])
        return torch.cat(test).sort().values

    _, test = stratified_holdout(labels, 0.2, 7)
    assert torch.equal(test, draw(7)) and not torch.equal(test, draw(8))
    digits = load_dataset("digits").test
    assert torch.equal(digits.labels, labels[draw(0)])
    assert not torch.equal(digits.labels, labels[draw(1)])


# member policies and initial weights --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 2])
def test_member_policies_are_drawn_from_the_run_seeds_key(seed):
    exp = tiny_experiment(population={"size": 5}, augment={"grid": CIFAR_GRID})
    base = {"crop_padding": exp["augment"]["crop_padding"], "flip": exp["augment"]["flip"]}

    def draw(key):
        return draw_policies(CIFAR_GRID, 5, rng.generator(*key), base)

    pinned(draw, (seed, "policies"), member_policies(exp, seed))


def _weights(module: nn.Module) -> list[torch.Tensor]:
    return [t.detach() for t in module.state_dict().values()]


@pytest.mark.parametrize("same_init", [False, True])
def test_member_j_is_initialized_from_the_key_of_the_run_seed_and_j(same_init):
    """Member j's weights come from ``derive_seed("init", seed, j)`` (j = 0 for every member with ``same_init``),
    also when a process builds only some of the members (``members``)."""
    exp = tiny_experiment(model={"kwargs": {"width": 4}}, population={"size": 4, "same_init": same_init})
    splits = SimpleNamespace(num_classes=10, in_channels=1)
    seed = 2

    def draw(key):
        with rng.seeded(rng.derive_seed(*key)):
            return _weights(create_model("digits_cnn", num_classes=10, in_channels=1, width=4))

    pop = build_population(exp, splits, seed)
    share = build_population(exp, splits, seed, members=[3, 1])
    for j in range(4):
        key = ("init", seed, 0 if same_init else j)
        pinned(draw, key, _weights(pop.member(j)), equal=same)
    assert same(_weights(share.member(0)), _weights(pop.member(3)))
    assert same(_weights(share.member(1)), _weights(pop.member(1)))


# data order and augmentation of each member and epoch ---------------------------------------------------------
def _noise_dataset(n: int = 40) -> ArrayDataset:
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ArrayDataset(images, torch.arange(n) % 4, 4, (0.5,) * 3, (0.25,) * 3, "noise")


POLICIES = [Policy(crop_padding=2, flip=True), Policy(flip=True, mixup=1.0),
            Policy(crop_padding=1, random_erasing=0.5, cutmix=1.0)]
GRID = {"mixup": [0.0, 1.0], "label_smoothing": [0.0, 0.1], "random_erasing": [0.0, 0.5]}


def _member_epoch(data, indices, batch, policy, order_key, augment_key, per_batch=None, steps=None):
    """One member's (x, targets) batches of one epoch (the first ``steps``), recomputed: its order is one
    permutation of ``indices`` from ``order_key``'s generator, its augmentations (and per-batch policies) come from
    ``augment_key``'s."""
    order = indices[torch.randperm(len(indices), generator=rng.generator(*order_key))]
    augment = rng.generator(*augment_key)
    out = []
    for s in range(steps or len(indices) // batch):
        if per_batch is not None:
            policy = draw_policies(per_batch, 1, augment, {"crop_padding": policy.crop_padding, "flip": policy.flip})[0]
        idx = order[s * batch:(s + 1) * batch]
        out.append(apply(policy, data.images[idx], data.labels[idx], data.num_classes, data.mean, data.std, augment))
    return out


@pytest.mark.parametrize("ids", [None, [4, 1, 6]])
@pytest.mark.parametrize("per_batch", [None, GRID])
def test_each_member_and_epoch_draw_their_order_and_augmentation_from_their_own_keys(ids, per_batch):
    """Member j's epoch e: its order from (seed, "order", j, e), its augmentations from (seed, "augment", j, e),
    j being the member's index in the whole population (``member_ids``: a process's share draws exactly what one
    process holding every member draws for them)."""
    data, indices, batch, seed = _noise_dataset(), torch.arange(4, 40), 8, 7
    stream = MemberStream(data, indices, batch, POLICIES, seed, per_batch=per_batch, member_ids=ids)
    members = ids or [0, 1, 2]
    for epoch in (0, 2):
        batches = list(stream.epoch(epoch))
        for k, j in enumerate(members):
            actual = [(x[k], t[k]) for x, t in batches]
            order_key, augment_key = (seed, "order", j, epoch), (seed, "augment", j, epoch)
            assert same(_member_epoch(data, indices, batch, POLICIES[k], order_key, augment_key, per_batch), actual)
            for wrong in wrong_keys(order_key):  # a wrong key shows from the first batch on
                assert not same(_member_epoch(data, indices, batch, POLICIES[k], wrong, augment_key, per_batch, 1),
                                actual[:1]), wrong
            for wrong in wrong_keys(augment_key):
                assert not same(_member_epoch(data, indices, batch, POLICIES[k], order_key, wrong, per_batch, 1),
                                actual[:1]), wrong


def test_per_batch_policies_are_drawn_for_members_whose_own_policies_draw_nothing():
    """``per_batch`` draws each batch's policy even when the members' fixed policies draw nothing (the streams
    transform those many steps at once only without ``per_batch``)."""
    data, indices, batch, seed, plain = _noise_dataset(), torch.arange(4, 40), 8, 7, [Policy()] * 2
    batches = list(MemberStream(data, indices, batch, plain, seed, per_batch=GRID).epoch(0))
    for j in range(2):
        expected = _member_epoch(data, indices, batch, plain[j], (seed, "order", j, 0), (seed, "augment", j, 0), GRID)
        assert same(expected, [(x[j], t[j]) for x, t in batches])


@pytest.mark.parametrize("ids", [None, [4, 1, 6]])
def test_member_batches_draw_the_order_then_an_augmentation_seed_from_the_callers_generator(ids):
    """REPAIR's and SWA's batches (member_batches): the items from the caller's generator first, so that every
    member given the same seed reads the same images, then one seed for the member's augmentations, with member
    j's policy (j its index in the whole population)."""
    data, indices = _noise_dataset(), torch.arange(4, 40)
    stream = MemberStream(data, indices, 8, POLICIES, seed=7, member_ids=ids)

    def draw(seed: int, k: int | None):
        g = torch.Generator().manual_seed(seed)
        order = indices[torch.randperm(len(indices), generator=g)]
        augment = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=g)))
        policy = Policy(crop_padding=2, flip=True) if k is None else POLICIES[k]  # None: the base transform
        return [apply(policy, data.images[order[i * 8:(i + 1) * 8]], data.labels[order[i * 8:(i + 1) * 8]],
                      4, data.mean, data.std, augment)[0] for i in range(3)]

    for k in (None, 1, 2):
        j = k if k is None or ids is None else ids[k]
        actual = list(stream.member_batches(j, torch.Generator().manual_seed(666), 3))
        assert same(actual, draw(666, k)) and not same(actual, draw(665, k))


def _write_folder(root: Path, n: int = 5) -> None:
    rng_np = np.random.default_rng(0)
    for part, count in (("train", n), ("val", 1)):
        for cls in ("cat", "dog"):
            (root / part / cls).mkdir(parents=True)
            for i in range(count):
                image = rng_np.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(image).save(root / part / cls / f"{i}.png")


def _folder_batches(train, order, batch, policy, augment, steps=None):
    """FolderStream's batches of the items ``order`` recomputed: each image transformed (crop, flip) under its own
    seed drawn from ``augment``, which then draws the rest of ``policy`` batch by batch."""
    seeds = torch.randint(2**62, (len(order),), generator=augment).tolist()
    transform = folder_train_transform(8, flip=policy.flip, mean=train.mean)
    out = []
    for s in range(steps or len(order) // batch):
        images = []
        for i, item_seed in zip(order[s * batch:(s + 1) * batch].tolist(), seeds[s * batch:], strict=False):
            with rng.seeded_globals(item_seed):
                images.append(transform(_image(train, i)))
        labels = train.labels[order[s * batch:(s + 1) * batch]]
        out.append(regularize(policy, torch.stack(images), labels, 2, train.mean, train.std, augment))
    return out


_IMAGES: dict = {}


def _image(train, i: int):
    path, _ = train.folder.samples[i]
    if path not in _IMAGES:
        _IMAGES[path] = train.folder.loader(path)
    return _IMAGES[path]


@pytest.fixture
def folder(tmp_path):
    _write_folder(tmp_path)
    return load_dataset("imagenet", tmp_path, image_size=8)


def test_image_folder_members_draw_order_and_per_image_seeds_from_their_own_keys(folder):
    """FolderStream: member j's order from (seed, "order", j, e); each of its images is transformed under a seed
    drawn from (seed, "augment", j, e), which then draws the rest of its policy."""
    train, indices, batch, seed = folder.train, torch.arange(1, 10), 3, 5
    policies = [Policy(flip=True), Policy(flip=True, label_smoothing=0.1)]
    stream = make_stream(folder, indices.tolist(), batch, policies, seed, member_ids=[2, 0])

    def draw(order_key, augment_key, policy, steps=None):
        order = indices[torch.randperm(len(indices), generator=rng.generator(*order_key))]
        return _folder_batches(train, order, batch, policy, rng.generator(*augment_key), steps)

    batches = list(stream.epoch(1))
    for k, j in enumerate([2, 0]):
        actual = [(x[k], t[k]) for x, t in batches]
        order_key, augment_key = (seed, "order", j, 1), (seed, "augment", j, 1)
        assert same(draw(order_key, augment_key, policies[k]), actual)
        for wrong in wrong_keys(order_key):
            assert not same(draw(wrong, augment_key, policies[k], 1), actual[:1]), wrong
        for wrong in wrong_keys(augment_key):
            assert not same(draw(order_key, wrong, policies[k], 1), actual[:1]), wrong


def test_folder_member_batches_follow_the_callers_generator(folder):
    """FolderStream.member_batches, as MemberStream's: the items from the caller's generator, then one seed for
    the augmentations (the base transform for j = None)."""
    indices = torch.arange(1, 10)
    policies = [Policy(flip=True, label_smoothing=0.1), Policy(flip=False)]
    stream = make_stream(folder, indices.tolist(), 2, policies, seed=5)

    def draw(seed, policy):
        g = torch.Generator().manual_seed(seed)
        order = indices[torch.randperm(len(indices), generator=g)][:6]
        augment = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=g)))
        return [x for x, _ in _folder_batches(folder.train, order, 2, policy, augment)]

    for j, policy in ((None, Policy(flip=True)), (1, policies[1])):
        actual = list(stream.member_batches(j, torch.Generator().manual_seed(666), 3))
        assert same(actual, draw(666, policy)) and not same(actual, draw(667, policy))


def test_segmentation_patches_and_flips_come_from_each_members_keys(tmp_path):
    """PatchStream: member j's patch positions from (seed, "order", j, e), its flips from (seed, "augment", j, e)."""
    from tests.vaihingen_tiles import OPTIONS, write_tiles

    splits = load_dataset("vaihingen", write_tiles(tmp_path / "vaihingen"), **OPTIONS)
    train, batch, seed = splits.train, 4, 3
    indices = torch.tensor(splits.fixed_split["train"])
    stream = make_stream(splits, indices.tolist(), batch, [Policy(flip=True)] * 2, seed)
    sizes = [tuple(y.shape) for y in train.labels]
    s = train.patch_size

    def draw(order_key, augment_key):
        positions = draw_patches(sizes, indices, s, stream.steps_per_epoch * batch, rng.generator(*order_key))
        augment, out = rng.generator(*augment_key), []
        for b in range(stream.steps_per_epoch):
            cut = positions[b * batch:(b + 1) * batch]
            labels = torch.stack([train.labels[t][y:y + s, x:x + s] for t, y, x in cut])
            flips = torch.rand(2, batch, generator=augment) < 0.5
            for dim, flip in zip((-2, -1), flips, strict=True):
                labels = torch.where(flip[:, None, None], labels.flip(dim), labels)
            out.append(labels)
        return out

    batches = list(stream.epoch(2))
    for j in range(2):
        actual = [t[j].argmax(1) for _, t in batches]
        order_key, augment_key = (seed, "order", j, 2), (seed, "augment", j, 2)
        assert same(draw(order_key, augment_key), actual)
        for wrong in wrong_keys(order_key):
            assert not same(draw(wrong, augment_key), actual), wrong
        for wrong in wrong_keys(augment_key):
            assert not same(draw(order_key, wrong), actual), wrong


# randomness inside augmentations and REPAIR --------------------------------------------------------------------
@pytest.mark.parametrize("policy", [Policy(mixup=1.0), Policy(cutmix=1.0), Policy(autoaugment="cifar10"),
                                    Policy(randaugment="rand-m9-n2-mstd0.5"), Policy(random_erasing=1.0)])
def test_augmentations_draw_everything_from_the_members_generator(policy):
    """Mixup's and CutMix's lambda (numpy's Beta, seeded from the generator), AutoAugment's and RandAugment's
    operations (the global RNGs, seeded from it): the same generator seed gives the same batch, another seed or
    the generator's next batch another one."""
    data = _noise_dataset(16)

    def batch(g):
        return apply(policy, data.images, data.labels, 4, data.mean, data.std, g)

    a = batch(torch.Generator().manual_seed(1))
    assert same(a, batch(torch.Generator().manual_seed(1)))
    assert not same(a, batch(torch.Generator().manual_seed(2)))
    g = torch.Generator().manual_seed(1)
    batch(g)
    assert not same(a, batch(g))


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_mixup_lambdas_are_beta_draws_of_the_members_generator(alpha):
    """Mixup's lambda, batch after batch of one member's generator, is Beta(alpha, alpha): mean 1/2, variance
    1 / (4 (2 alpha + 1)) (a constant seed would draw one lambda for every batch). Read from the targets: a
    sample mixed with a partner of another class keeps lambda of its own class."""
    data, g = _noise_dataset(16), torch.Generator().manual_seed(3)
    lambdas = []
    for _ in range(300):
        _, targets = apply(Policy(mixup=alpha), data.images, data.labels, 4, data.mean, data.std, g)
        mixed = ((targets > 0).sum(1) == 2).nonzero().flatten()
        if len(mixed):
            lambdas.append(targets[mixed[0], data.labels[mixed[0]]].item())
    lam = torch.tensor(lambdas, dtype=torch.float64)
    assert len(lam) > 250
    assert lam.mean().item() == pytest.approx(0.5, abs=0.05)
    assert lam.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.2)


def test_repair_train_mode_randomness_of_batch_b_comes_from_its_own_key():
    """A network with dropout before BatchNorm: the statistics REPAIR resets (here through reset_batchnorm) are
    the plain average over batches b of the train-mode batch statistics, batch b's dropout drawn from the global
    RNG seeded derive_seed("repair-batchnorm", seed, b)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(6))
    xs = [torch.randn(16, 6) for _ in range(3)]
    seed = 666

    def draw(key_of):
        means = []
        for b, x in enumerate(xs):
            with rng.seeded(rng.derive_seed(*key_of(b))):
                means.append(nn.functional.dropout(x, 0.5, training=True).mean(0))
        return torch.stack(means).mean(0)

    actual = reset_batchnorm(module, xs, seed=seed)[1].running_mean
    close = lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-6)  # noqa: E731
    assert close(draw(lambda b: ("repair-batchnorm", seed, b)), actual)
    wrong = [lambda b: ("repair-batchnorm", seed), lambda b: ("repair-batchnorm", b), lambda b: (seed, b),
             lambda b: ("repair-batchnorm", seed, b + 1), lambda b: ("repair-batchnorm", seed + 1, b),
             lambda b: ("repair-batchnorm", b, seed)]
    wrong += [lambda b, p=p: (p, seed, b) for p in PURPOSES if p != "repair-batchnorm"]
    for key_of in wrong:
        assert not close(draw(key_of), actual), key_of(0)


# the list of key-making calls -----------------------------------------------------------------------------------
KEY_MAKERS = {"generator", "Generator", "derive_seed", "manual_seed", "default_rng", "seeded", "seeded_globals", "seed"}
DRAW_SITES = {
    # (module, function): where its keys are pinned (test names), or why it is no draw of a run
    ("papa/averagers.py", "_Averaging.mutate_"):
        "test_mutations_of_each_averaging_come_from_its_key_and_shrink_as_1_over_g",
    ("papa/averagers.py", "Push.push"): "test_mutations_after_pushes_come_from_the_steps_key",
    ("papa/averagers.py", "Replace.next_generation"): "test_each_averaging_mixes_with_the_matrix_of_its_own_epochs_key",
    ("papa/build.py", "member_policies"): "test_member_policies_are_drawn_from_the_run_seeds_key",
    ("papa/data/augment.py", "_beta"): "test_mixup_lambdas_are_beta_draws_of_the_members_generator",
    ("papa/data/augment.py", "autoaugment"): "test_augmentations_draw_everything_from_the_members_generator",
    ("papa/data/augment.py", "randaugment"): "test_augmentations_draw_everything_from_the_members_generator",
    ("papa/data/datasets.py", "stratified_holdout"): "test_the_digits_test_split_is_drawn_class_by_class_from_seed_0",
    ("papa/data/splits.py", "make_split"): "test_the_validation_split_is_drawn_from_its_seeds_key",
    ("papa/data/stream.py", "MemberStream.epoch"):
        "test_each_member_and_epoch_draw_their_order_and_augmentation_from_their_own_keys",
    ("papa/data/stream.py", "MemberStream.member_batches"):
        "test_member_batches_draw_the_order_then_an_augmentation_seed_from_the_callers_generator",
    ("papa/data/stream.py", "_SeededImages.__getitem__"):
        "test_image_folder_members_draw_order_and_per_image_seeds_from_their_own_keys",
    ("papa/data/stream.py", "FolderStream.epoch"):
        "test_image_folder_members_draw_order_and_per_image_seeds_from_their_own_keys",
    ("papa/data/stream.py", "FolderStream.member_batches"): "test_folder_member_batches_follow_the_callers_generator",
    ("papa/forward.py", "inputs"): "test_callable_batches_get_member_and_a_freshly_seeded_generator",
    ("papa/population.py", "Population.from_factory"):
        "test_member_j_is_initialized_from_the_key_of_the_run_seed_and_j",
    ("papa/repair.py", "_passes.randomness"): "test_repair_train_mode_randomness_of_batch_b_comes_from_its_own_key",
    ("papa/train.py", "Trainer.run_epoch"): "test_every_epoch_starts_the_global_rng_from_its_own_key",
    ("papa/train.py", "Trainer.finish_swa"): "test_swa_batchnorm_batches_come_from_the_run_seeds_key",
    ("papa/train.py", "Trainer.val_view"): "test_training_scores_the_validation_split_from_each_epochs_scoring_keys",
    ("papa/runs.py", "_soups.val_accuracy"):
        "test_the_soups_job_scores_each_candidate_and_metrics_from_their_own_keys",
    ("papa/runs.py", "_evaluate"): "test_the_soups_job_scores_each_candidate_and_metrics_from_their_own_keys",
    ("papa/repair.py", "_data"): "test_own_images_give_each_network_the_seed_of_its_role_and_index",
    ("papa/averagers.py", "Replace.repair_seed"): "test_training_repairs_draw_from_each_averagings_key",
    ("papa/train.py", "Trainer.align_batches"): "test_training_alignment_draws_from_the_key_of_its_step",
    ("papa/runs.py", "_soups"): "test_the_soups_job_and_similarity_align_from_their_own_keys",
    ("papa/runs.py", "similarity"): "test_the_soups_job_and_similarity_align_from_their_own_keys",
    ("papa/data/stream.py", "MemberStream._fixed_epoch"): None,  # a generator the draw-free policies never draw from
    ("papa/rng.py", "generator"): None,  # the key makers themselves
    ("papa/rng.py", "seeded"): None,
    ("papa/rng.py", "seeded_globals"): None,
    ("papa/bench.py", "run"): None,  # benchmark inputs, no run's draw
    ("papa/export.py", "probe"): None,  # the input papa.fold traces and checks a fold on; changes no number
    ("papa/fakedata.py", "_images"): None,  # stand-in data written once by `papa fake-data`, no run's draw
    ("papa/fakedata.py", "write_optdigits"): None,
    ("papa/fakedata.py", "write_cifar"): None,
    ("papa/fakedata.py", "write_imagenet"): None,
    ("papa/fakedata.py", "write_vaihingen"): None,
    ("papa/fakedata.py", "write_hub_weights"): None,
}


def _key_making_calls() -> tuple[set[tuple[str, str]], set[str]]:
    """(module, enclosing function) of every key-making call in papa/ (a generator made or seeded, the global RNGs
    seeded), and every purpose string in the keys of a run's draws (the sites DRAW_SITES pins with a test)."""
    sites, purposes = set(), set()

    def visit(node, path: str, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = f"{where}.{child.name}" if where else child.name
            if isinstance(child, ast.Call):
                f = child.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if name in KEY_MAKERS:
                    sites.add((path, where))
                    if DRAW_SITES.get((path, where)) is not None:
                        purposes.update(a.value for a in child.args if isinstance(a, ast.Constant)
                                        and isinstance(a.value, str))
            visit(child, path, inner)

    for path in sorted((REPO / "papa").rglob("*.py")):
        visit(ast.parse(path.read_text()), path.relative_to(REPO).as_posix(), "")
    return sites, purposes


def test_every_key_making_call_is_pinned():
    """Every call in papa/ that seeds a generator (or the global RNG) is listed in DRAW_SITES with a test that
    pins its key, every such test exists, and every purpose a key names is one tests/keys.py knows (so that the
    wrong keys tried include it)."""
    sites, purposes = _key_making_calls()
    new = sorted(sites - set(DRAW_SITES))
    assert not new, f"new random keys at {new}: pin each key in a test and list it in DRAW_SITES"
    assert not set(DRAW_SITES) - sites, f"DRAW_SITES lists calls that are gone: {sorted(set(DRAW_SITES) - sites)}"
    tests = "\n".join(p.read_text() for p in (REPO / "tests").rglob("test_*.py"))
    for site, test in DRAW_SITES.items():
        assert test is None or f"def {test}(" in tests, (site, test)
    assert purposes == set(PURPOSES)
