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
        *(["--configfile", str(configfile)] if configfile is not None else []),
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
        "aggregate": 1,
        "render_table": 3,
        "plot_figure": 2,
        "all": 1,
    }
    assert "results/digits/papa-all/seed3/population.safetensors" in done.stdout
    assert "results/benchmarks/train/digits/papa-all/seed3.tsv" in done.stdout
    # on a cluster, each run's training and its soups-and-evaluation job are one job (Snakemake group "run")
    groups = done.stdout.split("Group job run")[1:]
    assert len(groups) == 12
    for group in groups:
        assert sorted(re.findall(r"^    rule (\w+):", group, re.M)) == ["soups", "train"]
        assert len(set(re.findall(r"^        wildcards: (.*)$", group, re.M))) == 1  # of one run


def bad_config(tmp_path, edit):
    config = yaml.safe_load(DEFAULT.read_text())
    edit(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def one_line_error(done) -> str:
    """A run stopped before any job: exit 2 and the project's one line, alone on stderr."""
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.strip().splitlines() if not ln.startswith("Using workflow specific profile")]
    assert len(lines) == 1 and lines[0].startswith("papa: error: "), done.stderr
    assert "Job stats" not in done.stdout + done.stderr  # no job planned, let alone started
    return lines[0]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["tables"][0].update(layout="wide"), r"bad\.yaml: tables\.0\.layout: 'wide' is not one of "),
        (lambda c: c.update(variants=["papa", "papa-3"]), r"bad\.yaml: variants\.1: 'papa-3' is not one of "),
        (lambda c: c["experiments"]["digits"]["train"].update(epocs=6), r"'digits': train: unknown key 'epocs'"),
        (
            lambda c: c["experiments"]["digits"]["train"].update(epochs=0),
            r"experiment 'digits': train\.epochs",
        ),
        (lambda c: c["tables"][0]["rows"][0].update(experiment="cifar"), r"tables\.0\.rows\.0\.experiment"),
        # averaging that can never happen, in a variant the config trains
        (lambda c: c["experiments"]["digits"]["averaging"]["papa-all"].update(every=6),
         r"experiment 'digits': averaging\.papa-all\.every: 6 >= train\.epochs \(6\)"),
        # data that is not there: at DAG time, not in each job
        (lambda c: c["experiments"]["digits"]["data"].update(dataset="cifar10"),
         r"experiment 'digits': CIFAR-10 not found: expected data/cifar10/cifar-10-batches-py "),
    ],
)
def test_config_errors_are_one_line_naming_the_key(tmp_path, edit, message):
    line = one_line_error(snakemake(tmp_path, "--cores", "1", configfile=bad_config(tmp_path, edit), check=False))
    assert re.search(message, line), line
    assert not (tmp_path / "results").exists()


def test_config_errors_of_a_dry_run_are_the_same_line(tmp_path):
    config = bad_config(tmp_path, lambda c: c["experiments"]["digits"]["train"].update(epocs=6))
    line = one_line_error(snakemake(tmp_path, "--dry-run", configfile=config, check=False))
    assert line.endswith("experiment 'digits': train: unknown key 'epocs' (expected one of: batch_size, channels_last, "
                         "check_finite, compile, device, engine, epochs, eval_batch_size, freeze_epochs, optimizer, "
                         "precision, schedule, swa)")


def test_never_firing_averaging_of_a_variant_not_trained_is_no_error(tmp_path):
    def edit(c):
        c["experiments"]["digits"]["averaging"]["papa-all"].update(every=6)
        c.update(variants=["baseline", "papa", "papa-2"], tables=[], figures=[])  # trains those three

    snakemake(tmp_path, "--dry-run", configfile=bad_config(tmp_path, edit))


