"""The random draws of a training run, recorded from tiny runs and recomputed from their keys (tests/keys.py: the
true key reproduces each draw, every key with a component dropped, changed or swapped does not):

- the mixing matrix of every PAPA-all / PAPA-2 averaging, Table 14's random weightings included, from
  (seed, "average", epoch): each averaging its own matrix, so PAPA-2 averages "different random pairs" each time;
- the Gaussian mutations after each averaging (Tables 15-17): a seed drawn from that averaging's generator after
  its matrix, then one stream (seed', "member", j) per member, scaled by std / g at the g-th averaging; after
  PAPA's pushes, from (seed, "mutate", step);
- the global RNG (dropout and other module-internal draws) at the start of epoch e, from (seed, "global", e), and
  the epoch each member's data order and augmentation are drawn for;
- REPAIR's batches during training (Algorithm 5: each member's own augmentation, a generator seeded 666) and the
  children's REPAIR of the genetic ablations (unaugmented, seeded 666); SWA's BatchNorm batches, from
  (seed, "swa-batchnorm");
- the members' initial weights, policies and data streams as the Trainer builds them from the run seed.

tests/unit/test_random_keys.py pins the draws of the pieces (streams, splits, REPAIR's train-mode randomness)."""

import importlib
import itertools
from pathlib import Path

import pytest
import torch

from papa import averaging, rng, runs
from papa.data import load_split
from papa.data.augment import apply, draw_policies
from papa.data.stream import MemberStream
from papa.models import create_model
from papa.train import Trainer
from tests.helpers import tiny_experiment
from tests.keys import pinned, wrong_keys

pytestmark = pytest.mark.usefixtures("one_thread")
REPAIR = importlib.import_module("papa.repair")


@pytest.fixture(scope="module")
def split_path(tmp_path_factory, one_thread) -> Path:
    path = tmp_path_factory.mktemp("draws") / "split.json"
    runs.prepare(tiny_experiment(), path)
    return path


def logreg(**overrides) -> dict:
    """TINY with logistic regression (the cheapest model: the draws do not depend on it)."""
    exp = tiny_experiment(model={"name": "logreg"}, **overrides)
    exp["model"]["kwargs"] = {}
    return exp


def trainer(exp: dict, variant: str, seed: int, split_path: Path) -> Trainer:
    return Trainer(exp, variant, seed, runs.load_data(exp), load_split(split_path), progress=False)


def snapshot(tensors: dict) -> dict:
    return {n: t.detach().clone() for n, t in tensors.items()}


def close(a, b) -> bool:
    """Nested lists of tensors equal up to float32 rounding."""
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-6)


# averaging: partners and weights --------------------------------------------------------------------------------
def record_mixes(monkeypatch) -> list[tuple[torch.Tensor, dict]]:
    """Every papa.averaging.mix_ call of the run: (matrix, the population's tensors right after the mix)."""
    mixes, original = [], averaging.mix_

    def mix_(pop, matrix, comm=None):
        out = original(pop, matrix, comm)
        mixes.append((torch.as_tensor(matrix).clone(), snapshot(pop.state_dict())))
        return out

    monkeypatch.setattr(averaging, "mix_", mix_)
    return mixes


@pytest.mark.parametrize(("variant", "scheme"), [("papa-2", "pair-half"), ("papa-2", "pair-75"),
                                                 ("papa-all", "dirichlet")])
def test_each_averaging_mixes_with_the_matrix_of_its_own_epochs_key(monkeypatch, split_path, variant, scheme):
    """PAPA-2 (pair-half) and Table 14's random weightings: the averaging after epoch e mixes the members with
    mixing_matrix(scheme, p, generator(seed, "average", e)); the three averagings of the run all differ."""
    seed, p = 2, 5
    exp = logreg(population={"size": p}, train={"epochs": 4, "batch_size": 256},
                 averaging={variant: {"every": 1, "scheme": scheme, "repair": False}})
    mixes = record_mixes(monkeypatch)
    trainer(exp, variant, seed, split_path).fit()
    used = [m for m, _ in mixes]
    assert len(used) == 3
    for epoch, matrix in enumerate(used, start=1):
        pinned(lambda key: averaging.mixing_matrix(scheme, p, rng.generator(*key)), (seed, "average", epoch), matrix)
    assert all(not torch.equal(a, b) for a, b in itertools.combinations(used, 2))  # different random pairs


# mutations ----------------------------------------------------------------------------------------------------------
def mutation(gen: torch.Generator, params: dict, scale: float, member_key=lambda s, j: (s, "member", j)) -> list:
    """The noise added to every member's parameters: a seed s from ``gen``, then member j's noise from
    generator(*member_key(s, j)), N(0, 1) times ``scale``, parameter after parameter."""
    s = int(torch.randint(2**62, (), generator=gen))
    out = []
    for j in range(next(iter(params.values())).shape[0]):
        g = rng.generator(*member_key(s, j))
        out.append([torch.randn(t.shape[1:], generator=g, dtype=t.dtype) * scale for t in params.values()])
    return out


