"""Populations and modules on disk: safetensors for tensors plus a JSON sidecar. Nothing is pickled."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from papa.errors import PapaError
from papa.io import write_atomic, write_json


def versions() -> dict[str, str]:
    """Versions of the libraries that shape a result (read from package metadata: importing timm and
    torchvision just for their version strings would cost seconds per run)."""
    names = ("papa", "torch", "torchvision", "timm", "safetensors", "numpy")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "unknown"
    return {**found, "python": platform.python_version()}


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


META_KEY = "papa"  # the safetensors header entry holding the metadata (as JSON)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` (contiguous CPU copies) to ``path`` and ``meta`` to its .json sidecar, each
    atomically.

    Two files cannot be replaced together atomically, so ``meta`` also goes into the safetensors header:
    the tensors file alone is complete and consistent (a kill between the two renames leaves new tensors
    beside an old sidecar), and the sidecar is its readable copy."""
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {**meta, "versions": versions()}
    header = {META_KEY: json.dumps(meta)}
    write_atomic(path, lambda tmp: save_file(cpu, str(tmp), metadata=header))
    write_json(sidecar_path(path), meta)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint: its tensors and the metadata in its header (the sidecar for files written
    without one); any missing, truncated or corrupt part is a PapaError."""
    path = Path(path)
    side = sidecar_path(path)
    if not path.exists():
        raise PapaError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header, names = f.metadata() or {}, f.keys()
            tensors = {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PapaError(f"{path}: corrupt or truncated checkpoint ({msg})") from None
    if META_KEY in header:
        try:
            return tensors, json.loads(header[META_KEY])
        except json.JSONDecodeError as e:
            raise PapaError(f"{path}: corrupt checkpoint metadata ({e})") from None
    if not side.exists():
        raise PapaError(f"{side}: checkpoint sidecar not found (incomplete checkpoint?)")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PapaError(f"{side}: corrupt checkpoint sidecar ({e})") from None
    return tensors, meta
