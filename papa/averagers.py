"""Each variant's averaging in training (Algorithm 1): a class per unit of papa.variants, picked by ``averager_for``."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from papa import averaging, fidelity
from papa.alignment import align_members_, align_pairs, permutation_spec
from papa.build import repair_fusion
from papa.checkpoint import Progress
from papa.data import FolderStream, MemberStream, PatchStream
from papa.distributed import Distributed, Local
from papa.errors import PapaError
from papa.forward import Batches
from papa.genetic import select
from papa.population import Population
from papa.repair import member_moments, repair_population_
from papa.rng import derive_seed, generator
from papa.soups import average_soup, greedy_alignment, greedy_soup
from papa.swa import SWA
from papa.variants import VARIANTS, averages_after, pushes_after, scripts_last_epoch, zero_based


@dataclass
class Context:
    """What an averager reads and changes of a training run (papa.train.Trainer builds it once)."""

    pop: Population
    comm: Local | Distributed  # the members held here, and the other processes' (torchrun)
    optimizer: torch.optim.Optimizer
    stream: MemberStream | FolderStream | PatchStream
    swa: SWA | None
    progress: Progress  # step, epoch and generation
    seed: int
    stacked: bool  # REPAIR's passes go through the vmapped engine
    val_scores: Callable[[Population], list[tuple[float, float]]]  # every member's validation (accuracy, loss)
    val_accuracy: Callable[[nn.Module], float]  # one network's validation accuracy
    align_batches: Callable[[int | None], Batches]  # the first N (all: None) training images, for alignment
    epochs: int = 0  # the run's epochs (Replace: the scripts' last-epoch averaging, fidelity averaging_epochs)


@dataclass
class Baseline:
    """Independent members: nothing is ever due."""

    window: tuple[float, float] = (0.0, 1.0)  # the fraction of training during which averaging happens

    def check(self, ctx: Context) -> None:
        """Refuse, before training starts, settings the run's members cannot honour."""

    def due_after_step(self, step: int, total: int, epoch_steps: int | None = None) -> bool:
        return False

    def due_after_epoch(self, epoch: int, epochs: int) -> bool:
        return False


@dataclass
class _Averaging(Baseline):
    """Alignment before averaging, mutations after it (``Progress.generation`` counts the averagings)."""

    name: str = ""  # the variant's key under averaging:
    align: bool = False
    align_images: int | None = None
    mutation_std: float = 0.0
    # fidelity alignment_target: the scripts' targets (Replace: the running soup, within pairs; Push as paper)
    scripts_alignment: bool = False

    def check(self, ctx: Context) -> None:
        if self.align:
            if ctx.comm.world_size > 1:
                raise PapaError(f"averaging.{self.name}.align runs in a single process only")
            permutation_spec(ctx.pop.template)  # fails now, not at the first averaging, on other models

    def align_(self, ctx: Context, target: str = "member") -> None:
        """Permute every member's units to match member 0's (Appendix A.4), with the optimizer state that follows
        them (momentum, Adam moments) and their SWA averages (each the running mean of its member's iterates, which
        it replaces at the end). ``scripts_alignment``: the optimizer state stays (the scripts permute only
        networks), and ``target="running-soup"`` matches each member to the average of those aligned before it."""
        state = ctx.optimizer.state
        keys = () if self.scripts_alignment else sorted({k for st in state.values() for k in st})
        companions = [{name: state[p][key] for name, p in ctx.pop.params.items()
                       if torch.is_tensor(state.get(p, {}).get(key)) and state[p][key].shape == p.shape}
                      for key in keys]
        if ctx.swa is not None:
            companions.append(ctx.swa.average.params)
        align_members_(ctx.pop, ctx.align_batches(self.align_images), reference=0, companions=companions, target=target)

    def mutate_(self, ctx: Context, gen: torch.Generator, pop: Population | None = None) -> None:
        """Gaussian mutations N(0, (std/g)^2) after the g-th averaging (Tables 15-17), of the members or of ``pop``."""
        if self.mutation_std <= 0:
            return
        seed = int(torch.randint(2**62, (), generator=gen))
        pop, members = (ctx.pop, ctx.comm.members) if pop is None else (pop, range(pop.size))
        with torch.no_grad():
            for i, j in enumerate(members):  # one stream per member, wherever it is held
                member_gen = generator(seed, "member", j)
                for p in pop.params.values():
                    noise = torch.randn(p.shape[1:], generator=member_gen, dtype=p.dtype).to(p.device)
                    p[i].add_(noise, alpha=self.mutation_std / ctx.progress.generation)


