"""Shared fixtures, and how `make test` spreads the suite over its workers (pytest-xdist, ``--dist loadgroup``):
each test module is one unit, run in order on one worker, so module-scoped fixtures are built once and tests
that share a working directory run in sequence; a test may name its own unit (``pytest.mark.xdist_group``), as
the smoke runs do to split into two halves. The smoke units, the longest, start first."""

import pytest
import torch
from torch import nn

from papa.population import Population


def small_cnn(bias: bool = True, bn: bool = True, classes: int = 3) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(1, 4, 3, padding=1, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, classes)]
    return nn.Sequential(*layers)


@pytest.fixture
def pop4() -> Population:
    """Four differently initialized small CNNs with BatchNorm, with distinct running statistics."""
    pop = Population.from_factory(small_cnn, 4, seed=3)
    for j in range(4):
        pop.buffers["1.running_mean"][j].uniform_(-1, 1, generator=torch.Generator().manual_seed(j))
        pop.buffers["1.num_batches_tracked"][j] = 10 * j + 1
    return pop


@pytest.fixture(scope="module")
def one_thread():
    """Small convolutions gain nothing from threads, and lose a lot when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _group(item) -> str:
    mark = item.get_closest_marker("xdist_group")
    return mark.args[0] if mark.args else mark.kwargs["name"]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Without a group of its own, a test's xdist unit is its module; the smoke units first (the sort is stable)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    items.sort(key=lambda item: not _group(item).startswith("smoke"))
