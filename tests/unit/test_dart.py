"""DART-style populations (paper §4.5.2, Table 3): timm RandAugment m=4 n=1 as a member policy, drawn per
sample from the run's generator."""

import random

import numpy as np
import pytest
import torch

from papa.data.augment import Policy, apply, geometric, randaugment
from papa.data.datasets import ArrayDataset
from papa.data.stream import MemberStream
from papa.errors import PapaError

CONFIG = "rand-m4-n1-mstd1.0-p1.0"


def images(b: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8)


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_randaugment_draws_per_sample():
    """The same image 16 times: each copy gets its own operation and magnitude (a batch-level transform
    would give 16 identical outputs)."""
    same = images(1).expand(16, -1, -1, -1).contiguous()
    out = randaugment(same, CONFIG, gen())
    assert out.shape == same.shape and out.dtype == torch.uint8
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) >= 8
    assert sum(not torch.equal(o, same[0]) for o in out) >= 12  # p=1.0: (almost) every image is changed


def test_randaugment_is_deterministic_under_the_seed_and_leaves_global_rngs_alone():
    x = images()
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    a = randaugment(x, CONFIG, gen(1))
    assert torch.equal(a, randaugment(x, CONFIG, gen(1)))
    assert not torch.equal(a, randaugment(x, CONFIG, gen(2)))
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


def test_randaugment_members_draw_from_their_own_streams():
    """A population of identical RandAugment members: member j's batches come from its own generator, so
    members see different augmentations, and a rerun with the run seed repeats them exactly."""
    n = 32
    data = ArrayDataset(images(n), torch.arange(n) % 4, 4, (0.5,) * 3, (0.25,) * 3, "toy")
    policy = Policy(randaugment=CONFIG)

    def first(seed):
        stream = MemberStream(data, range(n), 8, [policy, policy], seed)
        return next(iter(stream.epoch(0)))[0]

    x = first(3)
    assert torch.equal(x, first(3))
    assert not torch.equal(x, first(4))
    # both members see the same images in their own orders: compare the multiset of augmented pixels
    assert not torch.equal(x[0].sort(0).values, x[1].sort(0).values)


def test_randaugment_policy_validation_and_order():
    with pytest.raises(PapaError, match="timm config string"):
        Policy(randaugment="m4-n1")
    with pytest.raises(PapaError, match="expected a timm config string"):
        Policy(randaugment="rand-mX")
    policy = Policy(crop_padding=4, flip=True, randaugment=CONFIG)
    assert policy.as_dict()["randaugment"] == CONFIG and policy.base().randaugment == ""
    x = images(4)
    out = geometric(policy, x, gen())
    assert out.shape == x.shape
    xs, targets = apply(policy, x, torch.arange(4), 4, (0.5,) * 3, (0.25,) * 3, gen(), size=48)
    assert xs.shape == (4, 3, 48, 48) and torch.allclose(targets.sum(1), torch.ones(4))


def test_randaugment_fills_with_the_mean_as_timms_transform_factory():
    """The colour that rotations, shears and translations leave in the corners: timm's create_transform gives
    RandAugment ``img_mean`` = the normalization mean in 8-bit levels, rounded and clipped at 255."""
    from papa.data.augment import randaugment_transform
    ops = randaugment_transform(CONFIG, 32, (0.2, 0.6, 1.2)).ops
    assert len(ops) > 10 and {op.kwargs["fillcolor"] for op in ops} == {(51, 153, 255)}


def test_grayscale_images_work_too():
    x = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    assert randaugment(x, CONFIG, gen(), mean=(0.5,)).shape == (4, 1, 16, 16)


def test_randaugment_on_image_folders_is_reproducible(tmp_path):
    """The ImageFolder path applies timm's RandAugment per image under the image's own seed."""
    from papa.data import load_dataset, make_stream
    from tests.unit.test_data import _write_images

    for part in ("train", "val"):
        for cls in ("cat", "dog"):
            _write_images(tmp_path / part / cls, 3)
    splits = load_dataset("imagenet", tmp_path, image_size=8)
    policy = Policy(randaugment=CONFIG)
    stream = make_stream(splits, range(6), 3, [policy, Policy()], seed=1)
    first, again = list(stream.epoch(0)), list(stream.epoch(0))
    assert first[0][0].shape == (2, 3, 3, 8, 8)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
