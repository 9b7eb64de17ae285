"""The ``papa`` command: one small subcommand per pipeline stage, each a thin call into the library."""

import argparse
import json
import sys
from pathlib import Path

from papa import __version__
from papa.errors import DiskError, PapaError, one_line
from papa.io import need_file, path_error, write_error
from papa.report.cli import add_commands
from papa.variants import VARIANTS


def _experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="config file (YAML)")
    p.add_argument("--experiment", help="experiment name in the config (optional when it defines one)")


def _split_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", required=True, type=Path, help="validation split file written by `papa prepare`")


def _run_args(p: argparse.ArgumentParser, holds: str) -> None:
    _experiment_args(p)
    _split_arg(p)
    p.add_argument("--run", required=True, type=Path, help=f"run directory holding {holds}")


def _prepare(a):
    from papa import runs
    split = runs.prepare(runs.load_experiment(a.config, a.experiment), a.out)
    print(f"{a.out}: {len(split['train'])} training, {len(split['val'])} validation images")


def _train(a):
    from papa import runs
    from papa.train import Stopped
    exp = runs.load_experiment(a.config, a.experiment)
    try:
        trainer = runs.train(exp, a.variant, a.seed, a.split, a.out, progress=a.progress)
    except Stopped as e:
        print(f"papa train: {e}; checkpoint saved in {a.out}, run the same command to resume", file=sys.stderr)
        raise SystemExit(3) from None
    if not trainer.comm.is_main:  # under torchrun, one summary for the job
        return
    phase = "swa" if trainer.swa is not None else "end"  # the members as saved: their SWA averages
    at = trainer.progress
    last = [r for r in at.history if r["epoch"] == at.epoch and r["phase"] == phase]
    mean = sum(r["val_accuracy"] for r in last) / max(len(last), 1)
    print(f"{a.out}: trained {trainer.comm.p} members for {at.epoch} epochs; mean val accuracy {mean:.2f}%")


def _soups(a):
    from papa import runs
    need_file(a.run / "population.safetensors", "papa train")
    exp = runs.load_experiment(a.config, a.experiment)
    if a.evaluate:  # one process, the run loaded once: no second start-up, data load or device init
        info, metrics = runs.soups_and_metrics(exp, a.split, a.run)
    else:
        info, metrics = runs.soups(exp, a.split, a.run), None
    print(f"{a.run}/soups.safetensors: greedy soup of members {info['greedy_soup_members']}")
    if metrics is not None:
        _print_metrics(a.run, metrics)


def _evaluate(a):
    from papa import runs
    need_file(a.run / "population.safetensors", "papa train")
    need_file(a.run / "soups.safetensors", "papa soups")
    _print_metrics(a.run, runs.evaluate(runs.load_experiment(a.config, a.experiment), a.split, a.run))


def _print_metrics(run: Path, m: dict) -> None:
    print(f"{run}/metrics.json: members {m['mean']:.2f}% [{m['min']:.2f}, {m['max']:.2f}], ensemble "
          f"{m['ensemble']:.2f}%, avg soup {m['avg_soup']:.2f}%, greedy soup {m['greedy_soup']:.2f}%")


def _similarity(a):
    from papa import runs
    need_file(a.run / "population.safetensors", "papa train")
    s = runs.similarity(runs.load_experiment(a.config, a.experiment), a.split, a.run)
    cells = ", ".join(f"{k} {s['between_networks'][k]:.2f}% / {s['network_and_avg_soup'][k]:.2f}%" for k in s["stages"])
    print(f"{a.run}/similarity.json: between members / member and avg soup: {cells}")


def _export(a):
    from papa import export
    spec = export.export(a.run, a.out, soup=a.soup, member=a.member)
    n, b = spec["network"], spec["biases"]
    name = n["soup"] if n["member"] is None else f"member {n['member']}"
    folded = f"; REPAIR's biases of {len(b['folded'])} layers folded into BatchNorms" if b["folded"] else ""
    print(f"{a.out}: {name} of {n['experiment']}/{n['variant']}/seed{n['seed']} ({spec['model']}), test "
          f"{n['metric']} {n['test_accuracy']:.2f}%{folded}")
    if b["kept"]:
        why = b["note"] or "they feed no BatchNorm alone"
        print(f"{a.out}: kept the biases REPAIR gave {len(b['kept'])} layers ({', '.join(b['kept'])}): {why}; load "
              "it with papa.load_model")


