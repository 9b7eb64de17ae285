"""The model card of an exported network (README.md of the export folder): Markdown with the YAML front matter
the Hugging Face Hub reads (library, license, tags, the test accuracy as a model-index result)."""

import yaml

from papa.models import TIMM_PREFIX
from papa.provenance import describe as describe_code

PROJECT_LICENSE = "mit"
PAPER_URL = "https://openreview.net/forum?id=cPDVjsOytS"
BIBTEX = """@article{jolicoeurmartineau2024papa,
  title   = {PopulAtion Parameter Averaging ({PAPA})},
  author  = {Jolicoeur-Martineau, Alexia and Gervais, Emy and Fatras, Kilian and Zhang, Yan and
             Lacoste-Julien, Simon},
  journal = {Transactions on Machine Learning Research},
  issn    = {2835-8856},
  year    = {2024},
  url     = {https://openreview.net/forum?id=cPDVjsOytS}
}"""

SOUP_NAMES = {"avg_soup": "average soup", "greedy_soup": "greedy soup"}
# how a dataset's raw values become the [0, 1] pixels the normalization applies to, where it is not 8 bits / 255
PIXELS = {"digits": "scikit-learn's 8x8 digits (`sklearn.datasets.load_digits`), values 0-16 divided by 16"}


def network_name(n: dict) -> str:
    """'greedy soup with REPAIR', 'member 2'."""
    if n["member"] is not None:
        return f"member {n['member']}"
    return SOUP_NAMES[n["soup"].removesuffix("_repair")] + (" with REPAIR" if n["soup"].endswith("_repair") else "")


def _license(spec: dict) -> str:
    """The project's license for a network trained from scratch; for one fine-tuned from timm's pretrained weights,
    theirs (timm's pretrained config); else 'other'."""
    pretrained = spec["config"]["model"].get("pretrained")
    if pretrained is None:
        return PROJECT_LICENSE
    if str(pretrained) == "timm" and spec["model"].startswith(TIMM_PREFIX):
        from papa.models.pretrained import timm_pretrained_cfg
        cfg = timm_pretrained_cfg(spec["model"].removeprefix(TIMM_PREFIX))
        return getattr(cfg, "license", None) or "other"
    return "other"


def front_matter(spec: dict) -> dict:
    n, i = spec["network"], spec["input"]
    task = "image-segmentation" if i["kind"] == "segmentation" else "image-classification"
    name = f"{n['experiment']}-{n['variant']}-seed{n['seed']}-" + (n["soup"] or f"member{n['member']}")
    tags = ["papa", "model-soup", "weight-averaging", i["dataset"], n["variant"]] + ["repair"] * n["repaired"]
    matter = {"library_name": "timm" if spec["model"].startswith(TIMM_PREFIX) else "pytorch",
              "license": _license(spec), "pipeline_tag": task, "tags": list(dict.fromkeys(tags))}
    if n["test_accuracy"] is not None:
        matter["model-index"] = [{"name": name, "results": [{
            "task": {"type": task},
            "dataset": {"name": i["dataset"], "type": i["dataset"], "split": "test"},
            "metrics": [{"type": "accuracy" if n["metric"] == "accuracy" else "pixel_accuracy",
                         "value": round(float(n["test_accuracy"]), 4), "name": f"Test {n['metric']} (%)"}],
        }]}]
    return matter


def _percent(value) -> str:
    return "not measured" if value is None else f"{value:.2f}%"


def _input_text(spec: dict) -> str:
    i = spec["input"]
    h, w = i["size"]
    pixels = PIXELS.get(i["dataset"], "8-bit values divided by 255")
    if i["kind"] == "segmentation":
        shape = f"whole tiles of any size ({i['channels']} channels; trained on {h}x{w} patches); logits per pixel"
    elif i["kind"] == "folder":
        shape = (f"{i['channels']} x {h} x {w}: resized ({i['interpolation']}) so the crop is {i['crop_pct']:.3f} of "
                 "the shorter side, then centre-cropped")
    else:
        shape = f"{i['channels']} x {h} x {w}" + (f" (resized {i['interpolation']})" if i["interpolation"] else "")
    return (f"- Data: `{i['dataset']}`; {len(spec['classes'])} classes, one logit each, in this order: "
            f"{', '.join(spec['classes'][:20])}{', ...' if len(spec['classes']) > 20 else ''}.\n"
            f"- Input: float32 (N, C, H, W), {shape}.\n"
            f"- Pixels: in [0, 1] ({pixels}), then per channel (x - mean) / std with\n"
            f"  mean = {[round(v, 6) for v in i['mean']]}, std = {[round(v, 6) for v in i['std']]}.\n")


