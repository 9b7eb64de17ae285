"""Model factory: ``create_model(name, num_classes)`` looks the name up in one registry, filled by the modules
imported below with the architectures of the paper; names starting with ``timm/`` build any timm architecture."""

import inspect
from pathlib import Path

from torch import nn

from papa.errors import PapaError
from papa.models import cnn, linear, resnet_cifar, torchvision_models, unet, vgg  # noqa: F401  (they register)
from papa.models.pretrained import load_pretrained, timm_pretrained_cfg
from papa.models.registry import MODELS, register

__all__ = ["available_models", "create_model", "register"]

TIMM_PREFIX = "timm/"


def available_models() -> list[str]:
    """Registered model names, sorted (any ``timm/<name>`` is accepted too)."""
    return sorted(MODELS)


def _timm_model(name: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    import timm  # here: timm (with torchvision) adds seconds to every CLI start that never uses it
    if not timm.is_model(name):  # checked up front: timm's own error is a RuntimeError that looks like a crash
        raise PapaError(f"unknown timm model {name!r} (see timm.list_models())")
    timm_pretrained_cfg(name)  # likewise a tag the architecture has no weights under (arch.no_such_tag)
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except TypeError as err:  # a model.kwargs option the architecture does not take
        raise PapaError(f"timm model {name!r}: {err}") from None


def create_model(name: str, num_classes: int, in_channels: int = 3, pretrained: str | Path | None = None,
                 fake_ok: bool = False, **kwargs) -> nn.Module:
    """Build model ``name`` giving logits of shape (N, num_classes) for ``in_channels``-channel images. ``kwargs``
    go to the architecture (e.g. ``width`` for ``digits_cnn``); ``pretrained``: warm-start from a local safetensors
    file or, with ``timm``, the local Hugging Face hub cache (``load_pretrained``; ``fake_ok``: no warning for
    ``papa fake-data`` weights, at smoke scale). Bad names, arguments or weights raise ``PapaError``."""
    timm_name = name.removeprefix(TIMM_PREFIX) if name.startswith(TIMM_PREFIX) else None
    if timm_name is not None:
        model = _timm_model(timm_name, num_classes, in_channels, **kwargs)
    elif name in MODELS:
        try:  # a misspelled option in a config is reported, not a TypeError traceback
            inspect.signature(MODELS[name]).bind(num_classes, in_channels, **kwargs)
        except TypeError as err:
            raise PapaError(f"model {name!r}: {err}") from err
        model = MODELS[name](num_classes, in_channels, **kwargs)
    else:
        known = ", ".join(available_models())
        raise PapaError(f"unknown model {name!r}; available: {known}, or timm/<name> for any timm model")
    if pretrained is not None:
        load_pretrained(model, pretrained, timm_name, fake_ok=fake_ok)
    return model
