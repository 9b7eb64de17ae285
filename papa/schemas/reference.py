"""The config reference, config/README.md: every key of a config file and of an experiment (type, default,
meaning), generated from the schemas: ``python -m papa.schemas.reference config/README.md`` after changing one."""

import json
import sys
from collections.abc import Iterator

from papa.config import resolve as _resolve
from papa.config import schema
from papa.io import write_text

HEADER = """# Config keys

Generated from `papa/schemas/config.schema.yaml` and `papa/schemas/experiment.schema.yaml` by
`python -m papa.schemas.reference config/README.md` (a test checks that this file matches them): edit the
schemas, not this file. Every key is optional unless marked *required*; an unknown key, a wrong type or an
out-of-range value stops the run with one line naming the file and the key. `<name>` stands for a name you
choose, `[]` for each item of a list.
"""

SECTIONS = {
    "config": ("Config file", "The top level of a config file (`config/config.yaml`, `config/paper/*.yaml`)."),
    "experiment": ("Experiment", "The keys of one experiment, `experiments.<name>` (deep-merged over `defaults`, "
                   "which takes the same keys)."),
}


def _type(node: dict, root: dict) -> str:
    if "enum" in node:
        return "one of " + ", ".join(f"`{v}`" for v in node["enum"])
    if "oneOf" in node:
        return " or ".join(_type(alternative, root) for alternative in node["oneOf"])
    kinds = node.get("type", "")
    text = kinds if isinstance(kinds, str) else " or ".join(kinds)
    items = _resolve(node.get("items", {}), root)
    if node.get("type") in ("array", ["array", "null"]) and "enum" in items:
        text += " of " + ", ".join(f"`{v}`" for v in items["enum"])
    bounds = [f"{name} {node[key]}" for key, name in (("minimum", "≥"), ("exclusiveMinimum", ">"),
                                                      ("maximum", "≤"), ("exclusiveMaximum", "<"))
              if key in node]
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def rows(node: dict, root: dict, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every property under ``node``, depth first, in schema order; siblings that
    refer to one shared definition (``$ref``) are one row, ``<definition>`` (``resources.<job>.threads``, not five)."""
    node = _resolve(node, root)
    required = set(node.get("required", []))
    groups: dict[str, tuple[list[str], dict]] = {}  # (names, schema) by shared definition
    for name, child in node.get("properties", {}).items():
        ref = child.get("$ref") if set(child) == {"$ref"} else None
        groups.setdefault(ref or f"\0{name}", ([], child))[0].append(name)
    for names, child in groups.values():
        placeholder = child.get("$ref", "").rsplit("/", 1)[-1] if len(names) > 1 else ""
        child = _resolve(child, root)
        key = f"{prefix}<{placeholder}>" if placeholder else f"{prefix}{names[0]}"
        meaning = " ".join(child.get("description", "").split())
        if placeholder:
            meaning += f" `<{placeholder}>`: one of " + ", ".join(f"`{n}`" for n in names) + "."
        if names[0] in required:
            meaning = f"*required*. {meaning}"
        yield f"`{key}`", _type(child, root), f"`{json.dumps(child['default'])}`" if "default" in child else "", meaning
        if "properties" in child or isinstance(child.get("additionalProperties"), dict):
            yield from rows(child, root, f"{key}.")
        items = child.get("items")
        if isinstance(items, dict) and "properties" in _resolve(items, root):
            yield from rows(items, root, f"{key}[].")
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and ("properties" in extra or "$ref" in extra):
        yield from rows(extra, root, f"{prefix}<name>.")


def undocumented(name: str) -> list[str]:
    """Keys of schema ``name`` without a description."""
    root = schema(name)
    return [key.strip("`") for key, _, _, meaning in rows(root, root) if not meaning.replace("*required*.", "").strip()]


def reference() -> str:
    """The Markdown of config/README.md."""
    parts = [HEADER]
    for name, (title, intro) in SECTIONS.items():
        root = schema(name)
        lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows(root, root)]
        parts.append(f"## {title}\n\n{intro}\n\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        write_text(sys.argv[1], reference())
    else:
        sys.stdout.write(reference())
