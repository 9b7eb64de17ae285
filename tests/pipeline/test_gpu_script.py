"""benchmarks/gpu.sh, every GPU figure in one command: its CPU quick mode end to end, on a Python that can
import only the packages the script needs; the logic that fits it into its time budget and judges the
targets; and what makes the path need nothing more (configs without jsonschema).
"""

import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from benchmarks import gpu
from tests.helpers import REPO

IMAGE_PACKAGES = ["torch", "torchvision", "timm", "pandas", "matplotlib", "safetensors", "tqdm", "pyyaml",
                  "tabulate", "scikit-learn", "pytest"]
"""What gpu.sh needs (benchmarks/README.md; no jsonschema and no snakemake): its path may import these, what
they require, and the standard library."""


def _requirements(dist: metadata.Distribution, extras: set[str]):
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {"", *extras}):
            yield req


def image_modules() -> set[str]:
    """Top-level modules of the image's packages and everything they require (installed here)."""
    closure: dict[str, set[str]] = {}
    todo = [(name, set()) for name in IMAGE_PACKAGES]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in closure and extras <= closure[key]:
            continue
        closure[key] = closure.get(key, set()) | extras
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:  # an optional platform package not installed here
            continue
        todo += [(req.name, set(req.extras)) for req in _requirements(dist, extras)]
    return {module for module, dists in metadata.packages_distributions().items()
            if any(canonicalize_name(d) in closure for d in dists)}


SITECUSTOMIZE = '''\
"""Written by tests/pipeline/test_gpu_script.py: this Python finds only the modules gpu.sh may use."""
import os
import sys

# the standard library, with its platform modules (_sysconfigdata_*) that stdlib_module_names leaves out
STDLIB = os.path.dirname(os.__file__)
ALLOWED = set({allowed!r}) | set(sys.stdlib_module_names) | {{
    name.split(".")[0] for folder in (STDLIB, os.path.join(STDLIB, "lib-dynload")) if os.path.isdir(folder)
    for name in os.listdir(folder)}}


class _ImageOnly:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in ALLOWED:
            return None  # as if not installed: import raises ModuleNotFoundError, find_spec gives None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [_ImageOnly(f) for f in sys.meta_path]
'''


@pytest.fixture(scope="module")
def image_site(tmp_path_factory) -> Path:
    """A folder whose sitecustomize.py, on PYTHONPATH, hides every module the image lacks."""
    folder = tmp_path_factory.mktemp("image-site")
    allowed = image_modules() | {"papa", "benchmarks", "tests", "usercustomize"}
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(allowed=sorted(allowed)))
    return folder


