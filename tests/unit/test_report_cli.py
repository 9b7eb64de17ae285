"""The report subcommands (`papa aggregate`, `papa plot`, `papa render`) on the paths the pipeline and a user take
besides the usual one: `papa plot` of a curves figure finding the runs' history.csv under the config's results
folder, and each kind of bad input answered with exit 2 and one line naming the problem, nothing written."""

from pathlib import Path

import pandas as pd
import pytest

from papa import cli
from papa.report import figures
from tests.unit.test_report import fake_metrics, history

CONFIG = """\
results: runs
variants: [baseline, papa-all]
seeds: [1, 2]
experiments: {exp: {}, other: {}}
figures:
  - {name: curves, kind: curves, experiment: exp}
  - name: overlay
    kind: curves
    lines:
      - {label: With REPAIR, experiment: exp, variant: papa-all}
      - {label: Without, experiment: other, variant: papa-all}
  - {name: bars, kind: variants, experiments: [exp]}
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A config whose results folder (``runs``, not the default) holds a history.csv for every run it plots."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(CONFIG)
    for e in ("exp", "other"):
        for v in ("baseline", "papa-all"):
            for s in (1, 2):
                run = tmp_path / "runs" / e / v / f"seed{s}"
                run.mkdir(parents=True)
                history(run / "history.csv", jumps=v == "papa-all")
    return tmp_path


def fails(capsys, argv: list[str], *expected: str) -> str:
    """Run ``papa argv`` in-process: exit 2, one stderr line holding ``expected``, nothing on stdout."""
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"papa {argv[0]}: error: ")
    for text in expected:
        assert text in err, err
    return err


@pytest.mark.parametrize(("figure", "expected"), [
    ("curves", {("baseline", s): "runs/exp/baseline/seed{s}" for s in (1, 2)}
     | {("papa-all", s): "runs/exp/papa-all/seed{s}" for s in (1, 2)}),
    ("overlay", {("With REPAIR", s): "runs/exp/papa-all/seed{s}" for s in (1, 2)}
     | {("Without", s): "runs/other/papa-all/seed{s}" for s in (1, 2)}),
])
def test_plot_without_histories_reads_those_of_the_configs_results(project, monkeypatch, capsys, figure, expected):
    """Without --histories, a curves figure draws every seed of every curve from
    <results>/<experiment>/<variant>/seed<S>/history.csv, <results> being the config's results folder; a variants
    figure keys its curves by variant, a lines one by label."""
    seen = []
    draw = figures.curves
    monkeypatch.setattr(figures, "curves", lambda f, histories, out: (seen.append(histories), draw(f, histories, out)))
    assert cli.main(["plot", "--config", "c.yaml", "--figure", figure]) == 0
    assert capsys.readouterr().out == f"reports/{figure}.png: figure {figure!r} (curves)\n"
    assert seen == [{key: Path(run.format(s=key[1])) / "history.csv" for key, run in expected.items()}]
    assert (project / "reports" / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_histories_names_the_run_not_trained(project, capsys):
    """A run the figure plots but the results folder lacks: its history.csv is named, nothing is drawn."""
    (project / "runs" / "other" / "papa-all" / "seed2" / "history.csv").unlink()
    fails(capsys, ["plot", "--config", "c.yaml", "--figure", "overlay"],
          "runs/other/papa-all/seed2/history.csv: a history not found (train this run first)")
    assert not (project / "reports").exists()


def test_plot_names_a_curve_none_of_the_given_histories_draws(project, capsys):
    """--histories covering one line of an overlay: the other line is named, nothing is drawn."""
    fails(capsys, ["plot", "--config", "c.yaml", "--figure", "overlay", "--histories",
                   "runs/exp/papa-all/seed1/history.csv", "runs/exp/papa-all/seed2/history.csv"],
          "figure 'overlay': no history for 'Without'")
    assert not (project / "reports").exists()


def test_plot_refuses_histories_of_runs_it_does_not_plot(project, capsys):
    """--histories of other runs only (another experiment's): refused by name instead of an empty figure."""
    fails(capsys, ["plot", "--config", "c.yaml", "--figure", "curves", "--histories",
                   "runs/other/baseline/seed1/history.csv", "runs/other/papa-all/seed1/history.csv"],
          "figure 'curves': none of the history files is of a run it plots")
    assert not (project / "reports").exists()


def test_a_variants_figure_needs_the_aggregated_metrics(project, capsys):
    fails(capsys, ["plot", "--config", "c.yaml", "--figure", "bars", "--out", "bars.png"],
          "figure 'bars' (variants) needs --metrics")
    assert not (project / "bars.png").exists()


def test_aggregate_with_no_metrics_files(tmp_path, monkeypatch, capsys):
    """No files and no --results, or a --results folder without any run: refused, no CSV written; the second
    names the folder searched."""
    monkeypatch.chdir(tmp_path)
    err = fails(capsys, ["aggregate", "--out", "m.csv"], "no metrics files given",
                "pass files, or --results DIR to collect them")
    (tmp_path / "results" / "exp").mkdir(parents=True)
    err = fails(capsys, ["aggregate", "--results", "results", "--out", "m.csv"], "no metrics files given",
                "none found under results/")
    assert "--results DIR" not in err
    assert not (tmp_path / "m.csv").exists()


def test_aggregate_names_a_missing_or_malformed_metrics_file(tmp_path, monkeypatch, capsys):
    """A metrics.json that is not there, or not JSON: its path and the problem, and an earlier aggregated CSV is
    left as it was."""
    monkeypatch.chdir(tmp_path)
    good = fake_metrics(tmp_path / "results", "exp", "baseline", 1)
    assert cli.main(["aggregate", str(good), "--out", "m.csv"]) == 0
    capsys.readouterr()
    before = (tmp_path / "m.csv").read_bytes()
    fails(capsys, ["aggregate", str(good), "results/exp/papa/seed1/metrics.json", "--out", "m.csv"],
          "results/exp/papa/seed1/metrics.json: metrics file not found")
    broken = fake_metrics(tmp_path / "results", "exp", "papa", 1)
    broken.write_text('{"experiment": "exp", "mean": 9')
    fails(capsys, ["aggregate", "--results", "results", "--out", "m.csv"],
          f"{broken.relative_to(tmp_path)}: malformed JSON (Expecting ',' delimiter: line 1 column")
    assert (tmp_path / "m.csv").read_bytes() == before
    assert len(pd.read_csv("m.csv")) > 0


def test_render_names_missing_aggregated_metrics(project, capsys):
    (project / "c.yaml").write_text(CONFIG + "tables: [{name: t, layout: main, rows: [{label: CNN, experiment: "
                                             "exp}]}]\n")
    fails(capsys, ["render", "--config", "c.yaml", "--table", "t", "--metrics", "m.csv"],
          "m.csv: aggregated metrics not found (run `papa aggregate` first)")
    assert not (project / "reports").exists()
