"""The data package: datasets in their real on-disk formats, the validation split, augmentation, streams."""

import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from papa import fakedata
from papa.data import (
    LOADERS,
    MemberStream,
    Policy,
    augment,
    draw_policies,
    load_dataset,
    load_split,
    make_split,
    save_split,
)
from papa.data.augment import apply, eval_transform
from papa.data.datasets import ArrayDataset, _digits_arrays
from papa.data.stream import FolderStream, PatchStream, draw_patches, eval_batches, make_stream
from papa.data.vaihingen import TileDataset
from papa.errors import PapaError

CIFAR = {  # name: (folder, train files, test files, meta file, meta key, label key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "label_names", "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels", 100),
}

# the authors' per-channel mean and std: data/cifar10.py:8-10 (8-bit values / 255) and data/cifar100.py:8-9
AUTHORS_NORMALIZATION = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
                         "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}

CIFAR_GRID = {"mixup": [0, 0.5, 1.0], "label_smoothing": [0, 0.05, 0.1], "cutmix": [0, 0.5, 1.0],
              "random_erasing": [0, 0.15, 0.35]}  # Section 4.1's grid (the schema's default augment.grid)


def write_cifar(root, name: str, per_file: int = 20) -> np.ndarray:
    """A small archive in the python-version layout, pickled (protocol 2) as the originals are.
    Returns the first training image (3, 32, 32) written."""
    folder, train, test, meta, meta_key, label_key, k = CIFAR[name]
    base = root / folder
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = None
    for i, filename in enumerate(train + test):
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = [(i * per_file + n) % k for n in range(per_file)]
        batch = {"batch_label": f"batch {i}", label_key: labels, "data": data,
                 "filenames": [f"img_{n}.png" for n in range(per_file)]}
        if name == "cifar100":
            batch["coarse_labels"] = [lab // 5 for lab in labels]
        (base / filename).write_bytes(pickle.dumps(batch, protocol=2))
        first = data[0].reshape(3, 32, 32) if first is None else first
    (base / meta).write_bytes(pickle.dumps({meta_key: [f"class{c}" for c in range(k)]}, protocol=2))
    return first


def tiny_dataset(n: int = 200, k: int = 10, shape=(1, 2, 2)) -> ArrayDataset:
    """Image i is filled with the value i, so a batch tells which items it holds (mean 0, std 1/255)."""
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, *shape).contiguous()
    return ArrayDataset(images, torch.arange(n) % k, k, (0.0,) * shape[0], (1.0,) * shape[0], "tiny")


def same_batches(a, b) -> bool:
    pairs = [(x, y) for pa, pb in zip(a, b, strict=True) for x, y in zip(pa, pb, strict=True)]
    return all(torch.equal(x, y) for x, y in pairs)


def items(x: torch.Tensor) -> torch.Tensor:
    """The item indices of un-augmented tiny_dataset batches (..., C, H, W) -> (...)."""
    return x.flatten(-3)[..., 0].mul(255).round().long()


# datasets ---------------------------------------------------------------------------------------------------
def test_registry_and_unknown_names():
    assert {"digits", "cifar10", "cifar100", "imagenet"} <= set(LOADERS)
    with pytest.raises(PapaError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(PapaError, match="no option 'flavour'"):
        load_dataset("digits", flavour=1)


def test_array_images_and_sizes_that_are_not_what_the_streams_take_are_refused():
    labels = torch.zeros(2, dtype=torch.int64)
    for images in (torch.zeros(2, 1, 8, 8), torch.zeros(2, 8, 8, dtype=torch.uint8)):  # float; no channel axis
        with pytest.raises(ValueError, match=r"^x: images must be uint8 \(N, C, H, W\), got torch\.(float32|uint8) "):
            ArrayDataset(images, labels, 10, (0.0,), (1.0,), "x")
    with pytest.raises(ValueError, match=r"^x: 2 images but labels of shape \(3,\)$"):
        ArrayDataset(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(3), 10, (0.0,), (1.0,), "x")
    for size in (0, 2.5):
        with pytest.raises(PapaError, match=f"^digits: image_size must be a positive integer, found {size}$"):
            load_dataset("digits", image_size=size)


def test_the_digits_read_from_scikit_learns_csv_are_its_load_digits():
    """The loader reads the CSV scikit-learn ships instead of importing sklearn.datasets (seconds per step): the same
    1,797 images, labels and order as sklearn.datasets.load_digits."""
    from sklearn.datasets import load_digits as sklearn_digits  # seconds to import: only here

    images, labels = _digits_arrays()
    expected = sklearn_digits()
    assert np.array_equal(images, expected.images) and np.array_equal(labels, expected.target)
    assert labels.dtype == np.int64


def test_digits_fixed_stratified_test_split():
    splits = load_dataset("digits")
    again = load_dataset("digits")
    train, test = splits.train, splits.test
    assert (splits.kind, splits.in_channels, splits.image_size, splits.num_classes) == ("array", 1, 8, 10)
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 8, 8)
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    counts = torch.bincount(torch.cat([train.labels, test.labels]), minlength=10)
    assert torch.equal(torch.bincount(test.labels, minlength=10), (counts * 0.2).round().long())
    assert torch.equal(test.images, again.test.images) and torch.equal(test.labels, again.test.labels)
    assert 0 < splits.mean[0] < 1 and 0 < splits.std[0] < 1


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_archives_load(tmp_path, name):
    first = write_cifar(tmp_path, name)
    splits = load_dataset(name, tmp_path)
    k, n_train = CIFAR[name][6], 20 * len(CIFAR[name][1])
    assert (splits.kind, splits.num_classes, splits.in_channels, splits.image_size) == ("array", k, 3, 32)
    assert splits.train.images.shape == (n_train, 3, 32, 32) and splits.test.images.shape == (20, 3, 32, 32)
    assert splits.train.labels.dtype == torch.int64
    assert splits.train.labels.tolist() == [i % k for i in range(n_train)]
    assert np.array_equal(splits.train.images[0].numpy(), first)
    assert splits.train.classes[:2] == ("class0", "class1")
    mean, std = AUTHORS_NORMALIZATION[name]
    assert splits.mean == pytest.approx(mean, abs=1e-6) and splits.std == pytest.approx(std, abs=1e-6)
    assert splits.train.mean == splits.mean and splits.test.std == splits.std
    with pytest.raises(PapaError, match="checksum mismatch"):  # generated files are not the originals
        load_dataset(name, tmp_path, verify_md5=True)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_files_and_checksums_are_torchvisions(name):
    import torchvision.datasets

    from papa.catalog import DATASETS
    from papa.data.datasets import CIFAR_FORMATS

    fmt, layout = CIFAR_FORMATS[name], getattr(torchvision.datasets, name.upper())
    assert DATASETS[name].paths == (layout.base_folder,)
    assert [list(f) for f in fmt.train_list] == layout.train_list
    assert [list(f) for f in fmt.test_list] == layout.test_list
    assert fmt.meta == (layout.meta["filename"], layout.meta["key"], layout.meta["md5"])


