"""A population's training setup that cannot be honoured stops `papa train` before anything is written, in one line
naming the key: ``augment.members`` listing another number of policies than the population has members, or a key a
policy does not take, and a batch larger than the training split. The augmentation library refuses what timm or
the device resize cannot do: a RandAugment string that only looks like timm's, a resize mode it does not know."""

import pytest
import torch

from papa import runs
from papa.data.augment import eval_transform, randaugment_transform
from papa.errors import PapaError
from tests.helpers import tiny_experiment


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    path = tmp_path_factory.mktemp("split") / "split.json"
    runs.prepare(tiny_experiment(), path)
    return path


@pytest.mark.parametrize(("overrides", "message"), [
    ({"augment": {"members": [{"mixup": 0.2}]}}, "augment.members lists 1 policies for a population of 3"),
    ({"augment": {"members": [{"mixup": 0.2}, {}, {"mixupp": 0.1}]}},
     "augment.members: Policy.__init__() got an unexpected keyword argument 'mixupp'"),
    ({"train": {"batch_size": 5000}}, "train.batch_size 5000 exceeds the 1409 training images"),
])
def test_a_setup_the_members_cannot_follow_stops_training_before_it_writes(split, tmp_path, overrides, message):
    exp = tiny_experiment(population={"size": 3}, **overrides)
    with pytest.raises(PapaError) as e:
        runs.train(exp, "baseline", 1, split, tmp_path / "run", progress=False)
    assert str(e.value) == message
    assert not (tmp_path / "run").exists() or not any(p.name != runs.LOCK for p in (tmp_path / "run").iterdir())


def test_a_randaugment_string_timm_cannot_read_is_named():
    """'rand-w1' passes the pattern of timm's parts but timm has no weights 1: its assertion becomes one line."""
    with pytest.raises(PapaError, match=r"^randaugment: invalid timm config string 'rand-w1' \(AssertionError: "):
        randaugment_transform("rand-w1", 32, (0.5, 0.5, 0.5))


def test_an_unknown_resize_mode_is_named():
    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(PapaError, match=r"^resize mode must be one of bilinear, bicubic, got 'nearest'$"):
        eval_transform(images, (0.5,) * 3, (0.2,) * 3, 16, "nearest")
