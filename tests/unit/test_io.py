"""papa.io: results get the permissions the user's umask allows (colleagues on a shared cluster project can
read them), whichever writer made them; digests bind files to what they were made from."""

import hashlib
import os
import stat

import pytest
import torch

from papa.checkpoint import save_tensors
from papa.data.splits import save_split
from papa.io import file_digest, write_json, write_text


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_get_the_umasks_permissions(tmp_path, umask):
    expected = 0o666 & ~umask
    write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "b.json", {"a": 1})
    save_tensors(tmp_path / "c.safetensors", {"w": torch.zeros(2)}, {"k": 1})
    save_split(tmp_path / "split.json", {"train": [0, 1], "val": [2], "n": 3}, {"dataset": "digits"})
    for name in ("a.txt", "b.json", "c.safetensors", "c.json", "split.json"):
        assert mode(tmp_path / name) == expected, name
    assert not list(tmp_path.glob(".*.tmp"))


def test_rewriting_a_file_keeps_the_umasks_permissions(tmp_path, umask):
    (tmp_path / "a.txt").write_text("old")
    os.chmod(tmp_path / "a.txt", 0o600)
    write_text(tmp_path / "a.txt", "new")
    assert mode(tmp_path / "a.txt") == 0o666 & ~umask
    assert os.umask(umask) == umask  # reading the umask left it as it was


def test_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    assert file_digest(path) == hashlib.sha256(b"abc" * 1000).hexdigest()
