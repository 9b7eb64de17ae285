"""Alignment and feature similarity in the pipeline: aligned soups (soups.align), PAPA-all with alignment
(averaging.papa-all.align), `papa similarity` -> similarity.json, Table 5's layout, table5.yaml's DAG."""

import json
from pathlib import Path

import pytest
import torch

from papa import runs
from papa.alignment import align_population, permute, random_permutations
from papa.build import align_data, build_population
from papa.checkpoint import load_tensors, save_tensors
from papa.config import deep_merge, load_config
from papa.data import eval_batches, load_split
from papa.repair import reset_batchnorm
from papa.report import aggregate, tables
from papa.soups import average_soup
from papa.train import Trainer
from tests.helpers import REPO, papa, tiny_experiment, write_config
from tests.pipeline.test_workflow import job_counts, snakemake
from tests.unit.test_data import write_cifar

pytestmark = pytest.mark.usefixtures("one_thread")

RESNET = {"model": {"name": "resnet20"}, "population": {"size": 3}}


def experiment(tmp_path: Path, name: str, **overrides) -> dict:
    """TINY on digits with resnet20, or on a generated CIFAR-10 archive (32x32) with vgg11_bn."""
    base = {"model": {"name": name}, "population": {"size": 3}, "soups": {"align_images": 64},
            "similarity": {"align_images": 64, "test_images": 20}}
    if name == "vgg11_bn":
        write_cifar(tmp_path, "cifar10")
        base["data"] = {"dataset": "cifar10", "root": str(tmp_path)}
        base["train"] = {"batch_size": 16}
    exp = tiny_experiment(**deep_merge(base, overrides))
    exp["model"]["kwargs"] = {}  # TINY's digits_cnn width
    return exp


def permuted_run(tmp_path: Path, exp: dict, variant: str = "baseline"):
    """A run directory whose population is one network (BatchNorm statistics of training images) and
    randomly permuted copies of it, in the on-disk format `papa train` writes. Returns (run, split, network)."""
    split_path = tmp_path / "split.json"
    runs.prepare(exp, split_path)
    splits = runs.load_data(exp)
    split = load_split(split_path)
    network = build_population(exp, splits, seed=1).member(0)
    reset_batchnorm(network, [x for x, _ in eval_batches(splits.train, split["train"][:64], 32)])
    network.eval()
    g = torch.Generator().manual_seed(5)
    copies = [permute(network, random_permutations(network, g)) for _ in range(exp["population"]["size"] - 1)]
    from papa.population import Population

    pop = Population.from_modules([network, *copies])
    run = tmp_path / "run"
    run.mkdir()
    meta = {"experiment": exp["name"], "variant": variant, "seed": 1, "model": exp["model"]["name"],
            "population": pop.size}
    save_tensors(run / "population.safetensors", pop.state_dict(), meta)
    return run, split_path, network


def soup_state(run: Path, name: str) -> dict[str, torch.Tensor]:
    tensors, _ = load_tensors(run / "soups.safetensors")
    return {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}


def close_to(state: dict, network: torch.nn.Module) -> bool:
    ref = network.state_dict()
    return all(torch.allclose(state[k].double(), ref[k].double(), atol=1e-5) for k in ref)


# soups.align ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet20", "vgg11_bn"])
def test_aligned_soups_of_permuted_copies_are_the_network(tmp_path, name):
    """Members are permuted copies of one network: aligned, each soup is that network again; unaligned, the
    average soup mixes unrelated units. The key only changes the soups, under the same names."""
    exp = experiment(tmp_path, name, soups={"align": True})
    run, split, network = permuted_run(tmp_path, exp)
    info = runs.soups(exp, split, run)
    assert info["aligned"] is True and info["greedy_soup_members"] == [0, 1, 2]  # copies tie: all kept
    for soup in ("avg_soup", "greedy_soup"):
        assert close_to(soup_state(run, soup), network), soup
    metrics = runs.evaluate(exp, split, run)
    assert metrics["soups_aligned"] is True
    assert metrics["avg_soup"] == pytest.approx(metrics["mean"]) == pytest.approx(metrics["greedy_soup"])
    assert metrics["avg_soup_repair"] == pytest.approx(metrics["mean"], abs=10)  # REPAIR of a network ~ itself

    if name != "resnet20":
        return
    plain = deep_merge(exp, {"soups": {"align": ["papa"]}})  # aligns PAPA's soups only, not the baseline's
    info = runs.soups(plain, split, run)
    assert info["aligned"] is False
    assert not close_to(soup_state(run, "avg_soup"), network)
    assert runs.evaluate(plain, split, run)["soups_aligned"] is False


