"""Populations, modules and a trainer's state on disk: safetensors plus a JSON sidecar; nothing is pickled."""

import contextlib
import hashlib
import json
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from papa.errors import PapaError
from papa.io import write_atomic, write_json
from papa.population import Population
from papa.provenance import code_version
from papa.swa import SWA


def versions() -> dict[str, str]:
    """Versions of the libraries that shape a result, from package metadata (importing timm takes seconds)."""
    found = dict.fromkeys(("papa", "torch", "torchvision", "timm", "safetensors", "numpy"), "unknown")
    for name in found:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return {**found, "python": platform.python_version()}


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


META_KEY = "papa"  # the header's one metadata entry, the metadata as JSON (safetensors writes several in any order)
DIGEST_KEY = "content_sha256"  # the metadata's last key: tensors_digest of the rest of the file


def tensors_digest(tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """SHA-256 of a file's metadata (as JSON) and tensors (name, dtype, shape, bytes): safetensors has no checksum."""
    digest = hashlib.sha256(json.dumps(meta).encode())
    for name, t in sorted(tensors.items()):
        digest.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` to ``path`` and ``meta`` (+ library and code versions) to its .json sidecar, each atomically;
    as two files cannot be replaced together, ``meta`` and its digest go in its header too: that file alone is whole."""
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = json.loads(json.dumps({**meta, "versions": versions(), "code": code_version()}))  # as load_tensors reads it
    meta[DIGEST_KEY] = tensors_digest(cpu, meta)
    write_atomic(path, lambda tmp: save_file(cpu, str(tmp), metadata={META_KEY: json.dumps(meta)}))
    write_json(sidecar_path(path), meta)


def _read(path: Path, tensors: bool) -> tuple[dict, dict]:
    if not path.exists():
        raise PapaError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = f.keys() if tensors else []
            return f.metadata() or {}, {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PapaError(f"{path}: corrupt or truncated checkpoint ({msg})") from None


def read_meta(path: str | Path) -> dict:
    """The metadata in a tensors file's header, without reading (or checking) its tensors."""
    path = Path(path)
    header, _ = _read(path, tensors=False)
    try:
        meta = json.loads(header[META_KEY])
    except (KeyError, json.JSONDecodeError) as e:
        raise PapaError(f"{path}: no readable metadata in its header ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise PapaError(f"{path}: no readable metadata in its header")
    return meta


_UNCHECKED: set[Path] = set()  # files without a digest already warned about


def _unchecked(path: Path) -> None:
    if path.resolve() not in _UNCHECKED:
        _UNCHECKED.add(path.resolve())
        print(f"papa: warning: {path} carries no digest (written by an earlier papa): its bytes cannot be "
              "checked", file=sys.stderr)


def load_tensors(path: str | Path, remedy: str = "make it again") -> tuple[dict[str, torch.Tensor], dict]:
    """A tensors file's tensors and its header's metadata (else the sidecar's); a missing, truncated or corrupt part is
    a PapaError, ending with ``remedy`` for bytes that fail the digest. A file without a digest loads with a warning."""
    path = Path(path)
    header, tensors = _read(path, tensors=True)
    if META_KEY not in header:  # written before the header held the metadata
        _unchecked(path)
        if not (side := sidecar_path(path)).exists():
            raise PapaError(f"{side}: checkpoint sidecar not found (incomplete checkpoint?)")
        try:
            return tensors, json.loads(side.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PapaError(f"{side}: corrupt checkpoint sidecar ({e})") from None
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as e:
        raise PapaError(f"{path}: corrupt checkpoint metadata ({e})") from None
    if not isinstance(meta, dict):
        raise PapaError(f"{path}: corrupt checkpoint metadata (not a JSON object)")
    recorded = meta.pop(DIGEST_KEY, None)
    if recorded is None:
        _unchecked(path)
    elif tensors_digest(tensors, meta) != recorded:
        raise PapaError(f"{path}: corrupt: its bytes do not match what was written (the SHA-256 recorded in "
                        f"its header); {remedy}")
    return tensors, meta


def first_difference(theirs, ours, key: str = "") -> tuple[str, object, object] | None:
    """The first key path (``experiment.population.size``) at which two nested dicts differ, with both values."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        found = (first_difference(theirs.get(k), ours.get(k), f"{key}.{k}" if key else str(k)) for k in ours | theirs)
        return next((f for f in found if f is not None), None)
    return None if theirs == ours else (key, theirs, ours)


@dataclass
class Progress:
    """How far a training run has come: its counters, history rows and, at a mid-epoch stop, the RNG states."""
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    batch: int = 0  # batches of the current epoch completed (non-zero only in a mid-epoch checkpoint)
    generation: int = 0  # averagings so far (mutations shrink as 1/g)
    history: list[dict] = field(default_factory=list)  # one row per (epoch, member, phase): history.csv
    rng: torch.Tensor | None = None  # the global RNG state at a mid-epoch stop
    cuda_rng: torch.Tensor | None = None  # and the CUDA device's, when training there

    def record(self, phase: str, lr: float, val: list, test: list) -> None:
        """Every member's validation and test scores ((accuracy, loss) each) at the end of this epoch."""
        for j, ((va, vl), (ta, _)) in enumerate(zip(val, test, strict=True)):
            self.history.append({"epoch": self.epoch, "member": j, "phase": phase, "lr": lr,
                                 "val_accuracy": round(va, 4), "val_loss": round(vl, 6), "test_accuracy": round(ta, 4)})


@dataclass
class Resumable:
    """What a checkpoint saves of a training run (papa.train.Trainer) and restores into it."""
    run: dict  # variant, seed and experiment: a checkpoint of another run is refused
    pop: Population
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    swa: SWA | None
    progress: Progress
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling (fidelity.mixed_precision: authors on CUDA)


def saved(state: Resumable) -> tuple[dict[str, torch.Tensor], dict]:
    """Everything a resumed run needs, as tensors and JSON-able metadata."""
    at, opt = state.progress, state.optimizer.state_dict()
    flat = {f"{idx}.{key}": value for idx, st in opt["state"].items() for key, value in st.items()}
    tensors = {f"pop.{k}": v for k, v in state.pop.state_dict().items()}
    tensors |= {f"opt.{name}": value for name, value in flat.items() if torch.is_tensor(value)}
    tensors |= {name: t for name, t in (("rng.global", at.rng), ("rng.cuda", at.cuda_rng)) if t is not None}
    swa_tensors, swa_count = state.swa.state() if state.swa is not None else ({}, None)
    tensors |= swa_tensors
    meta = {**state.run, "epoch": at.epoch, "step": at.step, "batch": at.batch, "generation": at.generation,
            "scheduler": state.scheduler.state_dict(), "param_groups": opt["param_groups"],
            "optimizer_scalars": {name: value for name, value in flat.items() if not torch.is_tensor(value)},
            "history": at.history, "swa_count": swa_count}
    if state.scaler is not None:  # scale and growth counter: plain numbers
        meta["grad_scaler"] = state.scaler.state_dict()
    return tensors, meta


def restore(state: Resumable, tensors: dict[str, torch.Tensor], meta: dict, where: str = "checkpoint") -> None:
    """Resume ``state`` from ``saved``'s output; another run's checkpoint is refused, naming the first difference."""
    if (found := first_difference({key: meta.get(key) for key in state.run}, state.run)) is not None:
        key, theirs, ours = found
        raise PapaError(f"{where}: written by another run: {key}: the checkpoint has {theirs!r}, this run has "
                        f"{ours!r}; delete it to start over")
    try:
        state.pop.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("pop.")})
    except ValueError as e:
        raise PapaError(f"{where}: {e}") from None
    flat = {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")} | meta["optimizer_scalars"]
    opt: dict[int, dict] = {}
    for name, value in flat.items():
        idx, key = name.split(".", 1)
        opt.setdefault(int(idx), {})[key] = value
    state.optimizer.load_state_dict({"state": opt, "param_groups": meta["param_groups"]})
    state.scheduler.load_state_dict(meta["scheduler"])
    at = state.progress
    at.epoch, at.step, at.batch, at.generation = meta["epoch"], meta["step"], meta["batch"], meta["generation"]
    at.history = list(meta["history"])
    at.rng, at.cuda_rng = tensors.get("rng.global"), tensors.get("rng.cuda")
    if state.scaler is not None:
        if not isinstance(meta.get("grad_scaler"), dict):
            raise PapaError(f"{where}: holds no loss scaler state, which this run's fp16 training needs; delete it "
                            "to start over")
        state.scaler.load_state_dict(meta["grad_scaler"])
    if state.swa is not None:
        try:
            state.swa.load_state({k: v for k, v in tensors.items() if k.startswith("swa.")}, meta["swa_count"])
        except (ValueError, KeyError, TypeError) as e:
            raise PapaError(f"{where}: SWA averages: {e}") from None
