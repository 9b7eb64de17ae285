"""Every output records the code version that made it (papa.provenance): the commit and whether the code had
changes in a checkout, the package version otherwise, never a failed run for want of git; and a table cell of
the rendered CSV names the code versions of the runs behind it."""

import json
import subprocess

import pytest

import papa
from papa import provenance
from papa.report import aggregate, tables
from tests.helpers import REPO
from tests.unit.test_report import fake_metrics, table


@pytest.fixture
def fresh(monkeypatch):
    """code_version computed again (it is computed once per process), with CHECKOUT as the test sets it."""
    provenance.code_version.cache_clear()
    yield monkeypatch
    provenance.code_version.cache_clear()


def git(repo, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def test_this_checkout_records_its_commit_and_its_changes(fresh):
    code = provenance.code_version()
    changed = bool(git(REPO, "status", "--porcelain", "--untracked-files=no", "--", *provenance.CODE).strip())
    assert code == {"commit": git(REPO, "rev-parse", "HEAD").strip(), "changed": changed}
    assert provenance.describe(code) == code["commit"] + ("+changes" if changed else "")


def test_a_change_to_the_code_is_flagged_and_other_changes_are_not(fresh, tmp_path):
    for name in ("papa/a.py", "reports/t.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    fresh.setattr(provenance, "CHECKOUT", tmp_path)
    head = git(tmp_path, "rev-parse", "HEAD").strip()
    (tmp_path / "reports" / "t.md").write_text("2\n")  # a rendered table is an output, not code
    assert provenance.code_version() == {"commit": head, "changed": False}
    provenance.code_version.cache_clear()
    (tmp_path / "papa" / "a.py").write_text("2\n")
    assert provenance.code_version() == {"commit": head, "changed": True}


def test_without_a_checkout_or_without_git_the_package_version(fresh, tmp_path):
    fresh.setattr(provenance, "CHECKOUT", tmp_path)  # an installed package: no .git beside it
    assert provenance.code_version() == {"version": papa.__version__}
    provenance.code_version.cache_clear()
    fresh.setattr(provenance, "CHECKOUT", REPO)
    fresh.setenv("PATH", str(tmp_path))  # no git on PATH
    assert provenance.code_version() == {"version": papa.__version__}
    assert provenance.describe({"version": "0.1.0"}) == "papa 0.1.0" and provenance.describe(None) == ""


def test_a_table_cell_names_the_code_of_its_runs(tmp_path):
    results = tmp_path / "results"
    for seed, code in ((1, {"commit": "a" * 40, "changed": False}), (2, {"commit": "b" * 40, "changed": True})):
        fake_metrics(results, "exp", "papa", seed, code=code)
    fake_metrics(results, "exp", "baseline", 1)  # written before the code was recorded
    frame = aggregate.load(aggregate.write(aggregate.aggregate(aggregate.find_metrics(results)), tmp_path / "m.csv"))
    assert set(frame[frame.variant == "papa"]["code"]) == {"a" * 40, "b" * 40 + "+changes"}
    grid = tables.cells(table("range", rows=[{"label": "PAPA", "experiment": "exp", "variant": "papa"}]), frame,
                        ["baseline", "papa"], [1, 2])
    assert set(grid["code"]) == {f"{'a' * 40}; {'b' * 40}+changes"}
    grid = tables.cells(table("range", rows=[{"label": "B", "experiment": "exp", "variant": "baseline"}]), frame,
                        ["baseline", "papa"], [1, 2])
    assert set(grid["code"]) == {""}
    json.dumps(list(grid["code"]))
