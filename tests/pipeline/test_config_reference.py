"""config/README.md is the config reference generated from the schemas: every key, its type, default and
meaning. It must match the schemas, and every schema property must say what it means."""

import pytest

from papa.schemas import reference
from tests.helpers import REPO


def test_committed_reference_matches_the_schemas():
    committed = (REPO / "config" / "README.md").read_text()
    assert committed == reference.reference(), (
        "config/README.md is out of date: run `python -m papa.schemas.reference config/README.md`"
    )


@pytest.mark.parametrize("name", ["config", "experiment"])
def test_every_key_has_a_description(name):
    assert reference.undocumented(name) == []


def test_reference_rows():
    text = reference.reference()
    rows = {line.split(" | ")[0].strip("| `"): line for line in text.splitlines() if line.startswith("| `")}
    alpha = rows["averaging.papa.alpha"]
    assert "number (> 0, ≤ 1)" in alpha and "`0.99`" in alpha and "lr_t / lr_0" in alpha
    assert "*required*" in rows["experiments"] and "*required*" in rows["tables[].rows[].label"]
    # the four steps share one definition: written once, with the steps listed
    assert "`<job>`: one of `prepare`, `train`, `soups`, `similarity`." in rows["resources.<job>"]
    assert "resources.experiments.<name>.<job>.mem_mb" in rows
    assert "augment.grid.mixup" in rows and "train.swa.anneal_epochs" in rows


def test_undescribed_keys_are_found():
    root = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                                             "c": {"description": "C", "type": "string", "default": "x"}}}
    rows = list(reference.rows(root, root))
    assert [r[0] for r in rows] == ["`a`", "`a.b`", "`c`"]
    assert rows[2] == ("`c`", "string", '`"x"`', "C")
