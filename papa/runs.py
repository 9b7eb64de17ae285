"""The pipeline's stages over run directories: prepare, train, soups, similarity, evaluate (docs/interfaces.md)."""

import contextlib
import csv
import dataclasses
import io
import itertools
import json
import signal
import sys
from functools import partial
from pathlib import Path

import torch

from papa import config as cfg
from papa import fidelity, variants
from papa.build import (
    align_data,
    base_policy,
    build_engine,
    build_population,
    fixed_batches,
    loader_options,
    member_policies,
    repair_fusion,
    resolve_device,
    validation_view,
)
from papa.checkpoint import load_tensors, read_meta, save_tensors, sidecar_path
from papa.data import load_dataset, load_split, make_split, make_stream, save_split
from papa.data.subset import subset_splits
from papa.distributed import from_env
from papa.errors import DiskError, PapaError
from papa.io import file_digest, free_space, hold_lock, human_bytes, write_json, write_text
from papa.metrics import accuracy, held_out_metrics, population_scores, summary
from papa.models import TIMM_PREFIX, available_models
from papa.models.pretrained import pretrained_normalization
from papa.population import Population
from papa.provenance import code_version
from papa.rng import generator
from papa.similarity import BETWEEN_NETWORKS, NETWORK_AND_SOUP, population_similarity, stages
from papa.soups import SOUPS, make_soups
from papa.train import Trainer


def load_experiment(config_path: str | Path, name: str | None) -> dict:
    config = cfg.load_config(config_path)
    if name is None:
        if len(config["experiments"]) != 1:
            raise PapaError(f"{config_path}: several experiments defined; choose one with --experiment")
        name = next(iter(config["experiments"]))
    exp = cfg.experiment(config, name, config_path)
    model = exp["model"]["name"]
    if not model.startswith(TIMM_PREFIX) and model not in available_models():
        raise PapaError(f"{config_path}: experiment {name!r}: model.name: unknown model {model!r} (expected one "
                        f"of: {', '.join(available_models())}, or timm/<name>)")
    return exp


def load_data(exp: dict):
    """The experiment's dataset, resized to ``data.image_size`` and, for a pretrained timm model, normalized with
    its pretraining mean/std (with ``fidelity.finetune: authors`` the dataset's own, as data/cifar100.py did)."""
    d, m = exp["data"], exp["model"]
    options = {"image_size": d["image_size"]} if d["image_size"] else {}
    splits = load_dataset(d["dataset"], d["root"], **options, **d["options"])
    if d.get("subset"):  # smoke scale: a few items of each set
        splits = subset_splits(splits, **d["subset"])
    for part in (splits.train, splits.test):
        if hasattr(part, "resize"):  # in-memory arrays (folders crop and resize with their own transforms)
            part.resize = d.get("resize", "bilinear")
            part.resize_pixels = fidelity.authors(exp, "finetune_resize")
    own = fidelity.authors(exp, "finetune_normalization")  # the dataset's statistics, as the scripts normalized
    stats = None if own else pretrained_normalization(m["name"], m["pretrained"])
    if stats is not None and len(stats[0]) == splits.in_channels:
        for part in (splits, splits.train, splits.test):
            part.mean, part.std = stats
    return splits


def input_spec(exp: dict, splits) -> dict:
    """What a run's network expects (``input``, mean/std in [0, 1] pixel units) and returns (``classes``, one per
    logit), as load_data gave it; population.json records it, so an export needs no data."""
    test = splits.test
    size = int(splits.image_size)
    interpolation, crop = None, 1.0  # no resize, no crop: segmentation's whole tiles (any size), arrays at their own
    if splits.kind == "folder":  # papa.data.datasets.folder_eval_transform: resize to 256/224 of the crop, crop
        interpolation, crop = "bilinear", size / round(size * 256 / 224)
    elif splits.kind != "segmentation" and test.image_size:  # arrays resized on the device to data.image_size
        interpolation = exp["data"].get("resize", "bilinear")
    return {"input": {"dataset": splits.name, "kind": splits.kind, "channels": int(splits.in_channels),
                      "size": [size, size], "mean": [float(v) for v in test.mean], "std": [float(v) for v in test.std],
                      "interpolation": interpolation, "crop_pct": crop},
            "classes": [str(c) for c in getattr(test, "classes", ())] or [str(k) for k in range(splits.num_classes)]}