@dataclass
class Push(_Averaging):
    """PAPA (§2.3): every ``every`` steps, papa.averaging.push_toward_average_ with lr_t / lr_0 if ``scale_with_lr``."""

    alpha: float = 0.99
    every: int = 10
    scale_with_lr: bool = True
    lr0: float = 1.0

    def due_after_step(self, step: int, total: int, epoch_steps: int | None = None) -> bool:
        return pushes_after(step, total, self.every, self.window, epoch_steps)

    def push(self, ctx: Context, lr: float) -> None:
        if self.align:
            self.align_(ctx)
        averaging.push_toward_average_(ctx.pop, self.alpha, lr / self.lr0 if self.scale_with_lr else 1.0, comm=ctx.comm)
        ctx.progress.generation += 1
        self.mutate_(ctx, generator(ctx.seed, "mutate", ctx.progress.step))


@dataclass
class Replace(_Averaging):
    """PAPA-all / PAPA-2 every ``every`` epochs (papa.variants.averages_after): the members become a ``scheme`` matrix's
    rows, REPAIRed on ``repair_iters`` batches of their own augmented data; ``mix_swa``: SWA averages alike."""

    every: int = 5
    scheme: str = "all"
    repair: bool = True
    repair_iters: int = 5
    repair_layers: str = "conv+linear"
    repair_fusion: str = "exact"
    from_start: bool = False
    greedy_criterion: str = ">="  # the ``greedy`` scheme's (papa.soups.GREEDY_CRITERIA)
    mix_swa: bool = False
    pairs: str = "random"  # PAPA-2's partners (papa.averaging.PAIRINGS; fidelity option papa2_pairs)
    zero_based: bool = False  # the scripts' averaging epochs (papa.variants.averages_after; averaging_epochs)
    plain_pair_repair: bool = False  # pair schemes REPAIR on un-augmented batches (fidelity papa2_repair_data)
    scripts_repair_images: bool = False  # REPAIR's images drawn as the scripts' (fidelity repair_images)

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        scripts_copies = self.scheme in (*averaging.PAIR_SCHEMES, "greedy")  # aligned copies replace the members
        if self.align and self.scripts_alignment and scripts_copies and ctx.swa is not None:
            raise PapaError(f"averaging.{self.name}.align with train.swa: the scripts' alignment of the {self.scheme} "
                            "scheme (fidelity alignment_target: authors) permutes the members alone, which would "
                            "leave their SWA averages in the old order (the scripts have no SWA); use the paper's "
                            "alignment to member 0 (alignment_target: paper)")
        if self.scheme == "greedy" and ctx.comm.world_size > 1:
            raise PapaError(f"averaging.{self.name}.scheme greedy runs in a single process only")
        if (self.scheme in averaging.PAIR_SCHEMES and ctx.comm.world_size > 1 and self.zero_based
                and scripts_last_epoch(ctx.epochs, ctx.epochs, self.every, self.from_start, self.window)):
            raise PapaError(f"averaging.{self.name}: the scripts' averaging after the last epoch (fidelity "
                            "averaging_epochs: authors) runs in a single process only")

    def due_after_epoch(self, epoch: int, epochs: int) -> bool:
        return averages_after(epoch, epochs, self.every, self.from_start, self.window, self.zero_based) or (
            self.zero_based and scripts_last_epoch(epoch, epochs, self.every, self.from_start, self.window))

    def last_epoch(self, ctx: Context) -> bool:
        """Whether this averaging follows the run's last epoch, which only the scripts' test reaches (fidelity
        averaging_epochs: main.py:217): nothing is mixed or REPAIRed then (main.py:271, 299-311), but PAPA-2 still
        replaces each member by one member of its pair, and mutations and elitism still run (main.py:313-337)."""
        return 0 < ctx.epochs <= ctx.progress.epoch

    def matrix(self, ctx: Context, gen: torch.Generator) -> Tensor | None:
        """This generation's mixing matrix (None: PAPA-all); ``greedy``: all rows the greedy soup's (Algorithm 3)."""
        if self.scheme == "all":
            return None
        if self.scheme != "greedy":
            return averaging.mixing_matrix(self.scheme, ctx.comm.p, gen, self.pairs)
        scores = [acc for acc, _ in ctx.val_scores(ctx.pop)]
        if self.align and self.scripts_alignment:  # each member tried aligned to the greedy soup so far (the
            # scripts' greedy_soup with perm_fn, models/combined.py:263-279): the members become those copies
            aligned, members, _ = greedy_alignment(ctx.pop, ctx.val_accuracy, ctx.align_batches(self.align_images),
                                                   scores=scores, criterion=self.greedy_criterion)
            ctx.pop.load_state_dict(aligned.state_dict())
        else:
            _, members = greedy_soup(ctx.pop, ctx.val_accuracy, self.greedy_criterion, scores=scores)
        return averaging.greedy_matrix(members, ctx.comm.p)

    def batches(self, ctx: Context, plain: bool) -> Callable:
        """REPAIR's batches of member j: its own augmentation with a generator seeded 666 (Algorithm 5); ``plain``:
        the base transform for every member (the authors' pair REPAIR, recombine/permutations.py:69-75)."""
        return lambda member, g: ctx.stream.member_batches(None if plain else member, g, self.repair_iters)

    def repair_seed(self, ctx: Context) -> int:
        """The seed of this averaging's REPAIR batches: Algorithm 5's 666, or with ``scripts_repair_images`` one of
        the key (seed, "repair-images", e), as the scripts drew new images for every REPAIR (recombine/repair.py:111,
        169)."""
        return derive_seed(ctx.seed, "repair-images", ctx.progress.epoch) if self.scripts_repair_images else 666

    def next_generation(self, ctx: Context) -> torch.Generator:
        """Count this averaging; the generator of its draws (partners, weights, selection, mutations)."""
        ctx.progress.generation += 1
        return generator(ctx.seed, "average", ctx.progress.epoch)

    def average(self, ctx: Context) -> None:
        """The averaging after the current epoch, with its REPAIR. With ``align``, ``scripts_alignment`` aligns as the
        scripts (recombine/permutations.py:47-52, 103-106, 122-125): PAPA-2 and pair-75 within pairs (``pair_average``),
        PAPA-all each member to the running soup and ``greedy`` to the greedy soup so far, both after REPAIR's moments
        are taken on the unaligned members (permutations.py:133); other schemes, as the paper, all to member 0."""
        comm = ctx.comm
        gen = self.next_generation(ctx)
        scripts = self.align and self.scripts_alignment
        pairs = self.scheme in averaging.PAIR_SCHEMES
        batches = self.batches(ctx, self.plain_pair_repair and pairs)
        seed, own = self.repair_seed(ctx), self.scripts_repair_images and not pairs  # pairs: one draw (same_repair)
        last = self.last_epoch(ctx)
        if last or pairs and scripts:  # after the last epoch the scripts mix nothing else
            if pairs:
                self.pair_average(ctx, gen, batches, last)
            self.mutate_(ctx, gen)
            return
        if self.align and not (scripts and self.scheme in ("all", "greedy")):
            self.align_(ctx)  # before REPAIR's moments: they are measured on the aligned members
        if self.repair:
            moments = comm.all_moments(member_moments(ctx.pop, batches, self.repair_iters, seed, ctx.stacked,
                                                      comm.members, fusion=self.repair_fusion, own_images=own))
        if scripts and self.scheme == "all":
            self.align_(ctx, target="running-soup")
        matrix = self.matrix(ctx, gen)
        averaging.mix_or_average_(ctx.pop, matrix, comm)
        if self.repair:
            rows = averaging.mixing_matrix("all", comm.p) if matrix is None else matrix
            repair_population_(ctx.pop, rows[comm.members], batches, moments, self.repair_iters, seed,
                               members=comm.members, stacked=ctx.stacked, layers=self.repair_layers,
                               fusion=self.repair_fusion, own_images=own)
        self.mix_swa_(ctx, matrix)
        self.mutate_(ctx, gen)

    def mix_swa_(self, ctx: Context, matrix: Tensor | None) -> None:
        """With ``mix_swa``, the members' SWA averages mixed as the members just were (linear: each stays the
        running mean of its lineage's iterates; the final BatchNorm recomputation stands in for REPAIR)."""
        if self.mix_swa and ctx.swa is not None and ctx.swa.count:
            averaging.mix_or_average_(ctx.swa.average, matrix, ctx.comm)

    def pair_average(self, ctx: Context, gen: torch.Generator, batches, last: bool = False) -> None:
        """PAPA-2 and pair-75 pair by pair, as the scripts (recombine/permutations.py:32-76, main.py:308-311): row i's
        pair (a, b), a < b, b aligned to a with ``scripts_alignment`` (alignments accumulating over the rows), mixed
        by the row's weights, REPAIRed toward the parents' moments. ``last``: unmixed, member i is a or b (``gen``)."""
        matrix = self.matrix(ctx, gen)
        pairs = [tuple(row.nonzero().flatten().tolist()) for row in matrix]
        aligned = ctx.align_batches(self.align_images) if self.align and self.scripts_alignment else None
        parents = align_pairs(ctx.pop, pairs, aligned)
        n = len(pairs)
        if last:
            second = (torch.rand(n, generator=gen) < 0.5).long()
            ctx.pop.load_state_dict({name: t[2 * torch.arange(n) + second] for name, t in parents.tensors()})
            matrix = torch.eye(len(matrix), dtype=torch.float64)[torch.as_tensor(pairs)[torch.arange(n), second]]
        else:  # row k: pair k's weights on parents 2k and 2k + 1
            rows = torch.block_diag(*matrix.gather(1, torch.as_tensor(pairs)).unsqueeze(1))
            seed = self.repair_seed(ctx)  # parents and children: one draw (the scripts' same_repair)
            if self.repair:  # each parent on its own batches (its member's), as the members are measured
                moments = member_moments(parents, batches, self.repair_iters, seed, ctx.stacked,
                                         [j for pair in pairs for j in pair], fusion=self.repair_fusion)
            averaging.mix_(parents, torch.cat([rows, torch.eye(2 * n, dtype=torch.float64)[n:]]))
            ctx.pop.load_state_dict({name: t[:n] for name, t in parents.tensors()})
            if self.repair:
                repair_population_(ctx.pop, rows, batches, moments, self.repair_iters, seed, stacked=ctx.stacked,
                                   layers=self.repair_layers, fusion=self.repair_fusion)
        self.mix_swa_(ctx, matrix)