def test_loading_cifar_imports_no_torchvision(tmp_path):
    """torchvision imports torch._dynamo: ~3 s of CPU in every process that reads CIFAR."""
    import subprocess
    import sys

    write_cifar(tmp_path, "cifar10")
    code = ("import sys; from papa.data import load_dataset; load_dataset('cifar10', sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.startswith(('torchvision', 'torch._dynamo'))))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_cifar_missing_directory_names_the_path(tmp_path):
    with pytest.raises(PapaError, match="CIFAR-10 not found") as err:
        load_dataset("cifar10", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in str(err.value)
    write_cifar(tmp_path, "cifar10")
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(PapaError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)


def test_cifar_truncated_archive(tmp_path):
    write_cifar(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(PapaError, match="corrupt archive .*data_batch_2") as err:
        load_dataset("cifar10", tmp_path)
    assert "\n" not in str(err.value)


def test_cifar_wrong_shapes_and_lengths(tmp_path):
    write_cifar(tmp_path, "cifar100")
    base = tmp_path / "cifar-100-python"
    good = pickle.loads((base / "test").read_bytes(), encoding="latin1")
    (base / "test").write_bytes(pickle.dumps({**good, "data": good["data"][:, :100]}, protocol=2))
    with pytest.raises(PapaError, match=r"corrupt archive .*test: expected uint8 data of shape \(N, 3072\)"):
        load_dataset("cifar100", tmp_path)
    (base / "test").write_bytes(pickle.dumps({**good, "fine_labels": good["fine_labels"][:-1]}, protocol=2))
    with pytest.raises(PapaError, match="20 images but 19 labels"):
        load_dataset("cifar100", tmp_path)
    for wrong in (-1, 100):  # a label below or above the classes'
        labels = [wrong, *good["fine_labels"][1:]]
        (base / "test").write_bytes(pickle.dumps({**good, "fine_labels": labels}, protocol=2))
        with pytest.raises(PapaError, match=r"corrupt archive .*test: labels outside 0\.\.99$"):
            load_dataset("cifar100", tmp_path)
    for key in ("data", "fine_labels"):  # either key missing
        (base / "test").write_bytes(pickle.dumps({k: v for k, v in good.items() if k != key}, protocol=2))
        with pytest.raises(PapaError, match=r"corrupt archive .*test: expected keys 'data' and 'fine_labels', "
                                            r"found \[.*\]$") as err:
            load_dataset("cifar100", tmp_path)
        assert f"'{key}'" not in str(err.value).split("found")[1]
    (base / "test").write_bytes(pickle.dumps(good, protocol=2))
    meta = pickle.loads((base / "meta").read_bytes(), encoding="latin1")
    for names in (meta["fine_label_names"][:-1], "c" * 100, None):  # 99 names; 100 characters; nothing
        (base / "meta").write_bytes(pickle.dumps({"fine_label_names": names}, protocol=2))
        with pytest.raises(PapaError, match="corrupt archive .*meta: expected 100 names under 'fine_label_names'"):
            load_dataset("cifar100", tmp_path)


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_malicious_pickle_is_refused_not_run(tmp_path):
    write_cifar(tmp_path, "cifar10")
    witness = tmp_path / "pwned"
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(
        pickle.dumps({"data": _Exploit(witness), "labels": []}, protocol=2))
    with pytest.raises(PapaError, match=r"refusing to load .*data_batch_1: it references (posix|os)\.system"):
        load_dataset("cifar10", tmp_path)
    assert not witness.exists()


def _write_images(folder, n: int, size: int = 12):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_image_folder_loads_and_streams(tmp_path):
    for part, n in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            _write_images(tmp_path / part / cls, n)
    splits = load_dataset("imagenet", tmp_path, image_size=8)
    assert (splits.kind, splits.num_classes, splits.in_channels, splits.image_size) == ("folder", 2, 3, 8)
    assert len(splits.train) == 8 and len(splits.test) == 4
    assert splits.train.labels.tolist() == [0] * 4 + [1] * 4
    policies = [Policy(flip=True, mixup=1.0), Policy(random_erasing=0.5, label_smoothing=0.1)]
    stream = make_stream(splits, range(7), 3, policies, seed=1)
    assert isinstance(stream, FolderStream) and stream.steps_per_epoch == 2
    batches = list(stream.epoch(0))
    again = list(stream.epoch(0))
    assert len(batches) == 2 and batches[0][0].shape == (2, 3, 3, 8, 8) and batches[0][1].shape == (2, 3, 2)
    assert same_batches(batches, again)
    assert next(stream.member_batches(None, torch.Generator().manual_seed(666), 1)).shape == (3, 3, 8, 8)
    last = make_stream(splits, range(7), 3, policies, seed=1, keep_last=True)  # fidelity.last_batch: authors
    assert last.steps_per_epoch == 3 and [x.shape[1] for x, _ in last.epoch(0)] == [3, 3, 1]
    x, labels = zip(*eval_batches(splits.test, batch_size=3), strict=True)
    assert [t.shape for t in x] == [(3, 3, 8, 8), (1, 3, 8, 8)] and torch.cat(labels).tolist() == [0, 0, 1, 1]


def test_image_folder_without_images(tmp_path):
    _write_images(tmp_path / "train" / "cat", 2)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(PapaError, match="no images found under .*val"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(PapaError, match="ImageNet train not found.*elsewhere"):
        load_dataset("imagenet", tmp_path / "elsewhere")


# validation split -----------------------------------------------------------------------------------------
def test_split_fraction_disjoint_deterministic(tmp_path):
    split = make_split(1000, 0.02, seed=3)
    assert len(split["val"]) == 20 and len(split["train"]) == 980
    assert sorted(split["train"] + split["val"]) == list(range(1000))
    assert split["train"] == sorted(split["train"]) and split["val"] == sorted(split["val"])
    assert make_split(1000, 0.02, seed=3) == split and make_split(1000, 0.02, seed=4)["val"] != split["val"]
    assert len(make_split(10)["val"]) == 1
    path = tmp_path / "splits" / "digits.json"
    save_split(path, split, {"dataset": "digits"})
    loaded = load_split(path, expect_n=1000)
    assert loaded["train"] == split["train"] and loaded["val"] == split["val"]
    assert loaded["meta"] == {"dataset": "digits", "n": 1000, "fraction": 0.02, "seed": 3}
    assert [p.name for p in path.parent.iterdir()] == ["digits.json"]  # no temp file left behind


def test_split_bounds(tmp_path):
    assert len(make_split(2, 0.5)["train"]) == 1  # one item left to train on is enough
    for n, fraction in ((1, 0.5), (3, 0.99)):
        with pytest.raises(PapaError, match=f"cannot hold out a validation split from {n} training items"):
            make_split(n, fraction)
    for fraction in (0.0, 1.0):
        with pytest.raises(PapaError, match=r"validation fraction must be in \(0, 1\)"):
            make_split(10, fraction)
    path = tmp_path / "split.json"
    save_split(path, {"train": [0, 1], "val": [2]}, {"n": 3})
    assert load_split(path, expect_n=3)["val"] == [2]  # the last index is inside
    for train, val, problem in (([0, 1], [3], r"indices outside 0\.\.2"), ([0, -1], [2], "outside"),
                                ([0, 0], [2], "repeated"), ([0], [2, 2], "repeated"),
                                ([0, True], [2], "'train' must be a list of integers")):
        save_split(path, {"train": train, "val": val}, {"n": 3})
        with pytest.raises(PapaError, match=problem):
            load_split(path)


def test_split_file_problems(tmp_path):
    path = tmp_path / "split.json"
    with pytest.raises(PapaError, match="split file not found"):
        load_split(path)
    path.write_text('{"train": [0, 1')
    with pytest.raises(PapaError, match="bad split file"):
        load_split(path)
    path.write_text(json.dumps({"train": [0, 1], "val": [1]}))
    with pytest.raises(PapaError, match="share indices"):
        load_split(path)
    path.write_text(json.dumps({"train": [0, 1], "val": [7]}))
    with pytest.raises(PapaError, match="outside"):
        load_split(path, expect_n=5)
    save_split(path, make_split(50), {"dataset": "x"})
    with pytest.raises(PapaError, match="made for 50 training items, the dataset has 60"):
        load_split(path, expect_n=60)


# augmentation ---------------------------------------------------------------------------------------------
def _apply(policy, images, labels, k=10, seed=0):
    return apply(policy, images, labels, k, (0.5,) * images.shape[1], (0.25,) * images.shape[1],
                 torch.Generator().manual_seed(seed))


def test_flip_and_crop_are_per_sample():
    images = torch.zeros(64, 1, 4, 4, dtype=torch.uint8)
    images[..., :2] = 255  # bright left half
    x, _ = _apply(Policy(flip=True), images, torch.zeros(64, dtype=torch.long))
    flipped = x[:, 0, 0, 0] < x[:, 0, 0, 3]
    assert 0 < int(flipped.sum()) < 64
    white = torch.full((64, 1, 4, 4), 255, dtype=torch.uint8)
    y, _ = _apply(Policy(crop_padding=2), white, torch.zeros(64).long())
    black = (y == -2.0).flatten(1).sum(1)  # zero padding normalizes to (0 - 0.5) / 0.25
    assert len(torch.unique(black)) > 1 and black.max() <= 16


def test_targets_and_label_smoothing():
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (32,))
    policy = Policy(mixup=1.0, cutmix=1.0, label_smoothing=0.1, random_erasing=0.35, crop_padding=1,
                    flip=True)
    x, t = _apply(policy, images, labels)
    assert x.dtype == torch.float32 and x.shape == images.shape and t.shape == (32, 10)
    assert torch.allclose(t.sum(1), torch.ones(32))
    _, t = _apply(Policy(label_smoothing=0.1), images, labels)
    assert torch.allclose(t[torch.arange(32), labels], torch.tensor(0.91))  # 1 - 0.1 + 0.1 / 10
    assert torch.isclose(t.min(), torch.tensor(0.01))
    _, plain = _apply(Policy(), images, labels)
    assert torch.equal(plain, torch.nn.functional.one_hot(labels, 10).float())


def _distinct_constant_images(b: int = 16, h: int = 8, w: int = 8):
    values = torch.arange(b, dtype=torch.uint8) * 15 + 10
    return values[:, None, None, None].expand(b, 1, h, w).contiguous(), torch.arange(b), values


def test_mixup_targets_are_lambda_combinations():
    images, labels, values = _distinct_constant_images()  # label b is image b, so targets say what was mixed
    for seed in range(3):
        x, t = _apply(Policy(mixup=0.5), images, labels, k=16, seed=seed)
        assert torch.allclose(x[:, 0, 0, 0], (t @ values.float() / 255 - 0.5) / 0.25, atol=1e-4)
        assert torch.allclose(x.flatten(1).std(1), torch.zeros(16), atol=1e-5)  # whole images blended
        assert ((t > 0).sum(1) <= 2).all()
        paired = (t > 0).sum(1) == 2  # rows whose partner is another image: one lambda for the batch
        own = t[torch.arange(16), labels][paired]
        assert paired.any() and torch.allclose(own, own[0].expand_as(own))


def test_cutmix_lambda_is_the_area_actually_kept():
    images, labels, values = _distinct_constant_images(h=6, w=10)  # not square: each side its own cut
    for seed in range(5):
        x, t = _apply(Policy(cutmix=1.0), images, labels, k=16, seed=seed)
        own_value = eval_transform(images, (0.5,), (0.25,))[:, 0, :1, :1]  # exactly as apply normalizes
        own_pixels = (x[:, 0] == own_value).flatten(1).float().mean(1)
        assert torch.allclose(t[torch.arange(16), labels], own_pixels, atol=1e-6)
        assert torch.allclose(t.sum(1), torch.ones(16))


def test_mixup_and_cutmix_pair_each_sample_with_its_mirror_in_the_batch():
    """Sample i is mixed with sample B - 1 - i, as timm's Mixup in batch mode mixes x with x.flip(0) (the authors'
    utils/mixup.py): a batch of 7 pairs 0 with 6, 1 with 5, 2 with 4, and leaves 3 with itself."""
    images, labels, _ = _distinct_constant_images(7)
    own, mirror = torch.eye(7, 9), torch.eye(9)[6 - labels]  # 9 classes: the batch reversed, not the classes
    for policy in (Policy(mixup=0.5), Policy(cutmix=1.0)):
        partners_seen = False
        for seed in range(4):
            _, t = _apply(policy, images, labels, k=9, seed=seed)
            assert ((t > 0) <= ((own + mirror) > 0)).all()  # only itself and its mirror
            assert torch.allclose(t[3], own[3])
            partners_seen |= bool((t * mirror).sum(1)[[0, 1, 2, 4, 5, 6]].gt(0).all())
        assert partners_seen


def test_mixup_and_cutmix_together_mix_each_batch_by_one_of_them_half_the_time():
    """A member with both (the paper's grids deal mixup and cutmix together): each batch is mixed by one of the two,
    chosen with probability 1/2, as timm's Mixup with switch_prob=0.5 (the authors' utils/mixup.py)."""
    images, labels, _ = _distinct_constant_images()
    cutmixed = []
    for seed in range(40):
        x, _ = _apply(Policy(mixup=1.0, cutmix=1.0), images, labels, k=16, seed=seed)
        cutmixed.append(bool(x.flatten(1).std(1).gt(1e-5).any()))  # a pasted box: two values; a blend: one
    assert 10 <= sum(cutmixed) <= 30


def test_random_erasing_probability():
    images = torch.full((4000, 1, 16, 16), 200, dtype=torch.uint8)
    x, _ = _apply(Policy(random_erasing=0.35), images, torch.zeros(4000).long())
    erased = (x == 0).flatten(1).any(1).float().mean().item()
    assert abs(erased - 0.35) < 0.04
    x, _ = _apply(Policy(cutout=4), images[:100], torch.zeros(100).long())
    holes = (x == 0).flatten(1).sum(1)
    assert holes.max() == 16 and holes.min() >= 4 and len(torch.unique(holes)) > 1  # clipped at the borders


def test_random_crop_is_the_padded_image_at_the_drawn_offsets():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment.random_crop(images, 2, torch.Generator().manual_seed(4))
    offsets = torch.randint(5, (2, 6), generator=torch.Generator().manual_seed(4))  # the same draw
    padded = torch.nn.functional.pad(images, (2,) * 4)
    for i, (top, left) in enumerate(offsets.T.tolist()):
        assert torch.equal(out[i], padded[i, :, top:top + 8, left:left + 8])


def test_random_erasing_boxes_follow_the_authors_scale_and_ratio():
    """Every sample erased (probability 1): one box of 2-33.3% of the image with height / width in [0.3, 1 / 0.3] (up
    to rounding to whole pixels), never the whole height or width, of mean area near (0.02 + 1 / 3) / 2."""
    x = torch.full((2000, 1, 32, 32), 5.0)
    out = augment.random_erasing(x, 1.0, torch.Generator().manual_seed(0))
    rows, cols = (out == 0).any(3)[:, 0], (out == 0).any(2)[:, 0]  # (B, 32) each: where the box is
    eh, ew = rows.sum(1).double(), cols.sum(1).double()
    area = (out == 0).flatten(1).sum(1).double()
    assert torch.equal(area, eh * ew) and (eh > 0).all() and (eh < 32).all() and (ew < 32).all()
    assert ((area >= 0.02 * 1024 - eh - ew) & (area <= 1024 / 3 + eh + ew + 1)).all()
    aspect = eh / ew
    assert ((aspect >= 0.3 * (1 - 1 / ew) - 1 / ew) & (aspect <= (1 + 1 / ew) / 0.3 + 1 / ew)).all()
    assert (area / 1024).mean().item() == pytest.approx(0.177, abs=0.02)
    assert (aspect < 1).double().mean().item() == pytest.approx(0.5, abs=0.1)  # log-uniform: as often wide as tall


@pytest.mark.parametrize(("h", "w", "probability"), [(32, 32, 1.0), (5, 40, 0.6)])
def test_random_erasing_is_the_authors_timm_loop_on_the_same_uniforms(h, w, probability):
    """Each sample's box is the one the authors' RandomErasing (timm's, utils/random_erasing.py: mode const, one box,
    area uniform in [0.02, 1/3] of the image, log-aspect uniform in [log 0.3, log(1 / 0.3)], the first of 10
    attempts that fits strictly inside, a corner uniform over the places it fits) draws from the same uniforms,
    written here as their loop; a sample whose 10 attempts all fail is left alone. 5 x 40 makes most boxes fail."""
    b = 300
    x = torch.full((b, 2, h, w), 5.0)
    out = augment.random_erasing(x, probability, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the same draws, in random_erasing's order
    u_erase, u_area, u_aspect, u_top, u_left = (torch.rand(shape, generator=g).tolist()
                                                for shape in ((b,), (b, 10), (b, 10), (b,), (b,)))
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    failed = 0
    for i in range(b):
        expected = torch.full((2, h, w), 5.0)
        for attempt in range(10):
            target_area = (0.02 + (1 / 3 - 0.02) * u_area[i][attempt]) * h * w
            aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u_aspect[i][attempt])
            eh, ew = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
            if eh < h and ew < w:
                if u_erase[i] < probability:
                    top, left = math.floor(u_top[i] * (h - eh + 1)), math.floor(u_left[i] * (w - ew + 1))
                    expected[:, top:top + eh, left:left + ew] = 0.0
                break
        else:
            failed += 1
        assert torch.equal(out[i], expected), i
    assert failed > 0 if h == 5 else failed == 0


def test_cutmix_box_is_the_authors_rand_bbox_at_the_drawn_centre():
    """The scripts' rand_bbox (utils/mixup.py:43-53, timm 0.4's): a cut of int(side * sqrt(1 - lam)) around the
    centre, [c - cut // 2, c + cut // 2) clipped to the image (later timm rounds the upper half up; they did not)."""
    h, w, lam = 11, 7, 0.4
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))  # 8 and 5: an odd side too
    clipped_at = set()
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        cy, cx = int(torch.randint(h, (), generator=g)), int(torch.randint(w, (), generator=g))  # its centre draw
        box = augment._cutmix_box(lam, h, w, torch.Generator().manual_seed(seed))
        assert box == tuple(int(np.clip(v, 0, side)) for v, side in ((cy - cut_h // 2, h), (cy + cut_h // 2, h),
                                                                     (cx - cut_w // 2, w), (cx + cut_w // 2, w)))
        clipped_at |= {i for i, v in enumerate(box) if v in (0, (h, h, w, w)[i])}
    assert clipped_at == {0, 1, 2, 3}  # boxes clipped at every border were among them


def test_cutmix_boxes_cover_one_minus_lambda_and_cutout_as_devries_and_taylor():
    """A CutMix box for lambda = 3/4 on 32 x 32 is 16 x 16 unless clipped at a border; a cutout hole of side 3 is
    the DeVries & Taylor code's [c - 1, c + 1) square, 2 x 2 away from the borders."""
    g = torch.Generator().manual_seed(0)
    sides = [(bottom - top, right - left) for top, bottom, left, right in
             (augment._cutmix_box(0.75, 32, 32, g) for _ in range(200))]
    assert max(max(s) for s in sides) == 16 and (16, 16) in sides
    holes = (augment.cutout(torch.ones(200, 1, 16, 16), 3, g) == 0).flatten(1).sum(1)
    assert holes.max() == 4 and set(holes.tolist()) <= {1, 2, 4}


@pytest.mark.parametrize("fields", [{"mixup": -1}, {"cutmix": -0.5}, {"label_smoothing": 1.0},
                                    {"random_erasing": 1.5}, {"crop_padding": 1.5}, {"crop_padding": -1},
                                    {"cutout": -2}])
def test_a_policy_refuses_each_value_out_of_range(fields):
    with pytest.raises(PapaError, match="must be"):
        Policy(**fields)


@pytest.mark.parametrize("grid", [{"mixup": []}, {"mixup": 0.5}, {"mixup": {"uniform": [0.1]}},
                                  {"mixup": {"uniform": [0.1, 0.2], "seed": 1}}])
def test_a_grid_refuses_what_it_cannot_draw_from(grid):
    with pytest.raises(PapaError, match="augmentation grid 'mixup'"):
        augment.draw_policies(grid, 2, torch.Generator().manual_seed(0))


def test_autoaugment_per_sample_and_reproducible():
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    a, _ = _apply(Policy(autoaugment="cifar10"), images, torch.zeros(8).long(), seed=2)
    b, _ = _apply(Policy(autoaugment="cifar10"), images, torch.zeros(8).long(), seed=2)
    assert torch.equal(a, b) and a.shape == images.shape
    assert Policy(autoaugment=True).autoaugment == "cifar10" and Policy(autoaugment=False).autoaugment == ""
    with pytest.raises(PapaError, match="unknown AutoAugment policy"):
        Policy(autoaugment="mnist")


def test_eval_transform_normalizes():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2)
    assert torch.allclose(eval_transform(images, (0.5,), (0.25,)), torch.tensor([-2.0, 2.0]).view(1, 1, 1, 2))


def test_policies_draw_from_the_grid():
    draw = lambda seed: draw_policies(CIFAR_GRID, 10, torch.Generator().manual_seed(seed),  # noqa: E731
                                      {"crop_padding": 4, "flip": True})
    policies = draw(0)
    assert policies == draw(0) and policies != draw(1)
    assert len({tuple(p.as_dict().values()) for p in policies}) > 1
    for p in policies:
        assert p.mixup in CIFAR_GRID["mixup"] and p.cutmix in CIFAR_GRID["cutmix"]
        assert p.label_smoothing in CIFAR_GRID["label_smoothing"]
        assert p.random_erasing in CIFAR_GRID["random_erasing"]
        assert p.crop_padding == 4 and p.flip
    ranged = draw_policies({"mixup": {"uniform": [0, 1]}, "label_smoothing": {"uniform": [0, 0.1]}}, 5,
                           torch.Generator().manual_seed(0), {})
    assert all(0 <= p.mixup <= 1 and 0 <= p.label_smoothing <= 0.1 for p in ranged)
    assert len({p.mixup for p in ranged}) == 5
    shifted = draw_policies({"mixup": {"uniform": [0.2, 0.3]}}, 20, torch.Generator().manual_seed(0), {})
    assert all(0.2 <= p.mixup <= 0.3 for p in shifted) and max(p.mixup for p in shifted) > 0.28  # lo + (hi - lo) u
    with pytest.raises(PapaError, match="unknown augmentation 'blur'"):
        draw_policies({"blur": [0, 1]}, 2, torch.Generator(), {})


# streams --------------------------------------------------------------------------------------------------
def test_stream_orders_shapes_and_reproducibility():
    data = tiny_dataset()
    train_idx = list(range(10, 200))  # 0..9 held out
    stream = MemberStream(data, train_idx, 16, [Policy()] * 3, seed=7)
    assert stream.steps_per_epoch == 11
    batches = list(stream.epoch(0))
    assert len(batches) == 11
    assert batches[0][0].shape == (3, 16, 1, 2, 2) and batches[0][1].shape == (3, 16, 10)
    seen = torch.cat([items(x) for x, _ in batches], dim=1)  # (p, 176)
    for j in range(3):
        assert len(set(seen[j].tolist())) == 176 and min(seen[j].tolist()) >= 10
        assert torch.equal(batches[0][1][j].argmax(1), seen[j, :16] % 10)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    again = list(MemberStream(data, train_idx, 16, [Policy()] * 3, seed=7).epoch(0))
    assert same_batches(batches, again)
    assert not torch.equal(items(next(stream.epoch(1))[0]), items(batches[0][0]))
    # a member's batches do not depend on how many members there are
    two = next(MemberStream(data, train_idx, 16, [Policy()] * 2, seed=7).epoch(0))
    assert torch.equal(two[0], batches[0][0][:2])
    with pytest.raises(PapaError, match="batch size 500"):
        MemberStream(data, train_idx, 500, [Policy()], seed=7)


@pytest.mark.parametrize("policy", [Policy(), Policy(flip=True)], ids=["draws-nothing", "draws"])
def test_keep_last_ends_each_epoch_with_the_incomplete_batch(policy):
    """``keep_last`` (fidelity.last_batch: authors, the scripts' DataLoader): ceil(n / B) steps an epoch, every
    training item once per member, the last batch of n mod B items; the full batches are those of the paper's
    setting, which leaves the order's last n mod B items out of the epoch."""
    data, train_idx = tiny_dataset(), list(range(10, 200))  # 190 items: 11 batches of 16 and 14 left over
    dropped = MemberStream(data, train_idx, 16, [policy] * 3, seed=7)
    kept = MemberStream(data, train_idx, 16, [policy] * 3, seed=7, keep_last=True)
    assert (dropped.steps_per_epoch, kept.steps_per_epoch) == (11, 12)
    full, every = list(dropped.epoch(2)), list(kept.epoch(2))
    assert [x.shape[1] for x, _ in every] == [16] * 11 + [14] and every[-1][1].shape == (3, 14, 10)
    assert same_batches(full, every[:11])
    if policy == Policy():
        seen = torch.cat([items(x) for x, _ in every], dim=1)
        assert all(sorted(seen[j].tolist()) == train_idx for j in range(3))
    assert MemberStream(data, range(32), 16, [policy], seed=0, keep_last=True).steps_per_epoch == 2  # none left


def tile_dataset(images: list, labels: list) -> TileDataset:
    """Tiles of 6 classes (mean 0, std 1), cut into 4 x 4 patches, 6 per epoch."""
    return TileDataset(images, labels, tuple(range(1, len(images) + 1)), 6, (0.0,) * 3, (1.0,) * 3, "tiles",
                       tuple("abcdef"), patch_size=4, epoch_size=6)


def test_patches_are_drawn_anywhere_inside_the_training_tiles_and_cut_there():
    sizes = [(10, 12), (7, 9)]  # (height, width), not square: rows and columns have their own range
    positions = draw_patches(sizes, torch.tensor([0, 1]), 4, 3000, torch.Generator().manual_seed(0))
    for t, (h, w) in enumerate(sizes):
        mine = [(y, x) for tile, y, x in positions if tile == t]
        assert 1300 < len(mine) < 1700  # a tile, then a position in it, each uniformly
        assert {y for y, _ in mine} == set(range(h - 4 + 1)) and {x for _, x in mine} == set(range(w - 4 + 1))
    assert {t for t, _, _ in draw_patches(sizes, torch.tensor([1]), 4, 50, torch.Generator())} == {1}
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    labels = [torch.randint(0, 6, (h, w), generator=g) for h, w in sizes]
    tiles = tile_dataset(images, labels)
    cut = [(0, 6, 8), (1, 3, 0), (0, 0, 5)]
    x, targets = PatchStream(tiles, [0, 1], 3, [Policy()], seed=0)._batch(Policy(), cut, torch.Generator())
    for k, (t, y, left) in enumerate(cut):
        torch.testing.assert_close(x[k], images[t][:, y:y + 4, left:left + 4] / 255.0)
        assert torch.equal(targets[k].argmax(0), labels[t][y:y + 4, left:left + 4])


def test_streams_refuse_items_and_batch_sizes_they_cannot_serve():
    data, one = tiny_dataset(), [Policy()]
    assert MemberStream(data, [0, 199], 1, one, seed=0).steps_per_epoch == 2  # the bounds and a batch of one
    assert MemberStream(data, range(4), 4, one, seed=0).steps_per_epoch == 1  # a batch of every item
    for indices, batch, message in (([0, 200], 1, r"training indices outside 0\.\.199"),
                                    ([-1, 0], 1, r"training indices outside 0\.\.199"),
                                    (range(4), 5, "batch size 5 does not fit 4 training items"),
                                    (range(4), 0, "batch size 0 does not fit 4 training items"),
                                    ([], 1, "batch size 1 does not fit 0 training items")):
        with pytest.raises(PapaError, match=message):
            MemberStream(data, indices, batch, one, seed=0)
    with pytest.raises(PapaError, match="a stream needs at least one member policy"):
        MemberStream(data, range(4), 1, [], seed=0)
    tiles = tile_dataset([torch.zeros(3, 8, 8, dtype=torch.uint8)] * 2, [torch.zeros(8, 8, dtype=torch.int64)] * 2)
    assert PatchStream(tiles, [0, 1], 6, one, seed=0).steps_per_epoch == 1  # a batch of the whole epoch
    assert PatchStream(tiles, [1], 4, one, seed=0).steps_per_epoch == 1  # the incomplete last batch dropped
    assert PatchStream(tiles, [0], 1, one, seed=0).steps_per_epoch == 6
    last = PatchStream(tiles, [1], 4, one, seed=0, keep_last=True)  # and kept (fidelity.last_batch)
    assert last.steps_per_epoch == 2 and [x.shape[1] for x, _ in last.epoch(0)] == [4, 2]
    for indices, batch, policy, message in (
            ([], 1, Policy(), r"training tiles must be a non-empty subset of 0\.\.1"),
            ([2], 1, Policy(), r"training tiles must be a non-empty subset of 0\.\.1"),
            ([-1], 1, Policy(), r"training tiles must be a non-empty subset of 0\.\.1"),
            ([0], 7, Policy(), "batch size 7 does not fit an epoch of 6 patches"),
            ([0], 0, Policy(), "batch size 0 does not fit an epoch of 6 patches"),
            ([0], 1, Policy(crop_padding=2), "take no crop_padding or autoaugment"),
            ([0], 1, Policy(autoaugment=True), "take no crop_padding or autoaugment")):
        with pytest.raises(PapaError, match=message):
            PatchStream(tiles, indices, batch, [policy], seed=0)
    with pytest.raises(PapaError, match="a stream needs at least one member policy"):
        PatchStream(tiles, [0], 1, [], seed=0)


def test_policies_that_draw_nothing_are_transformed_many_steps_at_once(monkeypatch):
    """Members whose policies draw nothing (label smoothing at most) get every batch of an epoch bitwise as one
    call per step makes it, contiguous, also when the transform resizes, when the epoch is cut into several
    chunks and for a rank's share of the members; any drawing policy keeps the call per step."""
    from papa.data import stream as streams

    rng = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randint(0, 256, (70, 2, 5, 5), dtype=torch.uint8, generator=rng), torch.arange(70) % 4,
                        4, (0.4, 0.5), (0.2, 0.3), "noise")
    policies = [Policy(), Policy(label_smoothing=0.1), Policy()]
    assert all(map(streams.draws_nothing, policies))
    for p in (Policy(flip=True), Policy(crop_padding=1), Policy(mixup=0.2), Policy(cutmix=1.0), Policy(cutout=2),
              Policy(random_erasing=0.1), Policy(randaugment="rand-m4-n1"), Policy(autoaugment="cifar10")):
        assert not streams.draws_nothing(p)
    for size, chunk, keep_last in ((None, streams.CHUNK_FLOATS, False), (7, 3 * 4 * 2 * 49 * 5, False),
                                   (7, 3 * 4 * 2 * 49 * 5, True)):  # 5 steps a chunk of 16 (67 items), 3 left
        data.image_size = size
        monkeypatch.setattr(streams, "CHUNK_FLOATS", chunk)
        stream = MemberStream(data, range(3, 70), 4, policies, seed=3, member_ids=[0, 2, 5], keep_last=keep_last)
        fixed = list(stream.epoch(1))
        monkeypatch.setattr(streams, "draws_nothing", lambda _: False)
        per_step = list(stream.epoch(1))
        monkeypatch.undo()
        assert len(fixed) == len(per_step) == 16 + keep_last and same_batches(fixed, per_step)
        assert all(x.is_contiguous() and t.is_contiguous() for x, t in fixed)
        assert fixed[0][0].shape == (3, 4, 2, size or 5, size or 5)
        assert fixed[-1][0].shape[1] == (3 if keep_last else 4)
    with_flip = MemberStream(data, range(70), 4, [*policies[:2], Policy(flip=True)], seed=3)
    calls = []
    monkeypatch.setattr(with_flip, "_fixed_epoch", lambda orders: calls.append(orders))
    next(with_flip.epoch(0))
    assert calls == []


def test_stream_augments_each_member_with_its_policy():
    data = ArrayDataset(torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8), torch.arange(64) % 4, 4,
                        (0.5,) * 3, (0.25,) * 3, "noise")
    policies = [Policy(), Policy(label_smoothing=0.2), Policy(mixup=1.0, crop_padding=2, flip=True)]
    x, t = next(MemberStream(data, range(64), 8, policies, seed=0).epoch(0))
    assert t[0].max() == 1 and torch.isclose(t[1].max(), torch.tensor(0.85))
    assert torch.allclose(t.sum(2), torch.ones(3, 8))


def test_member_batches_share_data_across_members():
    data = tiny_dataset()
    policies = [Policy(), Policy(), Policy(mixup=1.0)]
    stream = MemberStream(data, range(200), 32, policies, seed=0)
    gen = lambda: torch.Generator().manual_seed(666)  # noqa: E731
    first = [items(x) for x in stream.member_batches(0, gen(), 3)]
    assert len(first) == 3 and first[0].shape == (32,)
    for j in (1, None):
        same = [items(b) for b in stream.member_batches(j, gen(), 3)]
        assert all(torch.equal(a, b) for a, b in zip(first, same, strict=True))
    mixed = next(stream.member_batches(2, gen(), 1))
    assert not torch.equal(items(mixed), first[0])
    assert len(list(stream.member_batches(None, gen(), 10))) == 10  # more than one epoch of data


def test_each_loader_reads_data_slash_its_name_without_a_root(tmp_path, monkeypatch):
    """Without data.root a dataset is read from data/<name> below the working directory, as docs/data.md says."""
    monkeypatch.chdir(tmp_path)
    write_cifar(tmp_path / "data" / "cifar10", "cifar10")
    fakedata.write_optdigits(tmp_path / "data" / "optdigits")
    for part in ("train", "val"):
        _write_images(tmp_path / "data" / "imagenet" / part / "cat", 1)
    assert len(load_dataset("cifar10").test) == 20 and len(load_dataset("optdigits").test) == fakedata.OPTDIGITS_TEST
    assert load_dataset("imagenet").train.classes == ("cat",)
