"""Config files: YAML validated against JSON schemas (papa/schemas/), defaults filled in; each experiment is the
config's ``defaults`` deep-merged with its own keys. Every problem is one PapaError line naming the file and key."""

import copy
import math
import sys
from functools import cache, reduce
from importlib import resources
from operator import getitem
from pathlib import Path
from typing import Any

import yaml

from papa import catalog, fidelity, smoke
from papa.errors import PapaError
from papa.io import write_text
from papa.variants import VARIANTS, averaging_epochs, first_push, swa_start_epoch, zero_based


@cache
def schema(name: str) -> dict:
    """A schema shipped with the package: 'config' or 'experiment'."""
    return yaml.safe_load(resources.files("papa.schemas").joinpath(f"{name}.schema.yaml").read_text())


def resolve(sch: dict, root: dict) -> dict:
    """``sch`` with its local ``$ref`` (``#/a/b``, the only kind) followed, the keys beside it laid over its target,
    ``properties`` one by one (a variant's averaging block sets its defaults over its unit's shared block)."""
    if "$ref" not in sch:
        return sch
    target = resolve(reduce(getitem, sch["$ref"].removeprefix("#/").split("/"), root), root)
    own = {k: v for k, v in sch.items() if k != "$ref"}
    if "properties" in own:
        own["properties"] = {k: {**target.get("properties", {}).get(k, {}), **v}
                             for k, v in {**target.get("properties", {}), **own["properties"]}.items()}
    return {**target, **own}


def fill_defaults(instance: Any, sch: dict, root: dict | None = None) -> None:
    """Write every missing property's ``default`` into ``instance``, in place, recursively (into those written too)."""
    root = sch if root is None else root
    sch = resolve(sch, root)
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


def _message(error) -> str:
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        return f"unknown key {', '.join(map(repr, extra))} (expected one of: {', '.join(allowed)})"
    if error.validator == "enum":
        return f"{error.instance!r} is not one of {', '.join(map(str, error.validator_value))}"
    if error.validator == "anyOf" and all(choice.keys() == {"required"} for choice in error.validator_value):
        return f"needs one of the keys {', '.join(repr(k) for c in error.validator_value for k in c['required'])}"
    return error.message


def _leaf(error):
    """The error to show for a value matching none of a ``oneOf``'s choices: the deepest one (the choice the
    value was meant for), a wrong type or an enum of plain values (for a mapping or list) last."""
    if error.validator != "oneOf" or not error.context:
        return error
    return _leaf(min(error.context, key=lambda e: (-len(e.absolute_path), e.validator == "type" or (
        e.validator == "enum" and isinstance(e.instance, dict | list)))))


def check_finite(instance: Any, where: str, key: str = "") -> None:
    """Refuse NaN and infinity anywhere in a config: no setting means either, and no JSON-schema bound refuses NaN."""
    if isinstance(instance, float) and not math.isfinite(instance):
        raise PapaError(f"{where}: {key or '(top level)'}: {instance} is not a finite number")
    if isinstance(instance, dict | list):
        for k, value in instance.items() if isinstance(instance, dict) else enumerate(instance):
            check_finite(value, where, f"{key}.{k}" if key else str(k))


def validate(instance: Any, name: str, where: str) -> Any:
    """Fill defaults into ``instance`` in place and validate it against schema ``name``; PapaError on failure."""
    sch = schema(name)
    check_finite(instance, where)
    fill_defaults(instance, sch)
    validator = _validator_class()
    errors = validator(sch).iter_errors(instance) if validator else ()
    if (first := min(errors, key=lambda e: list(e.absolute_path), default=None)) is not None:
        e = _leaf(first)
        key = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise PapaError(f"{where}: {key}: {_message(e)}")
    return instance


