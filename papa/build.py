"""From a validated experiment config to the objects of a run: device, population, optimizer, learning-rate
schedule, engine, member policies and the fixed-order data that REPAIR and alignment read."""

import math
from functools import partial

import torch

from papa import fidelity
from papa.data import FolderStream, MemberStream, PatchStream, Policy, draw_policies, eval_batches, make_stream
from papa.engines import Engine, PopulationScaler, analytic_allowed, choose_engine, forward_gflop
from papa.errors import PapaError
from papa.models import create_model
from papa.population import Population
from papa.rng import generator
from papa.variants import swa_start_epoch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PapaError("device 'cuda' (train.device, or papa bench --device) but no CUDA device is available")
    return torch.device(name)


def repair_fusion(exp: dict) -> str:
    """How the experiment's REPAIRs (averagings, soups, Table 5's) fuse their correction (papa.repair.FUSIONS)."""
    return "authors" if fidelity.authors(exp, "repair_fusion") else "exact"


def build_population(exp: dict, splits, seed: int, members: list[int] | None = None) -> Population:
    """``population.size`` members of ``model`` (only ``members`` of them: one process's share), trainable."""
    m, p = exp["model"], exp["population"]
    return Population.from_factory(
        lambda: create_model(m["name"], num_classes=splits.num_classes, in_channels=splits.in_channels,
                             pretrained=m["pretrained"], fake_ok=exp.get("scale") == "smoke", **m["kwargs"]),
        p["size"], seed=seed, same_init=p["same_init"], members=members).requires_grad_()


def build_optimizer(exp: dict, pop: Population) -> torch.optim.Optimizer:
    """One optimizer over the stacked parameters: SGD and AdamW are elementwise, so this is exactly p
    independent optimizers (and keeps each member's momentum across averaging)."""
    o = exp["train"]["optimizer"]
    if o["name"] == "sgd":
        return torch.optim.SGD(pop.parameters(), lr=o["lr"], momentum=o["momentum"],
                               nesterov=o["nesterov"] and o["momentum"] > 0, weight_decay=o["weight_decay"])
    return torch.optim.AdamW(pop.parameters(), lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])


def build_engine(exp: dict, device: torch.device, pop: Population, splits) -> Engine:
    """``train.engine`` with its speed options, ``auto`` resolved by papa.engines.choose_engine; the work of one
    member's step (forward GFLOP of one image times the batch size) is measured only when the choice depends on it."""
    t = exp["train"]
    analytic = analytic_allowed(t["engine"], pop.template, build_precision(exp, device)[0] is None, t["compile"])
    choose = partial(choose_engine, t["engine"], device, pop.size)
    work = None
    if choose(0.0, analytic) != choose(math.inf, analytic):
        shape = (splits.in_channels, splits.image_size, splits.image_size)
        work = forward_gflop(pop.template, pop.member_tensors(0), shape) * t["batch_size"]
    return Engine(choose(work, analytic), compile=t["compile"], channels_last=t["channels_last"])


def build_precision(exp: dict, device: torch.device) -> tuple[torch.dtype | None, PopulationScaler | None]:
    """``train.precision`` on ``device``: the autocast dtype (None: fp32) and the loss scaler (None: none). Under
    ``fidelity.mixed_precision: authors`` CUDA runs fp16 with a PopulationScaler, as the scripts' --mixed_precision/
    --grad_scaler ran (main.py:172-189; docs/decisions.md)."""
    precision, cuda = exp["train"]["precision"], device.type == "cuda"
    if precision == "fp32" or (precision == "bf16-cuda" and not cuda):
        return None, None
    if cuda and fidelity.authors(exp, "mixed_precision"):
        return torch.float16, PopulationScaler(device)
    return torch.bfloat16, None


