"""Algorithm 1: train a population with the baseline, PAPA, PAPA-all or PAPA-2.

Every random draw comes from a generator derived from (run seed, purpose, member, epoch), so a run is
reproducible and resumes from a checkpoint (population, optimizer, counters, history, and the global RNG
state when stopped mid-epoch) to exactly the numbers of an uninterrupted run.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor

from papa import averaging, swa
from papa.data import Policy, draw_policies, eval_batches, make_stream
from papa.distributed import Local
from papa.engines import build_engine, choose_engine
from papa.errors import PapaError
from papa.evaluate import accuracy, population_scores
from papa.models import create_model
from papa.models.pretrained import head_keys
from papa.population import Population
from papa.repair import member_moments, repair_population_
from papa.rng import derive_seed, generator

# steps between two host reads of the training losses (see Trainer.read_losses)
LOSS_READ_EVERY = 50


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PapaError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


# population, optimizer, schedule -------------------------------------------------------------------
def build_population(exp: dict, splits, seed: int, members: list[int] | None = None) -> Population:
    m = exp["model"]

    def factory():
        return create_model(
            m["name"], num_classes=splits.num_classes, in_channels=splits.in_channels,
            pretrained=m["pretrained"], fake_ok=exp.get("scale") == "smoke", **m["kwargs"],
        )

    p = exp["population"]
    pop = Population.from_factory(factory, p["size"], seed=seed, same_init=p["same_init"], members=members)
    for t in pop.params.values():
        t.requires_grad_(t.is_floating_point())
    return pop


def head_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the classifier head's parameters: timm's ``get_classifier()``, else the last Linear."""
    return head_keys(model, "params")


def build_optimizer(exp: dict, pop: Population) -> torch.optim.Optimizer:
    """One optimizer over the stacked parameters: SGD and AdamW are elementwise, so this is exactly p
    independent optimizers (and keeps each member's momentum across averaging)."""
    o = exp["train"]["optimizer"]
    params = list(pop.params.values())
    if o["name"] == "sgd":
        return torch.optim.SGD(
            params, lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"] and o["momentum"] > 0,
            weight_decay=o["weight_decay"],
        )
    return torch.optim.AdamW(params, lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])


