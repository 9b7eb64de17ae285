"""Every dataset is declared once (papa.catalog, without torch): its loader, ``papa fake-data`` and the schema
agree with the declaration, and the workflow's check before any job starts (papa.config.missing_data) says
what the loader says when the data is not there, and nothing when it is."""

from pathlib import Path

import pytest

from papa import catalog
from papa.config import missing_data, schema
from papa.data import LOADERS, load_dataset
from papa.data.datasets import register
from papa.errors import PapaError
from papa.fakedata import WRITERS
from tests.helpers import tiny_experiment

WITH_PATHS = [name for name, d in catalog.DATASETS.items() if d.paths]


def test_every_dataset_is_declared_loaded_written_and_in_the_schema():
    assert set(LOADERS) == set(catalog.DATASETS)
    assert schema("experiment")["properties"]["data"]["properties"]["dataset"]["enum"] == list(catalog.DATASETS)
    assert set(WRITERS) == set(WITH_PATHS)
    assert all(d.missing for d in catalog.DATASETS.values() if d.paths)


def test_a_loader_of_an_undeclared_dataset_is_refused_at_import():
    with pytest.raises(LookupError, match="'mnist' is not declared in papa/catalog.py"):
        register("mnist")
    assert "mnist" not in LOADERS


@pytest.mark.parametrize("dataset", WITH_PATHS)
def test_missing_data_says_what_the_loader_says(tmp_path, dataset):
    exp = tiny_experiment(data={"dataset": dataset, "root": str(tmp_path / "nothing")})
    with pytest.raises(PapaError) as loading:
        load_dataset(dataset, exp["data"]["root"])
    assert missing_data(exp) == str(loading.value)


@pytest.mark.parametrize("dataset", WITH_PATHS)
def test_present_paths_pass(tmp_path, dataset):
    for name in catalog.DATASETS[dataset].paths:
        (tmp_path / name).touch() if Path(name).suffix else (tmp_path / name).mkdir()
    assert missing_data(tiny_experiment(data={"dataset": dataset, "root": str(tmp_path)})) is None


def test_imagenet_names_the_missing_part(tmp_path):
    (tmp_path / "train").mkdir()
    exp = tiny_experiment(data={"dataset": "imagenet", "root": str(tmp_path)})
    assert missing_data(exp).startswith(f"ImageNet val not found: expected an image folder tree at {tmp_path / 'val'}")


def test_digits_is_embedded():
    assert missing_data(tiny_experiment()) is None


def test_a_path_with_a_suffix_is_a_file(tmp_path, monkeypatch):
    monkeypatch.setitem(catalog.DATASETS, "uci", catalog.Dataset("uci", ("a.tra",), "no {name} at {path}"))
    (tmp_path / "a.tra").mkdir()  # a folder is not the file
    assert catalog.missing("uci", tmp_path) == f"no a.tra at {tmp_path / 'a.tra'}"
    (tmp_path / "a.tra").rmdir()
    (tmp_path / "a.tra").write_text("")
    assert catalog.missing("uci", tmp_path) is None
