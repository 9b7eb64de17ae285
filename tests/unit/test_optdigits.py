"""UCI optdigits read from its own files (optdigits.tra / optdigits.tes, as `papa fake-data` writes them), the
input scaling of both digit datasets (raw counts 0-16 or standardized) and the bundled copy's split seed."""

import numpy as np
import pytest
import torch

from papa import fakedata
from papa.config import missing_data
from papa.data import load_dataset
from papa.data.augment import eval_transform
from papa.data.datasets import DIGITS_TEST_FRACTION, OPTDIGITS_FILES, read_optdigits
from papa.errors import PapaError
from tests.helpers import tiny_experiment


@pytest.fixture
def files(tmp_path):
    fakedata.write_optdigits(tmp_path)
    return tmp_path


def _table(path) -> np.ndarray:
    return np.array([[int(v) for v in line.split(",")] for line in path.read_text().splitlines()])


def test_fake_files_are_in_ucis_format(files):
    """One image per line: 64 comma-separated counts 0-16, then the class 0-9; every class in both files."""
    for name, n in zip(OPTDIGITS_FILES, (fakedata.OPTDIGITS_TRAIN, fakedata.OPTDIGITS_TEST), strict=True):
        lines = (files / name).read_text().splitlines()
        assert len(lines) == n and all(len(line.split(",")) == 65 for line in lines)
        table = _table(files / name)
        assert table[:, :64].min() >= 0 and table[:, :64].max() <= 16
        assert sorted(set(table[:, 64].tolist())) == list(range(10))


def test_loader_reads_both_files_as_they_are(files):
    """Training and test sets are the two files, row for row (no split of ours); raw scaling hands the model
    the counts themselves, standardizing uses the training pixels' mean and std."""
    raw = load_dataset("optdigits", files, scaling="raw")
    train, test = _table(files / "optdigits.tra"), _table(files / "optdigits.tes")
    assert (raw.num_classes, raw.in_channels, raw.image_size, raw.kind) == (10, 1, 8, "array")
    for part, table in ((raw.train, train), (raw.test, test)):
        assert torch.equal(part.labels, torch.from_numpy(table[:, 64]))
        x = eval_transform(part.images, part.mean, part.std)
        assert x.shape == (len(table), 1, 8, 8)
        assert torch.equal(x.flatten(1), torch.from_numpy(table[:, :64]).float())  # exactly 0-16
    assert "optdigits.tra" in raw.source and "raw 0-16" in raw.source
    std = load_dataset("optdigits", files)  # standardize is the default
    x = eval_transform(std.train.images, std.mean, std.std)
    assert abs(x.mean().item()) < 1e-5 and abs(x.std().item() - 1) < 1e-3
    assert torch.equal(std.test.labels, raw.test.labels) and "standardized" in std.source


def test_missing_and_malformed_files_are_one_line_errors(tmp_path, files):
    with pytest.raises(PapaError, match=r"UCI optdigits not found: expected the file .*optdigits\.tra"):
        load_dataset("optdigits", tmp_path / "nothing")
    (files / "optdigits.tes").unlink()
    with pytest.raises(PapaError, match=r"expected the file .*optdigits\.tes"):
        load_dataset("optdigits", files)
    bad = tmp_path / "bad.tra"
    for text, problem in [
        ("Block 1,Block 2\n", r"line 1: 'Block 1' is not an integer"),  # a copy with a header line
        ("0,1,2\n", r"line 1: expected 65 comma-separated integers .* found 3"),
        (",".join(["17"] * 64 + ["3"]) + "\n", "line 1: a pixel count outside 0-16"),
        (",".join(["0"] * 64 + ["10"]) + "\n", "outside 0-9"),
        ("\n\n", "no images"),
    ]:
        bad.write_text(text)
        with pytest.raises(PapaError, match=problem):
            read_optdigits(bad)
    bad.write_text(",".join(["0"] * 64 + ["7"]) + "\r\n")  # CRLF line ends read as well
    assert read_optdigits(bad)[1].tolist() == [7]
    with pytest.raises(PapaError, match="scaling must be one of standardize, raw"):
        load_dataset("optdigits", files, scaling="minmax")


def test_preflight_check_names_the_missing_file_as_the_loader_does(tmp_path, files):
    exp = tiny_experiment(data={"dataset": "optdigits", "root": str(tmp_path / "nothing")})
    with pytest.raises(PapaError) as loading:
        load_dataset("optdigits", exp["data"]["root"])
    assert missing_data(exp) == str(loading.value)
    assert missing_data(tiny_experiment(data={"dataset": "optdigits", "root": str(files)})) is None
    (files / "optdigits.tes").unlink()
    (files / "optdigits.tes").mkdir()  # a folder where the file should be
    assert "optdigits.tes" in missing_data(tiny_experiment(data={"dataset": "optdigits", "root": str(files)}))


def test_bundled_digits_scaling_and_split_seed():
    """``scaling: raw`` feeds the counts 0-16 (what 0-255 images rounded from them encode); another
    ``test_split_seed`` holds out another stratified 20%; the defaults are the data as they always were."""
    std, raw = load_dataset("digits"), load_dataset("digits", scaling="raw")
    assert torch.equal(std.test.labels, raw.test.labels) and std.mean != raw.mean
    counts = eval_transform(raw.train.images, raw.mean, raw.std)
    assert counts.min() == 0 and counts.max() == 16 and torch.equal(counts, counts.round())
    assert torch.equal(std.train.images, torch.round(raw.train.images * (255 / 16)).to(torch.uint8))
    assert torch.equal(load_dataset("digits", test_split_seed=0).test.images, std.test.images)
    other = load_dataset("digits", test_split_seed=1)
    assert len(other.test) == len(std.test) == 359 and not torch.equal(other.test.images, std.test.images)
    per_class = torch.bincount(other.test.labels, minlength=10)
    everything = torch.bincount(torch.cat([other.train.labels, other.test.labels]), minlength=10)
    assert torch.equal(per_class, torch.round(DIGITS_TEST_FRACTION * everything).long())
    with pytest.raises(PapaError, match="test_split_seed must be an integer >= 0"):
        load_dataset("digits", test_split_seed=-1)
    with pytest.raises(PapaError, match="dataset 'optdigits' has no option 'test_split_seed'"):
        load_dataset("optdigits", "x", test_split_seed=1)
