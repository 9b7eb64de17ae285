"""papa.io: results get the permissions the user's umask allows (colleagues on a shared cluster project can
read them), whichever writer made them; digests bind files to what they were made from; a write the disk refuses
leaves the earlier file whole and is one line naming the path and the room left; tensor files check their own
bytes; a lock keeps one process at a time."""

import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import stat
import subprocess
import sys

import pytest
import torch

from papa.checkpoint import DIGEST_KEY, first_difference, load_tensors, read_meta, save_tensors
from papa.data.splits import save_split
from papa.errors import PapaError
from papa.io import file_digest, hold_lock, human_bytes, write_atomic, write_error, write_json, write_text


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


def test_a_write_makes_its_folders_and_a_failing_writer_leaves_nothing(tmp_path):
    write_json(tmp_path / "new" / "deeper" / "m.json", {"b": 1, "a": [1]})
    assert (tmp_path / "new" / "deeper" / "m.json").read_text() == '{\n  "b": 1,\n  "a": [\n    1\n  ]\n}\n'

    def failing(tmp):
        tmp.write_text("half")
        raise ValueError("the writer's own error")

    write_text(tmp_path / "kept.txt", "old")
    with pytest.raises(ValueError, match="the writer's own error"):
        write_atomic(tmp_path / "kept.txt", failing)
    assert (tmp_path / "kept.txt").read_text() == "old" and not list(tmp_path.glob(".*.tmp"))


def test_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    assert file_digest(path) == hashlib.sha256(b"abc" * 1000).hexdigest()


# a full disk -------------------------------------------------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path):
    """A directory holding a good file, with room for 8 kB more (a tmpfs, else a file size limit: helpers)."""
    from tests.helpers import SmallDisk

    with SmallDisk(tmp_path / "disk", 64 * 1024) as disk:
        (disk.path / "good.csv").write_text("a,b\n1,2\n")
        disk.fill(leave=8 * 1024)
        yield disk


def test_a_write_the_disk_refuses_leaves_the_earlier_file_and_names_the_path(full_disk):
    good = full_disk.path / "good.csv"
    with full_disk.limited(), pytest.raises(OSError) as e:
        write_text(good, "a,b\n" + "1,2\n" * 100_000)
    assert e.value.errno in (errno.ENOSPC, errno.EFBIG) and e.value.filename == str(good)
    assert good.read_text() == "a,b\n1,2\n"  # whole: the new text went to a temporary file, now removed
    assert sorted(p.name for p in full_disk.path.iterdir()) == sorted(["good.csv", *["filler"] * full_disk.tmpfs])
    line = write_error(e.value)
    assert re.fullmatch(rf"{re.escape(str(good))}: (no space left on device|file too large \(.*\)) \(\d[\d.]* [kMGT]?B "
                        r"free on its file system\); free some space and run the same command again", line), line


def test_a_tensors_file_the_disk_refuses_is_an_oserror_naming_it(full_disk):
    """safetensors (Rust) reports a failed write as its own error: the atomic writer makes it the OSError it was."""
    path = full_disk.path / "pop.safetensors"
    with full_disk.limited(), pytest.raises(OSError) as e:
        save_tensors(path, {"w": torch.zeros(100_000)}, {"k": 1})
    assert e.value.errno in (errno.ENOSPC, errno.EFBIG) and e.value.filename == str(path)
    assert not path.exists() and not list(full_disk.path.glob(".*.tmp"))


def test_write_errors_are_one_line_and_other_oserrors_are_not_theirs(tmp_path):
    assert write_error(OSError(errno.EROFS, "Read-only file system", "/ro/x")) == "/ro/x: read-only file system"
    assert write_error(OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "x"))).startswith(
        f"{tmp_path / 'x'}: disk quota exceeded (")
    assert write_error(OSError(errno.EIO, "Input/output error", "/x")) is None
    assert human_bytes(0) == "0 B" and human_bytes(1234) == "1.23 kB" and human_bytes(5.6e9) == "5.6 GB"
    assert human_bytes(999) == "999 B" and human_bytes(1000) == "1 kB" and human_bytes(812_300) == "812 kB"