def prepare(exp: dict, out: str | Path) -> dict:
    """Save the validation split: 2% of the training set held out (paper), or the dataset's own (Vaihingen: 5 tiles)."""
    splits, d = load_data(exp), exp["data"]
    meta = {"dataset": d["dataset"], "n": len(splits.train)}
    if splits.fixed_split is not None:
        split, meta["fixed"] = dict(splits.fixed_split), True
    else:
        split = make_split(len(splits.train), d["val_fraction"], d["split_seed"])
        meta |= {"fraction": d["val_fraction"], "seed": d["split_seed"]}
    save_split(out, split, meta)
    return split


CHECKPOINT = "checkpoint.safetensors"
LOCK = ".papa-train.lock"  # in the run directory, locked by the `papa train` working there
# what `papa train` writes, then what the later stages make from it (docs/interfaces.md)
TRAINED = ("population.safetensors", "population.json", "history.csv")
DOWNSTREAM = ("soups.safetensors", "soups.json", "metrics.json", "similarity.json")
RUN_KEYS = ("experiment", "variant", "seed")


def train(exp: dict, variant: str, seed: int, split_path, out_dir, progress: bool | None = None) -> Trainer:
    """Train one population and write population.safetensors (+ .json) and history.csv under ``out_dir``, checkpointing
    after every epoch and on SIGTERM, SIGUSR1 or Ctrl-C (a second one interrupts at once) so that the same command
    resumes. An earlier training's outputs of the same run are removed, another run's refused (docs/decisions.md)."""
    variants.check(variant)
    cfg.check_averaging_fires(exp, variant)
    comm = from_env(exp["population"]["size"], exp["train"]["device"])
    out = Path(out_dir)
    busy = f"{out} is being trained by another `papa train` ({{holder}}); wait for it to finish, or stop it"
    try:
        with hold_lock(out / LOCK, busy) if comm.is_main else contextlib.nullcontext():
            splits = load_data(exp)
            split = load_split(split_path, expect_n=len(splits.train)) | {"sha256": file_digest(split_path)}
            return _train(exp, variant, seed, splits, split, out, progress, comm)
    finally:
        comm.close()


def _checkpoint(out: Path, comm) -> Path:
    """This process's checkpoint path, once those there are known to be as many processes', stopped at one point."""
    n = comm.world_size
    names = [CHECKPOINT] if n == 1 else [f"checkpoint.rank{r}.safetensors" for r in range(n)]
    found = {f.name for f in out.glob("checkpoint*.safetensors")}
    if found and found != set(names):
        raise PapaError(f"{out}: checkpoints {sorted(found)} were not written by a run of {n} "
                        "process(es); resume with as many processes as wrote them, or delete them to start over")

    def stopped_at(name: str) -> tuple[int, int, int]:
        try:
            meta = json.loads(sidecar_path(out / name).read_text())
            return meta["epoch"], meta["step"], meta["batch"]
        except (OSError, ValueError, KeyError):
            raise PapaError(f"{out / name}: incomplete checkpoint; delete the checkpoints to start over") from None

    if len(found) > 1 and len({stopped_at(name) for name in names}) > 1:
        raise PapaError(f"{out}: the processes' checkpoints stopped at different points; delete them to start over")
    return out / names[comm.rank]


