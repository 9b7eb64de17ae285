"""Algorithm 1: train a population of one variant. Every random draw comes from a generator keyed by (run seed,
purpose, member, epoch), so a run resumed from a checkpoint ends with exactly the numbers of an uninterrupted one."""

import sys
import time

import torch
from torch import Tensor

from papa import fidelity, swa
from papa.averagers import Context, averager_for
from papa.build import (
    align_data,
    build_engine,
    build_optimizer,
    build_population,
    build_precision,
    build_stream,
    lr_factor,
    member_policies,
    resolve_device,
    validation_view,
)
from papa.checkpoint import Progress, Resumable, restore, saved
from papa.distributed import Local
from papa.errors import PapaError
from papa.metrics import accuracy, population_scores
from papa.models.pretrained import head_keys
from papa.population import Population
from papa.repair import reset_batchnorm_
from papa.rng import derive_seed, generator
from papa.variants import push_epoch_steps, swa_start_epoch

LOSS_READ_EVERY = 50  # steps between two host reads of the training losses (Trainer.read_losses)
PROGRESS_LINE_SECONDS = 120.0  # off a terminal, a progress line per epoch and within one at least this often


def _clock(seconds: float) -> str:  # h:mm:ss
    m, sec = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{sec:02d}"


def head_only(exp: dict, epoch: int) -> bool:
    """Whether only the head trains in (0-based) ``epoch``: the first ``train.freeze_epochs`` (§4.2, Kumar et al.), or
    all once set by ``fidelity.finetune: authors`` (main.py:159-163 unfroze at epoch --linear_prob_time=0.04: never)."""
    freeze = exp["train"]["freeze_epochs"]
    return freeze > 0 if fidelity.authors(exp, "finetune_freeze") else epoch < freeze


class Stopped(Exception):
    """Training stopped on a signal after saving a checkpoint (the caller exits; a rerun resumes)."""


