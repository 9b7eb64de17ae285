"""Bad data on disk and bad loader options: each is a PapaError naming the file (or option) and what is wrong with
it; and the digits loader's fallback to scikit-learn's own reader gives the same images."""

import codecs
import dataclasses
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from papa import fakedata
from papa.data import ArrayDataset, load_dataset, load_split
from papa.data import datasets as datasets_module
from papa.data.augment import Policy
from papa.data.stream import MemberStream
from papa.data.subset import subset_splits
from papa.data.vaihingen import tile_name
from papa.errors import PapaError
from tests.unit.test_data import tiny_dataset, write_cifar
from tests.vaihingen_tiles import OPTIONS, write_tiles


# digits ----------------------------------------------------------------------------------------------------
def test_digits_fall_back_to_scikit_learns_loader_with_the_same_images(monkeypatch):
    """Should scikit-learn's bundled CSV not be where it is read directly, its own loader gives the same data."""
    direct = datasets_module._digits_arrays()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # the CSV is not found
    images, labels = datasets_module._digits_arrays()
    assert images.shape == (1797, 8, 8) and labels.dtype == np.int64
    assert np.array_equal(images, direct[0]) and np.array_equal(labels, direct[1])


# UCI optdigits ---------------------------------------------------------------------------------------------
def test_optdigits_file_that_is_not_text_is_named(tmp_path):
    fakedata.write_optdigits(tmp_path)
    bad = tmp_path / "optdigits.tes"
    bad.write_bytes(b"0,1,\xff\xfe\n")
    with pytest.raises(PapaError, match=rf"^cannot read {bad}: 'utf-8' codec can't decode byte 0xff"):
        load_dataset("optdigits", tmp_path)


# CIFAR python archives -------------------------------------------------------------------------------------
@pytest.fixture
def cifar(tmp_path) -> Path:
    """A CIFAR-10 archive; returns its first training batch file, which a case replaces."""
    write_cifar(tmp_path, "cifar10")
    return tmp_path / "cifar-10-batches-py" / "data_batch_1"


class _Encoded:
    """Pickles as ``_codecs.encode(text, 'utf-8')``: a call CIFAR archives make with latin1 only."""

    def __reduce__(self):
        return codecs.encode, ("abc", "utf-8")


def _batch(**change) -> dict:
    return {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], **change}


@pytest.mark.parametrize(("content", "problem"), [
    (pickle.dumps(_batch(batch_label=_Encoded()), protocol=2),
     "UnpicklingError: refusing _codecs.encode with encoding 'utf-8'"),
    (pickle.dumps([_batch()], protocol=2), "expected a dict, found list"),
    (pickle.dumps(_batch(labels=["cat", "dog"]), protocol=2), "'labels' is not a list of integers"),
], ids=["non-latin1-encode", "not-a-dict", "text-labels"])
def test_corrupt_cifar_archive_is_named_with_its_problem(cifar, content, problem):
    cifar.write_bytes(content)
    with pytest.raises(PapaError) as e:
        load_dataset("cifar10", cifar.parent.parent)
    assert str(e.value) == f"corrupt archive {cifar}: {problem}"


def test_unreadable_archive_is_named(tmp_path):
    """safe_unpickle (the loader checks the batch files are files first) on a path it cannot read."""
    with pytest.raises(PapaError) as e:
        datasets_module.safe_unpickle(tmp_path)
    assert str(e.value) == f"cannot read {tmp_path}: Is a directory"


# ImageNet --------------------------------------------------------------------------------------------------
def test_imagenet_train_and_val_with_different_classes_are_refused(tmp_path):
    fakedata.write_imagenet(tmp_path)
    first = sorted((tmp_path / "val").iterdir())[0]
    first.rename(first.with_name("n99999999"))
    with pytest.raises(PapaError) as e:
        load_dataset("imagenet", tmp_path, image_size=32)
    assert str(e.value) == (f"ImageNet: {tmp_path / 'train'} and {tmp_path / 'val'} have different class folders "
                            f"(e.g. {first.name}, n99999999)")


# split files -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "problem"), [
    ('[[0, 1], [2]]', "expected a JSON object with 'train' and 'val'"),
    ('{"train": [0, 1, 2], "val": [], "meta": {"n": 3}}', "empty validation split"),
], ids=["a-list", "no-validation"])
def test_bad_split_file_is_named(tmp_path, text, problem):
    path = tmp_path / "split.json"
    path.write_text(text)
    with pytest.raises(PapaError) as e:
        load_split(path)
    assert str(e.value) == f"bad split file {path}: {problem}"


# Vaihingen -------------------------------------------------------------------------------------------------
@pytest.fixture
def tiles(tmp_path) -> Path:
    return write_tiles(tmp_path)


def test_vaihingen_tile_that_is_not_an_image_is_named(tiles):
    bad = tiles / "top" / tile_name(OPTIONS["val_tiles"][0])
    bad.write_bytes(b"not a TIFF")
    with pytest.raises(PapaError, match=rf"^cannot read {bad}: cannot identify image file"):
        load_dataset("vaihingen", tiles, **OPTIONS)


def test_vaihingen_label_of_another_size_than_its_tile_is_named(tiles):
    tile = OPTIONS["train_tiles"][1]
    label = tiles / "gts_for_participants" / tile_name(tile)
    with Image.open(label) as image:
        image.crop((0, 0, 40, 64)).save(label)
    with pytest.raises(PapaError) as e:
        load_dataset("vaihingen", tiles, **OPTIONS)
    assert str(e.value) == f"Vaihingen tile {tile}: image 80x64 but label 40x64 ({label})"


@pytest.mark.parametrize(("option", "message"), [
    ({"patch_size": 4}, "Vaihingen: patch_size must be an integer >= 8 and epoch_size >= 1, found 4 and 24"),
    ({"epoch_size": 0}, "Vaihingen: patch_size must be an integer >= 8 and epoch_size >= 1, found 32 and 0"),
    ({"patch_size": 32.0}, "Vaihingen: patch_size must be an integer >= 8 and epoch_size >= 1, found 32.0 and 24"),
    ({"label_dirs": "gts_complete"}, "Vaihingen option label_dirs: expected a non-empty list of folder names, "
                                     "found 'gts_complete'"),
    ({"label_dirs": []}, "Vaihingen option label_dirs: expected a non-empty list of folder names, found []"),
    ({"label_dirs": ["gts", ""]}, "Vaihingen option label_dirs: expected a non-empty list of folder names, "
                                  "found ['gts', '']"),
])
def test_bad_vaihingen_options_are_named_before_any_file_is_read(tmp_path, option, message):
    with pytest.raises(PapaError) as e:
        load_dataset("vaihingen", tmp_path / "absent", **{**OPTIONS, **option})
    assert str(e.value) == message


# streams and subsets ---------------------------------------------------------------------------------------
def test_a_stream_needs_one_member_id_per_policy():
    with pytest.raises(PapaError, match=r"^2 member ids for 3 policies$"):
        MemberStream(tiny_dataset(), range(100), 10, [Policy()] * 3, seed=1, member_ids=[3, 4])


def test_a_subset_of_a_dataset_of_unknown_kind_is_refused():
    splits = load_dataset("digits")
    own = torch.utils.data.TensorDataset(torch.zeros(5, 1, 8, 8), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"^cannot take a subset of TensorDataset$"):
        subset_splits(dataclasses.replace(splits, test=own), train=2, test=2)
    assert isinstance(subset_splits(splits, train=2, test=2).test, ArrayDataset)  # the kinds it knows