def _model_arg(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``papa bench --model-arg``, the value read as YAML (``width=16`` gives 16)."""
    import yaml
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, found {text!r}")
    return key, yaml.safe_load(value)


def _bench(a):
    from papa import bench
    options = {k: v for k, v in vars(a).items() if k not in ("command", "func", "model_arg")}
    print(json.dumps(bench.run(**options, model_kwargs=dict(a.model_arg or []))))


def _fake_data(a):
    from papa import fakedata
    for line in fakedata.write_all(a.root, a.config or fakedata.default_configs(), a.hub_cache):
        print(line)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="papa", description="PopulAtion Parameter Averaging: train, average and "
                                     "evaluate populations.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the installed version of papa and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="load the dataset and save the 2%% validation split",
                       description="Check the dataset and hold out the validation split (index file).")
    _experiment_args(p)
    p.add_argument("--out", required=True, type=Path, help="split index file to write (JSON)")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="train one population (one variant, one seed)",
                       description="Train a population of one variant (Algorithm 1).")
    _experiment_args(p)
    p.add_argument("--variant", required=True, help=f"one of {', '.join(VARIANTS)} (papa.variants)")
    p.add_argument("--seed", required=True, type=int,
                   help="run seed: every random draw of the run (inits, data orders, augmentations) derives from it")
    _split_arg(p)
    p.add_argument("--out", required=True, type=Path, help="run directory to write")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: only on a terminal)")
    p.set_defaults(func=_train)

    p = sub.add_parser("soups", help="build average and greedy soups, with and without REPAIR",
                       description="Average soup, greedy soup (on the validation split), each repaired or not.")
    _run_args(p, "population.safetensors (from `papa train`)")
    p.add_argument("--evaluate", action="store_true",
                   help="then write metrics.json as `papa evaluate` does, in the same process (the pipeline's "
                   "soups job: one start-up and one data load per run instead of two)")
    p.set_defaults(func=_soups)

    p = sub.add_parser("evaluate", help="test accuracy of members, ensemble and soups -> metrics.json",
                       description="Write metrics.json for one trained population and its soups.")
    _run_args(p, "population.safetensors and soups.safetensors (from `papa train` and `papa soups`)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("similarity", help="feature similarity of members and soup per ResNet stage -> similarity.json",
                       description="Table 5 (Appendix A.5): align the members to member 0 (feature matching on "
                       "the training split), REPAIR the average soup, then per ResNet stage the mean cosine "
                       "similarity (%%) of the test-set stage outputs between two members and between a member "
                       "and the soup. Settings: the experiment's `similarity` entry.")
    _run_args(p, "population.safetensors (from `papa train`)")
    p.set_defaults(func=_similarity)

    p = sub.add_parser("export", help="write one soup (or member) of a run as a standalone model folder",
                       description="Write a soup of a trained, souped and evaluated run (or one of its members) as a "
                       "folder: model.safetensors (the architecture's own tensors, REPAIR's biases folded into the "
                       "BatchNorms they feed), config.json and a model card (README.md). A timm model's folder is "
                       "what timm.models.save_for_hf writes: timm.create_model('local-dir:PATH', pretrained=True) "
                       "reads it; papa.load_model(PATH) reads any export.")
    p.add_argument("--run", required=True, type=Path,
                   help="run directory (population.safetensors, soups.safetensors and metrics.json)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--soup", help="avg_soup, greedy_soup, avg_soup_repair or greedy_soup_repair "
                       "(default: greedy_soup_repair)")
    which.add_argument("--member", type=int, metavar="J", help="export member J (0-based) instead of a soup")
    p.add_argument("--out", required=True, type=Path,
                   help="folder to write (created; an earlier export there is replaced, anything else refused)")
    p.set_defaults(func=_export)

    p = sub.add_parser("bench", help="time training steps of one engine on synthetic data (one JSON line)",
                       description="Member-images per second, step and PAPA-push time of a population.")
    p.add_argument("--model", default="digits_cnn", help="model name in the registry (default: digits_cnn)")
    p.add_argument("--model-arg", action="append", type=_model_arg, metavar="KEY=VALUE",
                   help="a keyword argument of the model, as a config's model.kwargs (repeatable; e.g. width=16)")
    p.add_argument("--population", type=int, default=4, help="members p (default: 4)")
    p.add_argument("--batch-size", type=int, default=16, help="images per member per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--repeats", type=int, default=1, help="timed blocks of --steps; the fastest is reported")
    p.add_argument("--engine", choices=["loop", "stacked", "analytic", "auto"], default="auto",
                   help="loop: one member at a time; stacked: all members in one vmapped call; analytic: "
                   "logistic regression's gradient in closed form (logreg, fp32); auto: as train.engine's auto "
                   "(analytic for logreg in fp32; else stacked on CUDA, on CPU stacked for small steps, else loop)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile the step")
    p.add_argument("--channels-last", action="store_true", help="channels-last inputs (conv models)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--profile", type=Path, metavar="FILE",
                   help="also profile one step and write torch's kernel table to FILE")
    p.set_defaults(func=_bench)

    p = sub.add_parser("fake-data", help="write small random datasets and pretrained weights in the real formats",
                       description="Write, for every dataset and pretrained timm model the configs use, small random "
                       "data in the on-disk format the loaders read (CIFAR python archives, an ImageNet ImageFolder "
                       "of JPEGs, Vaihingen TIFF tiles and labels) and random model.safetensors files in the Hugging "
                       "Face hub cache layout, marked fake: run a config end to end (`--config scale=smoke "
                       "data_root=DIR`) before downloading anything or spending GPU hours.")
    p.add_argument("--root", required=True, type=Path, help="data root to write under (the configs' data_root)")
    p.add_argument("--hub-cache", type=Path, help="Hugging Face hub cache to write fake timm weights into (use it "
                   "as HF_HUB_CACHE); without it no weights are written")
    p.add_argument("--config", action="append", type=Path, help="config whose datasets and models to write "
                   "(repeatable; default: config/*.yaml and config/paper/*.yaml in the working directory)")
    p.set_defaults(func=_fake_data)

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Exit status: 0 done, 2 bad input (PapaError; an output path naming a folder or under a
    file), 3 training stopped by a signal after a checkpoint, 4 a write the file system refused (full disk, quota,
    read-only; DiskError), 130 interrupted. Each failure is one line on stderr."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PapaError as e:
        print(f"papa {args.command}: error: {e}", file=sys.stderr)
        return e.status
    except OSError as e:  # the machine refused a write: the path, and the space left
        if (line := path_error(e)) is not None:  # --out names a folder, or lies under a file: bad input
            print(f"papa {args.command}: error: {one_line(line)}", file=sys.stderr)
            return PapaError.status
        if (line := write_error(e)) is None:
            raise
        print(f"papa {args.command}: error: {one_line(line)}", file=sys.stderr)
        return DiskError.status
    except KeyboardInterrupt:
        print(f"papa {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
