"""What every selection is fed, checked on data where the plausible wrong input picks something else.

The case: logistic-regression members trained on digits, member 0's classifier then given permuted classes
(class c answered as c + 1), and the validation images relabelled the same way. On the validation split member 0
is the only good member (low cross-entropy, high accuracy) and the others are wrong almost everywhere; on the
training split (and the test set) it is the worst. So:

- the genetic ablations (Tables 15-17), which rank by validation cross-entropy, lowest first, keep member 0 and
  its children; fed accuracies as losses, losses of the training split or of the test set, they pick others;
- the greedy soup averaging of Table 14 and the soups stage (Algorithm 3, greedy by validation accuracy), with
  member 1 made a twin of member 0: they start from member 0 and keep its twin (their soup is member 0, as good
  on the validation split); candidate soups scored on the training split would refuse the twin, and a greedy
  soup ranked on the training split would never take either.

A linear model's mixture of members computes the same mixture of their logits, so every expected selection is
recomputed here from the members' logits with plain tensor code."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from papa import averaging, rng, runs
from papa.checkpoint import load_tensors, save_tensors
from papa.data import load_split
from papa.data.augment import eval_transform
from papa.genetic import selection_matrix
from papa.train import Trainer
from tests.helpers import tiny_experiment
from tests.keys import pinned

pytestmark = pytest.mark.usefixtures("one_thread")
P, SEED = 4, 2
PERM = (torch.arange(10) + 1) % 10  # member 0 answers c + 1 where it answered c; validation labels alike
HEAD = ("linear.weight", "linear.bias")


@pytest.fixture(scope="module")
def split_path(tmp_path_factory, one_thread) -> Path:
    path = tmp_path_factory.mktemp("selection") / "split.json"
    runs.prepare(tiny_experiment(), path)
    return path


def logreg(**overrides) -> dict:
    exp = tiny_experiment(model={"name": "logreg"}, population={"size": P}, **overrides)
    exp["model"]["kwargs"] = {}
    return exp


def permute_member_0(state: dict, twin: bool = False) -> dict:
    """``state`` (stacked) with member 0's classes permuted: its logit for PERM[c] is its old logit for c; with
    ``twin``, member 1 a copy of it."""
    state = {k: v.clone() for k, v in state.items()}
    for name in HEAD:
        state[name][0] = state[name][0][PERM.argsort()]
        if twin:
            state[name][1] = state[name][0]
    return state


def relabelled(splits, split: dict):
    """``splits`` with the validation images' labels permuted (the training split and test set untouched)."""
    splits = copy.deepcopy(splits)
    val = torch.as_tensor(split["val"])
    splits.train.labels[val] = PERM[splits.train.labels[val]]
    return splits


@pytest.fixture(scope="module")
def trained(split_path) -> dict:
    """A baseline population of P logistic regressions trained 2 epochs (stacked tensors)."""
    exp = logreg(train={"epochs": 2, "batch_size": 128})
    t = Trainer(exp, "baseline", 1, runs.load_data(exp), load_split(split_path), progress=False)
    t.fit()
    return {k: v.detach().clone() for k, v in t.pop.state_dict().items()}


def logits(state: dict, data, indices) -> torch.Tensor:
    """(P, N, 10): every member's logits on ``data``'s items ``indices`` (all when None), by plain algebra."""
    idx = torch.arange(len(data)) if indices is None else torch.as_tensor(indices)
    x = eval_transform(data.images[idx], data.mean, data.std).flatten(1).double()
    return torch.stack([x @ state["linear.weight"][j].double().T + state["linear.bias"][j].double()
                        for j in range(P)])


def scores(z: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, float]]:
    """(accuracy in percent, mean cross-entropy) of each row of logits (..., N, 10)."""
    return [(100.0 * (zj.argmax(1) == labels).double().mean().item(), F.cross_entropy(zj, labels).item())
            for zj in z]


class Where:
    """One of the splits the members can be scored on: its member logits and labels."""

    def __init__(self, state, data, indices):
        self.z = logits(state, data, indices)
        self.labels = data.labels if indices is None else data.labels[torch.as_tensor(indices)]

    def members(self) -> list[tuple[float, float]]:
        return scores(self.z, self.labels)

    def mixtures(self, rows: torch.Tensor) -> list[tuple[float, float]]:
        """The scores of the members' mixtures ``rows`` (a linear model's mixed weights mix its logits)."""
        return scores(torch.einsum("rp,pnk->rnk", rows.double(), self.z), self.labels)


def places(state, split_path, exp):
    """The relabelled data, the split, and the members of ``state`` on the validation split, training split and
    test set."""
    splits, split = runs.load_data(exp), load_split(split_path)
    splits = relabelled(splits, split)
    return splits, split, {"val": Where(state, splits.train, split["val"]),
                           "train": Where(state, splits.train, split["train"]),
                           "test": Where(state, splits.test, None)}


def averaged_once(monkeypatch, exp, variant, splits, split, state) -> torch.Tensor:
    """The matrix of the averaging after epoch 1 of a run holding ``state``."""
    t = Trainer(exp, variant, SEED, splits, split, progress=False)
    t.pop.load_state_dict(state)
    t.progress.epoch = 1
    used, mix_ = [], averaging.mix_
    monkeypatch.setattr(averaging, "mix_", lambda pop, m, comm=None: used.append(torch.as_tensor(m)) or mix_(pop, m,
                                                                                                          comm))
    t.average()
    (matrix,) = used
    return matrix