# tensor files check themselves -----------------------------------------------------------------------------
def flip_bit(path, name: str | None = None, offset: int = 3) -> None:
    """Flip one bit of a safetensors file: in tensor ``name``'s bytes, or (no name) in the header's metadata."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    if name is None:
        at = data.index(b'\\"seed\\": 1', 8, 8 + n) + len(b'\\"seed\\": ')  # "seed": 1 -> "seed": 3
        data[at] ^= 0x02
    else:
        at = 8 + n + json.loads(data[8:8 + n])[name]["data_offsets"][0] + offset
        data[at] ^= 0x10
    path.write_bytes(data)


def test_a_flipped_bit_anywhere_is_refused_as_corrupt(tmp_path):
    path = tmp_path / "p.safetensors"
    tensors = {"w": torch.randn(4, 3), "n": torch.tensor(7), "h": torch.randn(5).to(torch.bfloat16)}
    save_tensors(path, tensors, {"seed": 1})
    loaded, meta = load_tensors(path)
    assert meta["seed"] == 1 and DIGEST_KEY not in meta and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    good = path.read_bytes()
    for name in ("w", "n", "h", None):
        path.write_bytes(good)
        flip_bit(path, name, offset=1 if name == "h" else 3)
        with pytest.raises(PapaError, match=r"p\.safetensors: corrupt: its bytes do not match what was written "
                                            r"\(the SHA-256 recorded in its header\); do this$"):
            load_tensors(path, "do this")


def test_the_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    for name in ("a", "b"):
        save_tensors(tmp_path / f"{name}.safetensors", {"w": torch.ones(3), "v": torch.zeros(2)}, {"x": [1, 2.5]})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_a_file_written_before_digests_loads_with_a_warning(tmp_path, capsys):
    """Decision: populations and soups written before files carried a digest stay readable (unchecked, said once)."""
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={"papa": json.dumps({"seed": 1})})
    for _ in range(2):
        tensors, meta = load_tensors(path)
    assert meta == {"seed": 1} and torch.equal(tensors["w"], torch.ones(2))
    assert capsys.readouterr().err == (f"papa: warning: {path} carries no digest (written by an earlier papa): its "
                                       "bytes cannot be checked\n")


def test_a_file_without_metadata_in_its_header_reads_its_sidecar_and_bad_metadata_is_named(tmp_path, capsys):
    """Older files kept their metadata only in the .json sidecar: a missing or corrupt sidecar is named, never a
    traceback; metadata in the header that is not a JSON object is refused as corrupt."""
    from safetensors.torch import save_file

    path = tmp_path / "older.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(PapaError, match=r"older\.json: checkpoint sidecar not found \(incomplete checkpoint\?\)$"):
        load_tensors(path)
    (tmp_path / "older.json").write_text("{")
    with pytest.raises(PapaError, match=r"older\.json: corrupt checkpoint sidecar \(Expecting"):
        load_tensors(path)
    (tmp_path / "older.json").write_text('{"seed": 1}')
    assert load_tensors(path)[1] == {"seed": 1} and "carries no digest" in capsys.readouterr().err
    with pytest.raises(PapaError, match=r"older\.safetensors: no readable metadata in its header \(KeyError\)$"):
        read_meta(path)
    for bad, why in (("{", r"corrupt checkpoint metadata \(Expecting"), ("[1]", r"corrupt checkpoint metadata \(not")):
        save_file({"w": torch.ones(2)}, str(path), metadata={"papa": bad})
        with pytest.raises(PapaError, match=why):
            load_tensors(path)
        with pytest.raises(PapaError, match="no readable metadata in its header"):
            read_meta(path)


def test_first_difference_is_the_first_key_path_whose_values_differ():
    assert first_difference({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == ("a.c", 2, 3)
    assert first_difference({"swa": None}, {"swa": {"start": 0.75}}) == ("swa", None, {"start": 0.75})
    assert first_difference({}, {"seed": 2}) == ("seed", None, 2)
    assert first_difference({"a": {"b": [1, 2]}}, {"a": {"b": [1, 2]}}) is None


# one process at a time ---------------------------------------------------------------------------------------
def test_a_held_lock_refuses_a_second_holder_naming_the_first(tmp_path, umask):
    lock = tmp_path / "runs" / "run" / ".lock"
    with hold_lock(lock, "busy: {holder}"):
        assert lock.read_text() == f"process {os.getpid()} on {socket.gethostname()}\n"
        assert mode(lock) == 0o666 & ~umask
        fd = os.open(lock, os.O_RDWR)  # another open file description: flock treats it as another process
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        done = subprocess.run([sys.executable, "-c", "from papa.io import hold_lock\n"
                               f"with hold_lock({str(lock)!r}, 'busy: {{holder}}'): pass"],
                              capture_output=True, text=True)
        assert done.returncode == 1 and done.stderr.strip().endswith(
            f"papa.errors.PapaError: busy: process {os.getpid()} on {socket.gethostname()}")
    assert not lock.exists() and not lock.parent.exists()  # gone, with the folder it made


def test_a_lock_file_left_by_a_killed_holder_blocks_nothing(tmp_path):
    lock = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom papa.io import hold_lock\n"
                               f"with hold_lock({str(lock)!r}, 'busy'):\n print('held', flush=True)\n"
                               " sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(PapaError, match=r"^busy$"), hold_lock(lock, "busy"):
        pass
    holder.kill()
    holder.wait()
    assert lock.exists()  # left behind by the killed holder, and no longer locked
    with hold_lock(lock, "busy"):
        pass
    assert not lock.exists()