def image_env(site: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def test_the_simulated_image_lacks_jsonschema_and_snakemake_but_has_torch(image_site):
    code = ("import importlib.util as u, sys; "
            "print([m for m in ('jsonschema', 'snakemake', 'torch', 'timm', 'yaml') if u.find_spec(m)])")
    out = subprocess.run([sys.executable, "-c", code], env=image_env(image_site), capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "['torch', 'timm', 'yaml']"


@pytest.mark.slow
def test_quick_mode_writes_every_output_on_the_images_packages(image_site, tmp_path):
    """`benchmarks/gpu.sh --quick OUT` on the CPU, importing nothing beyond what it needs: every step runs
    and every output file exists and parses."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--quick", str(out)], cwd=tmp_path,
                          env=image_env(image_site), capture_output=True, text=True, timeout=1800)
    log = (out / "gpu.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "jsonschema is not installed" in log  # the image's path was taken (configs unchecked)

    junit = ET.parse(out / "pytest-gpu.xml").getroot()
    suite = junit if junit.tag == "testsuite" else junit[0]
    assert int(suite.get("errors")) == 0 and int(suite.get("failures")) == 0
    assert int(suite.get("tests")) >= 9  # the CUDA tests were collected (and skipped on this CPU)
    assert "skipped" in (out / "pytest-gpu.log").read_text()

    (jsonl,) = out.glob("results-cpu-*-quick.jsonl")
    md = jsonl.with_suffix(".md")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    kinds = {k: [r for r in rows if r["kind"] == k] for k in ("engine", "trainer", "averaging", "target")}
    engines = kinds["engine"]
    assert {(r["model"], r["label"]) for r in engines} == {
        (m, e) for m in ("resnet18_cifar", "vgg16_bn") for e in ("loop", "stacked")}
    assert all("error" not in r and r["images_per_second"] > 0 and r["channels_last"] for r in engines)
    trainers = kinds["trainer"]
    assert [r["label"] for r in trainers] == ["loop", "stacked"]
    for r in trainers:
        assert "error" not in r, r
        assert (r["experiment"], r["variant"], r["population"], r["train_images"]) == (
            "cifar10-resnet18-p10-aug", "papa", 2, 43)
        assert r["steps_per_epoch"] == 10 and r["pushes_per_epoch"] == 1 and r["paper_epochs"] == 300
        assert r["epoch_s"] > r["eval_s"] > 0 and r["projected_run_h"] > 0
    (avg,) = kinds["averaging"]
    assert avg["variant"] == "papa-all" and avg["repair"] and avg["averaging_s"] > 0
    assert len(kinds["target"]) == 6
    assert all(t["met"] in (True, False, None) and t["measured"] for t in kinds["target"])

    text = md.read_text()
    for heading in ("## Targets", "## The trainer", "## The engine sweep"):
        assert heading in text
    assert "| resnet18_cifar | 2 | 2 | stacked |" in text
    if any(t["met"] is False for t in kinds["target"]):  # a missed target leaves its kernel tables
        (profile,) = out.glob("profile-cpu-*-quick.txt")
        assert profile.read_text().count("one step") == 2  # loop and stacked
    assert len(list(out.iterdir())) <= 6  # the files gpu.sh's usage lists


# the budget ------------------------------------------------------------------------------------------
def test_plan_runs_what_the_targets_need_first_and_big_compiles_next():
    first, later = gpu.plan(["resnet18_cifar", "vgg16_bn"], [10, 4, 2, 1], ["loop", "stacked", "stacked+compile"], 10)
    assert first[:3] == [("resnet18_cifar", 10, "loop"), ("resnet18_cifar", 10, "stacked"),
                         ("resnet18_cifar", 10, "stacked+compile")]
    assert len(first) == 17 and not any(gpu.is_compiled(e) for _, p, e in first[3:])
    assert later[0] == ("vgg16_bn", 10, "stacked+compile") and [p for _, p, _ in later] == [10, 4, 4, 2, 2, 1, 1]
    assert set(first) | set(later) == {(m, p, e) for m in ("resnet18_cifar", "vgg16_bn") for p in (10, 4, 2, 1)
                                       for e in ("loop", "stacked", "stacked+compile")}


def test_a_run_that_would_not_end_before_the_deadline_is_skipped(monkeypatch, tmp_path):
    calls = []

    def fake_bench(model, p, label, cfg, options, profile=None, timeout=None):
        calls.append((model, p, label, profile is not None, timeout))
        return {"model": model, "population": p, "engine": label.split("+")[0], "images_per_second": 1.0,
                "wall_s": 100.0 if "compile" in label else 5.0}

    monkeypatch.setattr(gpu.run, "bench", fake_bench)
    args = gpu.parse(["--out", str(tmp_path), "--headline-population", "10"])
    sweep = gpu.Sweep(args, tmp_path)
    now = time.time()
    sweep.run("resnet18_cifar", 10, "stacked+compile", now + 1000)  # the headline setting: profiled
    sweep.run("vgg16_bn", 10, "stacked+compile", now + 99)  # the last compiled run took 100 s: no time
    sweep.run("vgg16_bn", 10, "loop", now + 99)  # an eager run fits (never guessed from compiled ones)
    assert [c[:4] for c in calls] == [("resnet18_cifar", 10, "stacked+compile", True), ("vgg16_bn", 10, "loop", False)]
    assert calls[0][4] == pytest.approx(1000, abs=5)  # stopped at the deadline if it runs over
    assert sweep.rows[1]["error"].startswith("skipped") and sweep.rows[1]["label"] == "stacked+compile"
    assert gpu.predicted_s("stacked+compile", []) == gpu.COMPILE_GUESS_S


# the targets ------------------------------------------------------------------------------------------
def engine_row(label: str, ips: float, peak: float | None = 0.4, push: float = 0.002, **extra) -> dict:
    return {"kind": "engine", "model": "resnet18_cifar", "population": 10, "label": label,
            "images_per_second": ips, "peak_fraction": peak, "averaging_fraction_every10": push,
            "device_name": "NVIDIA H200", "step_ms": 10.0, **extra}


def test_targets_are_judged_on_the_fastest_stacked_setting():
    rows = [engine_row("loop", 1000.0), engine_row("stacked", 4000.0, peak=0.2),
            engine_row("stacked+compile", 6000.0, peak=0.36), engine_row("stacked+compile", 9e9) | {"population": 4}]
    trainers = [{"label": "loop", "images_per_second": 900.0},
                {"label": "stacked+compile", "images_per_second": 3000.0}]
    averaging = {"averaging_s": 1.0, "every_epochs": 5, "epoch_s": 10.0}
    goals = gpu.targets(rows, trainers, averaging, 10)
    assert [(t["value"], t["met"]) for t in goals] == [
        (6.0, True), (0.36, True), (0.002, True), (0.02, False), (1000 / 900, True), (2.0, False)]
    assert goals[0]["target"].startswith("stacked (stacked+compile) / loop")
    assert goals[3]["measured"] == "2.000%" and "every 5 epochs" in goals[3]["target"]


def test_unknown_peak_and_missing_runs_are_unknown_not_missed():
    rows = [engine_row("loop", 1000.0, peak=None), engine_row("stacked", 4000.0, peak=None)]
    goals = gpu.targets(rows, [{"label": "loop", "error": "skipped: the time budget was spent"}], None, 10)
    assert goals[1]["met"] is None and "unknown: no dense bf16 peak is known for NVIDIA H200" in goals[1]["measured"]
    assert goals[3]["met"] is None and goals[3]["measured"] == "not measured"
    assert goals[4]["met"] is None and goals[0]["met"] is False  # 4x: missed
    empty = gpu.targets([], [], None, 10)
    assert all(t["met"] is None and t["measured"] == "not measured" for t in empty)


def test_results_markdown_lists_targets_trainer_and_sweep(tmp_path):
    rows = [engine_row("loop", 1000.0, batch_size=64, cpu_ms=1.0, averaging_ms=0.5, tflops=3.3),
            {"kind": "engine", "model": "vgg16_bn", "population": 10, "label": "stacked+compile",
             "error": "skipped: the time budget was spent"}]
    trainer = {"kind": "trainer", "label": "loop", "population": 10, "batch_size": 64, "steps_per_epoch": 765,
               "epoch_s": 40.0, "first_epoch_s": 41.0, "eval_s": 2.0, "images_per_second": 12240.0,
               "train_images_per_second": 12880.0, "projected_run_h": 3.33, "floor_run_h": 0.14, "floor_ratio": 23.8}
    meta = {"device_name": "NVIDIA H200", "precision": "bf16 autocast, channels-last"}
    md = gpu.write_results(tmp_path, "cuda-nvidia-h200", meta, rows, [trainer], None,
                           gpu.targets(rows, [trainer], None, 10))
    text = md.read_text()
    assert md.name == "results-cuda-nvidia-h200.md"
    assert "| loop | 10 | 64 | 765 | 40.00 | 41.00 | 2.00 | 12,240 | 12,880 | 3.33 | 0.140 | 23.8 |" in text
    assert "| vgg16_bn | 10 |  | stacked+compile | error: skipped: the time budget was spent |" in text
    kinds = [json.loads(line)["kind"] for line in md.with_suffix(".jsonl").read_text().splitlines()]
    assert kinds == ["engine", "engine", "trainer"] + ["target"] * 5


def test_the_headline_is_the_paper_config_with_the_measured_settings_laid_over():
    from benchmarks import headline

    # gpu.sh's GPU setting, checked by jsonschema here (gpu.sh runs without it)
    exp = headline.experiment(headline.settings("stacked", True, "cuda", 10, 64, repair_iters=2))
    assert exp["name"] == "cifar10-resnet18-p10-aug" and exp["model"]["name"] == "resnet18_cifar"
    assert (exp["train"]["epochs"], exp["averaging"]["papa"]["every"], exp["population"]["size"]) == (300, 10, 10)
    assert exp["train"] | {"engine": "stacked", "compile": True, "precision": "bf16", "channels_last": True,
                           "device": "cuda", "batch_size": 64} == exp["train"]
    assert exp["averaging"]["papa-all"]["repair_iters"] == 2 and exp["augment"]["grid"]["cutmix"] == [0.0, 0.5, 1.0]
    # the bf16 it measures and labels, even under fidelity: authors (fp16 with loss scaling there)
    assert exp["fidelity"]["mixed_precision"] == "paper"
    import torch

    from papa.build import build_precision
    assert build_precision(exp, torch.device("cuda")) == (torch.bfloat16, None)
    splits, split = headline.cifar_shaped_data(exp, 100, 10)
    assert splits.train.images.shape == (100, 3, 32, 32) and len(splits.test) == 10
    assert (len(split["train"]), len(split["val"])) == (98, 2)  # data.val_fraction = 2%


def test_gpu_script_documents_its_sizes_and_quick_mode():
    text = (REPO / "benchmarks" / "gpu.sh").read_text()
    for size in ("MODELS=", "POPULATIONS=", "ENGINES=", "BATCH=", "TRAIN_IMAGES=", "BUDGET_S=", "LIMIT_S="):
        assert re.search(rf"^{size}", text, re.M), size
    budget = int(re.search(r"^LIMIT_S=(\d+)", text, re.M).group(1))
    assert budget <= 480  # the 8 minutes the usage promises


def test_gpu_script_refuses_bad_arguments_and_a_machine_without_cuda(tmp_path):
    script = str(REPO / "benchmarks" / "gpu.sh")
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    for argv in ([], ["--quick"], ["a", "b"], ["--bogus"]):
        bad = subprocess.run(["bash", script, *argv], capture_output=True, text=True, env=env)
        assert bad.returncode == 2 and bad.stderr.strip().startswith("benchmarks/gpu.sh: error: "), argv
    usage = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, check=True).stdout
    assert "benchmarks/gpu.sh --quick OUT" in usage and "profile-<device>.txt" in usage
    no_gpu = subprocess.run(["bash", script, str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert no_gpu.returncode == 2 and "error: torch sees no CUDA device" in no_gpu.stdout
    assert "torch sees no CUDA device" in (tmp_path / "out" / "gpu.log").read_text()
