"""The table of named model factories; architecture modules add themselves with ``@register``."""

from collections.abc import Callable

from torch import nn

ModelFactory = Callable[..., nn.Module]

MODELS: dict[str, ModelFactory] = {}


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator adding ``factory(num_classes, in_channels, **kwargs)`` to the registry as ``name``."""

    def add(factory: ModelFactory) -> ModelFactory:
        # a silent overwrite would make a model name mean two architectures depending on import order
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = factory
        return factory

    return add
