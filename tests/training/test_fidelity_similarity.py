"""fidelity option ``similarity_members``: Table 5 aligns and REPAIRs every variant (paper) or the baseline's
runs only (authors: the scripts ran --permutation True --repair_soup True for the baseline alone)."""

import pytest

from papa import runs
from tests.training.test_align_pipeline import experiment, permuted_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("setting", ["paper", "authors"])
def test_table5_aligns_and_repairs_the_baseline_only_under_authors(tmp_path, setting):
    exp = experiment(tmp_path, "resnet20", fidelity={"similarity_members": setting})
    assert exp["fidelity"]["similarity_members"] == setting
    run, split, _ = permuted_run(tmp_path, exp, variant="papa-all")  # a network and permuted copies of it
    out = runs.similarity(exp, split, run)
    authors = setting == "authors"
    assert (out["aligned"], out["repaired"]) == (not authors, not authors)
    between = list(out["between_networks"].values())
    if authors:  # unaligned permuted copies: their units do not correspond
        assert max(between) < 90
    else:  # aligned, they are the same network
        assert min(between) > 99
    assert runs.similarity_steps(exp, "baseline") == (True, True)
    assert runs.similarity_steps(exp, "papa") == (not authors, not authors)
    assert runs.similarity_steps(exp, "papa-2") == (not authors, not authors)
