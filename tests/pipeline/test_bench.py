import json
from pathlib import Path

import pytest
import torch

from papa import bench
from papa.cli import main

REQUIRED = {"engine", "population", "batch_size", "device", "images_per_second", "step_ms", "averaging_ms"}


@pytest.mark.parametrize("engine", ["loop", "stacked", "auto"])
def test_papa_bench_prints_one_json_line(engine, capsys):
    threads = torch.get_num_threads()
    argv = ["bench", "--model", "digits_cnn", "--population", "2", "--batch-size", "4", "--steps", "2",
            "--warmup", "1", "--engine", engine, "--device", "cpu", "--threads", "1"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result.keys() >= REQUIRED
    assert result["engine"] in ("loop", "stacked") and result["engine_requested"] == engine
    assert (result["population"], result["batch_size"], result["device"]) == (2, 4, "cpu")
    assert result["images_per_second"] > 0 and result["step_ms"] > 0 and result["averaging_ms"] > 0
    assert result["cpu_ms"] > 0
    assert result["images_per_second"] == pytest.approx(2 * 4 / (result["step_ms"] / 1e3), rel=1e-3)
    assert result["averaging_fraction_every10"] == pytest.approx(
        result["averaging_ms"] / (10 * result["step_ms"]), rel=1e-2, abs=1e-5)
    assert result["gflop_per_image"] == pytest.approx(0.0072, rel=0.01)
    assert result["peak_fraction"] is None  # no bf16 peak for a CPU
    assert torch.get_num_threads() == threads  # --threads does not leak out of the benchmark


def test_flop_count_of_resnet18_matches_the_known_cost():
    from papa.models import create_model

    flop = bench.gflop_per_image(create_model("resnet18_cifar", 10), (3, 32, 32))
    assert flop == pytest.approx(3.33, abs=0.01)  # the known forward + backward cost


def test_bf16_peaks_by_device_name():
    assert bench.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.bf16_peak_tflops("NVIDIA H200") == 989.0
    assert bench.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.bf16_peak_tflops("AMD EPYC") is None


@pytest.mark.slow
def test_benchmark_runner_sweeps_engine_options_into_a_table(tmp_path):
    """benchmarks/run.py: each engine label becomes a `papa bench` run (+bf16 sets the precision), and the
    table compares wall and CPU time with the plain loop at the same p."""
    from benchmarks import run as runner

    out = tmp_path / "results.md"
    assert runner.main(["--device", "cpu", "--models", "digits_cnn", "--populations", "2", "--threads", "1",
                        "--repeats", "1", "--engines", "loop", "loop+cl+bf16", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [(r["label"], r["precision"], r["channels_last"]) for r in rows] == [
        ("loop", "fp32", False), ("loop+cl+bf16", "bf16", True)]
    lines = out.read_text().splitlines()
    loop_row = next(line for line in lines if "| loop |" in line)
    cells = [c.strip() for c in loop_row.strip("|").split("|")]
    assert cells[6] == "1.00" and cells[8] == "1.00"  # × loop, wall and CPU
    assert "CPU ms" in out.read_text()


def test_benchmark_grid_over_model_arguments_and_batch_sizes_shows_what_auto_picks(tmp_path):
    """benchmarks/run.py sweeps batch sizes (steps = images per block / batch) for a model with keyword arguments
    (`papa bench --model-arg`), and the table names the work of a member's step and the engine auto picks."""
    from benchmarks import run as runner
    from papa.engines import choose_engine

    out = tmp_path / "grid.md"
    assert runner.main(["--device", "cpu", "--models", "digits_cnn:width=4", "--batch-sizes", "1", "8",
                        "--populations", "2", "--threads", "1", "--repeats", "1", "--images", "48", "--engines",
                        "auto", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [(r["spec"], r["model_kwargs"], r["batch_size"], r["steps"]) for r in rows] == [
        ("digits_cnn:width=4", {"width": 4}, 1, 48), ("digits_cnn:width=4", {"width": 4}, 8, 6)]
    # width 4: conv 1->4 and 4->8 (3x3, 8x8 pixels) and a 128->10 linear layer, two FLOPs per multiply-add
    per_image = 2 * (9 * 4 * 64 + 9 * 4 * 8 * 64 + 128 * 10) / 1e9
    for r in rows:
        assert r["member_forward_gflop"] == pytest.approx(per_image * r["batch_size"], rel=1e-3)
        assert r["engine"] == choose_engine("auto", "cpu", 2, r["member_forward_gflop"]) == "stacked"
        assert r["gflop_per_image"] == pytest.approx(3 * per_image, rel=0.05)  # forward and backward
    lines = [line for line in out.read_text().splitlines() if line.startswith("| digits_cnn:width=4")]
    assert len(lines) == 2 and all(line.rstrip(" |").endswith("| stacked") for line in lines)


def test_papa_bench_profile_writes_the_kernel_table_of_one_step(tmp_path, capsys):
    table = tmp_path / "kernels.txt"
    argv = ["bench", "--model", "digits_cnn", "--population", "2", "--batch-size", "4", "--steps", "1",
            "--warmup", "1", "--engine", "stacked", "--device", "cpu", "--threads", "1", "--profile", str(table)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["profile_wall_ms"] > 0 and result["profile_launches"] == 0  # a CPU launches no kernels
    text = table.read_text()
    assert text.startswith("digits_cnn p=2 batch=4 stacked fp32") and "one step" in text
    assert "aten::" in text and "Self CPU" in text  # torch's operator table, the costliest first


def test_result_files_are_named_for_the_device_kind_and_name():
    from benchmarks.run import results_name

    assert results_name("cuda", "NVIDIA H200") == "cuda-nvidia-h200"
    assert results_name("cpu", "AMD EPYC", threads=1) == "cpu-amd-epyc-1thread"


def test_pipeline_benchmark_labels_the_commit_and_ignores_its_own_results_files(tmp_path, monkeypatch):
    """The recorded commit gets '+changes' when what is measured differs from it, not when --record has just
    appended to a results file (which would mark every second recorded run as changed)."""
    import subprocess

    from benchmarks import pipeline

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)

    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "results-pipeline-x.jsonl").write_text("{}\n")
    (tmp_path / "Snakefile").write_text("rule all:\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "x")
    monkeypatch.setattr(pipeline, "REPO", tmp_path)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert pipeline.commit() == head
    (tmp_path / "benchmarks" / "results-pipeline-x.jsonl").write_text("{}\n{}\n")
    assert pipeline.commit() == head
    (tmp_path / "Snakefile").write_text("rule all:\n    input: []\n")
    assert pipeline.commit() == head + "+changes"


def test_pipeline_benchmark_names_the_machine_as_papa_bench_does():
    import os

    from benchmarks import pipeline

    assert pipeline.machine() == f"{bench.device_name(torch.device('cpu'))}, {os.cpu_count()} logical CPUs"


def test_pipeline_benchmark_points_the_run_at_a_data_root(tmp_path):
    """A scratch directory holds no datasets: --data-root hands the config's data_root to Snakemake."""
    from benchmarks import pipeline

    plain = pipeline.command(Path("config/paper/a10.yaml"), "2", tmp_path)
    assert "--config" not in plain and plain[plain.index("--cores") + 1] == "2"
    given = pipeline.command(Path("config/paper/a10.yaml"), "2", tmp_path, Path("data"))
    assert given[-2:] == ["--config", f"data_root={Path('data').resolve()}"]
