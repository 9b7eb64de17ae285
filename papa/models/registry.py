"""The table of named model factories; architecture modules add themselves with ``@register``."""

from collections.abc import Callable

from torch import nn

ModelFactory = Callable[..., nn.Module]
MODELS: dict[str, ModelFactory] = {}


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator adding ``factory(num_classes, in_channels, **kwargs)`` (a function or a class) as ``name``."""
    def add(factory: ModelFactory) -> ModelFactory:
        if name in MODELS:  # else a name's architecture would depend on the import order
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = factory
        return factory
    return add
