"""Populations, modules and a trainer's state on disk: safetensors for tensors plus a JSON sidecar. Nothing is
pickled."""

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


# a trainer's state --------------------------------------------------------------------------------
def first_difference(theirs, ours, key: str = "") -> tuple[str, object, object] | None:
    """The first key path (``experiment.population.size``) at which two nested dicts differ, with both
    values; ``None`` where they are equal."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        for k in [*ours, *(k for k in theirs if k not in ours)]:
            found = first_difference(theirs.get(k), ours.get(k), f"{key}.{k}" if key else str(k))
            if found is not None:
                return found
        return None
    return None if theirs == ours else (key, theirs, ours)


def trainer_state(trainer) -> tuple[dict[str, torch.Tensor], dict]:
    """Everything a resumed papa.train.Trainer needs: population, optimizer, scheduler, counters, history,
    SWA averages and the RNG state of a mid-epoch stop, as tensors (safetensors) and JSON-able metadata."""
    tensors = {f"pop.{k}": v for k, v in trainer.pop.state_dict().items()}
    opt = trainer.optimizer.state_dict()
    opt_meta = {}
    for idx, st in opt["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{key}"] = value
            else:
                opt_meta[f"{idx}.{key}"] = value
    if trainer.rng_state is not None:
        tensors["rng.global"] = trainer.rng_state
    if trainer.cuda_rng_state is not None:
        tensors["rng.cuda"] = trainer.cuda_rng_state
    swa_count = None
    if trainer.swa is not None:
        swa_tensors, swa_count = trainer.swa.state()
        tensors |= swa_tensors
    meta = {
        "experiment": trainer.exp, "variant": trainer.variant, "seed": trainer.seed,
        "epoch": trainer.epoch, "step": trainer.step, "batch": trainer.batch,
        "generation": trainer.averager.generation, "scheduler": trainer.scheduler.state_dict(),
        "param_groups": opt["param_groups"], "optimizer_scalars": opt_meta, "history": trainer.history.rows,
        "swa_count": swa_count,
    }
    return tensors, meta


def restore_trainer(trainer, tensors: dict[str, torch.Tensor], meta: dict, where: str = "checkpoint") -> None:
    """Resume ``trainer`` from ``trainer_state``'s output; a checkpoint of another config, variant or seed is
    refused, naming the first difference."""
    run = {"variant": trainer.variant, "seed": trainer.seed, "experiment": trainer.exp}
    found = first_difference({key: meta.get(key) for key in run}, run)
    if found is not None:
        key, theirs, ours = found
        raise PapaError(f"{where}: written by another run: {key}: the checkpoint has {theirs!r}, this run has "
                        f"{ours!r}; delete it to start over")
    try:
        trainer.pop.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("pop.")})
    except ValueError as e:
        raise PapaError(f"{where}: {e}") from None
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["optimizer_scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    trainer.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    trainer.scheduler.load_state_dict(meta["scheduler"])
    trainer.epoch, trainer.step, trainer.batch = meta["epoch"], meta["step"], meta["batch"]
    trainer.averager.generation = meta["generation"]
    trainer.history.rows = list(meta["history"])
    trainer.rng_state = tensors.get("rng.global")
    if trainer.swa is not None:
        try:
            trainer.swa.load_state({k: v for k, v in tensors.items() if k.startswith("swa.")}, meta["swa_count"])
        except (ValueError, KeyError, TypeError) as e:
            raise PapaError(f"{where}: {e}") from None
    trainer.cuda_rng_state = tensors.get("rng.cuda")
