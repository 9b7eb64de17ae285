"""Where the paper's words and the authors' scripts (SamsungSAILMontreal/PAPA at 47ad83a, whose runs produced the
published numbers) differ and papa can run both: each difference one ``Option`` of the experiment key ``fidelity``
(``paper``, the default; ``authors``; or per option, ``{setting: paper, papa2_pairs: authors}``), which papa.config
resolves once per experiment; training code asks ``authors(exp, name)``. No torch (docs/architecture.md)."""

from dataclasses import dataclass

from papa.errors import PapaError

SETTINGS = ("paper", "authors")


@dataclass(frozen=True)
class Option:
    name: str  # the key under ``fidelity``
    paper: str  # what papa runs under ``paper``
    authors: str  # what the scripts ran (with where), run under ``authors``
    tables: str  # the paper's tables and figures it can move


OPTIONS = {o.name: o for o in (
    Option("papa2_pairs", "PAPA-2's partners (and those of the pair-75 scheme and the genetic ablations' "
           "untournamented children): p pairs drawn at random from all p(p-1)/2 distinct pairs",
           "the first p pairs in lexicographic order, dealt to the members in a random order (main.py:290-293, "
           "combinations(arange(p))[randperm(p)][:p]): at p = 10, 9 of the 10 children contain member 0; p <= 3 "
           "uses every pair either way, p = 2 averages its one pair into both members (main.py:295); pair-75 keeps "
           "a random one of each pair's two children (main.py:311)",
           "every PAPA-2 cell: Tables 1-2, 5, 6-9, 10-11, 12, 14 (pair-half, pair-75), 16 (the rows without "
           "tournament selection), 18 and Figure 2"),
    Option("averaging_epochs", "PAPA-all and PAPA-2 (and Table 14's schemes, the genetic ablations) average after "
           "epochs k, 2k, ... (and 1 with from_start), never after the last, inside the window (lo E, hi E]",
           "after epochs k+1, 2k+1, ... (and 1 with from_start, the scripts' mix_from_start, on in all their "
           "runs), inside the window [lo E, hi E] (main.py:217: 0-based `epoch % k == 0 and (epoch > 0 or "
           "mix_from_start) and epoch+1 >= lo E and epoch+1 <= hi E`; utils/utils.py:60-61 scales range_merge by "
           "EPOCHS): with k = 5 over 300 epochs, 1, 6, ..., 296, and Table 14's [0.75, 1] from 226 on (paper: "
           "230). When the test fires after the last epoch ((E-1) % k == 0, e.g. k = 1) nothing is mixed or "
           "REPAIRed (main.py:271, 299-311, mix=False), but PAPA-2 and pair-75 replace each member by one unmerged "
           "(aligned) member of its pair ([random.randint(0, 1)], drawn from the averaging generator), duplicates "
           "and all, and mutations and elitism still run (main.py:313-337)",
           "every table with PAPA-all or PAPA-2: Tables 1-2, 5, 6-9, 10-11, 12, 13, 14, 15-17, 18, A.10 and Figure 2"),
    Option("push_steps", "PAPA pushes after every `every`-th optimizer step of the run (step % every == 0, the "
           "step counted from 1 over all epochs: Algorithm 1's n_total)",
           "after the 1st, (every+1)-th, ... step of every epoch: main.py:169, 200 test `i % ema_every_k == 0` with i "
           "the step's 0-based index within its epoch, so the count starts again at each epoch (at 766 steps an "
           "epoch and every 10, 77 pushes an epoch, the last 6 steps before the next epoch's first)",
           "every PAPA row: Tables 1-3, 5-9, 12, 15-17 and Figure 2"),
    Option("last_batch", "an epoch is floor(n / B) full batches of every member's own order; the n mod B items "
           "at the end of the order go unused in that epoch (each epoch draws a new order)",
           "ceil(n / B) steps an epoch, the last of n mod B images (the DataLoader's default drop_last=False, "
           "models/combined.py:51; main.py:145, 169 step len(data_loader) times an epoch, and the cosine counts "
           "EPOCHS x that many steps, combined.py:97, 112): CIFAR at batch 64, 766 steps, the last of 40 images",
           "every trained cell, slightly: the steps per epoch, the cosine's length and PAPA's pushes of Tables 1-3, "
           "5-18 and Figure 2 (not A.10: its batch of 1 leaves nothing over)"),
    Option("val_images", "the validation split is scored on the evaluation transform (no crop, no flip): the same "
           "images at every scoring",
           "on the training split's base transform, crop and flip (arrays: augment.crop_padding and augment.flip; "
           "folders: RandomResizedCrop and flip), drawn again at every scoring, as the scripts cut the split out "
           "of train_dset_noaug (data/data.py:22, 37-38; data/cifar10.py:12-14, data/imagenet.py:12-13); their "
           "draws came from the unseeded global RNG, these from a generator keyed by the run seed and the "
           "scoring (in training its epoch and order within it), one draw for the members scored together where the "
           "scripts evaluated each member in a loop of its own (models/combined.py:222); segmentation tiles are "
           "scored whole either way (no script)",
           "every greedy soup (Tables 1, 2, 5-9, 12, 14-18), Table 14's greedy scheme, Table 16's tournament and "
           "elitism, Table 18's sizes; nothing where augment has no crop and no flip (digits, A.10)"),
    Option("alignment_images", "permutation alignment (feature matching, Appendix A.4) correlates the first "
           "align_images training-split images (all when null), unaugmented, in order: the same images at every "
           "matching",
           "the training split shuffled through its base transform, crop and flip (arrays: augment.crop_padding and "
           "augment.flip; folders: RandomResizedCrop and flip), drawn again for every matching, as the scripts fed "
           "corr_matching train_dset_noaug with shuffle=True (recombine/permutations.py:47-50, 93-95; data/data.py:22) "
           "and n_iter_matching 9999 batches, the whole split (main.py:110): align_images N takes N images drawn at "
           "random. Their draws came from the unseeded global RNG, once per layer (recombine/corr_matching.py:14-16 "
           "makes a shuffled DataLoader for each layer's correlation); these from a generator keyed by the run seed "
           "and the alignment (in training its step), one draw per matching for all its layers; segmentation tiles "
           "as under paper (no script)",
           "aligned soups (Tables 1, 6-9), Tables 15-17's alignment rows, Table 5's aligned baseline; where augment "
           "has no crop and no flip only the images' order and, with align_images N, which N"),
    Option("mixed_precision",
           "train.precision's mixed precision (bf16, bf16-cuda) is bf16 autocast with no loss scaling",
           "on CUDA, fp16 autocast with one torch.amp.GradScaler (torch's defaults) shared by the population: the "
           "summed loss scaled once, then each member stepped and the scale updated in member order, a member "
           "skipped when its own gradients overflow (main.py:172-189, utils/utils.py:70-71; --mixed_precision "
           "and --grad_scaler default to True, only the ESGD runs pass False); the CPU runs as under paper",
           "every table trained on CUDA with mixed precision (all but Table 12)"),
    Option("repair_fusion", "exact REPAIR (papa.repair): member moments in eval mode over all values; the averaged "
           "network repaired layer by layer in eval mode so that each layer's output has the target mean and std, a "
           "bias-free layer's shift kept (a bias added to a soup, or the running mean of the BatchNorm it feeds, "
           "rebuilt after the rescale)",
           "recombine/repair.py's fusion (47ad83a): member moments from TrackLayers in one train-mode pass, the "
           "mean of batch means and the root of the mean unbiased batch variance (l.17-29, 80-99); the averaged "
           "network in one train-mode pass through ResetLayers normalizing each batch to the targets, its "
           "nn.BatchNorm2d statistics re-estimated in that pass (l.31-43, 202-208); fuse_conv_bn (l.216-236) "
           "multiplies each weight by target std / sqrt(running var + 1e-5) and shifts only convolutions that have "
           "a bias: a bias-free one's shift is dropped, and the BatchNorm it feeds keeps the target statistics it "
           "saw (no reset after the fusion). Groups and dilation are kept (the fused state loads into the "
           "original architecture, combined.py:146-150)",
           "every REPAIR: PAPA-all and PAPA-2 rows with REPAIR (Tables 1-3, 5-18 and Figure 2, Table 1's "
           "fine-tuning rows; not Table 1's ImageNet rows or A.10, which average without it), the REPAIRed "
           "baseline soups of Tables 1-2 and 6-9, and Table 5's REPAIRed soup; on ResNet-18 and ResNet-20 every "
           "convolution is bias-free, so each loses its shift"),
    Option("papa2_repair_data",
           "REPAIR after a pair averaging (PAPA-2, pair-75, the genetic ablations' survivors) measures each parent "
           "on its own augmented batches and each child on its slot's (augmentation and mixup, as PAPA-all's)",
           "parents and child are measured on the same training batches with the base transform, crop and flip "
           "without regularization (recombine/permutations.py:69-75: correct_neuron_stats on train_dset_noaug, "
           "which data/data.py:22 builds with the training transform and re=0, and no hyperparam, so no mixup "
           "either); PAPA-all's and Table 14's many-/dirichlet/greedy REPAIR keeps the members' own augmentation in "
           "both settings (permutations.py:133)",
           "every PAPA-2 cell with REPAIR: Tables 1-2, 5, 6-9, 10-11, 12, 14 (pair-half, pair-75), 16, 18 and "
           "Figure 2"),
    Option("soup_repair_data",
           "soups' REPAIR measures members and soup alike on the base transform (crop, flip), no regularization",
           "each member's moments on its own augmented and regularized batches (its dataset transform and "
           "hyperparams[j]'s mixup, smoothing, CutMix), the soup's on the base transform, crop and flip without "
           "regularization (models/combined.py:257, :290 -> recombine/repair.py correct_neuron_stats_multiple "
           "with train_dset_out = [train_dset_noaug]: data/data.py:22, the training transform with re=0)",
           "the baselines' REPAIRed soups of Tables 1, 2 and 6-9 (not Table 5: papa similarity REPAIRs on "
           "its own data)"),
    Option("repair_images", "REPAIR measures every network on the same images, as Algorithms 4-5's one SEED = "
           "666 for every network (soups.repair_seed for the soups): the members whose moments are averaged and the "
           "network repaired see one order and one set of crops, each through its own policy, the same at every "
           "averaging",
           "PAPA-all's, Table 14's many-half, many-75, dirichlet and greedy, and the soups' REPAIR (correct_"
           "neuron_stats_multiple, same_repair=False: recombine/repair.py:151-172, called at permutations.py:133, "
           "combined.py:257, :290) measure every parent and every network repaired on a DataLoader of its own, "
           "shuffled and cropped by the global RNG where it then stands (repair.py:84): each network its own images, "
           "new at every averaging; the pair REPAIR (correct_neuron_stats, same_repair=True: PAPA-2, pair-75, the "
           "genetic ablations' children, permutations.py:69-75) gives its parents and child one draw, new at every "
           "call (repair.py:111-113). Their draws came from the unseeded global RNG; these from the key (seed, "
           "\"repair-images\", e) of averaging e, network k of a multiple REPAIR from derive_seed(that seed, "
           "\"repair-images\", role, k), the soups' from soups.repair_seed alike (a member measured once for both "
           "soups); Table 5's REPAIR as under paper (no script)",
           "every REPAIR of PAPA-all, PAPA-2, Table 14's schemes and the genetic ablations (Tables 1-3, 5-18 and "
           "Figure 2), the REPAIRed baseline soups of Tables 1, 2 and 6-9"),
    Option("alignment_target", "averagings with align permute every member (and its optimizer state) to member 0 "
           "before REPAIR's moments are measured and the members mixed",
           "PAPA-2 and pair-75 pair by pair in the order of the children, the pair's second member aligned to its "
           "first and kept so for the later pairs, so permutations accumulate (recombine/permutations.py:47-52, "
           "save_model(model1, m1)); PAPA-all each member to the running soup in member order, the soup built from "
           "aligned copies and REPAIRed toward the moments of the unpermuted members, so channels of members 1..p-1 "
           "are mismatched (models/combined.py:232-255 via permutations.py:122-123, acc_list None; "
           "permutations.py:133 passes the unaligned nets); greedy each member to the greedy soup so far, REPAIRed "
           "alike (combined.py:263-291); many-half, many-75 and dirichlet to member 0 (permutations.py:103-106); "
           "the optimizer state is never permuted. PAPA's push is aligned to member 0 in both settings (the "
           "scripts' EMA path, main.py:199-212, never aligns); the genetic ablations refuse align under authors",
           "Tables 15-17's alignment rows (ablation-align: PAPA-all and PAPA-2)"),
    Option("finetune_normalization",
           "fine-tuning normalizes with the pretrained network's mean/std (its timm pretrained_cfg)",
           "the dataset's own normalization (CIFAR-100's mean/std, data/cifar100.py:8-10)",
           "Table 1's fine-tuning rows"),
    Option("finetune_resize",
           "fine-tuning resizes CIFAR's 32-pixel images to the model's 224 on their values (data.resize, antialiased: "
           "PIL's kernels), keeping bicubic's overshoot below 0 and above 255",
           "as the scripts resized the uint8 PIL image before ToTensor (data/cifar100.py:16, 26: T.Resize(224, "
           "BICUBIC)): PIL's two passes, horizontal then vertical, each rounded to whole levels and clipped to "
           "0-255, then normalized (within one level of PIL in 0.02% of pixels: PIL's fixed-point arithmetic); "
           "wherever in-memory images are resized to data.image_size",
           "Table 1's fine-tuning rows"),
    Option("finetune_freeze",
           "fine-tuning trains the head alone for the first train.freeze_epochs epochs, then every layer (§4.2)",
           "the head alone for the whole run, as the published scripts are written: main.py:159-161 freezes all "
           "but the classifier at epoch 0 (--linear_prob_time 0.04 > 0) and main.py:163 unfreezes only when the "
           "integer epoch equals 0.04, which never happens; averaging loads weights into the frozen networks "
           "(models/combined.py:146-150). Table 1's fine-tuning numbers (88-92% on CIFAR-100) are those of full "
           "fine-tuning, which §5 says was done, so the paper configs keep `paper` for this option",
           "Table 1's fine-tuning rows"),
    Option("similarity_members", "Table 5 aligns every variant's members to member 0 and REPAIRs its average soup "
           "(similarity.align, similarity.repair)",
           "only the baseline's: the scripts ran --permutation True --repair_soup True for the baseline alone "
           "(scripts/paper_experiments.sh:153), PAPA-all and PAPA-2 unaligned with plain soups (:155, :157), and "
           "cossim measures the members and soup each run ends with (main.py:408-412, models/combined.py:153-179)",
           "Table 5"),
    Option("elitism", "the genetic ablations' elitism: the REPAIRed children are scored unmutated with the parents; "
           "then every survivor (a surviving parent by its identity row) is mixed again, REPAIRed on its own "
           "augmented batches and mutated",
           "the REPAIRed children are mutated, then scored with unmutated copies of the parents, and the survivors "
           "replace the members as they are: no second mixing, REPAIR or mutation, a surviving parent untouched "
           "(main.py:313-337)",
           "Table 16's elitist rows with mutations (\"pair-half, tournament, elitist, mutations\", \"tournament, "
           "elitist, mutations, no-REPAIR\"); \"pair-half, tournament, elitist\" only by its surviving parents' "
           "BatchNorm reset"),
)}


def resolve(value: str | dict | None, where: str = "fidelity") -> dict[str, str]:
    """An experiment's ``fidelity`` (a setting, or ``setting`` and options) as ``setting`` and every option's value."""
    value = {"setting": value} if isinstance(value, str) or value is None else dict(value)
    setting = value.pop("setting", None) or "paper"
    if unknown := sorted(value.keys() - OPTIONS.keys()):
        raise PapaError(f"{where}: unknown option {', '.join(map(repr, unknown))} (expected setting or one of: "
                        f"{', '.join(OPTIONS)})")
    resolved = {"setting": setting, **{name: value.get(name) or setting for name in OPTIONS}}
    for key, v in resolved.items():
        if v not in SETTINGS:
            raise PapaError(f"{where}.{key}: {v!r} is not one of {', '.join(SETTINGS)}")
    return resolved


def authors(exp: dict, name: str) -> bool:
    """Whether experiment ``exp`` (resolved by papa.config) runs option ``name`` the authors' way."""
    if name not in OPTIONS:
        raise LookupError(f"fidelity option {name!r} is not declared in papa/fidelity.py")
    return resolve(exp.get("fidelity"))[name] == "authors"