@pytest.mark.parametrize(("tournament", "elitism"), [(True, False), (False, True), (True, True)])
def test_genetic_selection_ranks_by_validation_cross_entropy_lowest_first(monkeypatch, trained, split_path,
                                                                          tournament, elitism):
    """The matrix of the generation is selection_matrix fed the parents' validation cross-entropies and, with
    elitism, the children's (drawn from the averaging's generator, (seed, "average", epoch)). Accuracies as losses,
    training-split or test-set cross-entropies, for the parents or the children, each give another matrix."""
    genetic = {"tournament": tournament, "elitism": elitism}
    exp = logreg(averaging={"papa-2": {"every": 1, "repair": False, "scheme": "pair-75"}, "genetic": genetic})
    state = permute_member_0(trained)
    splits, split, on = places(state, split_path, exp)
    matrix = averaged_once(monkeypatch, exp, "papa-2", splits, split, state)

    def selection(key, parents, children="val", what=1):
        losses = [s[what] for s in on[parents].members()]
        return selection_matrix(P, losses, "pair-75", genetic, rng.generator(*key),
                                lambda rows: [loss for _, loss in on[children].mixtures(rows)])

    key = (SEED, "average", 1)
    assert torch.equal(selection(key, "val"), matrix)
    if tournament:  # with elitism alone every pair is a child: only the heavier parent and the order are random
        pinned(lambda k: selection(k, "val"), key, matrix)
    val = on["val"].members()
    assert min(range(P), key=lambda j: val[j][1]) == 0 and max(range(P), key=lambda j: val[j][0]) == 0
    for wrong in (selection(key, "val", what=0), selection(key, "train"), selection(key, "test")):
        assert not torch.equal(wrong, matrix)
    if elitism:
        assert matrix[0].tolist() == [1.0, 0.0, 0.0, 0.0]  # member 0, the lowest validation loss, survives first
        for wrong in (selection(key, "val", children="train"), selection(key, "val", children="test")):
            assert not torch.equal(wrong, matrix)


def greedy(scores: list[float], soup_score) -> list[int]:
    """Algorithm 3: members by decreasing score (ties in member order), each added when the soup's score does
    not decrease."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    kept, best = [order[0]], scores[order[0]]
    for j in order[1:]:
        s = soup_score([*kept, j])
        if s >= best:
            kept, best = [*kept, j], s
    return kept


def greedy_on(ranked: Where, scored: Where | None = None) -> list[int]:
    """The greedy soup's members, in the order added, ranked by their accuracies on ``ranked`` and candidate soups
    scored on ``scored`` (default the same)."""
    scored = scored or ranked

    def soup_score(members: list[int]) -> float:
        w = torch.zeros(P, dtype=torch.float64)
        w[members] = 1.0 / len(members)
        return scored.mixtures(w[None])[0][0]

    return greedy([acc for acc, _ in ranked.members()], soup_score)


def test_greedy_soup_averaging_scores_candidate_soups_on_the_validation_split(monkeypatch, trained, split_path):
    """Table 14's GreedySoup: every member becomes the greedy soup of the population, greedy by validation accuracy
    (member 0 and its twin here); with candidate soups scored on the training split or the test set, or the
    members ranked there too, it would be another soup."""
    exp = logreg(averaging={"papa-all": {"every": 1, "repair": False, "scheme": "greedy"}})
    state = permute_member_0(trained, twin=True)
    splits, split, on = places(state, split_path, exp)
    matrix = averaged_once(monkeypatch, exp, "papa-all", splits, split, state)
    kept = greedy_on(on["val"])
    assert kept[:2] == [0, 1]
    assert torch.equal(matrix, averaging.greedy_matrix(kept, P))
    for wrong in ("train", "test"):
        assert set(greedy_on(on["val"], on[wrong])) != set(kept)
        assert not {0, 1} & set(greedy_on(on[wrong]))


def test_soups_stage_scores_candidate_soups_on_the_validation_split(monkeypatch, trained, split_path, tmp_path):
    """`papa soups`: the greedy soup's members (in the order added) and the soups' validation accuracies in
    soups.json are those of the validation split (member 0 and its twin here, so the greedy soup is member 0)."""
    exp = logreg(train={"epochs": 2, "batch_size": 128}, soups={"repair_iters": 1})
    out = tmp_path / "run"
    runs.train(exp, "baseline", 1, split_path, out, progress=False)
    tensors, meta = load_tensors(out / "population.safetensors")
    save_tensors(out / "population.safetensors", permute_member_0(tensors, twin=True), meta)
    load_data = runs.load_data
    monkeypatch.setattr(runs, "load_data", lambda e: relabelled(load_data(e), load_split(split_path)))
    info = runs.soups(exp, split_path, out)
    state = load_tensors(out / "population.safetensors")[0]
    splits, split = runs.load_data(exp), load_split(split_path)
    val, train = Where(state, splits.train, split["val"]), Where(state, splits.train, split["train"])
    assert info["greedy_soup_members"] == greedy_on(val)
    assert greedy_on(val)[:2] == [0, 1]
    assert set(greedy_on(val, train)) != set(greedy_on(val)) and not {0, 1} & set(greedy_on(train))
    uniform = val.mixtures(torch.full((1, P), 1.0 / P))[0][0]
    assert info["val_accuracy"]["avg_soup"] == pytest.approx(uniform, abs=1e-9)
    kept = torch.zeros(1, P, dtype=torch.float64)
    kept[0, greedy_on(val)] = 1.0 / len(greedy_on(val))
    assert info["val_accuracy"]["greedy_soup"] == pytest.approx(val.mixtures(kept)[0][0], abs=1e-9)
