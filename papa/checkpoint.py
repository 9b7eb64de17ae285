"""Populations and modules on disk: safetensors for tensors plus a JSON sidecar. Nothing is pickled."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

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


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` (contiguous CPU copies) to ``path`` and ``meta`` to its .json sidecar, each
    atomically; the sidecar is written last so its presence marks a complete checkpoint."""
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(cpu, str(tmp)))
    write_json(sidecar_path(path), {**meta, "versions": versions()})


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint and its sidecar; any missing, truncated or corrupt part is a PapaError."""
    path = Path(path)
    side = sidecar_path(path)
    if not path.exists():
        raise PapaError(f"{path}: checkpoint not found")
    if not side.exists():
        raise PapaError(f"{side}: checkpoint sidecar not found (incomplete checkpoint?)")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PapaError(f"{side}: corrupt checkpoint sidecar ({e})") from None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PapaError(f"{path}: corrupt or truncated checkpoint ({msg})") from None
    return tensors, meta
