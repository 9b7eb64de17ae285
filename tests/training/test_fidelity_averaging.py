"""The fidelity options of the averagings (papa/fidelity.py) in whole training runs: what happens after which
epoch, and on which data, under the authors' scripts' setting and under the paper's."""

from __future__ import annotations

import pytest

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
