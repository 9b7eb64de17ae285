"""``papa export``: one network of a run as a folder, ``model.safetensors`` (REPAIR's biases folded, papa.fold),
``config.json`` (timm's ``save_for_hf`` for a timm model, papa's description under ``papa``) and ``README.md``
(papa.card); ``load_soup`` / ``load_model`` give a network back as a plain ``nn.Module`` (docs/interfaces.md)."""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.modules.conv import _ConvNd

from papa.card import model_card
from papa.checkpoint import load_tensors, versions
from papa.errors import PapaError
from papa.fold import fold_biases
from papa.io import current_umask, file_digest, need_file
from papa.models import TIMM_PREFIX, create_model
from papa.population import Population
from papa.provenance import code_version
from papa.rng import generator
from papa.runs import input_spec, load_data, soup_state
from papa.soups import SOUPS

SOUP = "greedy_soup_repair"  # what ``papa export`` writes by default
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
FORMAT = 1  # the version of the ``papa`` description in config.json
PROBE_SIDE = 64  # the probe's side for a network taking any image size (U-Net): enough for its pools


def probe(spec: dict) -> torch.Tensor:
    """Two random images of the network's input size (at most PROBE_SIDE): what papa.fold runs it on."""
    h, w = spec["input"]["size"]
    if spec["input"]["kind"] == "segmentation":
        h, w = min(h, PROBE_SIDE), min(w, PROBE_SIDE)
    return torch.randn(2, spec["input"]["channels"], h, w, generator=generator("export-probe"))


def architecture(spec: dict) -> nn.Module:
    return create_model(spec["model"], num_classes=len(spec["classes"]), in_channels=spec["input"]["channels"],
                        **spec["kwargs"]).eval()


@dataclass
class RunFiles:
    """A run's population, soups and metrics, checked to come from the same training."""
    dir: Path
    meta: dict  # population.safetensors's metadata
    population: dict[str, torch.Tensor]  # stacked (p, ...)
    soups: dict[str, torch.Tensor]  # prefixed <soup>.
    soups_meta: dict
    metrics: dict
    digests: dict[str, str]


def read_run(run_dir: str | Path) -> RunFiles:
    """The files of a trained, souped and evaluated run; PapaError when one is missing, unreadable or stale."""
    run = Path(run_dir)
    if not run.is_dir():
        raise PapaError(f"{run}: no such run directory")
    population = need_file(run / "population.safetensors", "papa train")
    soups = need_file(run / "soups.safetensors", "papa soups --evaluate")
    metrics_path = need_file(run / "metrics.json", "papa evaluate")
    tensors, meta = load_tensors(population)
    soup_tensors, soups_meta = load_tensors(soups)
    if not isinstance(meta.get("config"), dict):
        raise PapaError(f"{population}: no experiment config in its metadata (not written by `papa train`?)")
    digests = {"population_sha256": file_digest(population), "soups_sha256": file_digest(soups)}
    if soups_meta.get("population_sha256") != digests["population_sha256"]:
        raise PapaError(f"{soups} is stale: made from another population than {population}; run `papa soups "
                        "--evaluate` on this run again")
    metrics = _read_json(metrics_path)
    if not isinstance(metrics, dict) or any(metrics.get(k) != v for k, v in digests.items()):
        raise PapaError(f"{metrics_path} is stale: computed from another population or other soups than the ones "
                        f"in {run}; run `papa evaluate` on this run again")
    return RunFiles(run, meta, tensors, soup_tensors, soups_meta, metrics, digests)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PapaError(f"{path}: unreadable ({e})") from None


def run_spec(files: RunFiles) -> dict:
    """A run's model, kwargs and ``input_spec`` (from the dataset for a run whose metadata lacks them)."""
    meta, exp = files.meta, files.meta["config"]
    data = meta if "input" in meta and "classes" in meta else input_spec(exp, load_data(exp))
    return {"format": FORMAT, "library": "papa", "model": exp["model"]["name"], "kwargs": exp["model"]["kwargs"],
            "input": data["input"], "classes": data["classes"]}


def _dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    return next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)


def _bias_free(model: nn.Module, name: str) -> bool:
    layer = dict(model.named_modules(remove_duplicate=False)).get(name)
    return isinstance(layer, nn.Linear | _ConvNd) and layer.bias is None