S, J = 10**6, 0  # placeholders for the drawn seed and the member in the wrong forms of (s, "member", j)


def _wrong_member_key(wrong: tuple, s: int, j: int) -> tuple:
    """One of wrong_keys((S, "member", J)) with the placeholders replaced: S (+- 1) by the drawn seed (+- 1), J (+- 1)
    by the member (+- 1)."""
    return tuple(s + (k - S) if isinstance(k, int) and abs(k - S) <= 1 else j + (k - J) if isinstance(k, int) else k
                 for k in wrong)


def check_mutation(noise: list, params: dict, std: float, g: int, key: tuple, before=lambda gen: None) -> None:
    """``noise`` (per member, per parameter) is the mutation of the g-th averaging or push, drawn from
    generator(*key) after ``before`` drew from it: the true keys and std / g reproduce it; a wrong key of the
    generator, a wrong member key or another scale (std, std / g^2, std / sqrt(g)) do not; its spread is std / g."""

    def draw(gen_key, member_key=lambda s, j: (s, "member", j), scale=std / g):
        gen = rng.generator(*gen_key)
        before(gen)
        return mutation(gen, params, scale, member_key)

    assert close(draw(key), noise)
    for wrong in wrong_keys(key):
        assert not close(draw(wrong), noise), wrong
    for wrong in wrong_keys((S, "member", J)):
        assert not close(draw(key, lambda s, j, wrong=wrong: _wrong_member_key(wrong, s, j)), noise), wrong
    for scale in {std, std / g**2, std / g**0.5} - {std / g}:
        assert not close(draw(key, scale=scale), noise), scale
    flat = torch.cat([t.flatten() for member in noise for t in member])
    assert flat.std().item() == pytest.approx(std / g, rel=0.06)


def test_mutations_of_each_averaging_come_from_its_key_and_shrink_as_1_over_g(monkeypatch, split_path):
    """After the g-th averaging (PAPA-2 here), every member's parameters get N(0, (std / g)^2) noise: a seed drawn
    from the averaging's generator (seed, "average", epoch) after its matrix, member j's noise from
    (that seed, "member", j). At g = 1, 2 and 3, so that std, std / g^2 and std / sqrt(g) are all told apart."""
    seed, p, std = 2, 4, 0.05
    exp = logreg(population={"size": p}, train={"epochs": 4, "batch_size": 256},
                 averaging={"papa-2": {"every": 1, "repair": False}, "genetic": {"mutation_std": std}})
    mixes, after = record_mixes(monkeypatch), []
    average = Trainer.average

    def recording(t):
        average(t)
        after.append(snapshot(t.pop.params))

    monkeypatch.setattr(Trainer, "average", recording)
    trainer(exp, "papa-2", seed, split_path).fit()
    assert len(mixes) == len(after) == 3
    for g, ((matrix, mixed), final) in enumerate(zip(mixes, after, strict=True), start=1):
        params = {n: mixed[n] for n in final}
        noise = [[final[n][j] - mixed[n][j] for n in final] for j in range(p)]
        assert torch.equal(averaging.mixing_matrix("pair-half", p, rng.generator(seed, "average", g)), matrix)
        check_mutation(noise, params, std, g, (seed, "average", g),
                       before=lambda gen: averaging.mixing_matrix("pair-half", p, gen))


def test_mutations_after_pushes_come_from_the_steps_key(monkeypatch, split_path):
    """PAPA with mutations: after the g-th push (at step s) every member gets N(0, (std / g)^2) noise from
    (seed, "mutate", s), member j's from (a seed drawn from it, "member", j)."""
    seed, p, std = 3, 3, 0.05
    exp = logreg(population={"size": p}, train={"epochs": 2, "batch_size": 256},
                 averaging={"papa": {"every": 2}, "genetic": {"mutation_std": std}})
    pushed, after, steps = [], [], []
    push_toward_average_ = averaging.push_toward_average_

    def pushing(pop, *args, **kwargs):
        out = push_toward_average_(pop, *args, **kwargs)
        pushed.append(snapshot(pop.params))
        return out

    push = Trainer.push

    def recording(t):
        push(t)
        after.append(snapshot(t.pop.params))
        steps.append(t.progress.step)

    monkeypatch.setattr(averaging, "push_toward_average_", pushing)
    monkeypatch.setattr(Trainer, "push", recording)
    trainer(exp, "papa", seed, split_path).fit()
    assert steps == [2, 4, 6, 8, 10]  # 5 steps per epoch
    for g, (mixed, final, step) in enumerate(zip(pushed, after, steps, strict=True), start=1):
        if g not in (1, 2, 5):
            continue
        noise = [[final[n][j] - mixed[n][j] for n in final] for j in range(p)]
        check_mutation(noise, mixed, std, g, (seed, "mutate", step))