def test_soups_align_is_validated():
    with pytest.raises(Exception, match="soups.align"):
        tiny_experiment(soups={"align": "yes"})
    assert tiny_experiment(soups={"align": ["baseline"]})["soups"]["align"] == ["baseline"]


# PAPA-all with alignment ------------------------------------------------------------------------------------
def papa_all_trainer(tmp_path, align: bool, every: int) -> Trainer:
    exp = experiment(tmp_path, "resnet20", population={"size": 2}, train={"epochs": 3},
                     averaging={"align_images": 64, "papa-all": {"align": align, "every": every, "repair": False}})
    split_path = tmp_path / f"split{align}{every}.json"
    runs.prepare(exp, split_path)
    return Trainer(exp, "papa-all", 1, runs.load_data(exp), load_split(split_path), progress=False)


def member_outputs(trainer: Trainer) -> torch.Tensor:
    x = next(eval_batches(trainer.splits.test, range(32), 32))[0]
    trainer.pop.eval()
    with torch.no_grad():
        return torch.stack([trainer.pop.forward(j, x) for j in range(trainer.pop.size)])


@pytest.mark.slow
def test_papa_all_aligns_members_and_their_momentum_before_averaging(tmp_path):
    aligned, plain = papa_all_trainer(tmp_path, True, 100), papa_all_trainer(tmp_path, False, 100)
    for t in (aligned, plain):
        t.run_epoch()  # no averaging (every 100 epochs)
    before = {k: v.clone() for k, v in aligned.pop.state_dict().items()}
    out = member_outputs(aligned)
    aligned.averager.align_(aligned.context)
    # member 0 is the reference; member 1 is permuted, computing the same function
    assert all(torch.equal(aligned.pop.state_dict()[k][0], v[0]) for k, v in before.items())
    assert not all(torch.equal(aligned.pop.state_dict()[k][1], v[1]) for k, v in before.items())
    torch.testing.assert_close(member_outputs(aligned), out, rtol=1e-4, atol=1e-4)
    # the momentum was permuted with the weights: one more epoch trains the same functions as without alignment
    for t in (aligned, plain):
        t.run_epoch()
    # Up to float rounding, which a permuted channel order changes and an epoch of SGD amplifies, and which
    # depends on the CPU's kernels (AVX-512 or AVX2): measured mean |difference| of the logits 0.006 on an
    # AVX2 EPYC, against 0.18 when the momentum is not permuted with the weights (logits up to ~8).
    diff = (member_outputs(aligned) - member_outputs(plain)).abs()
    assert diff.mean() < 0.03 and diff.max() < 0.5, (diff.mean().item(), diff.max().item())

    # averaging with align: every member becomes the average of the members aligned to member 0
    data = align_data(aligned.exp, aligned.splits, aligned.split, 64, "cpu", None)
    expected = average_soup(align_population(aligned.pop, data)).state_dict()
    unaligned = average_soup(aligned.pop).state_dict()
    aligned.average()
    got = aligned.pop.state_dict()
    for k, v in expected.items():
        if v.is_floating_point():
            torch.testing.assert_close(got[k][0], v, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[k][1], v, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(v, expected[k]) for k, v in unaligned.items() if v.is_floating_point())


