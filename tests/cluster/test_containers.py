"""The Apptainer image: its definition (pinned to uv.lock, installed from the lockfile, running `papa`) and
(slow) the tiny pipeline under `--sdm apptainer`, through a stand-in `apptainer` that checks the arguments
Snakemake passes and runs each command without a container (no container engine runs here)."""

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEFINITION = ROOT / "containers" / "papa.def"
PROFILE = ROOT / "workflow" / "profiles" / "slurm" / "config.yaml"
SNAKEFILE = ROOT / "workflow" / "Snakefile"
SECTIONS = ("labels", "help", "files", "post", "environment", "runscript", "test")


def locked(name: str) -> dict:
    """uv.lock's entry for one package."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    (entry,) = [p for p in lock["package"] if p["name"] == name]
    return entry


def definition() -> tuple[dict[str, str], dict[str, str]]:
    """(header, sections) of containers/papa.def, comments dropped: {"From": ...}, {"post": body, ...}."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in DEFINITION.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if m := re.match(r"^%(\w+)", line):
            current = m[1]
            assert current not in sections, f"%{current} appears twice"
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif m := re.match(r"^(\w+):\s*(\S+)", line):
            header[m[1]] = m[2]
    return header, {name: "\n".join(body) for name, body in sections.items()}


def test_definition_has_every_section():
    header, sections = definition()
    assert header["Bootstrap"] == "docker"
    assert set(SECTIONS) <= set(sections), set(SECTIONS) - set(sections)


def test_base_image_pinned_to_the_locked_torch():
    header, sections = definition()
    torch = locked("torch")
    # the CUDA build of the locked torch: the version of the CUDA toolkit its wheels depend on
    assert any(d["name"] == "cuda-toolkit" for d in torch["dependencies"])
    cuda = locked("cuda-toolkit")["version"]
    image, _, tag = header["From"].partition(":")
    assert image == "nvidia/cuda" and re.fullmatch(r"\d+\.\d+\.\d+-[\w.-]+", tag), header["From"]
    assert tag.split("-")[0] == cuda, f"base CUDA {tag} is not the locked torch's CUDA {cuda}"
    labels = dict(line.split(None, 1) for line in sections["labels"].strip().splitlines())
    assert labels["papa.torch"] == torch["version"]
    assert labels["papa.cuda"] == cuda
    # the image's own check fails the build when the installed torch is not the locked one
    assert f"== '{torch['version']}'" in sections["test"]
    major_minor = ".".join(cuda.split(".")[:2])
    assert f"torch.version.cuda == '{major_minor}'" in sections["test"]