def load_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        data = path.read_bytes()
        return yaml.safe_load(data.decode())
    except FileNotFoundError:
        raise PapaError(f"{path}: config file not found") from None
    except OSError as e:
        raise PapaError(f"{path}: cannot read config ({e.strerror})") from None
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise PapaError(f"{path}: not UTF-8 text: byte {data[e.start]:#04x} at line {line}, column {column} (save "
                        "the file as UTF-8)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PapaError(f"{path}: malformed YAML{at}: {problem}") from None


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` laid over ``base``: nested dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = deep_merge(out[key], value) if nested else copy.deepcopy(value)
    return out


def _yaml_leaves(value: Any) -> Any:
    """Snakemake reads a list or mapping given with ``--config`` with YAML's base loader, which leaves every
    leaf a string ('[1, 2]' -> ['1', '2']): read the leaves as YAML values."""
    if isinstance(value, list):
        return [_yaml_leaves(v) for v in value]
    if isinstance(value, dict):
        return {k: _yaml_leaves(v) for k, v in value.items()}
    return yaml.safe_load(value) if isinstance(value, str) else value


def with_overrides(raw: dict, overrides: dict, path: str | Path) -> dict:
    """A config file's ``raw`` content with top-level ``overrides`` (``--config KEY=VALUE``; a mapping merges into the
    file's), validated alone first, then merged (``table1.yaml with --config scale=tiny: scale: ...``)."""
    validate(copy.deepcopy(raw), "config", str(path))
    merged = deep_merge(raw, {k: _yaml_leaves(v) if isinstance(v, list | dict) else v for k, v in overrides.items()})
    given = " ".join(f"{k}={v}" for k, v in overrides.items())
    validate(copy.deepcopy(merged), "config", f"{path} with --config {given}")
    return merged


def load_config(path: str | Path, overrides: dict | None = None) -> dict:
    """Read and validate a config file (with top-level ``overrides``, see ``with_overrides``) and its experiments."""
    return _checked(_raw_config(path, overrides), path)


def _checked(raw: dict, path: str | Path) -> dict:
    """A config file's content validated (a copy, ``raw`` left as read), shrunk at smoke scale, experiments checked."""
    config = validate(copy.deepcopy(raw), "config", str(path))
    if config["scale"] == "smoke":
        smoke.scale_config(config)
    for name in config["experiments"]:
        experiment(config, name, path)
    return config


def _raw_config(path: str | Path, overrides: dict | None) -> dict:
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise PapaError(f"{path}: expected a mapping at the top level, found {type(raw).__name__}")
    return with_overrides(raw, overrides, path) if overrides else raw


def workflow_config(configfiles: list, overrides: dict) -> tuple[dict, str, dict[str, str]]:
    """The config of a Snakemake run (one ``--configfile``, ``overrides`` from ``--config``), the config file its
    report jobs read (the file, or ``<results>/<file name>`` with the overrides written in) and the files to write."""
    if len(configfiles) != 1:
        raise PapaError(f"give exactly one config file (--configfile FILE), found {len(configfiles)}")
    path = Path(configfiles[0])
    raw = _raw_config(path, overrides)
    config = _checked(raw, path)
    if not overrides:
        return config, str(path), {}
    given = " ".join(f"{k}={v}" for k, v in overrides.items())
    text = f"# {path} with --config {given} (written by the workflow; edit {path} instead)\n" + yaml.safe_dump(
        raw, sort_keys=False, allow_unicode=True)
    jobs = str(Path(config["results"]) / path.name)
    return config, jobs, {jobs: text}


REPORT_KEYS = ("description", "tables", "figures")  # top-level keys a job's config leaves out (the report's)


def job_configs(configfiles: list, overrides: dict, config: dict) -> tuple[dict[str, str], dict[str, str]]:
    """{experiment: its ``papa`` jobs' config, ``<results>/<experiment>/config.yaml`` (one run trained once for the
    configs sharing it)} and those files {path: text}: the top-level keys (overrides written in), that experiment."""
    path = Path(configfiles[0])
    raw = _raw_config(path, overrides)
    top = {k: v for k, v in raw.items() if k not in (*REPORT_KEYS, "experiments")}
    paths, files = {}, {}
    for name, own in raw["experiments"].items():
        text = f"# experiment {name!r} of {path} for the workflow's jobs (written by the workflow; edit {path} " \
               "instead)\n" + yaml.safe_dump({**top, "experiments": {name: own}}, sort_keys=False, allow_unicode=True)
        paths[name] = str(Path(config["results"]) / name / "config.yaml")
        files[paths[name]] = text
    return paths, files


def write_configs(files: dict[str, str]) -> None:
    """Write the workflow's config files ({path: text}) whose content changed (the others keep their mtime)."""
    for path, text in files.items():
        if not Path(path).is_file() or Path(path).read_bytes() != text.encode():
            write_text(path, text)


def known_experiment(name: str, experiments: dict, where: str | Path) -> None:
    """Refuse a ``name`` that is none of a config's ``experiments``, naming those it defines."""
    if name not in experiments:
        raise PapaError(f"{where}: unknown experiment {name!r} (defined: {', '.join(sorted(experiments))})")


def experiment(config: dict, name: str, path: str | Path = "config") -> dict:
    """Experiment ``name`` of a loaded config: ``defaults`` merged with its keys, validated, shrunk at smoke scale."""
    known_experiment(name, config["experiments"], path)
    where = f"{path}: experiment {name!r}"
    exp = validate(deep_merge(config.get("defaults") or {}, config["experiments"][name] or {}), "experiment", where)
    exp["fidelity"] = fidelity.resolve(exp["fidelity"], f"{where}: fidelity")
    lo, hi = exp["averaging"]["window"]
    if lo >= hi:
        raise PapaError(f"{where}: averaging.window: start {lo} must be before end {hi}")
    if (swa := exp["train"]["swa"]) is not None:
        start, epochs = swa["start"], exp["train"]["epochs"]
        if start >= 1 and start != int(start):
            raise PapaError(f"{where}: train.swa.start: {start} is neither a fraction below 1 nor a whole number of "
                            "epochs")
        if not 0 < (first := swa_start_epoch(exp)) < epochs:
            raise PapaError(f"{where}: train.swa.start: SWA would start after {first} of {epochs} epochs; it needs at "
                            "least one epoch before it and one during it")
    if config.get("scale") == "smoke":
        exp = validate(smoke.scale_experiment(exp, where), "experiment", f"{where} at smoke scale")
    exp["data"]["root"] = str(Path(config["data_root"]) / (exp["data"]["root"] or exp["data"]["dataset"]))
    exp["name"] = name
    exp["scale"] = config.get("scale", "full")
    return exp


def check_averaging_fires(exp: dict, variant: str, steps_per_epoch: int | None = None, where: str = "") -> None:
    """Refuse a run of ``variant`` that would never average (the baseline under another name): an ``epochs``
    variant with no averaging epoch, or (steps per epoch known) a ``steps`` variant that never pushes."""
    prefix = f"{where + ': ' if where else ''}experiment {exp['name']!r}: "
    v, a, epochs = VARIANTS[variant], exp["averaging"], exp["train"]["epochs"]
    if v.unit == "epochs" and not averaging_epochs(exp, variant):
        every = a[variant]["every"]
        if not averaging_epochs(exp, variant, window=(0.0, 1.0)):
            if zero_based(exp):  # fidelity averaging_epochs: authors
                raise PapaError(f"{prefix}averaging.{variant}.every: {every} + 1 >= train.epochs ({epochs}): "
                                f"{variant} would never average (after epochs k+1, 2k+1, ... as the authors' "
                                "scripts count, never after the last)")
            raise PapaError(f"{prefix}averaging.{variant}.every: {every} >= train.epochs ({epochs}): {variant} "
                            "would never average (at the end of every k-th epoch, never after the last)")
        raise PapaError(f"{prefix}averaging.window: {a['window']} of {epochs} epochs holds no {variant} averaging "
                        f"(every {every} epochs, never after the last)")
    if v.unit == "steps" and steps_per_epoch is not None and first_push(exp, variant, steps_per_epoch) is None:
        total = epochs * steps_per_epoch
        lo, hi = a["window"]
        raise PapaError(f"{prefix}averaging.{variant}.every: {a[variant]['every']} steps: {v.label} would never "
                        f"push in averaging.window {a['window']} (steps {int(lo * total) + 1}-{int(hi * total)} of "
                        f"{total})")


def missing_data(exp: dict) -> str | None:
    """Why the experiment's dataset files are missing (papa.catalog: cheap, no torch), or None when they are there."""
    return catalog.missing(exp["data"]["dataset"], exp["data"]["root"])