def _identity(out: Path, name: str) -> dict | None:
    """(experiment, variant, seed) of the training that wrote ``out/name``, None when unreadable."""
    try:
        meta = read_meta(out / name) if name.endswith(".safetensors") else json.loads((out / name).read_bytes())
        return {key: meta[key] for key in RUN_KEYS}
    except (OSError, ValueError, PapaError, KeyError, TypeError):  # unreadable, not an object, or a key missing
        return None


def earlier_outputs(out: Path, run: dict, keep: tuple[str, ...] = ()) -> list[str]:
    """The outputs in ``out`` of an earlier training of ``run`` that training it again removes (all but ``keep``),
    downstream first so that a crash leaves nothing orphaned. Another run's are refused: every file that records
    a run must name this one, and one must (history.csv records none). Checkpoints are not outputs."""
    found = [n for n in (*DOWNSTREAM, *TRAINED) if (out / n).is_file()]
    named = {n: ident for n in ("population.safetensors", "population.json", "metrics.json", "similarity.json")
             if n in found and (ident := _identity(out, n)) is not None}
    for name, theirs in named.items():
        if theirs != run:
            held = ", ".join(f"{k} {v}" for k, v in theirs.items())
            raise PapaError(f"{out} holds the outputs of another run ({held}, in {name}); give another --out, or "
                            "delete them to train this run there")
    if not named and set(found) - {"history.csv"}:
        raise PapaError(f"{out} holds outputs ({', '.join(found)}) that name no run: population.safetensors and "
                        "population.json are missing or unreadable; give another --out, or delete them to train "
                        "this run there")
    return [n for n in found if n not in keep]


def check_room(out: Path, needed: int, what: str, freed: int = 0) -> None:
    """Refuse to train where the next file training writes (``what``, ``needed`` bytes) would not fit, counting
    the ``freed`` bytes of the earlier outputs it removes first: that training would be for nothing."""
    free = free_space(out)
    if free is not None and free + freed < needed:
        raise DiskError(f"{out}: no room to train: {human_bytes(free)} free on its file system, but {what} takes "
                        f"{human_bytes(needed)}; free some space and run the same command again")


def write_history(out: Path, trainer: Trainer) -> None:
    """history.csv: one row per (epoch, member, phase) so far (csv, not pandas: its import is slow)."""
    rows, text = trainer.progress.history, io.StringIO()
    if not rows:  # stopped before the first epoch ended
        return
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "history.csv", text.getvalue())


def _train(exp: dict, variant: str, seed: int, splits, split: dict, out: Path, progress, comm) -> Trainer:
    trainer = Trainer(exp, variant, seed, splits, split, progress=progress, comm=comm)
    cfg.check_averaging_fires(exp, variant, trainer.stream.steps_per_epoch)
    ckpt = _checkpoint(out, comm)
    if resumed := ckpt.exists():  # checked (bytes, run, config) before anything in the directory is touched
        trainer.load_state(*load_tensors(ckpt, f"delete {ckpt.name} and {sidecar_path(ckpt).name} to start this "
                                               "run over"), where=str(ckpt))
    run = {"experiment": exp["name"], "variant": variant, "seed": seed}
    if comm.is_main:
        earlier = earlier_outputs(out, run, keep=("history.csv",) if resumed else ())  # the next checkpoint rewrites it
        needed, what = (ckpt.stat().st_size, "its next checkpoint") if resumed else (
            sum(t.nbytes for t in trainer.pop.state_dict().values()), "the population")
        check_room(out, needed, what, freed=sum((out / name).stat().st_size for name in earlier))
        for name in earlier:
            (out / name).unlink()
        if earlier:
            print(f"papa train: {out}: removed the outputs of an earlier training ({', '.join(earlier)})",
                  file=sys.stderr)
        if resumed:
            print(f"papa train: {out}: resumed from epoch {trainer.progress.epoch + 1}, batch {trainer.progress.batch}",
                  file=sys.stderr)
    comm.barrier()

    def save_checkpoint(t: Trainer) -> None:
        save_tensors(ckpt, *t.state())
        if comm.is_main:  # the history so far, readable while the run goes on
            write_history(out, t)

    def request_stop(signum, _frame) -> None:
        if signum == signal.SIGINT and trainer.stop_signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        trainer.stop_signal = signal.Signals(signum).name

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        trainer.fit(checkpoint=save_checkpoint)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    state = comm.gather_state(trainer.pop)
    if comm.is_main:  # history rows are the same on every process (scores are gathered)
        write_history(out, trainer)
        meta = {**run, "epochs": trainer.progress.epoch, "steps": trainer.progress.step, "population": comm.p,
                "model": exp["model"]["name"], "engine": trainer.engine_name, "device": str(trainer.device),
                "processes": comm.world_size, "policies": [dataclasses.asdict(p) for p in trainer.all_policies],
                "config": exp, "split_sha256": split["sha256"], **input_spec(exp, splits)}
        save_tensors(out / "population.safetensors", state, meta)
    comm.barrier()  # the outputs exist before any checkpoint goes
    ckpt.unlink(missing_ok=True)
    sidecar_path(ckpt).unlink(missing_ok=True)
    return trainer