def lr_factor(exp: dict, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based), updated every step (Algorithm 1).

    With ``train.swa`` the regular schedule (still defined over ``train.epochs``) stops at the SWA start;
    from there SWALR's annealing, once per epoch, takes the rate to the SWA rate."""
    start = swa.start_epoch(exp)
    if start is not None and step >= start * steps_per_epoch:
        cfg, lr0 = exp["train"]["swa"], exp["train"]["optimizer"]["lr"]
        alpha = swa.anneal_alpha(cfg, step // steps_per_epoch - start)
        return (1.0 - alpha) * schedule_factor(exp, start * steps_per_epoch, steps_per_epoch) + alpha * cfg["lr"] / lr0
    return schedule_factor(exp, step, steps_per_epoch)


def schedule_factor(exp: dict, step: int, steps_per_epoch: int) -> float:
    """The regular schedule's learning-rate multiplier at optimizer step ``step``."""
    s = exp["train"]["schedule"]
    epochs, lr0 = exp["train"]["epochs"], exp["train"]["optimizer"]["lr"]
    total = epochs * steps_per_epoch
    floor = s["lr_min"] / lr0
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


def loader_options(exp: dict, splits) -> dict:
    """Stream and batch options of the dataset's kind: DataLoader workers for ImageFolder data."""
    return {"num_workers": exp["data"]["num_workers"]} if splits.kind == "folder" else {}


def fixed_batches(exp: dict, splits, dataset, indices, device):
    """Unaugmented batches of ``dataset``'s ``indices`` in a fixed order: a callable as REPAIR and
    papa.alignment take."""
    bs, options = exp["train"]["eval_batch_size"], loader_options(exp, splits)
    return lambda _member, _gen: eval_batches(dataset, indices, bs, device, **options)


def align_data(exp: dict, splits, split: dict, images: int | None, device):
    """Feature-matching data (Appendix A.4): the first ``images`` training-split images (all when None)."""
    return fixed_batches(exp, splits, splits.train, list(split["train"])[:images], device)


# history ---------------------------------------------------------------------------------------
@dataclass
class History:
    rows: list[dict] = field(default_factory=list)

    def record(self, epoch: int, phase: str, lr: float, val: list, test: list) -> None:
        for j, ((va, vl), (ta, _)) in enumerate(zip(val, test, strict=True)):
            self.rows.append(
                {"epoch": epoch, "member": j, "phase": phase, "lr": lr,
                 "val_accuracy": round(va, 4), "val_loss": round(vl, 6), "test_accuracy": round(ta, 4)}
            )


def member_scores(pop, data, indices, exp, device) -> list[tuple[float, float]]:
    return population_scores(pop, data, indices, exp["train"]["eval_batch_size"], device)


# the run ---------------------------------------------------------------------------------------
def member_policies(exp: dict, seed: int) -> list[Policy]:
    a, p = exp["augment"], exp["population"]["size"]
    base = {"crop_padding": a["crop_padding"], "flip": a["flip"]}
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


def in_window(exp: dict, done: int, total: int) -> bool:
    lo, hi = exp["averaging"]["window"]
    return lo * total < done <= hi * total


def first_difference(theirs, ours, key: str = "") -> tuple[str, object, object] | None:
    """The first key path (``experiment.population.size``) at which two nested dicts differ, with both
    values; ``None`` where they are equal."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        for k in [*ours, *(k for k in theirs if k not in ours)]:
            found = first_difference(theirs.get(k), ours.get(k), f"{key}.{k}" if key else str(k))
            if found is not None:
                return found
        return None
    return None if theirs == ours else (key, theirs, ours)


class Stopped(Exception):
    """Training stopped on a signal after saving a checkpoint (the caller exits; a rerun resumes)."""


class Trainer:
    """Trains one population of one variant for one seed (Algorithm 1)."""

    def __init__(self, exp: dict, variant: str, seed: int, splits, split: dict, progress: bool | None = None,
                 comm=None):
        self.exp, self.variant, self.seed = exp, variant, seed
        self.comm = comm if comm is not None else Local(exp["population"]["size"])
        self.device = resolve_device(exp["train"]["device"]) if comm is None else comm.device(exp)
        self.splits, self.split = splits, split
        self.pop = build_population(exp, splits, seed, self.comm.members).to(self.device)
        self.all_policies = member_policies(exp, seed)
        self.policies = [self.all_policies[j] for j in self.comm.members]
        per_batch = exp["augment"]["grid"] if exp["augment"]["per_batch"] and exp["augment"]["enabled"] else None
        options = loader_options(exp, splits)
        if splits.kind != "segmentation" and len(split["train"]) < exp["train"]["batch_size"]:
            raise PapaError(
                f"train.batch_size {exp['train']['batch_size']} exceeds the {len(split['train'])} training images"
            )
        self.stream = make_stream(splits, split["train"], exp["train"]["batch_size"], self.policies, seed,
                                  self.device, per_batch=per_batch, member_ids=self.comm.members, **options)
        self.optimizer = build_optimizer(exp, self.pop)
        self.swa_start = swa.start_epoch(exp)  # papa.config checked that it leaves epochs before and during SWA
        self.swa = swa.SWA(self.pop) if self.swa_start is not None else None
        spe = self.stream.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(exp, s, spe))
        self.engine_name = choose_engine(exp["train"]["engine"], self.device, self.pop.size)
        self.engine = build_engine(self.engine_name, compile=exp["train"]["compile"],
                                   channels_last=exp["train"]["channels_last"])
        self.stacked_repair = self.engine_name == "stacked"  # REPAIR passes go through the same vmap
        bf16 = exp["train"]["precision"] == "bf16"
        self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
        self.history = History()
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps completed
        self.batch = 0  # batches of the current epoch completed (non-zero only in a mid-epoch checkpoint)
        self.generation = 0  # averaging events so far (for mutations' 0.01/g)
        self.rng_state: Tensor | None = None  # global RNG state at a mid-epoch stop
        self.cuda_rng_state: Tensor | None = None  # and the CUDA device's, when training there
        self.stop_signal: str | None = None  # set by a signal handler; honoured at the next step
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.comm.is_main
        self.aligns = variant != "baseline" and exp["averaging"][variant]["align"]
        if self.aligns:
            from papa.alignment import permutation_spec

            if self.comm.world_size > 1:
                raise PapaError(f"averaging.{variant}.align runs in a single process only")
            permutation_spec(self.pop.template)  # fails now, not at the first averaging, on other models

    # pieces ----------------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def evaluate(self):
        """Every member's validation and test (accuracy, loss); each process scores the members it holds."""
        val = member_scores(self.pop, self.splits.train, self.split["val"], self.exp, self.device)
        test = member_scores(self.pop, self.splits.test, None, self.exp, self.device)
        return self.comm.gather_scores(val), self.comm.gather_scores(test)

    def repair_batches(self, iters: int):
        """Per-member repair data (Algorithm 5): member j's own augmentation, a generator seeded 666."""
        return lambda member, gen: self.stream.member_batches(member, gen, iters)

    def member_repair_batches(self, iters: int):
        """As repair_batches, addressed by position in the held population (member_moments' indexing)."""
        return lambda i, gen: self.stream.member_batches(self.comm.members[i], gen, iters)

    def align(self) -> None:
        """Permute every member's units to match member 0's (Appendix A.4), with the optimizer state that
        follows them (momentum, Adam moments), so each member computes and trains on exactly as before."""
        from papa.alignment import align_members_

        companions = []
        for key in sorted({k for st in self.optimizer.state.values() for k in st}):
            stacked = {name: self.optimizer.state[t][key] for name, t in self.pop.params.items()
                       if torch.is_tensor(self.optimizer.state.get(t, {}).get(key))
                       and self.optimizer.state[t][key].shape == t.shape}
            companions.append(stacked)
        data = align_data(self.exp, self.splits, self.split, self.exp["averaging"]["align_images"], self.device)
        align_members_(self.pop, data, reference=0, companions=companions)

    def mutate(self, gen: torch.Generator) -> None:
        """Gaussian mutations N(0, (std/g)^2) after the g-th averaging (the ablations of Tables 15-17)."""
        std = self.exp["averaging"]["genetic"]["mutation_std"]
        if std <= 0:
            return
        seed = int(torch.randint(2**62, (), generator=gen))
        with torch.no_grad():
            for i, j in enumerate(self.comm.members):  # one stream per member, wherever it is held
                member_gen = generator(seed, "member", j)
                for t in self.pop.params.values():
                    noise = torch.randn(t.shape[1:], generator=member_gen, dtype=t.dtype).to(t.device)
                    t[i].add_(noise, alpha=std / self.generation)

    def push(self) -> None:
        """PAPA: theta_j <- a' theta_j + (1 - a') mean, with 1 - a' = (1 - alpha) lr_t / lr_0."""
        cfg = self.exp["averaging"]["papa"]
        lr0 = self.exp["train"]["optimizer"]["lr"]
        one_minus = (1.0 - cfg["alpha"]) * (self.lr / lr0 if cfg["scale_with_lr"] else 1.0)
        if self.aligns:
            self.align()
        self.comm.push_(self.pop, 1.0 - min(one_minus, 1.0))
        self.generation += 1
        if self.exp["averaging"]["genetic"]["mutation_std"] > 0:
            self.mutate(generator(self.seed, "mutate", self.step))

    def average(self) -> None:
        """PAPA-all / PAPA-2 averaging at an epoch boundary, with optional REPAIR (and GA ablations)."""
        cfg = self.exp["averaging"][self.variant]
        self.generation += 1
        gen = generator(self.seed, "average", self.epoch)
        if self.aligns:  # before REPAIR's moments: they are measured on the aligned members
            self.align()
        moments = None
        if cfg["repair"]:
            local = member_moments(self.pop, self.member_repair_batches(cfg["repair_iters"]), cfg["repair_iters"],
                                   stacked=self.stacked_repair)
            moments = self.comm.all_moments(local)
        matrix = self.mixing_matrix(cfg["scheme"], gen)
        uniform = cfg["scheme"] == "all" and matrix is None
        if uniform:
            self.comm.average_all_(self.pop)
            matrix = averaging.mixing_matrix("all", self.comm.p)
        else:
            self.comm.mix_(self.pop, matrix)
        if cfg["repair"]:
            repair_population_(self.pop, matrix[self.comm.members], self.repair_batches(cfg["repair_iters"]),
                               moments, cfg["repair_iters"], members=self.comm.members, stacked=self.stacked_repair)
        if self.swa is not None and self.swa.count and self.exp["train"]["swa"]["mix_averages"]:
            # The members were replaced by mixtures of members: their SWA averages follow (the mixing is linear,
            # so each stays the running mean of its mixed lineage's iterates; REPAIR is not applied to them,
            # the final BatchNorm recomputation does that work).
            if uniform:
                self.comm.average_all_(self.swa.average)
            else:
                self.comm.mix_(self.swa.average, matrix)
        self.mutate(gen)

    def mixing_matrix(self, scheme: str, gen: torch.Generator) -> Tensor | None:
        genetic = self.exp["averaging"]["genetic"]
        if not (genetic["tournament"] or genetic["elitism"]):
            return None if scheme == "all" else averaging.mixing_matrix(scheme, self.comm.p, gen)
        from papa.genetic import selection_matrix

        if self.comm.world_size > 1:
            raise PapaError("the genetic-algorithm ablations (averaging.genetic) run in a single process only")
        fitness = [va for va, _ in member_scores(self.pop, self.splits.train, self.split["val"], self.exp,
                                                  self.device)]
        return selection_matrix(self.pop, fitness, scheme, genetic, gen, self.child_fitness)

    def child_fitness(self, state: dict[str, Tensor]) -> float:
        module = self.pop.module_from_state(state).to(self.device).eval()
        return accuracy(module, self.splits.train, self.split["val"], self.exp["train"]["eval_batch_size"],
                        self.device)

    def freeze_body(self, frozen: bool) -> None:
        """Fine-tuning (§4.2, after Kumar et al.): only the classifier head trains while ``frozen``."""
        head = set(head_parameters(self.pop.template))
        for name, t in self.pop.params.items():
            t.requires_grad_(t.is_floating_point() and (name in head or not frozen))

    # the loop --------------------------------------------------------------------------------
    def run_epoch(self, bar=None, checkpoint=None) -> None:
        """One epoch (or the rest of one, after a mid-epoch checkpoint), then evaluation and averaging."""
        exp, e = self.exp, self.epoch
        total_steps = exp["train"]["epochs"] * self.stream.steps_per_epoch
        torch.manual_seed(derive_seed(self.seed, "global", e))  # dropout and other module-internal draws
        self.freeze_body(e < exp["train"]["freeze_epochs"])
        self.pop.train()
        pending: list[Tensor] = []  # the losses of the steps since the host last read them
        for i, (x, targets) in enumerate(self.stream.epoch(e)):
            if i < self.batch:  # resuming mid-epoch: replay the data stream up to where it stopped
                continue
            if i == self.batch and self.rng_state is not None:
                torch.set_rng_state(self.rng_state)
                if self.cuda_rng_state is not None and self.device.type == "cuda":
                    torch.cuda.set_rng_state(self.cuda_rng_state, self.device)
                self.rng_state = self.cuda_rng_state = None
            # None (not zero) gradients: a frozen parameter must get no weight decay or momentum step either
            self.optimizer.zero_grad(set_to_none=True)
            pending.append(self.engine(self.pop, x, targets, self.autocast).detach())
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            self.batch = i + 1
            if len(pending) == LOSS_READ_EVERY:
                self.read_losses(pending, bar)
            if self.variant == "papa" and self.step % exp["averaging"]["papa"]["every"] == 0 and in_window(
                exp, self.step, total_steps
            ):
                self.push()
            if self.batch < self.stream.steps_per_epoch and self.stop_requested():
                self.read_losses(pending, bar)  # never checkpoint a diverged population
                self.rng_state = torch.get_rng_state()
                if self.device.type == "cuda":
                    self.cuda_rng_state = torch.cuda.get_rng_state(self.device)
                if checkpoint is not None:
                    checkpoint(self)
                raise Stopped(f"stopped by {self.stop_signal} at epoch {e + 1}, batch {self.batch}")
        self.read_losses(pending, bar)
        self.batch = 0
        self.epoch += 1
        val, test = self.evaluate()
        self.history.record(self.epoch, "end", self.lr, val, test)
        if self.swa is not None and e >= self.swa_start:
            self.swa.update(self.pop)  # the iterate SGD reached, before any averaging mixes it
        if self.averaging_due():
            self.history.record(self.epoch, "before_avg", self.lr, val, test)
            self.average()
            self.history.record(self.epoch, "after_avg", self.lr, *self.evaluate())
        if self.swa is not None and self.epoch == exp["train"]["epochs"]:
            self.finish_swa()
            self.history.record(self.epoch, "swa", self.lr, *self.evaluate())

    def read_losses(self, pending: list[Tensor], bar=None) -> None:
        """Read the losses of the last ``len(pending)`` steps (up to ``self.step``) on the host, raise on a
        non-finite one (train.check_finite) naming its member and step, and show the latest on the progress
        bar. Reading waits for the device to finish those steps, which is why it happens only every
        LOSS_READ_EVERY steps: a read per step would stop the host from queueing work ahead of a GPU."""
        if not pending:
            return
        host = torch.stack(pending).float().cpu()  # (steps, members)
        first = self.step - len(pending) + 1  # pending[k] is step first + k (1-based)
        pending.clear()
        bad = ~torch.isfinite(host)
        if self.exp["train"]["check_finite"] and bad.any():
            k, j = bad.nonzero()[0].tolist()
            raise PapaError(f"non-finite loss ({host[k, j].item()}) for member {j} at epoch {self.epoch + 1}, "
                            f"step {first + k}; the last good checkpoint is kept")
        if bar is not None:
            bar.set_postfix(loss=f"{host[-1].mean().item():.3f}", lr=f"{self.lr:.2e}", refresh=False)

    def finish_swa(self) -> None:
        """The members become their SWA averages; BatchNorm statistics are then recomputed on training data
        (update_bn): ``bn_batches`` batches (default one epoch) of each member's own training stream, the
        same images for all members (one seed), all members at once with the stacked engine."""
        n = self.exp["train"]["swa"]["bn_batches"] or self.stream.steps_per_epoch
        self.swa.swap_into(self.pop)
        streams = [self.stream.member_batches(j, generator(self.seed, "swa-batchnorm"), n) for j in self.comm.members]
        batches = (torch.stack([x.to(self.device) for x in xs]) for xs in zip(*streams, strict=True))
        swa.recompute_batchnorm_(self.pop, batches, stacked=self.stacked_repair)

    def stop_requested(self) -> bool:
        """Whether a stop signal arrived, here or (under torchrun) at any other process: all processes
        then stop after the same step, so their checkpoints agree."""
        if self.comm.anyone(self.stop_signal is not None):
            self.stop_signal = self.stop_signal or "a signal to another process"
            return True
        return False

    def averaging_due(self) -> bool:
        if self.variant not in ("papa-all", "papa-2"):
            return False
        epochs = self.exp["train"]["epochs"]
        every = self.exp["averaging"][self.variant]["every"]
        return self.epoch % every == 0 and self.epoch < epochs and in_window(self.exp, self.epoch, epochs)

    def fit(self, checkpoint=None) -> Population:
        """Train to the last epoch; ``checkpoint(trainer)`` is called after every epoch and on a stop."""
        from tqdm.auto import tqdm

        epochs = self.exp["train"]["epochs"]
        with tqdm(total=epochs, initial=self.epoch, disable=not self.progress, unit="epoch",
                  desc=f"{self.exp['name']}/{self.variant}/seed{self.seed} p={self.pop.size}") as bar:
            while self.epoch < epochs:
                self.run_epoch(bar, checkpoint)
                bar.update(1)
                if checkpoint is not None:
                    checkpoint(self)
                if self.epoch < epochs and self.stop_requested():
                    raise Stopped(f"stopped by {self.stop_signal} after epoch {self.epoch}")
        return self.pop

    # checkpoints -----------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict]:
        """Everything a resumed run needs, as tensors (safetensors) and JSON-able metadata."""
        tensors = {f"pop.{k}": v for k, v in self.pop.state_dict().items()}
        opt = self.optimizer.state_dict()
        opt_meta = {}
        for idx, st in opt["state"].items():
            for key, value in st.items():
                if torch.is_tensor(value):
                    tensors[f"opt.{idx}.{key}"] = value
                else:
                    opt_meta[f"{idx}.{key}"] = value
        if self.rng_state is not None:
            tensors["rng.global"] = self.rng_state
        if self.cuda_rng_state is not None:
            tensors["rng.cuda"] = self.cuda_rng_state
        swa_count = None
        if self.swa is not None:
            swa_tensors, swa_count = self.swa.state()
            tensors |= swa_tensors
        meta = {
            "experiment": self.exp, "variant": self.variant, "seed": self.seed,
            "epoch": self.epoch, "step": self.step, "batch": self.batch, "generation": self.generation,
            "scheduler": self.scheduler.state_dict(), "param_groups": opt["param_groups"],
            "optimizer_scalars": opt_meta, "history": self.history.rows, "swa_count": swa_count,
        }
        return tensors, meta

    def load_state(self, tensors: dict[str, Tensor], meta: dict, where: str = "checkpoint") -> None:
        """Resume from ``state()``; a checkpoint of another config, variant or seed is refused."""
        run = {"variant": self.variant, "seed": self.seed, "experiment": self.exp}
        found = first_difference({key: meta.get(key) for key in run}, run)
        if found is not None:
            key, theirs, ours = found
            raise PapaError(f"{where}: written by another run: {key}: the checkpoint has {theirs!r}, this run has "
                            f"{ours!r}; delete it to start over")
        try:
            self.pop.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("pop.")})
        except ValueError as e:
            raise PapaError(f"{where}: {e}") from None
        state: dict[int, dict] = {}
        for name, value in tensors.items():
            if name.startswith("opt."):
                _, idx, key = name.split(".", 2)
                state.setdefault(int(idx), {})[key] = value
        for name, value in meta["optimizer_scalars"].items():
            idx, key = name.split(".", 1)
            state.setdefault(int(idx), {})[key] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.scheduler.load_state_dict(meta["scheduler"])
        self.epoch, self.step, self.batch = meta["epoch"], meta["step"], meta["batch"]
        self.generation = meta["generation"]
        self.history.rows = list(meta["history"])
        self.rng_state = tensors.get("rng.global")
        if self.swa is not None:
            try:
                self.swa.load_state({k: v for k, v in tensors.items() if k.startswith("swa.")}, meta["swa_count"])
            except (ValueError, KeyError, TypeError) as e:
                raise PapaError(f"{where}: {e}") from None
        self.cuda_rng_state = tensors.get("rng.cuda")