def test_malformed_default_config_names_file_and_line(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text("variants: [baseline,\nseeds: [1]\n")
    line = one_line_error(snakemake(tmp_path, "--dry-run", configfile=None, check=False))
    assert re.match(r"papa: error: config/config\.yaml: malformed YAML at line \d+, column \d+: ", line), line


def test_a_failed_jobs_one_line_error_is_on_the_console(tmp_path):
    """The default profile shows a failed job's log: its `papa` one-line error is on the console."""
    done = snakemake(tmp_path, "--cores", "1", configfile=bad_config(
        tmp_path, lambda c: c["experiments"]["digits"]["model"].update(name="nosuchnet")), check=False)
    assert done.returncode != 0
    assert "papa prepare: error: " in done.stderr and "unknown model 'nosuchnet'" in done.stderr


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
    """The tiny config run once, end to end (p=2, 2 variants, 1 seed, 2 epochs), by the pipeline benchmark
    (benchmarks/pipeline.py: `snakemake --cores 2` in the directory, measured)."""
    from benchmarks import pipeline as bench

    workdir = tmp_path_factory.mktemp("pipeline")
    config = workdir / "tiny.yaml"
    config.write_text(TINY)
    return workdir, config, bench.run(config, "2", workdir)


@pytest.mark.slow
def test_pipeline_end_to_end(pipeline):
    workdir, config, measured = pipeline
    assert job_counts((workdir / "snakemake.log").read_text())["train"] == 2
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


@pytest.mark.slow
def test_the_pipeline_benchmark_measures_the_run_and_records_it(pipeline, tmp_path):
    from benchmarks import pipeline as bench

    _, _, measured = pipeline
    steps = measured["steps"]
    # aggregate, 2 tables and 2 figures are the report step
    assert {k: v["jobs"] for k, v in steps.items()} == {"prepare": 1, "train": 2, "soups": 2, "report": 5}
    # the total is Snakemake's own CPU time and its jobs' (each sampled by Snakemake, so at most what they used)
    jobs_cpu = sum(v["cpu_s"] for v in steps.values())
    assert measured["cpu_s"] >= measured["snakemake_cpu_s"] + jobs_cpu > measured["snakemake_cpu_s"] > 0
    assert measured["cpu_s"] == pytest.approx(measured["user_s"] + measured["system_s"], abs=0.11)
    assert measured["wall_s"] >= steps["prepare"]["mean_s"] + steps["train"]["mean_s"] + steps["soups"]["mean_s"]
    log = tmp_path / "results.jsonl"
    for label in ("first", "second"):
        bench.record({"date": "2026-12-01 00:00", "label": label, "commit": "abc", "config": "c.yaml",
                      "cores": "2", **measured, "machine": "m"}, log)
    rows = log.with_suffix(".md").read_text().splitlines()
    assert len(rows) == 2 + 2 + 2 and "| first | abc | c.yaml | 2 |" in rows[4] and "| second |" in rows[5]
    assert f"train 2 ({steps['train']['mean_s']})" in rows[5]


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



@pytest.mark.slow
def test_runs_shared_by_another_config_file_are_not_trained_again(pipeline):
    """Two configs naming the same experiment with the same settings (Table 1's runs in Tables 6-9 and 18) share
    its runs: the config file's path is not a rerun trigger, the experiment's settings are."""
    workdir, config, _ = pipeline
    other = workdir / "other name.yaml"
    other.write_text(config.read_text())
    dry = snakemake(workdir, "--dry-run", configfile=other)
    assert not {"prepare", "train", "soups"} & set(job_counts(dry.stdout)), dry.stdout
    changed = workdir / "changed.yaml"  # a setting of the experiment changed: its runs are trained again
    changed.write_text(config.read_text().replace("epochs: 2", "epochs: 3"))
    assert job_counts(snakemake(workdir, "--dry-run", configfile=changed).stdout)["train"] == 2

# one run at a time; a killed run restarts with the same command ---------------------------------------------
def hold_run_lock(workdir: Path, pid: str = "12345"):
    """Hold the workflow's run lock as another run would (an open, flock-ed file; the caller closes it)."""
    import fcntl

    (workdir / ".snakemake").mkdir(parents=True, exist_ok=True)
    f = open(workdir / ".snakemake" / "papa-run.lock", "w")  # noqa: SIM115 - held across the test
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write(pid)
    f.flush()
    return f


def test_a_second_run_in_one_directory_is_refused_and_a_dry_run_is_not(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    held = hold_run_lock(tmp_path)
    try:
        stale = tmp_path / ".snakemake" / "locks" / "0.output.lock"
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_text("results/tiny/split.json\n")
        line = one_line_error(snakemake(tmp_path, "results/tiny/split.json", "--cores", "1", configfile=config,
                                        check=False))
        assert line == (f"papa: error: another run of this workflow (process 12345) is running in {tmp_path}; wait "
                        "for it to finish, or stop it, then run the same command again")
        assert stale.exists()  # never cleared while another run holds the directory
        snakemake(tmp_path, "--dry-run", configfile=config)
    finally:
        held.close()
    # the holder gone, its directory lock is stale: cleared, and the run goes ahead
    done = snakemake(tmp_path, "results/tiny/split.json", "--cores", "1", configfile=config)
    assert "papa: cleared the directory lock left by an earlier run that was stopped (1 files)" in done.stderr
    assert not stale.exists() and (tmp_path / "results/tiny/split.json").exists()


@pytest.mark.slow
def test_a_killed_run_finishes_with_the_same_command_from_a_path_with_spaces_and_accents(pipeline, tmp_path):
    """`snakemake` from a copy of the workflow whose path holds a space and non-ASCII letters, killed with
    SIGKILL as a lost node would be (the whole process group) in the middle of training, then started again
    with the same command (no --cores: the default profile's), finishes with the same metrics.json files as
    the uninterrupted run."""
    import shutil
    import signal
    import time

    reference, _, _ = pipeline
    clone = tmp_path / "my runs" / "papa é ü"
    shutil.copytree(ROOT / "workflow", clone / "workflow")
    (clone / "config").mkdir()
    (clone / "config" / "tiny config.yaml").write_text(TINY)
    cmd = [sys.executable, "-m", "snakemake", "--configfile", "config/tiny config.yaml"]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(cmd, cwd=clone, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 900
    while not list((clone / "results").glob("tiny/*/seed1/checkpoint.json")):  # an epoch done, training goes on
        assert proc.poll() is None and time.monotonic() < deadline, "no training checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((clone / ".snakemake" / "locks").glob("*.lock"))  # the killed run's stale directory lock

    done = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr
    assert "cleared the directory lock left by an earlier run" in done.stderr
    for variant in ("baseline", "papa-all"):
        ours = json.loads((clone / f"results/tiny/{variant}/seed1/metrics.json").read_text())
        theirs = json.loads((reference / f"results/tiny/{variant}/seed1/metrics.json").read_text())
        assert ours == theirs, variant
    assert (clone / "reports" / "tiny_main.md").read_text() == (reference / "reports" / "tiny_main.md").read_text()


# a dry run beside a running run, a full disk ----------------------------------------------------------------
def gated_papa(tmp_path: Path) -> tuple[dict, Path]:
    """An environment whose `papa` waits until the file it returns exists, then runs this tree's `papa`: a run
    held at its first job."""
    gate, bin_dir = tmp_path / "go", tmp_path / "bin"
    bin_dir.mkdir()
    real = Path(sys.executable).parent / "papa"
    (bin_dir / "papa").write_text(f"#!/bin/sh\nwhile [ ! -e '{gate}' ]; do sleep 0.05; done\nexec '{real}' \"$@\"\n")
    (bin_dir / "papa").chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return os.environ | {"PATH": path}, gate


@pytest.mark.slow
def test_a_dry_run_or_a_refused_run_beside_a_running_run_changes_nothing_it_trains(tmp_path):
    """`snakemake -n` with other settings, and a second run refused by the run lock, while a run is going write
    nothing: the running run trains what its own command says (2 epochs, not 3) and its command then has nothing
    left to do."""
    import time

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    # (the target before the multi-value options)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(tmp_path),
           "--workflow-profile", "none", "--cores", "1", "R/tiny/baseline/seed1/population.safetensors",
           "--configfile", str(config), "--config", "results=R"]
    dry_run = [*cmd[:3], "--dry-run", *cmd[3:]]
    env, gate = gated_papa(tmp_path)
    live = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "R/tiny/config.yaml").exists():  # the run holds its lock and wrote its jobs' config
            assert live.poll() is None and time.monotonic() < deadline, live.stdout.read()
            time.sleep(0.05)
        before = {p: p.read_bytes() for p in (tmp_path / "R").rglob("*") if p.is_file()}
        other = ["experiments={tiny: {train: {epochs: 3}}}"]
        dry = subprocess.run([*dry_run, *other], env=env, capture_output=True, text=True)
        assert dry.returncode == 0 and job_counts(dry.stdout)["train"] == 1, dry.stderr
        refused = subprocess.run([*cmd, *other], env=env, capture_output=True, text=True)
        assert refused.returncode == 2 and "another run of this workflow" in refused.stderr, refused.stderr
        assert {p: p.read_bytes() for p in (tmp_path / "R").rglob("*") if p.is_file()} == before
    finally:
        gate.touch()
        out, _ = live.communicate(timeout=600)
    assert live.returncode == 0, out
    assert json.loads((tmp_path / "R/tiny/baseline/seed1/population.json").read_text())["epochs"] == 2
    again = subprocess.run(dry_run, env=env, capture_output=True, text=True)
    assert "Nothing to be done" in again.stdout, again.stdout


@pytest.mark.slow
def test_a_job_that_meets_a_full_disk_says_so_in_one_line_and_is_not_retried(tmp_path):
    """Results on a disk with no room for a population: the training job stops with one line naming the run
    directory and the room left (a tmpfs; elsewhere a file size limit), once: Snakemake does not retry it."""
    import resource

    from tests.helpers import SmallDisk

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    with SmallDisk(tmp_path / "disk", 40 * 1024) as disk:
        def limit():  # the file size limit, in snakemake and its jobs only (a tmpfs needs none)
            if not disk.tmpfs:
                resource.setrlimit(resource.RLIMIT_FSIZE, (disk.size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

        results = disk.path / "results"
        done = subprocess.run(
            [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(tmp_path),
             "--workflow-profile", "none", "--cores", "1", f"{results}/tiny/baseline/seed1/population.safetensors",
             "--configfile", str(config), "--config", f"results={results}"],
            env=os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
            capture_output=True, text=True, preexec_fn=limit)
        assert done.returncode != 0
        assert (results / "tiny/split.json").exists()  # the small files fitted
        assert "Trying to restart job" not in done.stderr and done.stderr.count("Error in rule train") == 1
        log = (tmp_path / "logs/train/tiny/baseline/seed1.log").read_text().splitlines()
        run = results / "tiny/baseline/seed1"
        assert re.fullmatch(rf"papa train: error: {re.escape(str(run))}(: no room to train: .* free on its file "
                            r"system, but the population takes .*|/checkpoint.safetensors: file too large .*); free "
                            "some space and run the same command again", log[-1]), log
        assert not list(results.rglob("population*")) and not list(results.rglob("*.tmp"))