def load_population(exp: dict, splits, path: str | Path, device="cpu") -> tuple[Population, dict]:
    """A trained population, checked against the experiment's architecture and population size."""
    tensors, meta = load_tensors(path, "run `papa train` on this run again")
    if meta.get("model") != exp["model"]["name"] or meta.get("population") != exp["population"]["size"]:
        raise PapaError(f"{path}: checkpoint holds {meta.get('population')} x {meta.get('model')}, but experiment "
                        f"{exp['name']!r} expects {exp['population']['size']} x {exp['model']['name']}")
    pop = build_population(exp, splits, seed=0)
    try:
        pop.load_state_dict(tensors)
    except ValueError as e:
        raise PapaError(f"{path}: {e}") from None
    return pop.requires_grad_(False).to(device), meta


@dataclasses.dataclass
class Run:
    """A trained run, each part checked."""
    dir: Path
    device: torch.device
    splits: object
    split: dict
    pop: Population
    meta: dict
    digest: str  # population.safetensors's SHA-256: the later outputs record it


def open_run(exp: dict, split_path, run_dir) -> Run:
    """A trained run, refused when ``split_path`` is not the split its population was trained with."""
    run = Path(run_dir)
    device, splits = resolve_device(exp["train"]["device"]), load_data(exp)
    split = load_split(split_path, expect_n=len(splits.train))
    population = run / "population.safetensors"
    pop, meta = load_population(exp, splits, population, device)
    if meta.get("split_sha256") not in (None, file_digest(split_path)):
        raise PapaError(f"{split_path} and {population} come from different trainings: the population was trained "
                        "with another validation split; rerun `papa train` (or give its split)")
    return Run(run, device, splits, split, pop, meta, file_digest(population))


def soups_aligned(exp: dict, variant: str) -> bool:
    align = exp["soups"]["align"]
    return align if isinstance(align, bool) else variant in align


def soups(exp: dict, split_path, run_dir) -> dict:
    """papa.soups.make_soups of a trained run -> soups.safetensors: average and greedy soups (greedy on the validation
    split), each with and without REPAIR, of members permutation-aligned first with ``soups.align`` (soups.json then
    says ``aligned``). REPAIR reads training batches: with ``fidelity.soup_repair_data: paper``, all of the base
    transform (crop, flip); ``authors``, member j its own augmented, regularized ones and the soup ``train_dset_noaug``
    (the training transform, re=0), as models/combined.py:257, :290 and data/data.py:22. Their images come from REPAIR's
    generator (the scripts' ``same_repair=False`` left each member's to the unseeded global RNG)."""
    return _soups(exp, open_run(exp, split_path, run_dir))


