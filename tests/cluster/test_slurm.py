"""(slow) The tiny pipeline on a real SLURM cluster through workflow/profiles/slurm: every step but the local
rules goes through `sbatch`, training jobs to the `gpu` partition with one GPU each, every command inside
the image (`apptainer exec --nv`, through the stand-in of tests/cluster/test_containers.py).

.ci/setup-slurm.sh starts the single-node cluster this expects (partitions `cpu` and `gpu`, the node
advertising GPUs as a generic resource); on a cluster without a `gpu` partition with GPUs the training
jobs run on the CPU partition instead (`--set-resources` on the command line). Skipped where the SLURM
commands are not installed; where they are but no cluster answers, skipped too, except under CI."""

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.cluster.test_containers import PROFILE, SNAKEFILE, SUBCOMMAND, exec_calls, fake_apptainer, tiny_workdir

SLURM_COMMANDS = ("sbatch", "squeue", "scontrol", "sinfo", "srun", "scancel")
# the rules of the tiny config that run as SLURM jobs (the others are local rules)
REMOTE_RULES = {"prepare", "train", "soups"}
LOCAL_RULES = {"aggregate", "render_table"}
# the rules of a run's cluster job (group "run" of workflow/rules)
RUN_GROUP = frozenset({"train", "soups"})

# Stand-in for sbatch, first on PATH: records each submission (arguments and job id), then submits it.
SBATCH = """#!{python}
import json, subprocess, sys

done = subprocess.run([{real!r}, *sys.argv[1:]], stdout=subprocess.PIPE, text=True)
with open({log!r}, "a") as log:
    log.write(json.dumps({{"args": sys.argv[1:], "out": done.stdout, "rc": done.returncode}}) + "\\n")
sys.stdout.write(done.stdout)
sys.exit(done.returncode)
"""


def unavailable(reason: str, hint: str = "run .ci/setup-slurm.sh (as root) for a single-node cluster"):
    """Skip, but fail under CI: there the locked environment and .ci/setup-slurm.sh provide everything."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs the locked environment and runs .ci/setup-slurm.sh)")
    pytest.skip(f"{reason}: {hint}")


def slurm(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=True).stdout


@pytest.fixture(scope="module")
def cluster() -> dict:
    """What the running cluster offers: {"gpu": whether a `gpu` partition has GPU GRES}."""
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        pytest.skip(f"SLURM is not installed (no {', '.join(missing)}); .ci/setup-slurm.sh installs it")
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        unavailable("snakemake-executor-plugin-slurm is not installed in this environment", "make install")
    try:
        up = "is UP" in slurm("scontrol", "ping")
        states = slurm("sinfo", "-h", "-o", "%t").split()
    except (subprocess.SubprocessError, OSError) as e:
        unavailable(f"no SLURM controller answers ({e})")
    if not up or not {"idle", "mix", "alloc"} & set(states):
        unavailable(f"no SLURM node takes jobs (states: {states})")
    partitions = dict(line.split() for line in slurm("sinfo", "-h", "-o", "%R %G").splitlines())
    return {"gpu": "gpu" in partitions.get("gpu", "")}


def job_record(job_id: str) -> dict[str, str]:
    """`scontrol show job` as {key: value} (completed jobs stay for MinJobAge)."""
    text = slurm("scontrol", "show", "job", "--oneliner", job_id)
    return dict(re.findall(r"(\S+?)=(\S*)", text))


def option(args: list[str], name: str) -> str | None:
    """The value of ``name`` in an sbatch argument list (``--name value`` or ``--name=value``)."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


@pytest.mark.slow
def test_pipeline_on_slurm(cluster, tmp_path):
    workdir, config, image = tiny_workdir(tmp_path)
    apptainer_args = shlex.split(yaml.safe_load(PROFILE.read_text())["apptainer-args"])
    env, apptainer_log = fake_apptainer(tmp_path, image, apptainer_args)
    sbatch_log = tmp_path / "sbatch-calls.jsonl"
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.write_text(SBATCH.format(python=sys.executable, real=shutil.which("sbatch"), log=str(sbatch_log)))
    sbatch.chmod(0o755)

    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(SNAKEFILE),
        "--workflow-profile", str(PROFILE.parent),
        "--configfile", str(config),
        # a test cluster without job accounting; the first status check once a tiny job may be done
        "--slurm-status-command", "squeue",
        "--slurm-no-account",
        "--slurm-init-seconds-before-status-checks", "30",
    ]  # fmt: skip
    if not cluster["gpu"]:
        # no GPUs: the training jobs on the default partition (replaces the profile's set-resources)
        cmd += ["--set-resources", "train:gpu=0"]
    try:
        # from the working directory: SLURM jobs start in the directory snakemake was started in
        done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=1200)
    finally:
        submitted = [json.loads(line) for line in sbatch_log.read_text().splitlines()] if sbatch_log.exists() else []
        ids = [s["out"].strip().split(";")[0] for s in submitted if s["rc"] == 0]
        if ids:  # nothing of this test left queued or running
            subprocess.run(["scancel", *ids], capture_output=True)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"

    # every job but the local rules went through sbatch, once: prepare alone; a run's train and soups (with
    # its evaluation) as one job (their group "run", named rule_run_<its rules> by the plugin)
    jobs = {}
    for submission, job_id in zip(submitted, ids, strict=True):
        comment = option(submission["args"], "--comment")
        group = re.fullmatch(r"rule_run_(\w+)", comment)
        rules = frozenset(group[1].split("_") if group else [re.match(r"rule_(\w+?)_wildcards_", comment)[1]])
        assert rules not in jobs, f"{sorted(rules)} submitted twice"
        jobs[rules] = (job_id, submission["args"])
    assert set(jobs) == {frozenset({"prepare"}), RUN_GROUP}
    assert set().union(*jobs) == REMOTE_RULES

    for rules, (job_id, args) in jobs.items():
        record = job_record(job_id)
        assert record["JobState"] == "COMPLETED", record
        assert record["WorkDir"] == str(workdir)
        assert "--requeue" in args  # slurm-requeue: preempted jobs go back to the queue
        if "train" in rules and cluster["gpu"]:  # the group job has the training's GPU
            assert record["Partition"] == "gpu"
            assert "gpu:1" in record["TresPerJob"]
            assert record.get("CpusPerTres") == "gres:gpu:1"  # cpus_per_gpu: the config's 1 thread
        else:
            assert "TresPerJob" not in record or "gpu" not in record["TresPerJob"]
    # the profile keeps each job's SLURM log
    assert list((workdir / "logs" / "slurm").glob(f"group_run_*/**/{jobs[RUN_GROUP][0]}.log"))

    # every command ran in the image: remote jobs on the node, local rules on the submit host
    calls = exec_calls(apptainer_log)
    assert sorted(c["papa"] for c in calls) == sorted(SUBCOMMAND[r] for r in REMOTE_RULES | LOCAL_RULES)
    assert all(set(apptainer_args) <= set(c["args"]) for c in calls)

    assert "| cnn " in (workdir / "reports" / "tiny_range.md").read_text()
