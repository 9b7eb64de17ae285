"""File output: atomic writes (under the final name only once complete, with the umask's permissions, not mkstemp's
0600), ``write_error``'s one line for a refused write, and ``hold_lock`` for a process working in a directory."""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from papa.errors import PapaError


def current_umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, writer: Callable[[Path], None]) -> None:
    """``writer`` writes a unique temporary file beside ``path``, then fsynced and renamed into place (removed on
    failure, ``path`` untouched). A failed system call naming no file (a failed write(), as a full disk gives) or the
    temporary file, or reported by a writer in Rust (safetensors), is raised again as an OSError naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        code = _os_error_code(e)
        if code is not None and (not isinstance(e, OSError) or e.filename is None
                                 or Path(e.filename).name.startswith(f".{path.name}.")):
            raise OSError(code, os.strerror(code), str(path)) from e
        raise


def _os_error_code(e: BaseException) -> int | None:
    """An OSError's errno, or the one Rust's io::Error prints in a message: "... (os error 28)"."""
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"\(os error (\d+)\)", str(e)) if isinstance(e, Exception) else None
    return int(found[1]) if found else None


def write_text(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def need_file(path: Path, step: str) -> Path:
    if not path.is_file():
        raise PapaError(f"{path}: not found; run `{step}` on this run first")
    return path


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """The SHA-256 (or ``algorithm``) of a file's bytes (hex), read in chunks: what binds a run's later outputs to the
    files they were made from."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


# the machine refusing a write ------------------------------------------------------------------------------
SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
         errno.EFBIG: "file too large (the file system's or this process's file size limit)"}
WRITE_ERRORS = {**SPACE, errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


def human_bytes(n: float) -> str:
    """``n`` bytes as ``0 B``, ``812 kB``, ``1.4 GB`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 999.5 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" or n >= 99.5 else f"{n:.3g} {unit}"


def free_space(path: str | Path) -> int | None:
    """Bytes free for this user on the file system holding ``path`` (its nearest existing ancestor)."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free
    return None


def write_error(e: OSError) -> str | None:
    """The one line for a write the file system refused: the path and, for lack of space, the space left; else None."""
    reason = WRITE_ERRORS.get(e.errno)
    if reason is None:
        return None
    where = f"{e.filename}: " if e.filename else ""
    if e.errno not in SPACE:
        return f"{where}{reason}"
    free = free_space(e.filename) if e.filename else None
    left = f" ({human_bytes(free)} free on its file system)" if free is not None else ""
    return f"{where}{reason}{left}; free some space and run the same command again"


# an output path the file system cannot take as given: bad input, whatever the room
PATH_ERRORS = {errno.EISDIR: "is a folder, not a file", errno.ENOTDIR: "a part of this path is a file, not a folder",
               errno.EEXIST: "exists and is not a folder"}


def path_error(e: OSError) -> str | None:
    """The one line for a path naming a folder where a file is needed, or a file where a folder is; else None."""
    reason = PATH_ERRORS.get(e.errno)
    return f"{e.filename}: {reason}" if reason is not None and e.filename else None


# one process at a time ----------------------------------------------------------------------------------
@contextlib.contextmanager
def hold_lock(path: str | Path, busy: str) -> Iterator[None]:
    """Hold an exclusive flock on the file ``path`` (holding this process's id and host) while the block runs; the
    file goes when the block ends (and its folder, when this call made it and it is empty). Another holder makes a
    PapaError: ``busy`` with ``{holder}`` filled in. The kernel drops the lock when its holder exits."""
    path = Path(path)
    made = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise PapaError(busy.format(holder=holder)) from None
        # locked; still the file at ``path``, or one its holder removed as it finished? then try again
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # who holds it, for the message above (the lock needs no disk space)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: a process waiting on this file then tries again
        os.close(fd)
        if made:
            with contextlib.suppress(OSError):
                path.parent.rmdir()
