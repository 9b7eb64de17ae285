"""Warm-starting a model from a local safetensors file (nothing is ever downloaded)."""

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from papa.errors import PapaError


def load_pretrained(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy the tensors of ``path`` into ``model`` in place and return it.

    Tensors whose shape differs from the model's (the classifier head when ``num_classes`` changes) are
    skipped, so those layers keep their fresh initialization; names absent from either side are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise PapaError(f"pretrained weight file not found: {path}")
    try:
        weights = load_file(path)
    except (OSError, SafetensorError) as err:
        raise PapaError(f"cannot read pretrained weights {path}: {err}") from err
    own = model.state_dict()
    usable = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    # a file with nothing in common is almost surely the wrong file, not a fine-tuning setup
    if not usable:
        raise PapaError(f"pretrained weights {path} share no tensor (name and shape) with the model")
    model.load_state_dict(usable, strict=False)
    return model