@dataclass
class Genetic(Replace):
    """``Replace`` whose mixtures come from tournament and/or elitist selection by validation loss (papa.genetic).
    Elitism's children are scored after a REPAIR on un-augmented batches; the survivors are then mixed, REPAIRed and
    mutated like every averaging. ``scripts_elitism`` (fidelity option elitism), the authors' order (main.py:308-337):
    the REPAIRed children are mutated, scored with the parents, and the survivors replace the members as they are."""

    tournament: bool = False
    elitism: bool = False
    scripts_elitism: bool = False

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        if ctx.comm.world_size > 1:
            raise PapaError("the genetic-algorithm ablations (averaging.genetic) run in a single process only")
        if self.align and self.scripts_alignment:
            raise PapaError(f"averaging.{self.name}.align with averaging.genetic: the scripts' pairwise alignment "
                            "(fidelity alignment_target: authors) is not implemented for the genetic ablations")

    def _select(self, ctx: Context, gen: torch.Generator, mutate: bool) -> tuple[Tensor, list[int], Population]:
        """The candidates, the survivors' indices among them and the children as scored."""
        losses = [loss for _, loss in ctx.val_scores(ctx.pop)]
        made = []
        last = self.last_epoch(ctx)  # the children are unmerged members, not REPAIRed (main.py:299-311)
        plain = self.batches(ctx, plain=True)

        def children_losses(rows: Tensor) -> list[float]:
            children = Population.from_modules([average_soup(ctx.pop, r) for r in rows])
            if self.repair and not last:
                seed = self.repair_seed(ctx)  # the scripts' children: pair REPAIRs, one draw each (same_repair)
                moments = member_moments(ctx.pop, plain, self.repair_iters, seed, ctx.stacked,
                                         fusion=self.repair_fusion)
                repair_population_(children, rows, plain, moments, self.repair_iters, seed, members=[0] * len(rows),
                                   layers=self.repair_layers, fusion=self.repair_fusion)
            if mutate:
                self.mutate_(ctx, gen, children)
            made.append(children)
            return [loss for _, loss in ctx.val_scores(children)]

        genetic = {"tournament": self.tournament, "elitism": self.elitism}
        candidates, chosen = select(ctx.comm.p, losses, self.scheme, genetic, gen, children_losses, self.pairs,
                                    heavy=1.0 if last else None)
        return candidates, chosen, (made[0] if made else None)

    def matrix(self, ctx: Context, gen: torch.Generator) -> Tensor:
        candidates, chosen, _ = self._select(ctx, gen, mutate=False)
        return candidates[chosen]

    def average(self, ctx: Context) -> None:
        scripts = self.elitism and self.scripts_elitism
        if not scripts and not self.last_epoch(ctx):
            return super().average(ctx)
        gen = self.next_generation(ctx)
        if not scripts:  # after the last epoch the candidates are unmerged members: each row picks one
            rows = self.matrix(ctx, gen)
            ctx.pop.load_state_dict({name: t[rows.argmax(1)] for name, t in ctx.pop.tensors()})
            self.mix_swa_(ctx, rows)
            self.mutate_(ctx, gen)
            return None
        if self.align:
            self.align_(ctx)
        candidates, chosen, children = self._select(ctx, gen, mutate=True)
        n, made = children.size, children.state_dict()
        # a surviving parent is left as it is: not mixed, REPAIRed nor mutated again
        ctx.pop.load_state_dict({name: torch.stack([made[name][c] if c < n else t[c - n] for c in chosen])
                                 for name, t in ctx.pop.tensors()})
        self.mix_swa_(ctx, candidates[chosen])


