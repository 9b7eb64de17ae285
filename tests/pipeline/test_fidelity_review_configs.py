"""The review's two config-level differences (fidelity-review.md N5, N7), closed in the paper configs:
Table 13's baseline soups are plain, as in the ablation setting it follows, and Figure 2 draws PAPA too."""

from pathlib import Path

import pandas as pd

from papa import config as cfg
from papa.report import figures, plan

ROOT = Path(__file__).resolve().parents[2]


def _table(config: dict, name: str) -> dict:
    return next(t for t in config["tables"] if t["name"] == name)


def test_table13_baseline_soups_are_plain_like_the_ablation_setting():
    table13 = _table(cfg.load_config(ROOT / "config" / "paper" / "table13.yaml"), "table13")
    table14 = _table(cfg.load_config(ROOT / "config" / "paper" / "tables14-17.yaml"), "table14")
    assert "baseline" in {row["variant"] for row in table13["rows"]}
    assert "baseline" not in table13.get("repair", []) and "baseline" not in table14.get("repair", [])


def test_figure2_plans_and_draws_a_papa_line(tmp_path):
    config = cfg.load_config(ROOT / "config" / "paper" / "figure2.yaml")
    (figure,) = config["figures"]
    assert ("ablation-base", "papa") in plan.figure_runs(figure, config["variants"])
    assert ("ablation-base", "papa") in plan.runs(config)
    assert figures.curve_keys(figure, config["variants"])["PAPA"] == ("ablation-base", "papa")
    # the run is the one Table 17 shows: the same experiment in both configs
    tables = cfg.load_config(ROOT / "config" / "paper" / "tables14-17.yaml")
    same = {k: v for k, v in cfg.experiment(config, "ablation-base").items() if k != "description"}
    assert same == {k: v for k, v in cfg.experiment(tables, "ablation-base").items() if k != "description"}
    # PAPA's history has no averaging phases (it pushes every 10 steps): its line is drawn without jumps
    histories = {}
    for label in figures.curve_keys(figure, config["variants"]):
        rows = [(e, m, "end", 50.0 + e + m) for e in (1, 2, 3) for m in (0, 1)]
        if label != "PAPA" and label != "Baseline":
            rows += [(e, m, phase, 49.0 + e) for e in (1, 2) for m in (0, 1) for phase in ("before_avg", "after_avg")]
        path = tmp_path / f"{label}.csv"
        pd.DataFrame(rows, columns=["epoch", "member", "phase", "test_accuracy"]).to_csv(path, index=False)
        histories[(label, 1)] = path
    fig = figures.curves_figure(figure, histories)
    assert "PAPA" in [t.get_text() for t in fig.legends[0].get_texts()]
