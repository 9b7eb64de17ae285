"""Warm-starting a model from a local safetensors file, or (``timm``) from the ``model.safetensors`` of a timm
model's Hugging Face hub repository in the local hub cache, which ``timm.create_model(name, pretrained=True)``
fills on a connected machine. Nothing is ever downloaded, nothing pickled is loaded."""

import os
import sys
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from papa.errors import PapaError

TIMM_CACHE = "timm"  # the model.pretrained value for the hub cache
HUB_FILE = "model.safetensors"
FAKE_KEY = "papa_fake"  # safetensors metadata key marking the random weights `papa fake-data` writes
_warned: set[Path] = set()  # the files warn_if_fake warned about


def head_keys(model: nn.Module, kind: str = "state") -> list[str]:
    """Names of the classifier head's state_dict entries (``kind='state'``) or of its parameters (``'params'``);
    the head is timm's ``get_classifier()``, else the last Linear."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module) or not list(head.parameters()):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise PapaError(f"{type(model).__name__} has no Linear classifier head")
        head = linears[-1]
    prefix = next(n for n, m in model.named_modules() if m is head)
    names = head.state_dict().keys() if kind == "state" else (n for n, _ in head.named_parameters())
    return [f"{prefix}.{n}" if prefix else n for n in names]


def _hub_cache() -> Path:  # as huggingface_hub finds it, read when needed
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home) / "hub"


def timm_pretrained_cfg(name: str):
    """timm's pretrained config of ``name`` (``arch`` or ``arch.tag``), or None when it has none; PapaError for a
    tag the architecture has no weights under."""
    from timm.models import get_pretrained_cfg
    try:
        return get_pretrained_cfg(name)
    except RuntimeError as err:  # a tag the architecture has no weights under (timm/resnet18.no_such_tag)
        raise PapaError(f"timm/{name}: {err}") from None


def cached_timm_weights(name: str) -> Path:
    """The cached ``model.safetensors`` of timm model ``name``; PapaError naming what was looked for."""
    from huggingface_hub import try_to_load_from_cache
    repo = getattr(timm_pretrained_cfg(name), "hf_hub_id", None)
    if not repo:
        raise PapaError(f"model.pretrained: timm: timm/{name} has no Hugging Face hub weights; export weights to a "
                        "safetensors file and set model.pretrained to its path")
    cache = _hub_cache()
    found = try_to_load_from_cache(repo, HUB_FILE, cache_dir=cache)
    if not isinstance(found, str) or not Path(found).is_file():
        raise PapaError(f"pretrained weights of timm/{name} not found: looked for {HUB_FILE} of {repo} in the hub "
                        f"cache {cache}; fetch it on a connected machine (huggingface-cli download {repo} {HUB_FILE})"
                        " and copy the cache, or set model.pretrained to a local safetensors file")
    return Path(found)


def warn_if_fake(path: Path, fake_ok: bool) -> None:
    """Warn once per process and file when ``path`` holds ``papa fake-data``'s random weights, unless ``fake_ok``."""
    if fake_ok or path in _warned:
        return
    with safe_open(path, "pt") as f:
        if FAKE_KEY in (f.metadata() or {}):
            _warned.add(path)
            print(f"papa: warning: {path} holds random weights written by `papa fake-data`, not pretrained ones; "
                  "results are meaningless outside smoke scale (scale: smoke)", file=sys.stderr)


def load_pretrained(model: nn.Module, source: str | Path, timm_name: str | None = None,
                    fake_ok: bool = False) -> None:
    """Copy the weights of ``source`` (a safetensors file, or ``TIMM_CACHE`` with ``timm_name``) into ``model``, in
    place. Every tensor outside the classifier head must be in the file with the model's shape, and nothing else,
    or a PapaError lists what does not fit; the head is loaded only when it fits too (else, for a new
    ``num_classes``, it keeps its fresh initialization)."""
    if str(source) == TIMM_CACHE:
        if timm_name is None:
            raise PapaError("model.pretrained: timm applies to timm/<name> models only")
        path = cached_timm_weights(timm_name)
    else:
        path = Path(source)
        if not path.is_file():
            raise PapaError(f"pretrained weight file not found: {path} (a safetensors file, or 'timm' for the "
                            "local Hugging Face hub cache)")
    try:
        weights = load_file(path)
        warn_if_fake(path, fake_ok)
    except (OSError, SafetensorError) as err:
        raise PapaError(f"cannot read pretrained weights {path}: {err}") from err
    own = model.state_dict()
    head = set(head_keys(model))
    body = [k for k in own if k not in head]
    missing = [k for k in body if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in body
              if k in weights and weights[k].shape != own[k].shape]
    problems = [f"{len(found)} {what} (e.g. {found[0]})" for what, found in
                (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if found]
    if problems:
        raise PapaError(f"pretrained weights {path} do not fit {type(model).__name__} outside its classifier head: "
                        f"{'; '.join(problems)}")
    keep = [k for k in own if k in head and k in weights and weights[k].shape == own[k].shape]
    model.load_state_dict({k: weights[k] for k in body + (keep if len(keep) == len(head) else [])}, strict=False)


def pretrained_normalization(name: str, pretrained) -> tuple[tuple, tuple] | None:
    """(mean, std) a pretrained ``timm/<name>`` model expects its inputs normalized with, else None."""
    if pretrained is None or not name.startswith("timm/"):
        return None
    cfg = timm_pretrained_cfg(name.removeprefix("timm/"))
    if cfg is None or cfg.mean is None or cfg.std is None:
        return None
    return tuple(cfg.mean), tuple(cfg.std)
