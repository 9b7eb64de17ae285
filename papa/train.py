"""Algorithm 1: train a population with the baseline, PAPA, PAPA-all or PAPA-2.

Every random draw comes from a generator derived from (run seed, purpose, member, epoch), so a run is
reproducible and can resume at any epoch boundary from the population and optimizer state alone.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor

from papa import averaging
from papa.data import MemberStream, Policy, draw_policies
from papa.engines import ENGINES, choose_engine
from papa.errors import PapaError
from papa.evaluate import labels_of, member_logits, scores
from papa.models import create_model
from papa.population import Population
from papa.repair import member_moments, repair_population_
from papa.rng import derive_seed, generator


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PapaError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


# population, optimizer, schedule -------------------------------------------------------------------
def build_population(exp: dict, splits, seed: int) -> Population:
    m = exp["model"]

    def factory():
        return create_model(
            m["name"], num_classes=splits.num_classes, in_channels=splits.in_channels,
            pretrained=m["pretrained"], **m["kwargs"],
        )

    p = exp["population"]
    pop = Population.from_factory(factory, p["size"], seed=seed, same_init=p["same_init"])
    for t in pop.params.values():
        t.requires_grad_(t.is_floating_point())
    return pop


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
    """Learning-rate multiplier at optimizer step ``step`` (0-based), updated every step (Algorithm 1)."""
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
    labels = labels_of(data, indices)
    logits = member_logits(pop, data, indices, exp["train"]["eval_batch_size"], device)
    return [scores(z, labels) for z in logits]


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


class Trainer:
    """Trains one population of one variant for one seed (Algorithm 1)."""

    def __init__(self, exp: dict, variant: str, seed: int, splits, split: dict, progress: bool | None = None):
        self.exp, self.variant, self.seed = exp, variant, seed
        self.device = resolve_device(exp["train"]["device"])
        self.splits, self.split = splits, split
        self.pop = build_population(exp, splits, seed).to(self.device)
        self.policies = member_policies(exp, seed)
        self.stream = MemberStream(
            splits.train, split["train"], exp["train"]["batch_size"], self.policies, seed, self.device
        )
        if self.stream.steps_per_epoch < 1:
            raise PapaError(
                f"train.batch_size {exp['train']['batch_size']} exceeds the {len(split['train'])} training images"
            )
        self.optimizer = build_optimizer(exp, self.pop)
        spe = self.stream.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(exp, s, spe))
        self.engine_name = choose_engine(exp["train"]["engine"], self.device)
        self.engine = ENGINES[self.engine_name]
        bf16 = exp["train"]["precision"] == "bf16" and self.device.type == "cuda"
        self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
        self.history = History()
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps completed
        self.generation = 0  # averaging events so far (for mutations' 0.01/g)
        self.progress = sys.stderr.isatty() if progress is None else progress

    # pieces ----------------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def evaluate(self):
        val = member_scores(self.pop, self.splits.train, self.split["val"], self.exp, self.device)
        test = member_scores(self.pop, self.splits.test, None, self.exp, self.device)
        return val, test

    def repair_batches(self, iters: int):
        """Per-member repair data (Algorithm 5): member j's own augmentation, a generator seeded 666."""
        return lambda member, gen: self.stream.member_batches(member, gen, iters)

    def push(self) -> None:
        cfg = self.exp["averaging"]["papa"]
        lr0 = self.exp["train"]["optimizer"]["lr"]
        one_minus = (1.0 - cfg["alpha"]) * (self.lr / lr0 if cfg["scale_with_lr"] else 1.0)
        averaging.push_toward_average_(self.pop, 1.0 - min(one_minus, 1.0))

    def average(self) -> None:
        """PAPA-all / PAPA-2 averaging at an epoch boundary, with optional REPAIR (and GA ablations)."""
        cfg = self.exp["averaging"][self.variant]
        self.generation += 1
        gen = generator(self.seed, "average", self.epoch)
        moments = None
        if cfg["repair"]:
            moments = member_moments(self.pop, self.repair_batches(cfg["repair_iters"]), cfg["repair_iters"])
        matrix = self.mixing_matrix(cfg["scheme"], gen)
        averaging.mix_(self.pop, matrix)
        if cfg["repair"]:
            repair_population_(self.pop, matrix, self.repair_batches(cfg["repair_iters"]), moments,
                               cfg["repair_iters"])
        std = self.exp["averaging"]["genetic"]["mutation_std"]
        if std > 0:
            with torch.no_grad():
                for t in self.pop.params.values():
                    noise = torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)
                    t.add_(noise, alpha=std / self.generation)

    def mixing_matrix(self, scheme: str, gen: torch.Generator) -> Tensor:
        genetic = self.exp["averaging"]["genetic"]
        if not (genetic["tournament"] or genetic["elitism"]):
            return averaging.mixing_matrix(scheme, self.pop.size, gen)
        from papa.genetic import selection_matrix

        fitness = [va for va, _ in member_scores(self.pop, self.splits.train, self.split["val"], self.exp,
                                                  self.device)]
        return selection_matrix(self.pop, fitness, scheme, genetic, gen, self.child_fitness)

    def child_fitness(self, state: dict[str, Tensor]) -> float:
        module = self.pop.module_from_state(state).to(self.device).eval()
        from papa.evaluate import predict

        logits = predict(module, self.splits.train, self.split["val"], self.exp["train"]["eval_batch_size"],
                         self.device)
        return scores(logits, labels_of(self.splits.train, self.split["val"]))[0]

    # the loop --------------------------------------------------------------------------------
    def run_epoch(self, bar=None) -> None:
        exp, e = self.exp, self.epoch
        total_steps = exp["train"]["epochs"] * self.stream.steps_per_epoch
        torch.manual_seed(derive_seed(self.seed, "global", e))  # dropout and other module-internal draws
        self.pop.train()
        for x, targets in self.stream.epoch(e):
            self.optimizer.zero_grad(set_to_none=False)
            losses = self.engine(self.pop, x, targets, self.autocast)
            if exp["train"]["check_finite"] and not torch.isfinite(losses).all():
                j = int((~torch.isfinite(losses)).nonzero()[0])
                raise PapaError(
                    f"non-finite loss ({losses[j].item()}) for member {j} at epoch {e + 1}, step {self.step + 1}"
                )
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            if self.variant == "papa" and self.step % exp["averaging"]["papa"]["every"] == 0 and in_window(
                exp, self.step, total_steps
            ):
                self.push()
            if bar is not None:
                bar.set_postfix(loss=f"{losses.mean().item():.3f}", lr=f"{self.lr:.2e}", refresh=False)
        self.epoch += 1
        val, test = self.evaluate()
        self.history.record(self.epoch, "end", self.lr, val, test)
        if self.averaging_due():
            self.history.record(self.epoch, "before_avg", self.lr, val, test)
            self.average()
            self.history.record(self.epoch, "after_avg", self.lr, *self.evaluate())

    def averaging_due(self) -> bool:
        if self.variant not in ("papa-all", "papa-2"):
            return False
        epochs = self.exp["train"]["epochs"]
        every = self.exp["averaging"][self.variant]["every"]
        return self.epoch % every == 0 and self.epoch < epochs and in_window(self.exp, self.epoch, epochs)

    def fit(self, on_epoch=None) -> Population:
        from tqdm.auto import tqdm

        epochs = self.exp["train"]["epochs"]
        with tqdm(total=epochs, initial=self.epoch, disable=not self.progress, unit="epoch",
                  desc=f"{self.exp['name']}/{self.variant}/seed{self.seed} p={self.pop.size}") as bar:
            while self.epoch < epochs:
                self.run_epoch(bar)
                bar.update(1)
                if on_epoch is not None:
                    on_epoch(self)
        return self.pop