# the learning-rate schedule ------------------------------------------------------------------------
def lr_factor(exp: dict, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based), updated every step (Algorithm 1); from the SWA
    start, SWALR's annealing to the SWA rate, once per epoch (docs/decisions.md)."""
    start = swa_start_epoch(exp)
    if start is None or step < start * steps_per_epoch:
        return schedule_factor(exp, step, steps_per_epoch)
    swa, lr0 = exp["train"]["swa"], exp["train"]["optimizer"]["lr"]
    t = min((step // steps_per_epoch - start) / swa["anneal_epochs"], 1.0) if swa["anneal_epochs"] else 1.0
    w = t if swa["anneal"] == "linear" else (1.0 - math.cos(math.pi * t)) / 2.0
    return (1.0 - w) * schedule_factor(exp, start * steps_per_epoch, steps_per_epoch) + w * swa["lr"] / lr0


def schedule_factor(exp: dict, step: int, steps_per_epoch: int) -> float:
    s, epochs = exp["train"]["schedule"], exp["train"]["epochs"]
    total, floor = epochs * steps_per_epoch, s["lr_min"] / exp["train"]["optimizer"]["lr"]
    if s["name"] == "constant":
        return 1.0
    if s["name"] == "multistep":
        passed = sum(step >= round(m * epochs) * steps_per_epoch for m in s["milestones"])
        return s["gamma"] ** passed
    if s["name"] == "linear":
        return 1.0 + (floor - 1.0) * min(step / total, 1.0)
    if s["restart_every"]:
        period = s["restart_every"] * steps_per_epoch
        t = (step % period) / period
    else:
        t = min(step / total, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


# members and data ------------------------------------------------------------------------------------
def base_policy(exp: dict) -> Policy:
    """The crop and flip every member's images pass (augment.crop_padding, augment.flip), without regularization."""
    return Policy(crop_padding=exp["augment"]["crop_padding"], flip=exp["augment"]["flip"])


def member_policies(exp: dict, seed: int) -> list[Policy]:
    """Every member's augmentation and regularization: listed (``augment.members``) or drawn from the grid."""
    a, p = exp["augment"], exp["population"]["size"]
    base = base_policy(exp).as_dict()
    if a["members"] is not None:
        if len(a["members"]) != p:
            raise PapaError(f"augment.members lists {len(a['members'])} policies for a population of {p}")
        try:
            return [Policy(**{**base, **m}) for m in a["members"]]
        except TypeError as e:
            raise PapaError(f"augment.members: {e}") from None
    if not a["enabled"]:
        return [Policy(**base) for _ in range(p)]
    return draw_policies(a["grid"], p, generator(seed, "policies"), base)


def validation_view(exp: dict, splits, gen: torch.Generator) -> dict:
    """How one scoring of the validation split sees its images (papa.metrics' ``view``): as evaluation does, or
    with ``fidelity.val_images: authors`` through ``base_policy``, drawn from ``gen`` (the scoring's own)."""
    if splits.kind == "segmentation" or not fidelity.authors(exp, "val_images"):
        return {}
    return {"augment": base_policy(exp), "generator": gen}


def build_stream(exp: dict, splits, split: dict, policies: list[Policy], seed: int, device,
                 members: list[int]) -> MemberStream | FolderStream | PatchStream:
    """The training batches of ``members``, each with its own data order and augmentation (``policies``)."""
    t, a = exp["train"], exp["augment"]
    if splits.kind != "segmentation" and len(split["train"]) < t["batch_size"]:
        raise PapaError(f"train.batch_size {t['batch_size']} exceeds the {len(split['train'])} training images")
    per_batch = a["grid"] if a["per_batch"] and a["enabled"] else None
    return make_stream(splits, split["train"], t["batch_size"], policies, seed, device, per_batch=per_batch,
                       member_ids=members, keep_last=fidelity.authors(exp, "last_batch"), **loader_options(exp, splits))


def loader_options(exp: dict, splits) -> dict:
    return {"num_workers": exp["data"]["num_workers"]} if splits.kind == "folder" else {}


def fixed_batches(exp: dict, splits, dataset, indices, device):
    """Unaugmented batches of ``dataset``'s ``indices`` in a fixed order, as REPAIR and papa.alignment take them."""
    bs, options = exp["train"]["eval_batch_size"], loader_options(exp, splits)
    return lambda _member, _gen: eval_batches(dataset, indices, bs, device, **options)


def align_data(exp: dict, splits, split: dict, images: int | None, device, gen: torch.Generator | None):
    """Feature-matching data (Appendix A.4): the first ``images`` training-split images (all when None); with
    ``fidelity.alignment_images: authors`` and ``gen`` (the alignment's own), at every matching ``images`` drawn at
    random from ``gen`` through ``base_policy``, as the scripts' shuffled ``train_dset_noaug``."""
    train = list(split["train"])
    if gen is None or splits.kind == "segmentation" or not fidelity.authors(exp, "alignment_images"):
        return fixed_batches(exp, splits, splits.train, train[:images], device)
    bs, options, view = exp["train"]["eval_batch_size"], loader_options(exp, splits), base_policy(exp)

    def batches(_member, _gen):  # gen, not the caller's fixed seed: each matching draws the next images
        order = torch.randperm(len(train), generator=gen)[:images].tolist()
        return eval_batches(splits.train, [train[i] for i in order], bs, device, augment=view, generator=gen,
                            **options)
    return batches