def averager_for(variant: str, exp: dict) -> Baseline:
    """The averaging of ``variant`` (by its unit, papa.variants) with ``exp``'s ``averaging.<variant>``."""
    a, unit = exp["averaging"], VARIANTS[variant].unit
    window = tuple(a["window"])
    if unit == "none":
        return Baseline(window)
    cfg, genetic = a[variant], a["genetic"]
    common = {"window": window, "name": variant, "align": cfg["align"], "align_images": a["align_images"],
              "mutation_std": genetic["mutation_std"],
              "scripts_alignment": fidelity.authors(exp, "alignment_target") and unit == "epochs"}
    if unit == "steps":
        return Push(**common, alpha=cfg["alpha"], every=cfg["every"], scale_with_lr=cfg["scale_with_lr"],
                    lr0=exp["train"]["optimizer"]["lr"])
    swa = exp["train"]["swa"]
    replace = {"every": cfg["every"], "scheme": cfg["scheme"], "repair": cfg["repair"],
               "repair_iters": cfg["repair_iters"], "repair_layers": exp["repair"]["layers"],
               "repair_fusion": repair_fusion(exp),
               "from_start": cfg["from_start"], "greedy_criterion": exp["soups"]["greedy_criterion"],
               "mix_swa": swa is not None and swa["mix_averages"],
               "pairs": "first" if fidelity.authors(exp, "papa2_pairs") else "random",
               "zero_based": zero_based(exp), "plain_pair_repair": fidelity.authors(exp, "papa2_repair_data"),
               "scripts_repair_images": fidelity.authors(exp, "repair_images")}
    if genetic["tournament"] or genetic["elitism"]:
        return Genetic(**common, **replace, tournament=genetic["tournament"], elitism=genetic["elitism"],
                       scripts_elitism=fidelity.authors(exp, "elitism"))
    return Replace(**common, **replace)