def _usage(spec: dict) -> str:
    if spec["model"].startswith(TIMM_PREFIX):
        code = ('import timm\n\nmodel = timm.create_model("local-dir:PATH", pretrained=True).eval()  # no papa needed\n'
                'config = timm.data.resolve_data_config({}, model=model)  # the size and normalization above\n'
                'transform = timm.data.create_transform(**config)  # PIL image -> normalized tensor')
        if spec["biases"]["kept"]:
            code = ('import papa  # this export keeps biases the stock architecture lacks: timm alone refuses it\n\n'
                    'model = papa.load_model("PATH")')
    else:
        code = f'import papa\n\nmodel = papa.load_model("PATH")  # {spec["model"]}, eval mode; device= to move it'
    return f"```python\n{code}\n```\n"


def _biases_text(spec: dict) -> str:
    b = spec["biases"]
    if not b["folded"] and not b["kept"]:
        return "The network has exactly its architecture's tensors (REPAIR added no bias to it).\n"
    text = ""
    if b["folded"]:
        text += (f"REPAIR gave {len(b['folded'])} bias-free layers a bias b; each feeds a BatchNorm and nothing "
                 "else, so b is folded into that BatchNorm's running mean (mu - b): the outputs are the soup's in "
                 "eval mode, and in train mode too (the batch mean absorbs b; the running mean stays b below the "
                 "soup's).\n")
    if b["kept"]:
        why = b.get("note") or "no BatchNorm alone takes their output"
        text += (f"\nKept ({why}): the biases of {', '.join(b['kept'])}. The stock architecture has no such "
                 "tensors; `papa.load_model` gives those layers a bias before loading.\n")
    return text


def model_card(spec: dict) -> str:
    """The README.md of an export folder, from its description (config.json's ``papa`` part)."""
    n = spec["network"]
    kwargs = ", ".join(f"{k}={v!r}" for k, v in spec["kwargs"].items())
    arch = f"`{spec['model']}`" + (f" ({kwargs})" if kwargs else "")
    if n["member"] is not None:
        what = f"Member {n['member']} of the population, as trained."
    else:
        avg = "the uniform average of members " + ", ".join(map(str, n["members"])) + f" of {n['population']}"
        aligned = ", each permutation-aligned to the soup before it was added" if n["aligned"] else ""
        what = (f"The {network_name(n)}: {avg}{aligned}" + (", then REPAIRed" if n["repaired"] else "")
                + ("" if len(n["members"]) > 1 else " (a one-member soup is that member, not REPAIRed)") + ".")
    rows = [("Experiment", f"`{n['experiment']}`"), ("Variant", n["variant"]), ("Seed", n["seed"]),
            ("Population", f"p = {n['population']}"), ("Network", f"`{n['soup'] or 'member'}`: {what}"),
            ("REPAIR", "yes" if n["repaired"] else "no"), ("Architecture", arch),
            (f"Test {n['metric']}", f"{_percent(n['test_accuracy'])} (metrics.json of the run)"),
            (f"Validation {n['metric']}", _percent(n["val_accuracy"]))]
    if "test_f1_average" in n:
        rows.append(("Test mean F1", _percent(n["test_f1_average"])))
    table = "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    code = describe_code(spec.get("code")) or "not recorded"
    code_versions = f"- papa code: {code}\n" + "".join(f"- {k}: {v}\n" for k, v in spec["versions"].items())
    config = yaml.safe_dump(spec["config"], sort_keys=False).rstrip()
    return (
        "---\n" + yaml.safe_dump(front_matter(spec), sort_keys=False) + "---\n\n"
        f"# {n['experiment']} / {n['variant']} / seed {n['seed']}: {network_name(n)}\n\n"
        f"One network made by `papa` with PopulAtion Parameter Averaging (PAPA, [paper]({PAPER_URL})): "
        f"{what[0].lower() + what[1:]} The population of {n['population']} `{spec['model']}` networks was trained with "
        f"the `{n['variant']}` variant, seed {n['seed']}.\n\n"
        f"{table}\n"
        f"## Input and output\n\n{_input_text(spec)}\n"
        f"## Use\n\n{_usage(spec)}\n"
        f"## REPAIR's biases\n\n{_biases_text(spec)}\n"
        f"## Training configuration\n\nThe experiment as the run read it:\n\n```yaml\n{config}\n```\n\n"
        f"## Code version\n\nTrained with:\n\n{code_versions}\n"
        f"## Citation\n\n```bibtex\n{BIBTEX}\n```\n"
    )