@pytest.mark.slow
def test_training_alignment_refuses_other_architectures(tmp_path):
    config = write_config(tmp_path / "c.yaml", {"averaging": {"papa-all": {"align": True}}})
    papa("prepare", "--config", str(config), "--out", str(tmp_path / "split.json"), check=True)
    done = papa("train", "--config", str(config), "--variant", "papa-all", "--seed", "1", "--split",
                str(tmp_path / "split.json"), "--out", str(tmp_path / "r"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "permutation alignment supports" in done.stderr and not (tmp_path / "r" / "population.safetensors").exists()


# papa similarity --------------------------------------------------------------------------------------------
def test_similarity_json_of_permuted_copies(tmp_path):
    exp = experiment(tmp_path, "resnet20")
    run, split, _ = permuted_run(tmp_path, exp, variant="papa")
    out = runs.similarity(exp, split, run)
    written = json.loads((run / "similarity.json").read_text())
    assert written == json.loads(json.dumps(out))
    assert written["stages"] == ["layer1", "layer2", "layer3"] and written["variant"] == "papa"
    assert written["test_images"] == 20 and written["aligned"] is True and written["repair_iters"] == 5
    for key in ("between_networks", "network_and_avg_soup"):
        assert list(written[key]) == written["stages"]
        # aligned copies are the same network: 100% up to units that no alignment image excites (matched
        # arbitrarily, they may differ on the test images) and REPAIR's re-estimated statistics
        assert list(written[key].values()) == pytest.approx([100.0] * 3, abs=0.1)
    unaligned = runs.similarity(deep_merge(exp, {"similarity": {"align": False}}), split, run)
    assert all(v < 99 for v in unaligned["between_networks"].values())
    frame = aggregate.read_metrics(run / "similarity.json")
    assert set(frame.metric) >= {"between_networks.layer1", "network_and_avg_soup.layer3"}
    # the authors' measure: members 0 and 1, member 0 with the soup; the all-pairs one written beside it
    first = runs.similarity(deep_merge(exp, {"similarity": {"align": False, "members": "first-two"}}), split, run)
    assert first["members"] == "first-two" and first["all_pairs_between_networks"] == unaligned["between_networks"]
    assert first["between_networks"] != unaligned["between_networks"]
    assert "all_pairs_between_networks" not in unaligned
    frame = aggregate.read_metrics(run / "similarity.json")
    assert set(frame.metric) >= {"between_networks.layer1", "all_pairs_between_networks.layer1"}


@pytest.mark.slow
def test_cli_help_and_one_line_errors(tmp_path):
    """`papa similarity --help`; a missing run, and soups.align or similarity on a model alignment does not
    support: one line, exit 2, nothing written."""
    done = papa("similarity", "--help")
    assert done.returncode == 0 and "--run" in done.stdout and "cosine" in done.stdout
    config = write_config(tmp_path / "c.yaml", {"population": {"size": 2}, "train": {"epochs": 1},
                                                "soups": {"align": True}})
    split, run = tmp_path / "split.json", tmp_path / "r"
    papa("prepare", "--config", str(config), "--out", str(split), check=True)
    done = papa("similarity", "--config", str(config), "--split", str(split), "--run", str(tmp_path / "none"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "not found" in done.stderr
    papa("train", "--config", str(config), "--variant", "baseline", "--seed", "1", "--split", str(split), "--out",
         str(run), check=True)
    done = papa("similarity", "--config", str(config), "--split", str(split), "--run", str(run))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "resnet18_cifar and resnet20" in done.stderr
    done = papa("soups", "--config", str(config), "--split", str(split), "--run", str(run))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "permutation alignment supports" in done.stderr
    assert not (run / "similarity.json").exists() and not (run / "soups.safetensors").exists()


# Table 5 ----------------------------------------------------------------------------------------------------
def test_table5_renders_the_papers_layout_from_similarity_files(tmp_path):
    config = load_config(REPO / "config" / "paper" / "table5.yaml")
    files = []
    for k, variant in enumerate(["baseline", "papa", "papa-all", "papa-2"]):
        run = aggregate.run_dir(tmp_path, "similarity-cifar100-resnet18-p5", variant, 1)
        run.mkdir(parents=True)
        stages = [f"layer{i}" for i in range(1, 5)]
        (run / "similarity.json").write_text(json.dumps({
            "experiment": "similarity-cifar100-resnet18-p5", "variant": variant, "seed": 1, "stages": stages,
            "between_networks": {s: 10.0 * k + i for i, s in enumerate(stages)},
            "network_and_avg_soup": {s: 50.0 + k + i / 4 for i, s in enumerate(stages)},
            "aligned": True, "repaired": True, "repair_iters": 5, "test_images": 100}))
        files.append(run / "similarity.json")
    (files[0].parent / "metrics.json").write_text(json.dumps({"experiment": "similarity-cifar100-resnet18-p5",
                                                              "variant": "baseline", "seed": 1, "mean": 79.0,
                                                              "population": 5}))
    frame = aggregate.aggregate(aggregate.find_metrics(tmp_path))
    table = config["tables"][0]
    md, csv = tmp_path / "table5.md", tmp_path / "table5.csv"
    tables.render(table, frame, config["variants"], config["seeds"], md, csv)
    text = md.read_text()
    assert "| Layer" in text and "Layer 4 |" in text
    assert text.index("**Baseline**") < text.index("**PAPA**") < text.index("**PAPA-all**") < text.index("**PAPA-2**")
    lines = text.splitlines()
    papa2 = lines.index(next(line for line in lines if "**PAPA-2**" in line))
    cells = [c.strip() for c in lines[papa2 + 1].split("|")[1:6]]
    assert cells == ["Between two networks", "30.00", "31.00", "32.00", "33.00"]
    assert "Between two networks (paper)" in lines[papa2 + 2] and "99.41" in lines[papa2 + 2]
    assert "Between one network and the average soup" in lines[papa2 + 3] and "53.75" in lines[papa2 + 3]
    assert "48.07" in text and "Cosine similarity (%)" in text
    grid = __import__("pandas").read_csv(csv)
    assert len(grid) == 4 * 8 and set(grid.metric) == {f"{m}.layer{i}" for m in ("between_networks",
                                                                               "network_and_avg_soup")
                                                        for i in range(1, 5)}


@pytest.mark.slow
def test_table5_dry_run(tmp_path):
    done = snakemake(tmp_path, "--dry-run", "--cores", "4", configfile=REPO / "config" / "paper" / "table5.yaml")
    counts = job_counts(done.stdout)
    assert counts["train"] == counts["soups"] == counts["similarity"] == 4 and "evaluate" not in counts
    assert counts["render_table"] == 1 and counts["aggregate"] == 1


def test_tables14_17_train_the_alignment_ablation():
    from papa.report import plan

    path = REPO / "config" / "paper" / "tables14-17.yaml"
    config = load_config(path)
    assert [v for e, v in plan.runs(config) if e == "ablation-align"] == ["papa-2", "papa-all"]
    assert [v for e, v in plan.runs(config) if e == "ablation-align-papa"] == ["papa"]
    exp = runs.load_experiment(path, "ablation-align")
    assert all(exp["averaging"][v]["align"] for v in ("papa-all", "papa-2"))
    # every 10 epochs, as the authors ran the alignment rows (PE:322, 342)
    assert all(exp["averaging"][v]["every"] == 10 for v in ("papa-all", "papa-2"))
    assert exp["averaging"]["align_images"] is None  # the full training split, as the paper's feature matching
    push = runs.load_experiment(path, "ablation-align-papa")
    # PAPA re-aligns at every push: on a subset sized so the run costs at most ~2x (measured, see the config)
    assert push["averaging"]["papa"]["align"] and push["averaging"]["align_images"] < 49_000