# the global RNG and the epoch of the data streams -----------------------------------------------------------------
def test_every_epoch_starts_the_global_rng_from_its_own_key(split_path):
    """Dropout and other module-internal draws: epoch e (0-based) starts with the global RNG seeded
    derive_seed(seed, "global", e), and its batches are the streams' epoch e."""
    seed = 4
    t = trainer(logreg(population={"size": 2}, train={"epochs": 3, "batch_size": 256}), "baseline", seed, split_path)
    states, epochs, original = [], [], t.stream.epoch

    def epoch(e):
        states.append(torch.get_rng_state())
        epochs.append(e)
        return original(e)

    t.stream.epoch = epoch
    t.fit()
    assert epochs == [0, 1, 2]

    def draw(key):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.derive_seed(*key))
            return torch.get_rng_state()

    for e, state in enumerate(states):
        pinned(draw, (seed, "global", e), state)


# REPAIR's and SWA's batches ------------------------------------------------------------------------------------------
def record_member_batches(monkeypatch) -> list[tuple]:
    """Every MemberStream.member_batches call: (member, the caller's generator's seed, batches)."""
    calls, original = [], MemberStream.member_batches

    def recording(stream, j, generator, n):
        calls.append((j, generator.initial_seed(), n))
        return original(stream, j, generator, n)

    monkeypatch.setattr(MemberStream, "member_batches", recording)
    return calls


@pytest.mark.parametrize("genetic", [False, True])
def test_repair_in_training_reads_each_members_own_batches_seeded_666(monkeypatch, split_path, genetic):
    """Algorithm 5 in training: every member's REPAIR batches are its own augmentation of the same images, from a
    generator seeded 666 (not the run seed); the genetic ablations' children are REPAIRed on unaugmented batches
    (member None), seeded 666 too."""
    exp = tiny_experiment(model={"kwargs": {"width": 4}}, population={"size": 3},
                          train={"epochs": 2, "batch_size": 256},
                          averaging={"papa-2": {"every": 1, "repair_iters": 2},
                                     "genetic": {"elitism": genetic}})
    calls = record_member_batches(monkeypatch)
    trainer(exp, "papa-2", 5, split_path).fit()
    assert calls and {seed for _, seed, _ in calls} == {666} and {n for *_, n in calls} == {2}
    assert {j for j, _, _ in calls} == ({0, 1, 2, None} if genetic else {0, 1, 2})


def test_swa_batchnorm_batches_come_from_the_run_seeds_key(monkeypatch, split_path):
    """SWA's final BatchNorm recomputation reads ``bn_batches`` batches of every member's own stream, all members
    from generator(seed, "swa-batchnorm") (the same images)."""
    seed = 6
    exp = logreg(population={"size": 2}, train={"epochs": 4, "batch_size": 256,
                                                "swa": {"start": 0.5, "lr": 0.02, "anneal_epochs": 1, "bn_batches": 3}})
    calls = record_member_batches(monkeypatch)
    trainer(exp, "baseline", seed, split_path).fit()
    assert [(j, n) for j, _, n in calls] == [(0, 3), (1, 3)]
    for _, actual, _ in calls:
        pinned(lambda key: rng.derive_seed(*key), (seed, "swa-batchnorm"), actual)


# what the Trainer builds from the run seed ----------------------------------------------------------------------------
def test_the_trainer_draws_members_policies_and_data_from_its_seed(split_path):
    """Member j's initial weights from derive_seed("init", seed, j), the policies from (seed, "policies"), member
    j's first batch from (seed, "order", j, 0) and (seed, "augment", j, 0) over the training split (every policy
    of this grid, merged into TINY's, draws: mixup and erasing)."""
    seed, p = 3, 3
    grid = {"mixup": [0.1, 0.2, 0.3, 0.4, 0.5], "random_erasing": [0.1, 0.2, 0.3, 0.4, 0.5]}
    exp = tiny_experiment(model={"kwargs": {"width": 4}}, population={"size": p}, augment={"grid": grid})
    t = trainer(exp, "baseline", seed, split_path)

    def init(key):
        with rng.seeded(rng.derive_seed(*key)):
            return list(create_model("digits_cnn", num_classes=10, in_channels=1, width=4).state_dict().values())

    for j in range(p):
        pinned(init, ("init", seed, j), list(t.pop.member(j).state_dict().values()))
    a = exp["augment"]
    base = {"crop_padding": a["crop_padding"], "flip": a["flip"]}
    pinned(lambda key: draw_policies(a["grid"], p, rng.generator(*key), base), (seed, "policies"), t.all_policies)

    train, indices = t.splits.train, torch.as_tensor(t.split["train"])
    b = exp["train"]["batch_size"]
    x, targets = next(iter(t.stream.epoch(0)))
    for j in range(p):
        def first(order_key, augment_key, j=j):
            idx = indices[torch.randperm(len(indices), generator=rng.generator(*order_key))][:b]
            return list(apply(t.policies[j], train.images[idx], train.labels[idx], 10, train.mean, train.std,
                              rng.generator(*augment_key)))

        pinned(lambda key, j=j: first(key, (seed, "augment", j, 0)), (seed, "order", j, 0), [x[j], targets[j]])
        pinned(lambda key, j=j: first((seed, "order", j, 0), key), (seed, "augment", j, 0), [x[j], targets[j]])