def _module(stock: nn.Module, state: dict[str, torch.Tensor], where: Path) -> tuple[nn.Module, list[str]]:
    """``stock`` holding ``state``, and the layers ``state`` gives a bias ``stock`` lacks (REPAIR's); else PapaError."""
    own = stock.state_dict()
    added = sorted(k.removesuffix(".bias") for k in state.keys() - own.keys()
                   if k.endswith(".bias") and _bias_free(stock, k.removesuffix(".bias")))
    problems = {"missing": sorted(own.keys() - state.keys()),
                "unexpected": sorted(state.keys() - own.keys() - {f"{n}.bias" for n in added}),
                "of another shape": sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)}
    if any(problems.values()):
        found = [f"{what} {names[:3]}" for what, names in problems.items() if names]
        raise PapaError(f"{where}: the tensors do not fit the run's architecture: {'; '.join(found)}")
    return Population.from_modules([stock]).module_from_state(state).eval(), added


def to_architecture(state: dict[str, torch.Tensor], spec: dict, where: str | Path = "the network"):
    """``spec``'s architecture (eval mode) holding ``state``, REPAIR's biases folded where exact
    (papa.fold.fold_biases on ``probe(spec)``), and the papa.fold.Fold saying which were folded and which kept."""
    module, added = _module(architecture(spec), state, where)
    return fold_biases(module, added, probe(spec).to(_dtype(state)))  # a copy of module: in eval mode


def describe(files: RunFiles, soup: str | None, member: int | None) -> dict:
    """config.json's ``network``: which network of the run this is (a member when ``soup`` is None), how well it did."""
    m, meta, soups = files.metrics, files.meta, files.soups_meta
    segmentation = "f1_members" in m
    if member is not None:
        members, test = [member], m["members"][member]
        val = (m.get("val_members") or [None] * (member + 1))[member]
    else:
        members = list(soups["greedy_soup_members"]) if soup.startswith("greedy") else list(range(len(m["members"])))
        val, test = soups.get("val_accuracy", {}).get(soup), m[soup]
    out = {"experiment": meta.get("experiment"), "variant": meta.get("variant"), "seed": meta.get("seed"),
           "population": len(m["members"]), "soup": soup, "member": member, "members": members,
           # a one-member soup is that member, never REPAIRed (papa.soups.make_soups)
           "repaired": bool(soup and soup.endswith("_repair") and len(members) > 1),
           "aligned": bool(soup and soups.get("aligned", False)),
           "metric": "pixel accuracy" if segmentation else "accuracy", "test_accuracy": test, "val_accuracy": val}
    if segmentation:
        f1 = m["f1_members"][member]["average"] if member is not None else m.get(f"{soup}_f1_average")
        out["test_f1_average"] = f1
    return out


def network(files: RunFiles, soup: str | None = None, member: int | None = None) -> tuple[nn.Module, dict]:
    """Soup ``soup`` (default SOUP) or member ``member`` of a run as a plain module of its architecture (eval mode,
    on the CPU), REPAIR's biases folded where exact, and config.json's description of it."""
    if soup is not None and member is not None:
        raise PapaError("give a soup or a member, not both")
    if member is None:
        soup = soup or SOUP
        where = files.dir / "soups.safetensors"
        if soup not in SOUPS:
            raise PapaError(f"no soup {soup!r}; a run's soups are {', '.join(SOUPS)}")
        state = soup_state(files.soups, soup, where)
    else:
        where = files.dir / "population.safetensors"
        p = int(files.meta.get("population") or next(iter(files.population.values())).shape[0])
        if not 0 <= member < p:
            raise PapaError(f"no member {member}: the population of {files.dir} has {p} members (0 to {p - 1})")
        state = {k: v[member] for k, v in files.population.items()}
    spec = run_spec(files)
    folded, fold = to_architecture(state, spec, where)
    return folded, spec | {
        "biases": {"folded": fold.folded, "kept": fold.kept, "note": fold.note},
        "network": describe(files, soup, member), "run": dict(files.digests), "config": files.meta["config"],
        "versions": files.meta.get("versions", {}),
        "code": files.meta.get("code"),  # the code version that trained it (papa.provenance)
        "exported_with": versions() | {"code": code_version()},
    }


def load_soup(run_dir: str | Path, name: str = SOUP, device: str | torch.device = "cpu") -> nn.Module:
    """Soup ``name`` (one of papa.soups.SOUPS) of a run as a plain ``nn.Module`` in eval mode on ``device``: what
    ``papa export`` writes (the soup's outputs to float rounding); PapaError when its soups or metrics are stale."""
    return network(read_run(run_dir), soup=name)[0].to(device)