def test_installs_from_the_lockfile():
    _, sections = definition()
    copied = {line.split()[0] for line in sections["files"].strip().splitlines()}
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    # uv itself at the Makefile's version
    uv_version = re.search(r"^UV_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)[1]
    # the project's build needs its readme as well
    assert {"pyproject.toml", "uv.lock", "papa", readme} <= copied
    # the commands of %post, continuation lines joined
    post = [" ".join(line.split()) for line in sections["post"].replace("\\\n", " ").splitlines()]
    (sync,) = [m for line in post if (m := re.search(r"UV_PROJECT_ENVIRONMENT=(\S+) \S*uv sync (.*)", line))]
    assert {"--frozen", "--no-dev"} <= set(sync[2].split())
    # nothing else installs Python packages around the lock
    installs = [line for line in post if re.search(r"pip\S* install|uv pip|uv add", line)]
    assert installs == ["/opt/uv/bin/pip install --no-cache-dir uv==" + uv_version], installs
    labels = dict(line.split(None, 1) for line in sections["labels"].strip().splitlines())
    assert labels["papa.uv"] == uv_version
    # the locked environment comes first on the image's PATH
    assert f"export PATH={sync[1]}/bin:$PATH" in sections["environment"]


def test_runscript_and_test_run_papa():
    _, sections = definition()
    assert sections["runscript"].split() == ["exec", "papa", '"$@"']
    assert re.search(r"^\s*papa --help\b", sections["test"], re.M)
    assert re.search(r"^\s*python -c .*import papa\b", sections["test"], re.M)


def test_slurm_profile_runs_jobs_in_the_image():
    profile = yaml.safe_load(PROFILE.read_text())
    assert profile["software-deployment-method"] == "apptainer"
    assert "--nv" in shlex.split(profile["apptainer-args"])
    # the name the issue gives the profile file is the same file
    assert (PROFILE.parent / "profile.yaml").resolve() == PROFILE.resolve()


# ---- the pipeline through `apptainer exec` --------------------------------------------------------------

TINY = """
description: tiny container test (digits, p = 2, 1 epoch)
variants: [baseline]
seeds: [1]
container: {image}
experiments:
  tiny:
    data: {{dataset: digits, num_workers: 0}}
    population: {{size: 2}}
    train: {{epochs: 1, batch_size: 64, device: cpu}}
    soups: {{repair_iters: 1}}
resources:
  prepare: {{threads: 1, mem_mb: 1000, runtime: 10}}
  train: {{threads: 1, mem_mb: 1500, runtime: 10}}
  soups: {{threads: 1, mem_mb: 1500, runtime: 10}}
tables:
  - name: tiny_range
    layout: range
    caption: Tiny table.
    rows: [{{label: cnn, experiment: tiny, variant: baseline}}]
"""

# every job of TINY that runs a shell command, hence `apptainer exec`
SHELL_RULES = {"prepare", "train", "soups", "aggregate", "render_table"}

# Snakemake runs `apptainer exec --home <cwd> <apptainer-args> [--bind ...] <image> <shell> -c '<command>'`
STAND_IN = '''#!{python}
"""Stand-in for apptainer: logs each call, checks `exec`'s arguments, runs the command without a container."""
import json, os, sys

args = sys.argv[1:]
with open(os.environ["PAPA_TEST_APPTAINER_LOG"], "a") as log:
    log.write(json.dumps({{"args": args, "cwd": os.getcwd()}}) + "\\n")
if args == ["--version"]:
    print("apptainer version 1.4.0")
    sys.exit(0)

def fail(why):
    sys.exit(f"stand-in apptainer: {{why}}: {{args}}")

if len(args) < 7 or args[0] != "exec" or args[1] != "--home" or args[-2] != "-c":
    fail("not `exec --home DIR ... IMAGE SHELL -c COMMAND`")
image, shell, command = args[-4], args[-3], args[-1]
if image != os.environ["PAPA_TEST_IMAGE"] or not os.path.isfile(image):
    fail(f"image is not {{os.environ['PAPA_TEST_IMAGE']}}")
missing = set(json.loads(os.environ["PAPA_TEST_APPTAINER_ARGS"])) - set(args[3:-4])
if missing:
    fail(f"missing {{sorted(missing)}}")
os.execvp(shell, [shell, "-c", command])
'''


def fake_apptainer(tmp_path: Path, image: Path, apptainer_args: list[str]) -> tuple[dict[str, str], Path]:
    """A stand-in `apptainer` first on PATH: (environment for snakemake, its call log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "apptainer"
    stand_in.write_text(STAND_IN.format(python=sys.executable))
    stand_in.chmod(0o755)
    log = tmp_path / "apptainer-calls.jsonl"
    env = os.environ | {
        # the stand-in first, then `papa` of this environment (the image's stands in for it)
        "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
        "PAPA_TEST_APPTAINER_LOG": str(log),
        "PAPA_TEST_IMAGE": str(image),
        "PAPA_TEST_APPTAINER_ARGS": json.dumps(apptainer_args),
    }
    return env, log


def exec_calls(log: Path) -> list[dict]:
    """The stand-in's `exec` calls, each with the rule that ran (from the command) and the full arguments."""
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    execs = [c for c in calls if c["args"][:1] == ["exec"]]
    for call in execs:
        call["papa"] = re.search(r"papa (\w+)", call["args"][-1])[1]
    return execs


def tiny_workdir(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(workdir, config, image): the tiny config naming an (empty) image file in the workdir."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    image = workdir / "papa.sif"
    image.write_bytes(b"")
    config = workdir / "tiny.yaml"
    config.write_text(TINY.format(image=image))
    return workdir, config, image


# the `papa` subcommand of each rule
SUBCOMMAND = {
    "prepare": "prepare",
    "train": "train",
    "soups": "soups",
    "aggregate": "aggregate",
    "render_table": "render",
}


@pytest.mark.slow
def test_pipeline_runs_every_job_through_apptainer(tmp_path):
    workdir, config, image = tiny_workdir(tmp_path)
    apptainer_args = shlex.split(yaml.safe_load(PROFILE.read_text())["apptainer-args"])
    env, log = fake_apptainer(tmp_path, image, apptainer_args)
    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(SNAKEFILE),
        "--directory", str(workdir),
        "--cores", "2",
        "--sdm", "apptainer",
        f"--apptainer-args={shlex.join(apptainer_args)}",
        "--configfile", str(config),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"

    calls = exec_calls(log)
    assert sorted(c["papa"] for c in calls) == sorted(SUBCOMMAND[r] for r in SHELL_RULES)
    for call in calls:
        args = call["args"]
        assert args[:3] == ["exec", "--home", str(workdir)]
        assert args[-4:-2] == [str(image), "bash"]
        assert set(apptainer_args) <= set(args[3:-4])
    assert "| cnn " in (workdir / "reports" / "tiny_range.md").read_text()
    assert (workdir / "results" / "tiny" / "baseline" / "seed1" / "metrics.json").exists()
