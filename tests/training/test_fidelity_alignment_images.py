"""``fidelity.alignment_images``: under ``authors`` permutation alignment matches features on the images the scripts
fed it, the training split shuffled through its base transform (crop and flip) and drawn again for every matching
(recombine/permutations.py:47-50, 93-95), here from generators keyed by the run seed and the alignment: in training
(seed, "alignment", t) for the averaging at step t, in the soups job (seed, "soups-alignment") and in Table 5's
similarity (seed, "similarity-alignment"). The paper setting matches on the first images, unaugmented, in order."""

from types import SimpleNamespace

import pytest
import torch

from papa import rng, runs
from papa.build import align_data
from papa.data import Policy, eval_batches, load_split
from papa.forward import inputs
from papa.train import Trainer
from tests.helpers import tiny_experiment
from tests.keys import pinned
from tests.training.test_align_pipeline import close_to, experiment, permuted_run, soup_state
from tests.training.test_fidelity_val_images import arrays

pytestmark = pytest.mark.usefixtures("one_thread")
AUGMENT = {"crop_padding": 1, "flip": True}
AUTHORS = {"fidelity": {"alignment_images": "authors"}, "augment": AUGMENT}


@pytest.fixture(scope="module")
def digits(tmp_path_factory, one_thread):
    """The tiny digits experiment's data and split."""
    path = tmp_path_factory.mktemp("alignment-images") / "split.json"
    exp = tiny_experiment()
    runs.prepare(exp, path)
    return runs.load_data(exp), load_split(path)


def images(batches) -> list[torch.Tensor]:
    return list(inputs(batches, None, 666))


def equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_authors_draw_random_images_through_the_base_crop_and_flip_again_at_every_matching(digits):
    splits, split = digits
    exp, train = tiny_experiment(**AUTHORS), list(split["train"])
    bs = exp["train"]["eval_batch_size"]
    data = align_data(exp, splits, split, 40, "cpu", torch.Generator().manual_seed(4))
    first, second = images(data), images(data)

    g = torch.Generator().manual_seed(4)
    expected = []
    for _ in range(2):  # each matching: a random order's first 40 images, then their crops and flips, from g
        order = torch.randperm(len(train), generator=g)[:40].tolist()
        expected.append([x for x, _ in eval_batches(splits.train, [train[i] for i in order], bs,
                                                    augment=Policy(**AUGMENT), generator=g)])
    assert equal(first, expected[0]) and equal(second, expected[1])
    assert not equal(first, second)
    assert sum(len(x) for x in first) == 40

    plain = [x for x, _ in eval_batches(splits.train, train[:40], bs)]
    paper = align_data(tiny_experiment(augment=AUGMENT), splits, split, 40, "cpu", torch.Generator().manual_seed(4))
    assert equal(images(paper), plain) and equal(images(paper), plain)  # the same images at every matching
    assert equal(images(align_data(exp, splits, split, 40, "cpu", None)), plain)  # no generator: the fixed images


def test_authors_match_on_the_whole_split_when_align_images_is_null(digits):
    splits, split = digits
    exp = tiny_experiment(fidelity={"alignment_images": "authors"})  # digits: no crop, no flip
    drawn = torch.cat(images(align_data(exp, splits, split, None, "cpu", torch.Generator().manual_seed(1))))
    plain = torch.cat([x for x, _ in eval_batches(splits.train, split["train"], 1000)])
    assert drawn.shape == plain.shape and not torch.equal(drawn, plain)  # the same images in another order
    assert torch.equal(drawn.flatten(1).unique(dim=0), plain.flatten(1).unique(dim=0))


def test_segmentation_tiles_match_as_under_paper():
    exp, data = tiny_experiment(**AUTHORS), arrays(12)
    splits = SimpleNamespace(kind="segmentation", train=data)
    got = images(align_data(exp, splits, {"train": range(12)}, 5, "cpu", torch.Generator()))
    assert equal(got, [x for x, _ in eval_batches(data, range(5), exp["train"]["eval_batch_size"])])


def record(monkeypatch, module) -> list:
    """The generator each ``align_data`` call of ``module`` got: its state before drawing, or None."""
    calls, original = [], module.align_data

    def recording(*args):
        gen = args[-1]
        calls.append(None if gen is None else gen.get_state().clone())
        return original(*args)

    monkeypatch.setattr(module, "align_data", recording)
    return calls


def state(key: tuple) -> torch.Tensor:
    return rng.generator(*key).get_state()


def test_training_alignment_draws_from_the_key_of_its_step(monkeypatch, digits):
    import papa.train

    seed, exp = 3, tiny_experiment(**AUTHORS)
    t = Trainer(exp, "papa-all", seed, *digits, progress=False)
    assert t.context.align_batches == t.align_batches  # what every averager's alignment reads
    calls = record(monkeypatch, papa.train)
    t.progress.step = 7
    t.align_batches(5)
    pinned(state, (seed, "alignment", 7), calls[0], equal=torch.equal)


def test_the_soups_job_and_similarity_align_from_their_own_keys(monkeypatch, tmp_path):
    """Members that are permuted copies of one network: aligned on the scripts' images, each soup is the network
    again. The soups job's matchings draw from (seed, "soups-alignment"), Table 5's from (seed,
    "similarity-alignment"), while its REPAIR keeps the fixed images."""
    exp = experiment(tmp_path, "resnet20", soups={"align": True}, **AUTHORS)
    run, split, network = permuted_run(tmp_path, exp)
    calls = record(monkeypatch, runs)
    runs.soups(exp, split, run)
    assert len(calls) == 1
    pinned(state, (1, "soups-alignment"), calls[0], equal=torch.equal)  # permuted_run's seed: 1
    for soup in ("avg_soup", "greedy_soup"):
        assert close_to(soup_state(run, soup), network), soup

    calls.clear()
    runs.similarity(exp, split, run)
    assert len(calls) == 2 and calls[0] is None  # REPAIR's data, then the alignment's
    pinned(state, (1, "similarity-alignment"), calls[1], equal=torch.equal)
