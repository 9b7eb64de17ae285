"""The workflow's DAG-time data check (papa.config.missing_data, without torch) says what the dataset loaders
themselves say when the data is not there, and nothing when it is."""

import pytest

from papa.config import missing_data
from papa.data import load_dataset
from papa.errors import PapaError
from tests.helpers import tiny_experiment


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "imagenet", "vaihingen"])
def test_missing_data_says_what_the_loader_says(tmp_path, dataset):
    exp = tiny_experiment(data={"dataset": dataset, "root": str(tmp_path / "nothing")})
    with pytest.raises(PapaError) as loading:
        load_dataset(dataset, exp["data"]["root"])
    assert missing_data(exp) == str(loading.value)


@pytest.mark.parametrize(("dataset", "folders"), [
    ("cifar10", ["cifar-10-batches-py"]), ("cifar100", ["cifar-100-python"]), ("imagenet", ["train", "val"]),
    ("vaihingen", ["top"]),
])
def test_present_folders_pass(tmp_path, dataset, folders):
    for name in folders:
        (tmp_path / name).mkdir()
    assert missing_data(tiny_experiment(data={"dataset": dataset, "root": str(tmp_path)})) is None


def test_imagenet_names_the_missing_part(tmp_path):
    (tmp_path / "train").mkdir()
    exp = tiny_experiment(data={"dataset": "imagenet", "root": str(tmp_path)})
    assert missing_data(exp).startswith(f"ImageNet val not found: expected an image folder tree at {tmp_path / 'val'}")


def test_digits_is_embedded():
    assert missing_data(tiny_experiment()) is None
