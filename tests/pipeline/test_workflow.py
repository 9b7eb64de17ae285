"""The Snakemake workflow: lint, the DAG of the default config, config errors, and (slow) a tiny
end-to-end run whose tables regenerate from cached results without retraining."""

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SNAKEFILE = ROOT / "workflow" / "Snakefile"
DEFAULT = ROOT / "config" / "config.yaml"


def snakemake(workdir, *args, configfile=DEFAULT, check=True):
    """Run snakemake on the repository's workflow in ``workdir`` (``papa`` from this env on PATH)."""
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(workdir),
        *args,
        "--configfile",
        str(configfile),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def job_counts(output: str) -> dict[str, int]:
    """{rule: count} from the 'Job stats' table of a (dry) run."""
    stats = output.split("Job stats:")[-1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M) if m[1] != "total"}


def test_lint(tmp_path):
    done = snakemake(tmp_path, "--lint")
    assert "Congratulations" in done.stdout + done.stderr


def test_default_config_dag(tmp_path):
    done = snakemake(tmp_path, "--dry-run", "--cores", "4")
    counts = job_counts(done.stdout)
    # 1 experiment x 4 variants x 3 seeds; 3 tables, 2 figures
    assert counts == {
        "prepare": 1,
        "train": 12,
        "soups": 12,
        "evaluate": 12,
        "aggregate": 1,
        "render_table": 3,
        "plot_figure": 2,
        "all": 1,
    }
    assert "results/digits/papa-all/seed3/population.safetensors" in done.stdout
    assert "results/benchmarks/train/digits/papa-all/seed3.tsv" in done.stdout


def bad_config(tmp_path, edit):
    config = yaml.safe_load(DEFAULT.read_text())
    edit(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["tables"][0].update(layout="wide"), r"instance\['tables'\]\[0\]\['layout'\]"),
        (lambda c: c.update(variants=["papa", "papa-3"]), r"instance\['variants'\]\[1\]"),
        (
            lambda c: c["experiments"]["digits"]["train"].update(epochs=0),
            r"experiment 'digits': train\.epochs",
        ),
        (lambda c: c["tables"][0]["rows"][0].update(experiment="cifar"), r"tables\.0\.rows\.0\.experiment"),
    ],
)
def test_config_errors_name_the_key(tmp_path, edit, message):
    done = snakemake(tmp_path, "--dry-run", configfile=bad_config(tmp_path, edit), check=False)
    assert done.returncode != 0
    assert re.search(message, done.stderr + done.stdout), done.stderr


TINY = """
description: tiny end-to-end test
variants: [baseline, papa-all]
seeds: [1]
experiments:
  tiny:
    data: {dataset: digits, num_workers: 0}
    population: {size: 2}
    train: {epochs: 2, batch_size: 64, device: cpu}
    averaging: {papa-all: {every: 1, repair_iters: 1}}
    soups: {repair_iters: 1}
resources:
  train: {threads: 1}
tables:
  - {name: tiny_main, layout: main, caption: Tiny main table., rows: [{label: cnn, experiment: tiny}]}
  - {name: tiny_sizes, layout: greedy_sizes, caption: Soup sizes., rows: [{label: cnn, experiment: tiny}]}
figures:
  - {name: tiny_curves, kind: curves, caption: Tiny curves., experiment: tiny}
  - {name: tiny_variants, kind: variants, caption: Tiny variants., experiments: [tiny]}
"""


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The tiny config run once, end to end (p=2, 2 variants, 1 seed, 2 epochs)."""
    workdir = tmp_path_factory.mktemp("pipeline")
    config = workdir / "tiny.yaml"
    config.write_text(TINY)
    done = snakemake(workdir, "--cores", "2", configfile=config)
    return workdir, config, done


@pytest.mark.slow
def test_pipeline_end_to_end(pipeline):
    workdir, config, done = pipeline
    assert job_counts(done.stderr + done.stdout)["train"] == 2
    for name in ("tiny_main.md", "tiny_main.csv", "tiny_sizes.md", "tiny_curves.png", "tiny_variants.png"):
        assert (workdir / "reports" / name).stat().st_size > 0
    assert "| cnn " in (workdir / "reports/tiny_main.md").read_text()
    assert "(out of 2)" in (workdir / "reports/tiny_sizes.md").read_text()
    metrics = (workdir / "results/metrics.csv").read_text()
    assert "tiny,papa-all,1,avg_soup," in metrics
    assert (workdir / "results/benchmarks/train/tiny/baseline/seed1.tsv").exists()
    assert (workdir / "logs/train/tiny/papa-all/seed1.log").exists()
    snakemake(workdir, "--report", "reports/report.html", configfile=config)
    items = report_items(workdir / "reports/report.html")
    table = items["reports/tiny_main.html"]  # shown inline in the report: an HTML table
    assert table["mime_type"] == "text/html" and "Tiny main table." in table["caption"]
    page = base64.b64decode(table["data_uri"].split("base64,", 1)[1]).decode()
    assert "<table>" in page and '<th scope="row">cnn</th>' in page and ">Greedy soup</th>" in page
    assert "Tiny curves." in items["reports/tiny_curves.png"]["caption"]
    assert {"reports/tiny_main.md", "reports/tiny_main.csv", "reports/tiny_variants.png"} <= set(items)


def report_items(path: Path) -> dict:
    """The result items of a Snakemake HTML report: {path: {caption, mime_type, data_uri, ...}}."""
    text = path.read_text()
    return json.loads(re.search(r"var results = (\{.*?\});\n", text, re.S)[1])


@pytest.mark.slow
def test_table_regenerates_from_cache(pipeline):
    workdir, config, _ = pipeline
    assert "Nothing to be done" in snakemake(workdir, "--dry-run", configfile=config).stdout
    (workdir / "reports/tiny_main.md").unlink()
    dry = snakemake(workdir, "reports/tiny_main.md", "--dry-run", configfile=config)
    assert job_counts(dry.stdout) == {"render_table": 1}
    done = snakemake(workdir, "reports/tiny_main.md", "--cores", "1", configfile=config)
    assert job_counts(done.stderr + done.stdout) == {"render_table": 1}
    assert (workdir / "reports/tiny_main.md").exists()
