"""Smoke scale (``scale: smoke``, or ``--config scale=smoke``): every experiment shrunk by one rule (docs/smoke.md)
to run end to end in seconds to minutes on a CPU while every code path and every scheduled event of the full run
still happens; results under ``<results>/smoke``, every caption starting with "Smoke scale"."""

import copy
from pathlib import Path

from papa import fidelity
from papa.catalog import DATASETS
from papa.errors import PapaError
from papa.variants import VARIANTS, averaging_epochs, by_unit, first_push, swa_start_epoch

SUBSET = {"train": 6, "val": 2, "test": 4}  # data.subset: items kept of each set
MAX_BATCH, MAX_POPULATION, MAX_REPAIR_ITERS, MAX_WORKERS, MAX_PATCH = 2, 3, 1, 1, 32
PATCH_STEPS = 2  # batches per epoch of a patch-drawing dataset
MIN_EPOCHS, MAX_EPOCHS = 2, 50
CAPTION = "Smoke scale (a pipeline check on tiny data, not a result)"


def scale_config(config: dict) -> None:
    """The config-level part of the rule, in place: one seed, results under <results>/smoke, captions."""
    config["seeds"] = config["seeds"][:1]
    config["results"] = str(Path(config["results"]) / "smoke")
    for entry in (*config["tables"], *config["figures"]):
        entry["caption"] = f"{CAPTION}. {entry['caption']}".rstrip(". ") + "."


def _steps_per_epoch(exp: dict) -> int:
    """Training steps per epoch at smoke scale of a dataset of items (the validation split held out of the subset, as
    papa prepare does, and the incomplete last batch dropped or kept, as the streams do: fidelity.last_batch)."""
    n, b = SUBSET["train"], exp["train"]["batch_size"]
    n -= max(1, round(exp["data"]["val_fraction"] * n))
    return -(-n // b) if fidelity.authors(exp, "last_batch") else max(n // b, 1)


def _timed(full: dict, epochs: int, steps: int) -> dict:
    """``full`` with its periods rescaled to ``epochs`` smoke epochs of ``steps`` steps."""
    exp = copy.deepcopy(full)
    total, t = full["train"]["epochs"], exp["train"]

    def rescale(period: int | None) -> int | None:  # proportional, at least 1 (0 or None, never, stays)
        return max(1, round(period * epochs / total)) if period else period
    t["epochs"] = epochs
    t["freeze_epochs"] = rescale(t["freeze_epochs"])
    t["schedule"]["restart_every"] = rescale(t["schedule"]["restart_every"])
    if (swa := t["swa"]) is not None:
        if swa["start"] >= 1:
            swa["start"] = rescale(int(swa["start"]))
        swa["anneal_epochs"] = rescale(swa["anneal_epochs"])
        if swa["bn_batches"] is not None:
            swa["bn_batches"] = min(swa["bn_batches"], steps)
    a = exp["averaging"]
    for variant in by_unit("epochs"):
        a[variant]["every"] = rescale(a[variant]["every"])
    for variant in by_unit("steps"):
        a[variant]["every"] = min(a[variant]["every"], steps)
    return exp


def events(exp: dict, steps: int | None) -> dict[str, str]:
    """The scheduled events that happen in a run of ``exp`` with ``steps`` steps per epoch (None: the full
    run, whose steps per epoch depend on the data: pushes are taken to happen), as {event: what}."""
    t, a = exp["train"], exp["averaging"]
    epochs, swa_start = t["epochs"], swa_start_epoch(exp)
    found = {}
    for variant in by_unit("epochs"):
        what = f"averaging.{variant} every {a[variant]['every']} of {epochs} epochs in the window {a['window']}"
        if due := averaging_epochs(exp, variant):
            found[f"{variant} averaging"] = what
        if swa_start is not None and any(e > swa_start for e in due):  # after an SWA update (mix_averages)
            found[f"{variant} averaging during SWA"] = what + f" after the SWA start {swa_start}"
    for variant in by_unit("steps"):
        if steps is None or first_push(exp, variant, steps) is not None:
            found[f"{VARIANTS[variant].label} push"] = (f"averaging.{variant} every {a[variant]['every']} steps in "
                                                        f"the window {a['window']}")
    if 0 < t["freeze_epochs"] < epochs and not fidelity.authors(exp, "finetune_freeze"):  # the scripts never unfreeze
        found["unfreeze"] = f"train.freeze_epochs {t['freeze_epochs']} of {epochs}"
    if (restart := t["schedule"]["restart_every"]) and restart < epochs:
        found["warm restart"] = f"train.schedule.restart_every {restart} of {epochs} epochs"
    if swa_start is not None and 0 < swa_start < epochs:
        found["SWA start"] = f"train.swa.start {t['swa']['start']} of {epochs} epochs"
    return found


def scale_experiment(full: dict, where: str = "experiment") -> dict:
    """A validated experiment (defaults filled in) at smoke scale: the rule of this module's docstring."""
    exp = copy.deepcopy(full)
    d, t = exp["data"], exp["train"]
    d["subset"] = {k: min(v, (d["subset"] or {}).get(k, v)) for k, v in SUBSET.items()}
    d["num_workers"] = min(d["num_workers"], MAX_WORKERS)
    t["batch_size"] = min(t["batch_size"], MAX_BATCH)
    default_patch = DATASETS[d["dataset"]].patch_size  # a dataset drawing patches (papa.catalog)
    if default_patch is not None:
        d["options"]["epoch_size"] = PATCH_STEPS * t["batch_size"]
        d["options"]["patch_size"] = min(d["options"].get("patch_size", default_patch), MAX_PATCH)
    exp["population"]["size"] = p = min(exp["population"]["size"], MAX_POPULATION)
    if exp["augment"]["members"] is not None:
        exp["augment"]["members"] = exp["augment"]["members"][:p]
    for section in (*(exp["averaging"][v] for v in by_unit("epochs")), exp["soups"], exp["similarity"]):
        section["repair_iters"] = min(section["repair_iters"], MAX_REPAIR_ITERS)
    steps = PATCH_STEPS if default_patch is not None else _steps_per_epoch(exp)
    wanted = events(full, None)
    for epochs in range(MIN_EPOCHS, MAX_EPOCHS + 1):
        timed = _timed(exp, epochs, steps)
        found = events(timed, steps)
        if not (missed := [event for event in wanted if event not in found]):
            return timed
    raise PapaError(f"{where}: at smoke scale, no number of epochs up to {MAX_EPOCHS} keeps every scheduled event of "
                    f"the full run: {missed[0]} ({wanted[missed[0]]})")
