"""Shared fixtures, and how `make test` spreads the suite over its workers (pytest-xdist, ``ByModule``): each
test module is one unit, run in order on one worker, so module-scoped fixtures are built once and tests that
share a working directory run in sequence; the smoke runs of the paper configs are two units, the halves of
tests/pipeline/test_smoke.py's ``HALF``, and start first (they are the longest)."""

import os

import pytest
import torch
from torch import nn

from papa.population import Population

# Under `make test` each worker gets its share of the cores, it and the processes it starts: torch's threads spin
# while they wait, so two workers of two threads each on two cores run several times slower than one thread each.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))


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


SMOKE = "tests/pipeline/test_smoke.py::test_paper_config_at_smoke_scale["


def pytest_collection_modifyitems(config, items):
    """The smoke runs first (the sort is stable): the longest units start first."""
    items.sort(key=lambda item: not item.nodeid.startswith(SMOKE))


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: where it is not installed (the GPU image), unused
def pytest_xdist_make_scheduler(config, log):
    """xdist's scheduling by scope, a scope being a module or a smoke half (xdist's own ``loadgroup`` marks do not
    group with pytest 9, whose node ids xdist 3.8 can no longer suffix)."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith(SMOKE):
                from tests.pipeline.test_smoke import HALF

                return f"smoke-{HALF[nodeid[len(SMOKE):-1]]}"
            return nodeid.split("::")[0]

    return ByModule(config, log)
