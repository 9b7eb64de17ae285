"""fidelity option ``soup_repair_data``: the batches the soups' REPAIR reads. ``paper``: the base transform for
members and soup alike; ``authors`` (models/combined.py:257): member j's own augmented and regularized batches
(the policies it trained with) for its moments, the base transform (crop, flip: the scripts' train_dset_noaug,
data/data.py:22, is the training transform without random erasing) for the soup."""

import pytest
import torch

from papa import runs
from papa.build import member_policies
from papa.data import Policy, make_stream
from tests.training.test_align_pipeline import experiment, permuted_run

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = {"mixup": [0.0, 1.0], "label_smoothing": [0.0], "cutmix": [0.0], "random_erasing": [0.0, 0.5]}


class _Captured(Exception):
    pass


def _repair_batches(tmp_path, monkeypatch, setting: str):
    """The ``repair_batches`` `papa soups` hands to make_soups, and the experiment."""
    exp = experiment(tmp_path, "resnet20", fidelity={"soup_repair_data": setting},
                     augment={"enabled": True, "crop_padding": 1, "flip": True, "grid": GRID})
    run, split, _ = permuted_run(tmp_path, exp, variant="baseline")
    seen = {}

    def make_soups(pop, score, repair_batches, *args, **kwargs):
        seen["batches"] = repair_batches
        raise _Captured

    monkeypatch.setattr(runs, "make_soups", make_soups)
    with pytest.raises(_Captured):
        runs.soups(exp, split, run)
    return seen["batches"], exp, runs.open_run(exp, split, run)


def _read(batches, member):  # as papa.forward.inputs hands them to REPAIR: a generator seeded repair_seed
    return list(batches(member, torch.Generator().manual_seed(666)))


@pytest.mark.parametrize("setting", ["paper", "authors"])
def test_soup_repair_reads_each_members_own_augmented_batches_under_authors(tmp_path, monkeypatch, setting):
    batches, exp, run = _repair_batches(tmp_path, monkeypatch, setting)
    policies = member_policies(exp, 1)
    assert len({(p.mixup, p.random_erasing) for p in policies}) > 1  # the members' policies differ
    base = Policy(crop_padding=1, flip=True)
    own = make_stream(run.splits, run.split["train"], exp["train"]["batch_size"], policies, 0, run.device,
                      base=base)
    plain = make_stream(run.splits, run.split["train"], exp["train"]["batch_size"], [base] * 3, 0, run.device)
    n = exp["soups"]["repair_iters"]

    def expected(stream, member):
        return list(stream.member_batches(member, torch.Generator().manual_seed(666), n))

    for member in (0, 1, 2, None):
        got = _read(batches, member)
        assert len(got) == n
        want = expected(own, member) if setting == "authors" else expected(plain, None)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    soup = _read(batches, None)  # crop and flip, as train_dset_noaug: not the images as they are
    bare = make_stream(run.splits, run.split["train"], exp["train"]["batch_size"], [Policy()] * 3, 0, run.device)
    assert all(torch.equal(a, b) for a, b in zip(soup, expected(plain, None), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(soup, expected(bare, None), strict=True))
    if setting == "authors":  # members differ from one another and from the soup's base-transform batches
        first = [_read(batches, m)[0] for m in (0, 1, 2, None)]
        assert not torch.equal(first[0], first[3])
        assert any(not torch.equal(first[i], first[j]) for i in range(3) for j in range(i))
    else:
        assert all(torch.equal(a, b) for a, b in zip(_read(batches, 0), _read(batches, None), strict=True))