def soups_and_metrics(exp: dict, split_path, run_dir) -> tuple[dict, dict]:
    """``soups`` then ``evaluate`` of one run, opened (data, population, device) once: the pipeline's soups job."""
    run = open_run(exp, split_path, run_dir)
    return _soups(exp, run), _evaluate(exp, run)


def _soups(exp: dict, run: Run) -> dict:
    bs, s, seed = exp["train"]["eval_batch_size"], exp["soups"], run.meta["seed"]
    base = base_policy(exp)
    own = fidelity.authors(exp, "soup_repair_data")
    policies = member_policies(exp, seed) if own else [base] * run.pop.size
    stream = make_stream(run.splits, run.split["train"], exp["train"]["batch_size"], policies, 0, run.device,
                         base=base, **loader_options(exp, run.splits))
    scorings = itertools.count(1)

    def val_accuracy(module) -> float:  # the n-th scoring's images from the key (seed, "soups-validation", n)
        view = validation_view(exp, run.splits, generator(seed, "soups-validation", next(scorings)))
        return accuracy(module.to(run.device).eval(), run.splits.train, run.split["val"], bs, run.device, **view)

    def batches(member, gen):  # member j's moments (member_moments), or None: the soup's (repair)
        return stream.member_batches(member if own else None, gen, s["repair_iters"])

    aligned = soups_aligned(exp, run.meta["variant"])
    align_batches = align_data(exp, run.splits, run.split, s["align_images"], run.device,
                               generator(seed, "soups-alignment")) if aligned else None
    made, members = make_soups(run.pop, val_accuracy, batches, s["repair_iters"], s["repair_seed"], align_batches,
                               stacked=build_engine(exp, run.device, run.pop, run.splits).stacked,
                               criterion=s["greedy_criterion"], layers=exp["repair"]["layers"],
                               fusion=repair_fusion(exp), own_images=fidelity.authors(exp, "repair_images"))
    tensors = {f"{name}.{k}": v for name, m in made.items() for k, v in m.state_dict().items()}
    info = {"greedy_soup_members": members, "aligned": aligned,
            "val_accuracy": {k: val_accuracy(m) for k, m in made.items()}}
    save_tensors(run.dir / "soups.safetensors", tensors,
                 {**info, "experiment": exp["name"], "population_sha256": run.digest})
    return info


def similarity_steps(exp: dict, variant: str) -> tuple[bool, bool]:
    """Whether Table 5 aligns ``variant``'s members and REPAIRs its soup: ``similarity.align`` and ``.repair``
    for every variant, or (``fidelity.similarity_members: authors``) for the baseline only, as the scripts did
    (PE:153 with ``--permutation True --repair_soup True``; PAPA-all and PAPA-2 at PE:155, 157 with
    ``--permutation False`` and the default ``--repair_soup False``; cossim, models/combined.py:153-179)."""
    if variant != "baseline" and fidelity.authors(exp, "similarity_members"):
        return False, False
    return exp["similarity"]["align"], exp["similarity"]["repair"]


