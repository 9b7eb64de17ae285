"""Where the paper's words and the authors' scripts (SamsungSAILMontreal/PAPA at 47ad83a, whose runs produced the
published numbers) differ and papa can run both: each difference one option of the experiment key ``fidelity``
(``paper``, the default; ``authors``; or per option, ``{setting: paper, papa2_pairs: authors}``), which papa.config
resolves once per experiment; training code asks ``authors(exp, name)``. What each option runs under either
setting, with the scripts' file and line, and the tables it moves: its row of docs/decisions.md's differences table,
the one description (tests/unit/test_fidelity_switch.py checks the rows against ``OPTIONS``). No torch."""

from papa.errors import PapaError

SETTINGS = ("paper", "authors")

OPTIONS = {  # each option under ``fidelity``: the difference, as its row of docs/decisions.md names it
    "papa2_pairs": "PAPA-2's partners",
    "averaging_epochs": "averaging epochs",
    "push_steps": "when PAPA's push fires",
    "last_batch": "an epoch's last, incomplete batch",
    "val_images": "the images the validation split is scored on",
    "alignment_images": "the alignment's images",
    "mixed_precision": "mixed precision on CUDA",
    "repair_fusion": "REPAIR's computation",
    "papa2_repair_data": "REPAIR after a pair averaging",
    "soup_repair_data": "the soups' REPAIR data",
    "repair_images": "REPAIR's images",
    "alignment_target": "alignment before averaging",
    "finetune_normalization": "fine-tuning normalization",
    "finetune_resize": "resizing CIFAR for fine-tuning",
    "finetune_freeze": "fine-tuning freeze",
    "similarity_members": "Table 5's alignment and REPAIR",
    "elitism": "Table 16's elitism",
}


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
