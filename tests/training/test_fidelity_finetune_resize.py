"""``fidelity.finetune_resize``: under ``authors`` in-memory images are resized to data.image_size as the scripts
resized CIFAR for fine-tuning, PIL's resize of the uint8 image before ToTensor (data/cifar100.py:16, 26): a
horizontal then a vertical pass, each rounded to whole levels and clipped to 0-255. The paper setting resizes the
values, keeping bicubic's overshoot."""

import numpy as np
import pytest
import torch
from PIL import Image

from papa import runs
from papa.data import Policy, eval_batches, make_stream
from papa.data.augment import eval_transform
from tests.helpers import tiny_experiment
from tests.unit.test_data import write_cifar

pytestmark = pytest.mark.usefixtures("one_thread")
LEVELS = ((0.0,) * 3, (1 / 255,) * 3)  # a mean and std under which eval_transform returns pixel levels


def pil_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(Image.fromarray(x.permute(1, 2, 0).numpy()).resize(
        (size, size), Image.BICUBIC)).transpose(2, 0, 1).copy()) for x in images]).float()


def test_pixels_are_resized_as_pil_resizes_a_uint8_image():
    images = torch.randint(256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    pil = pil_resize(images, 224)
    ours = eval_transform(images, *LEVELS, 224, "bicubic", pixels=True)
    off = (ours - pil).abs()
    assert off.max() < 1 + 1e-3 and (off > 0.5).float().mean() < 1e-3  # PIL's fixed point: a level, rarely
    assert torch.allclose(ours, ours.round(), atol=1e-3) and ours.min() > -1e-3 and ours.max() < 255 + 1e-3
    values = eval_transform(images, *LEVELS, 224, "bicubic")  # the paper setting: bicubic's overshoot kept
    assert values.min() < -1 and values.max() > 256 and (values - pil).abs().max() > 10
    assert torch.equal(eval_transform(images, *LEVELS, 32, "bicubic", pixels=True),
                       eval_transform(images, *LEVELS, 32, "bicubic"))  # no resize: nothing to round


def levels(x: torch.Tensor, splits) -> torch.Tensor:
    """Normalized images back to pixel levels."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (splits.mean, splits.std))
    return (x * std + mean) * 255


@pytest.mark.parametrize("setting", ["authors", "paper"])
def test_the_setting_resizes_training_and_evaluation_batches(tmp_path, setting):
    write_cifar(tmp_path, "cifar100", per_file=40)
    exp = tiny_experiment(data={"dataset": "cifar100", "root": str(tmp_path), "image_size": 40, "resize": "bicubic"},
                          fidelity={"finetune_resize": setting})
    splits = runs.load_data(exp)
    assert splits.train.resize_pixels is splits.test.resize_pixels is (setting == "authors")
    evaluated = next(eval_batches(splits.test, range(8), 8))[0]
    stream = make_stream(splits, range(32), 16, [Policy(crop_padding=4, flip=True)], seed=0)
    trained = next(iter(stream.member_batches(0, torch.Generator().manual_seed(1), 1)))
    for x in (evaluated, trained):
        assert x.shape[-2:] == (40, 40)
        whole = torch.allclose(levels(x, splits), levels(x, splits).round(), atol=1e-3)
        assert whole is (setting == "authors")
    expected = eval_transform(splits.test.images[:8], splits.mean, splits.std, 40, "bicubic", setting == "authors")
    assert torch.equal(evaluated, expected)