def similarity(exp: dict, split_path, run_dir) -> dict:
    """Table 5 (Appendix A.5) for one run -> similarity.json: per ResNet stage, the mean cosine similarity (%) of
    test-set stage outputs between two members and between a member and the average soup (``similarity_steps``),
    over every pair (``similarity.members: all``) or members 0 and 1 (``first-two``, all pairs then beside it)."""
    run = open_run(exp, split_path, run_dir)
    s, pop, splits = exp["similarity"], run.pop, run.splits
    names = stages(pop.template)
    if pop.size < 2:
        raise PapaError(f"{run.dir}: feature similarity needs a population of at least 2 members, found {pop.size}")
    align, repair = similarity_steps(exp, run.meta["variant"])
    measured = range(len(splits.test))[: s["test_images"]]  # the first similarity.test_images (null: all)
    test = fixed_batches(exp, splits, splits.test, measured, run.device)
    data = partial(align_data, exp, splits, run.split, s["align_images"], run.device)  # REPAIR's: the fixed images
    sims = population_similarity(pop, data(None), align=align, repair=repair, repair_iters=s["repair_iters"],
                                 seed=exp["soups"]["repair_seed"], measure_batches=test, layers=exp["repair"]["layers"],
                                 fusion=repair_fusion(exp),
                                 align_batches=data(generator(run.meta["seed"], "similarity-alignment")))
    per_stage = {measure: {"between_networks": dict(zip(names, rows[BETWEEN_NETWORKS], strict=True)),
                           "network_and_avg_soup": dict(zip(names, rows[NETWORK_AND_SOUP], strict=True))}
                 for measure, rows in sims.items()}
    out = {"experiment": exp["name"], "variant": run.meta["variant"], "seed": run.meta["seed"], "stages": names,
           **per_stage[s["members"]], "members": s["members"], "aligned": align, "repaired": repair,
           "repair_iters": s["repair_iters"], "test_images": len(measured), "population_sha256": run.digest,
           "code": code_version()}
    if s["members"] != "all":  # the all-pairs measure beside the configured one
        out |= {f"all_pairs_{k}": v for k, v in per_stage["all"].items()}
    write_json(run.dir / "similarity.json", out)
    return out


def evaluate(exp: dict, split_path, run_dir) -> dict:
    """Test accuracies of members, logit ensemble and four soups (per-class F1 too for segmentation) → metrics.json."""
    return _evaluate(exp, open_run(exp, split_path, run_dir))


def soup_state(tensors: dict, name: str, where) -> dict:
    """Soup ``name``'s tensors from soups.safetensors's ``tensors`` (``<soup>.<tensor>``, as ``soups`` writes them)."""
    state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
    if not state:
        raise PapaError(f"{where}: no tensors for {name}")
    return state


def _evaluate(exp: dict, run: Run) -> dict:
    where = run.dir / "soups.safetensors"
    tensors, soup_meta = load_tensors(where, "run `papa soups` on this run again")
    if soup_meta.get("population_sha256") != run.digest:
        raise PapaError(f"{where} and {run.dir / 'population.safetensors'} come from different trainings: the soups "
                        "were made from another population; run `papa soups` on this run again")
    soups = {name: run.pop.module_from_state(soup_state(tensors, name, where)).to(run.device).eval()
             for name in SOUPS}
    bs = exp["train"]["eval_batch_size"]
    test = held_out_metrics(run.pop, soups, run.splits.test, bs, run.device)
    view = validation_view(exp, run.splits, generator(run.meta["seed"], "evaluate-validation"))
    val = [a for a, _ in population_scores(run.pop, run.splits.train, run.split["val"], bs, run.device, **view)]
    members = soup_meta["greedy_soup_members"]
    metrics = {"experiment": exp["name"], "variant": run.meta["variant"], "seed": run.meta["seed"],
               "population": run.pop.size, **summary(test["members"]), **test, "greedy_soup_size": len(members),
               "greedy_soup_members": members, "soups_aligned": bool(soup_meta.get("aligned", False)),
               "val_members": val, "num_classes": run.splits.num_classes,  # soups at chance: 100 / num_classes %
               "data": run.splits.source or exp["data"]["dataset"],  # which data made these numbers
               "population_sha256": run.digest, "soups_sha256": file_digest(where), "code": code_version()}
    order = ["experiment", "variant", "seed", "population", "members", "mean", "min", "max", "std", "ensemble",
             "avg_soup", "greedy_soup", "greedy_soup_size", "avg_soup_repair", "greedy_soup_repair",
             "greedy_soup_members", "soups_aligned", "val_members"]
    metrics = {k: metrics[k] for k in order} | {k: v for k, v in metrics.items() if k not in order}
    write_json(run.dir / "metrics.json", metrics)
    return metrics
