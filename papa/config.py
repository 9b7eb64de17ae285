"""Config files: YAML validated against JSON schemas (papa/schemas/), with defaults filled in.

A config file (config/*.yaml) holds experiments; each experiment is ``defaults`` deep-merged with its
own overrides and must satisfy experiment.schema.yaml. Every problem becomes one PapaError line that
names the file and the offending key.
"""

from __future__ import annotations

import copy
import sys
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from papa import smoke
from papa.errors import PapaError
from papa.io import write_text

if TYPE_CHECKING:
    import jsonschema

VARIANTS = ("baseline", "papa", "papa-all", "papa-2")


@cache
def schema(name: str) -> dict:
    """A schema shipped with the package: 'config' or 'experiment'."""
    text = resources.files("papa.schemas").joinpath(f"{name}.schema.yaml").read_text()
    return yaml.safe_load(text)


def _resolve(sch: dict, root: dict) -> dict:
    """``sch`` with its local ``$ref`` (``#/a/b``) followed: the schemas use no other kind."""
    while "$ref" in sch:
        target = root
        for part in sch["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        sch = target
    return sch


def fill_defaults(instance: Any, sch: dict, root: dict | None = None) -> Any:
    """Write every missing property's ``default`` into ``instance``, in place and recursively (into the
    defaults just written too), following ``properties``, ``additionalProperties``, ``items`` and local
    ``$ref``s: where the schemas keep their defaults (tests/pipeline/test_gpu_script.py checks that no default lies
    elsewhere). Nothing is checked here; ``validate`` does both."""
    root = sch if root is None else root
    sch = _resolve(sch, root)
    if isinstance(instance, dict):
        props = sch.get("properties", {})
        for key, sub in props.items():
            if "default" in sub and key not in instance:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                fill_defaults(instance[key], sub, root)
        extra = sch.get("additionalProperties")
        if isinstance(extra, dict):
            for key in instance.keys() - props.keys():
                fill_defaults(instance[key], extra, root)
    elif isinstance(instance, list) and isinstance(sch.get("items"), dict):
        for item in instance:
            fill_defaults(item, sch["items"], root)
    return instance


@cache
def _validator_class():
    """jsonschema's validator, or None where jsonschema is not installed (the GPU benchmark machine's image,
    benchmarks/gpu.sh): configs then get their defaults but no checks, and a warning says so once."""
    try:
        import jsonschema
    except ModuleNotFoundError:
        print("papa: warning: jsonschema is not installed: configs get their defaults but are not checked",
              file=sys.stderr)
        return None
    return jsonschema.Draft202012Validator


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        return f"unknown key {', '.join(map(repr, extra))} (expected one of: {', '.join(allowed)})"
    if error.validator == "enum":
        return f"{error.instance!r} is not one of {', '.join(map(str, error.validator_value))}"
    if error.validator == "oneOf" and error.context:
        return min(error.context, key=lambda e: len(list(e.absolute_path))).message
    return error.message


def validate(instance: Any, name: str, where: str) -> Any:
    """Fill defaults into ``instance`` in place and validate it against schema ``name``; PapaError on failure."""
    sch = schema(name)
    fill_defaults(instance, sch)
    validator = _validator_class()
    if validator is None:
        return instance
    errors = sorted(validator(sch).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        raise PapaError(f"{where}: {_key_path(e)}: {_message(e)}")
    return instance


def load_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PapaError(f"{path}: config file not found") from None
    except OSError as e:
        raise PapaError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PapaError(f"{path}: malformed YAML{at}: {problem}") from None


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` laid over ``base``: nested dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _mapping(raw: Any, path: str | Path) -> dict:
    if not isinstance(raw, dict):
        raise PapaError(f"{path}: expected a mapping at the top level, found {type(raw).__name__}")
    return raw


def _yaml_leaves(value: Any) -> Any:
    """Snakemake reads a list or mapping given with ``--config`` with YAML's base loader, which leaves every
    leaf a string ('[1, 2]' -> ['1', '2']): read the leaves as YAML values."""
    if isinstance(value, list):
        return [_yaml_leaves(v) for v in value]
    if isinstance(value, dict):
        return {k: _yaml_leaves(v) for k, v in value.items()}
    return yaml.safe_load(value) if isinstance(value, str) else value


def with_overrides(raw: dict, overrides: dict, path: str | Path) -> dict:
    """A config file's content ``raw`` with top-level keys set from ``overrides`` (Snakemake's ``--config
    KEY=VALUE``; a mapping merges into the file's), validated like the file: the file alone first, then with
    the overrides, whose errors name them (``table1.yaml with --config scale=tiny: scale: ...``)."""
    validate(copy.deepcopy(raw), "config", str(path))
    merged = {**raw}
    for key, value in overrides.items():
        value = _yaml_leaves(value) if isinstance(value, list | dict) else value
        merged[key] = deep_merge(raw[key], value) if isinstance(value, dict) and isinstance(raw.get(key), dict) \
            else value
    given = " ".join(f"{k}={v}" for k, v in overrides.items())
    validate(copy.deepcopy(merged), "config", f"{path} with --config {given}")
    return merged


def load_config(path: str | Path, overrides: dict | None = None) -> dict:
    """Read and validate a config file (with top-level ``overrides``, see ``with_overrides``), and every
    experiment in it; at ``scale: smoke`` the config is shrunk by papa.smoke's rule."""
    return _checked(_raw_config(path, overrides), path)


def _raw_config(path: str | Path, overrides: dict | None) -> dict:
    raw = _mapping(load_yaml(path), path)
    return with_overrides(raw, overrides, path) if overrides else raw


def _checked(raw: dict, path: str | Path) -> dict:
    config = validate(copy.deepcopy(raw), "config", str(path))
    if config["scale"] == "smoke":
        smoke.scale_config(config)
    for name in config["experiments"]:
        experiment(config, name, path)
    return config


def workflow_config(configfiles: list, overrides: dict) -> tuple[dict, str]:
    """The config of a Snakemake run and the config file its ``papa`` jobs read (one path for every job).

    Exactly one config file (``--configfile``); ``overrides`` are Snakemake's ``--config KEY=VALUE`` (top-level
    keys), validated like the file. Without overrides the jobs read the file itself. With them, they read the
    file with the overrides written in: ``<results>/<file name>`` (at smoke scale ``<results>/smoke/...``),
    rewritten only when its content changes, so that tables re-render only when the config did."""
    if len(configfiles) != 1:
        raise PapaError(f"give exactly one config file (--configfile FILE), found {len(configfiles)}")
    path = Path(configfiles[0])
    raw = _raw_config(path, overrides)
    config = _checked(raw, path)
    if not overrides:
        return config, str(path)
    given = " ".join(f"{k}={v}" for k, v in overrides.items())
    text = f"# {path} with --config {given} (written by the workflow; edit {path} instead)\n" + yaml.safe_dump(
        raw, sort_keys=False, allow_unicode=True)
    jobs = Path(config["results"]) / path.name
    _write_if_changed(jobs, text)
    return config, str(jobs)


def _write_if_changed(path: Path, text: str) -> None:
    """Write a config file for the workflow's jobs only when its content changes (its mtime then stays)."""
    if not path.is_file() or path.read_text() != text:
        write_text(path, text)


# the top-level keys a job's config leaves out: the report's, and the description of the whole config
REPORT_KEYS = ("description", "tables", "figures")


def job_configs(configfiles: list, overrides: dict, config: dict) -> dict[str, str]:
    """{experiment: the config file its ``papa`` jobs read}: ``<results>/<experiment>/config.yaml``, the config's
    top-level keys (with the ``--config`` overrides written in) and that experiment alone, rewritten only when
    its content changes. The path depends on the experiment, not on the config file, so a run that several
    configs share (Table 1's in Tables 6-9 and 18) is not trained again when another config names it: the
    workflow reruns a step when the experiment's settings change (its ``settings`` param), not the file name."""
    path = Path(configfiles[0])
    raw = _raw_config(path, overrides)
    top = {k: v for k, v in raw.items() if k not in (*REPORT_KEYS, "experiments")}
    out = {}
    for name, own in raw["experiments"].items():
        text = f"# experiment {name!r} of {path} for the workflow's jobs (written by the workflow; edit {path} " \
               "instead)\n" + yaml.safe_dump({**top, "experiments": {name: own}}, sort_keys=False, allow_unicode=True)
        jobs = Path(config["results"]) / name / "config.yaml"
        _write_if_changed(jobs, text)
        out[name] = str(jobs)
    return out


def swa_start_epoch(exp: dict) -> int | None:
    """The first SWA epoch (0-based; epochs before it run the regular schedule), or None without SWA."""
    swa = exp["train"]["swa"]
    if swa is None:
        return None
    start = swa["start"]
    return round(start * exp["train"]["epochs"]) if start < 1 else int(start)


def experiment(config: dict, name: str, path: str | Path = "config") -> dict:
    """Experiment ``name`` of a loaded config: defaults merged with its overrides, validated (and at smoke scale
    shrunk, papa.smoke), with ``data.root`` resolved against ``data_root`` and ``name`` and ``scale`` added."""
    if name not in config["experiments"]:
        known = ", ".join(sorted(config["experiments"]))
        raise PapaError(f"{path}: unknown experiment {name!r} (defined: {known})")
    exp = deep_merge(config.get("defaults") or {}, config["experiments"][name] or {})
    exp = validate(exp, "experiment", f"{path}: experiment {name!r}")
    lo, hi = exp["averaging"]["window"]
    if lo >= hi:
        raise PapaError(f"{path}: experiment {name!r}: averaging.window: start {lo} must be before end {hi}")
    swa = exp["train"]["swa"]
    if swa is not None:
        start, epochs = swa["start"], exp["train"]["epochs"]
        if start >= 1 and start != int(start):
            raise PapaError(f"{path}: experiment {name!r}: train.swa.start: {start} is neither a fraction below 1 "
                            "nor a whole number of epochs")
        first = swa_start_epoch(exp)
        if not 0 < first < epochs:
            raise PapaError(f"{path}: experiment {name!r}: train.swa.start: SWA would start after {first} of "
                            f"{epochs} epochs; it needs at least one epoch before it and one during it")
    if config.get("scale") == "smoke":
        exp = validate(smoke.scale_experiment(exp, f"{path}: experiment {name!r}"), "experiment",
                       f"{path}: experiment {name!r} at smoke scale")
    data = exp["data"]
    root = Path(data["root"] or data["dataset"])
    data["root"] = str(root if root.is_absolute() else Path(config["data_root"]) / root)
    exp["name"] = name
    exp["scale"] = config.get("scale", "full")
    return exp


def averaging_epochs(exp: dict, variant: str) -> list[int]:
    """The epochs after which PAPA-all / PAPA-2 average (1-based): every ``every``-th epoch but the last, and
    the first with ``from_start``, inside ``averaging.window`` (papa.averagers.Replace.due_after_epoch; a test
    keeps the two the same)."""
    epochs, (lo, hi) = exp["train"]["epochs"], exp["averaging"]["window"]
    every, from_start = exp["averaging"][variant]["every"], exp["averaging"][variant].get("from_start", False)
    return [e for e in range(1, epochs)
            if (e % every == 0 or (from_start and e == 1)) and lo * epochs < e <= hi * epochs]


def first_push(exp: dict, steps_per_epoch: int) -> int | None:
    """The first optimizer step after which PAPA pushes (papa.averagers.Push.due_after_step), None if none."""
    total, (lo, hi) = exp["train"]["epochs"] * steps_per_epoch, exp["averaging"]["window"]
    every = exp["averaging"]["papa"]["every"]
    step = every * (int(lo * total) // every + 1)  # the first multiple of `every` past the window's start
    return step if step <= min(hi * total, total) else None


def check_averaging_fires(exp: dict, variant: str, steps_per_epoch: int | None = None, where: str = "") -> None:
    """Refuse a PAPA-all / PAPA-2 experiment whose averaging can never happen (``every`` >= epochs, or a window
    holding no averaging epoch) and, once the steps per epoch are known, a PAPA whose pushes never happen: such
    a run would be the baseline under another name. Only the variant being trained is checked: an experiment
    is shared by variants, and the others' settings do not matter to it."""
    prefix = f"{where + ': ' if where else ''}experiment {exp['name']!r}: "
    a, epochs = exp["averaging"], exp["train"]["epochs"]
    if variant in ("papa-all", "papa-2") and not averaging_epochs(exp, variant):
        every = a[variant]["every"]
        if every >= epochs:
            raise PapaError(f"{prefix}averaging.{variant}.every: {every} >= train.epochs ({epochs}): {variant} "
                            "would never average (at the end of every k-th epoch, never after the last)")
        raise PapaError(f"{prefix}averaging.window: {a['window']} of {epochs} epochs holds no {variant} averaging "
                        f"(every {every} epochs, never after the last)")
    if variant == "papa" and steps_per_epoch is not None and first_push(exp, steps_per_epoch) is None:
        total = epochs * steps_per_epoch
        lo, hi = a["window"]
        raise PapaError(f"{prefix}averaging.papa.every: {a['papa']['every']} steps: PAPA would never push in "
                        f"averaging.window {a['window']} (steps {int(lo * total) + 1}-{int(hi * total)} of {total})")


# where each dataset's loader (papa.data) looks under data.root (folders, and files: names with a suffix), and
# its message when that is not there; a test keeps these the same as the loaders' own
_DATA_LAYOUT = {
    "optdigits": (["optdigits.tra", "optdigits.tes"], "UCI optdigits not found: expected the file {} (UCI's "
                  "comma-separated optdigits.tra and optdigits.tes)"),
    "cifar10": (["cifar-10-batches-py"], "CIFAR-10 not found: expected {} (python version archive, extracted)"),
    "cifar100": (["cifar-100-python"], "CIFAR-100 not found: expected {} (python version archive, extracted)"),
    "imagenet": (["train", "val"], "ImageNet {name} not found: expected an image folder tree at {} (<class>/<image>)"),
    "vaihingen": (["top"], "Vaihingen not found: expected the tile folder {}"),
}


def missing_data(exp: dict) -> str | None:
    """Why the experiment's dataset cannot be loaded, when its folders are not there (a cheap check, without
    torch, for the workflow to fail before any job starts); None when they are."""
    layout = _DATA_LAYOUT.get(exp["data"]["dataset"])
    if layout is None:  # digits: embedded in scikit-learn
        return None
    paths, message = layout
    for name in paths:
        path = Path(exp["data"]["root"]) / name
        if not (path.is_file() if Path(name).suffix else path.is_dir()):
            return message.format(path, name=name)
    return None


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise PapaError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return variant