def _is_export(path: Path) -> bool:
    """Whether ``path`` is a folder ``export`` may replace: empty, or an earlier export and nothing else."""
    if not path.is_dir() or path.is_symlink():
        return False
    names = {p.name for p in path.iterdir()}
    if CONFIG not in names or not names <= {WEIGHTS, CONFIG, CARD}:
        return not names  # no earlier export: only an empty folder may go
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("library") == "papa" or isinstance(config.get("papa"), dict))


@contextlib.contextmanager
def write_folder(out: str | Path) -> Iterator[Path]:
    """Create folder ``out`` atomically: the block writes into a temporary sibling, renamed into place once complete
    (replacing an earlier export; anything else there is refused). On failure nothing is left but what was there."""
    out = Path(out)
    if out.exists() and not _is_export(out):
        raise PapaError(f"{out} exists and is not a papa export; give another --out, or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = None
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb+") as handle:
                os.fsync(handle.fileno())
            os.chmod(f, 0o666 & ~current_umask())
        os.chmod(tmp, 0o777 & ~current_umask())
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old.tmp"))
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    finally:
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)


def _timm_data_config(spec: dict) -> dict:
    i = spec["input"]
    config = {"input_size": (i["channels"], *i["size"]), "mean": tuple(i["mean"]), "std": tuple(i["std"]),
              "crop_pct": i["crop_pct"], "crop_mode": "center"}
    return config | ({"interpolation": i["interpolation"]} if i["interpolation"] else {})


def save(module: nn.Module, spec: dict, out: str | Path) -> None:
    """Write ``module`` (``spec``'s architecture plus the biases ``spec['biases']['kept']`` names), its description and
    model card as export folder ``out``, through a fresh network loaded with ``strict=True``: what is written loads."""
    stock = loaded(architecture(spec), spec, module.state_dict())
    with write_folder(out) as tmp:
        if spec["model"].startswith(TIMM_PREFIX):
            from timm.models import save_for_hf
            try:
                save_for_hf(stock, str(tmp), model_config={"papa": spec, "label_names": spec["classes"]},
                            safe_serialization=True, data_config=_timm_data_config(spec))
            except (ValueError, TypeError) as e:
                raise PapaError(f"timm cannot write {spec['model']}: {e}") from None
        else:
            state = {k: v.detach().cpu().contiguous() for k, v in stock.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
            (tmp / CONFIG).write_text(json.dumps(spec, indent=2) + "\n")
        (tmp / CARD).write_text(model_card(spec))


def export(run_dir: str | Path, out: str | Path, soup: str | None = None, member: int | None = None) -> dict:
    """``papa export``: soup ``soup`` (default SOUP) or member ``member`` as folder ``out``; config.json's ``papa``."""
    module, spec = network(read_run(run_dir), soup, member)
    save(module, spec, out)
    return spec


def loaded(model: nn.Module, spec: dict, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> nn.Module:
    """``model`` holding ``state``, loaded strictly in ``dtype`` (default: ``state``'s) once each layer
    ``spec['biases']['kept']`` names (bias-free in ``model``) has a bias shaped as in ``state``."""
    for name in spec["biases"]["kept"]:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise PapaError(f"the export keeps a bias for layer {name!r}, which its architecture lacks") from None
        if getattr(layer, "bias", None) is None and f"{name}.bias" in state:
            layer.bias = nn.Parameter(torch.zeros_like(state[f"{name}.bias"]))
    model.to(dtype or _dtype(state)).load_state_dict(state, strict=True)
    return model


def read_spec(path: str | Path) -> dict:
    """The ``papa`` description of an export folder (config.json, or its ``papa`` entry for a timm model)."""
    config_path = Path(path) / CONFIG
    if not config_path.is_file():
        raise PapaError(f"{path}: not a papa export (no {CONFIG})")
    config = _read_json(config_path)
    spec = config.get("papa", config) if isinstance(config, dict) else None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise PapaError(f"{config_path}: not written by `papa export` (format {FORMAT})")
    return spec


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """The network of an export folder as an ``nn.Module`` in eval mode on ``device``, floating tensors of ``dtype``
    (default: as saved): papa's architectures from config.json, timm's by ``timm.create_model("local-dir:PATH")``."""
    path, spec = Path(path), read_spec(path)
    try:
        state = load_file(str(path / WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise PapaError(f"{path / WEIGHTS}: unreadable ({e})") from None
    if spec["model"].startswith(TIMM_PREFIX):
        import timm
        model = timm.create_model(f"local-dir:{path}", pretrained=False)
    else:
        model = architecture(spec)
    try:
        loaded(model, spec, state, dtype)
    except RuntimeError as e:
        raise PapaError(f"{path / WEIGHTS}: does not fit {spec['model']} ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()
