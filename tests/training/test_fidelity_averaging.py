"""The fidelity options of the averagings (papa/fidelity.py) in whole training runs: what happens after which
epoch, and on which data, under the authors' scripts' setting and under the paper's."""

import importlib

import pytest

from papa import runs
from papa.data.stream import MemberStream
from tests.helpers import tiny_experiment
from tests.training.test_schedule_events import logreg, split_path, train  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("from_start", "authors", "paper"), [(False, [3, 5], [2, 4]), (True, [1, 3, 5], [1, 2, 4])])
def test_a_run_averages_after_the_epochs_the_scripts_count(split_path, tmp_path, from_start, authors, paper):  # noqa: F811
    """6 epochs, every 2: the scripts' 0-based test averages after epochs (1,) 3, 5; the paper's after (1,) 2, 4."""
    for setting, expected in (("authors", authors), ("paper", paper)):
        exp = logreg(population={"size": 3}, train={"epochs": 6, "batch_size": 256},
                     fidelity={"averaging_epochs": setting},
                     averaging={"papa-2": {"every": 2, "repair": False, "from_start": from_start}})
        history = train(exp, "papa-2", split_path, tmp_path / setting)
        assert sorted(set(history[history.phase == "after_avg"].epoch)) == expected


@pytest.mark.parametrize(("variant", "scheme"), [("papa-2", "pair-half"), ("papa-2", "pair-75"), ("papa-all", "all")])
def test_pair_repair_reads_unaugmented_batches_under_authors(split_path, tmp_path, monkeypatch, variant, scheme):  # noqa: F811
    """REPAIR after a pair averaging measures parents and children on the base transform (member None) under the
    authors' setting, each member's own augmentation under the paper's; PAPA-all's REPAIR reads each member's own
    augmentation in both (the scripts' correct_neuron_stats_multiple with the members' hyperparameters)."""
    for setting in ("authors", "paper"):
        read = []
        original = MemberStream.member_batches

        def recording(self, j, generator, n, _original=original, _read=read):
            _read.append(j)
            return _original(self, j, generator, n)

        monkeypatch.setattr(MemberStream, "member_batches", recording)
        exp = logreg(population={"size": 3}, train={"epochs": 3, "batch_size": 256},
                     fidelity={"papa2_repair_data": setting},
                     averaging={variant: {"every": 1, "repair": True, "repair_iters": 1, "scheme": scheme}})
        train(exp, variant, split_path, tmp_path / setting)
        monkeypatch.setattr(MemberStream, "member_batches", original)
        assert len(read) >= 2 * 3 * 2  # two averagings, the three members' moments and their REPAIR
        plain = setting == "authors" and variant == "papa-2"
        assert set(read) == ({None} if plain else {0, 1, 2})


def test_authors_elitism_trains_and_repairs_only_the_children(split_path, tmp_path, monkeypatch):  # noqa: F811
    """Table 16's "tournament, elitist, mutations" row under authors on the digits CNN (BatchNorm buffers): one
    REPAIR per generation, of the 10 children before they are scored; the survivors are not REPAIRed again."""
    averagers = importlib.import_module("papa.averagers")
    calls, original = [], averagers.repair_population_

    def recording(pop, matrix, *args, **kwargs):
        calls.append(len(matrix))
        return original(pop, matrix, *args, **kwargs)

    monkeypatch.setattr(averagers, "repair_population_", recording)
    for setting, expected in (("authors", [10]), ("paper", [10, 5])):
        calls.clear()
        exp = tiny_experiment(population={"size": 5}, train={"epochs": 2}, fidelity={"elitism": setting},
                              averaging={"papa-2": {"every": 1, "repair_iters": 1},
                                         "genetic": {"tournament": True, "elitism": True, "mutation_std": 0.01}})
        runs.train(exp, "papa-2", 1, split_path, tmp_path / setting, progress=False)
        assert calls == expected