class Trainer:
    """Trains one population of one variant for one seed (Algorithm 1)."""

    def __init__(self, exp: dict, variant: str, seed: int, splits, split: dict, progress: bool | None = None,
                 comm=None):
        self.exp, self.variant, self.seed = exp, variant, seed
        self.comm = comm or Local(exp["population"]["size"], resolve_device(exp["train"]["device"]))
        self.device = self.comm.device
        self.splits, self.split = splits, split
        self.pop = build_population(exp, splits, seed, self.comm.members).to(self.device)
        self.all_policies = member_policies(exp, seed)
        self.policies = [self.all_policies[j] for j in self.comm.members]
        self.stream = build_stream(exp, splits, split, self.policies, seed, self.device, self.comm.members)
        self.optimizer = build_optimizer(exp, self.pop)
        self.swa_start = swa_start_epoch(exp)
        self.swa = swa.SWA(self.pop) if self.swa_start is not None else None
        spe = self.stream.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(exp, s, spe))
        self.engine = build_engine(exp, self.device, self.pop, splits)
        self.engine_name, self.stacked = self.engine.name, self.engine.stacked  # REPAIR, BatchNorm: the same vmap
        dtype, self.scaler = build_precision(exp, self.device)  # bf16-cuda: autocast on CUDA only
        self.autocast = lambda: torch.autocast(self.device.type, dtype=dtype or torch.bfloat16,
                                               enabled=dtype is not None)
        self.progress = Progress()  # counters, history: what a checkpoint saves
        self.val_draws = 0  # validation scorings since this epoch's steps (val_view)
        self.stop_signal: str | None = None  # set by a signal handler; honoured at the next step
        bar = sys.stderr.isatty() if progress is None else progress
        self.show_bar = bar and self.comm.is_main  # the tqdm bar, else progress lines
        self.lines = not bar and self.comm.is_main
        self.last_loss: float | None = None  # population mean of the last loss read on the host
        self.clock = (time.monotonic(), 0)  # (start time, step then) of this process's training (fit resets it)
        self.last_line = self.clock[0]
        self.averager = averager_for(variant, exp)
        self.context = Context(  # what the averager reads and changes
            self.pop, self.comm, self.optimizer, self.stream, self.swa, self.progress, seed, self.stacked,
            self.val_scores, self.val_accuracy, self.align_batches,
            exp["train"]["epochs"])
        self.averager.check(self.context)
        self.resumable = Resumable({"variant": variant, "seed": seed, "experiment": exp}, self.pop, self.optimizer,
                                   self.scheduler, self.swa, self.progress, self.scaler)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def val_view(self) -> dict:
        """The images of the next validation scoring (``build.validation_view``): the n-th scoring after epoch
        e's steps draws from the key (seed, "validation", e, n), whether or not the run was resumed."""
        self.val_draws += 1
        return validation_view(self.exp, self.splits,
                               generator(self.seed, "validation", self.progress.epoch, self.val_draws))

    def align_batches(self, images: int | None):
        """Feature matching's images (``build.align_data``): the alignment at step t draws from the key
        (seed, "alignment", t) under ``fidelity.alignment_images: authors``."""
        return align_data(self.exp, self.splits, self.split, images, self.device,
                          generator(self.seed, "alignment", self.progress.step))

    def val_scores(self, pop: Population) -> list[tuple[float, float]]:
        """Every member's (validation accuracy, validation loss) of ``pop``."""
        return population_scores(pop, self.splits.train, self.split["val"], self.exp["train"]["eval_batch_size"],
                                 self.device, **self.val_view())

    def val_accuracy(self, module) -> float:
        bs = self.exp["train"]["eval_batch_size"]
        return accuracy(module.to(self.device).eval(), self.splits.train, self.split["val"], bs, self.device,
                        **self.val_view())

    def evaluate(self):
        """Every member's validation and test (accuracy, loss); each process scores the members it holds."""
        test = population_scores(self.pop, self.splits.test, None, self.exp["train"]["eval_batch_size"], self.device)
        return self.comm.gather_scores(self.val_scores(self.pop)), self.comm.gather_scores(test)

    def push(self) -> None:
        self.averager.push(self.context, self.lr)

    def average(self) -> None:
        self.averager.average(self.context)

    def freeze_body(self, frozen: bool) -> None:
        head = set(head_keys(self.pop.template, "params"))
        for name, t in self.pop.params.items():
            t.requires_grad_(t.is_floating_point() and (name in head or not frozen))

    def run_epoch(self, bar=None, checkpoint=None) -> None:
        """One epoch (or the rest of one, after a mid-epoch checkpoint), then evaluation and averaging."""
        at, epochs = self.progress, self.exp["train"]["epochs"]
        e, total_steps = at.epoch, epochs * self.stream.steps_per_epoch
        epoch_steps = push_epoch_steps(self.exp, self.stream.steps_per_epoch)  # the scripts' push count, or None
        torch.manual_seed(derive_seed(self.seed, "global", e))  # dropout and other module-internal draws
        self.val_draws = 0
        self.freeze_body(head_only(self.exp, e))
        self.pop.train()
        pending: list[Tensor] = []  # the losses of the steps since the host last read them
        for i, (x, targets) in enumerate(self.stream.epoch(e)):
            if i < at.batch:  # resuming mid-epoch: replay the data stream up to where it stopped
                continue
            if i == at.batch and at.rng is not None:  # the global (and CUDA) RNG state of the step it stopped after
                torch.set_rng_state(at.rng)
                if at.cuda_rng is not None and self.device.type == "cuda":
                    torch.cuda.set_rng_state(at.cuda_rng, self.device)
                at.rng = at.cuda_rng = None
            self.optimizer.zero_grad(set_to_none=True)  # None: a frozen parameter gets no weight decay or momentum step
            if self.scaler is None:
                pending.append(self.engine(self.pop, x, targets, self.autocast).detach())
                self.optimizer.step()
            else:  # fp16 with loss scaling: a member's step is skipped when its gradients overflow
                pending.append(self.engine(self.pop, x, targets, self.autocast, self.scaler.scale).detach())
                self.scaler.step_population(self.optimizer, self.pop, self.comm)
            self.scheduler.step()
            at.step, at.batch = at.step + 1, i + 1
            if len(pending) == LOSS_READ_EVERY:
                self.read_losses(pending, bar)
            if self.averager.due_after_step(at.step, total_steps, epoch_steps):
                self.push()
            if at.batch < self.stream.steps_per_epoch and self.stop_requested():
                self.stop_mid_epoch(pending, bar, checkpoint)
            if self.lines and time.monotonic() - self.last_line >= PROGRESS_LINE_SECONDS:
                self.read_losses(pending, bar)
                self.progress_line()
        self.read_losses(pending, bar)
        at.batch, at.epoch = 0, at.epoch + 1
        val, test = self.evaluate()
        at.record("end", self.lr, val, test)
        if self.swa is not None and e >= self.swa_start:
            self.swa.update(self.pop)  # the iterate SGD reached, before any averaging mixes it
        if self.averager.due_after_epoch(at.epoch, epochs):
            at.record("before_avg", self.lr, val, test)
            self.average()
            at.record("after_avg", self.lr, *self.evaluate())
        if self.swa is not None and at.epoch == epochs:
            self.finish_swa()
            at.record("swa", self.lr, *self.evaluate())

    def read_losses(self, pending: list[Tensor], bar=None) -> None:
        """Read the last ``len(pending)`` steps' losses on the host, raise on a non-finite one (train.check_finite),
        show the latest on the bar. A read waits for the device, hence only every LOSS_READ_EVERY steps."""
        if not pending:
            return
        host = torch.stack(pending).float().cpu()  # (steps, members)
        first = self.progress.step - len(pending) + 1  # pending[k] is step first + k (1-based)
        pending.clear()
        bad = ~torch.isfinite(host)
        if self.exp["train"]["check_finite"] and bad.any():
            k, j = bad.nonzero()[0].tolist()
            raise PapaError(f"non-finite loss ({host[k, j].item()}) for member {j} at epoch "
                            f"{self.progress.epoch + 1}, step {first + k}; the last good checkpoint is kept")
        self.last_loss = host[-1].mean().item()
        if bar is not None:
            bar.set_postfix(loss=f"{self.last_loss:.3f}", lr=f"{self.lr:.2e}", refresh=False)

    def progress_line(self) -> None:
        """One line on stderr for logs, where a progress bar is unreadable."""
        at, epochs, spe = self.progress, self.exp["train"]["epochs"], self.stream.steps_per_epoch
        (start, start_step), now = self.clock, time.monotonic()
        elapsed, done, total = now - start, at.step - start_step, epochs * spe
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - at.step) / rate if rate > 0 else None
        val = [r["val_accuracy"] for r in at.history if r["epoch"] == at.epoch and r["phase"] == "end"]
        fields = [f"{self.exp['name']}/{self.variant}/seed{self.seed}",
                  f"epoch {at.epoch + (at.batch > 0)}/{epochs}" + (f" batch {at.batch}/{spe}" if at.batch else ""),
                  f"step {at.step}/{total}", "loss " + ("-" if self.last_loss is None else f"{self.last_loss:.4f}"),
                  f"lr {self.lr:.3g}", "val " + (f"{sum(val) / len(val):.2f}%" if val else "-"),
                  f"{rate * self.exp['train']['batch_size'] * self.comm.p:.0f} img/s",
                  f"elapsed {_clock(elapsed)}", "ETA " + ("-" if eta is None else _clock(eta))]
        print("papa train: " + ", ".join(fields), file=sys.stderr, flush=True)
        self.last_line = now

    def finish_swa(self) -> None:
        """The members become their SWA averages, then their BatchNorm statistics are recomputed (update_bn) on
        ``bn_batches`` batches (default one epoch) of each member's own stream, the same images for all."""
        n = self.exp["train"]["swa"]["bn_batches"] or self.stream.steps_per_epoch
        self.swa.swap_into(self.pop)
        streams = [self.stream.member_batches(j, generator(self.seed, "swa-batchnorm"), n) for j in self.comm.members]
        batches = (torch.stack([x.to(self.device) for x in xs]) for xs in zip(*streams, strict=True))
        reset_batchnorm_(self.pop, batches, stacked=self.stacked)

    def stop_mid_epoch(self, pending: list[Tensor], bar, checkpoint) -> None:
        """Save a checkpoint holding the global RNG state after this step, then raise Stopped."""
        self.read_losses(pending, bar)  # never checkpoint a diverged population
        at = self.progress
        at.rng = torch.get_rng_state()
        if self.device.type == "cuda":
            at.cuda_rng = torch.cuda.get_rng_state(self.device)
        if checkpoint is not None:
            checkpoint(self)
        raise Stopped(f"stopped by {self.stop_signal} at epoch {at.epoch + 1}, batch {at.batch}")

    def stop_requested(self) -> bool:
        """Whether a stop signal arrived here or at any other process: all stop after the same step."""
        if stop := self.comm.anyone(self.stop_signal is not None):
            self.stop_signal = self.stop_signal or "a signal to another process"
        return stop

    def fit(self, checkpoint=None) -> Population:
        """Train to the last epoch; ``checkpoint(trainer)`` is called after every epoch and on a stop."""
        from tqdm.auto import tqdm

        epochs = self.exp["train"]["epochs"]
        self.clock = (time.monotonic(), self.progress.step)
        self.last_line = self.clock[0]
        with tqdm(total=epochs, initial=self.progress.epoch, disable=not self.show_bar, unit="epoch",
                  desc=f"{self.exp['name']}/{self.variant}/seed{self.seed} p={self.pop.size}") as bar:
            while self.progress.epoch < epochs:
                self.run_epoch(bar, checkpoint)
                bar.update(1)
                if self.lines:
                    self.progress_line()
                if checkpoint is not None:
                    checkpoint(self)
                if self.progress.epoch < epochs and self.stop_requested():
                    raise Stopped(f"stopped by {self.stop_signal} after epoch {self.progress.epoch}")
        return self.pop

    def state(self) -> tuple[dict[str, Tensor], dict]:
        return saved(self.resumable)

    def load_state(self, tensors: dict[str, Tensor], meta: dict, where: str = "checkpoint") -> None:
        restore(self.resumable, tensors, meta, where)
