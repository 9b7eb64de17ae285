"""papa.variants is the one source of the variants and of when scheduled things happen: the schedule's values
pinned by hand, and every consumer reading it (smoke scale seeks the averaging ``from_start`` adds)."""

import pytest

from papa import smoke
from papa.errors import PapaError
from papa.variants import (
    UNITS,
    VARIANTS,
    averaging_epochs,
    by_unit,
    check,
    first_push,
    in_window,
    pushes_after,
    swa_start_epoch,
)
from tests.helpers import tiny_experiment


def exp(epochs=6, window=(0.0, 1.0), **averaging):
    return tiny_experiment(train={"epochs": epochs}, averaging={"window": list(window), **averaging})


def test_the_four_variants_in_table_order():
    assert list(VARIANTS) == ["baseline", "papa", "papa-all", "papa-2"]
    assert [v.label for v in VARIANTS.values()] == ["Baseline", "PAPA", "PAPA-all", "PAPA-2"]
    assert by_unit("none") == ["baseline"] and by_unit("steps") == ["papa"]
    assert by_unit("epochs") == ["papa-all", "papa-2"]
    assert {v.unit for v in VARIANTS.values()} <= set(UNITS)
    assert len({v.color for v in VARIANTS.values()}) == len(VARIANTS)


def test_an_unknown_variant_names_the_known_ones():
    assert check("papa-2") is VARIANTS["papa-2"]
    with pytest.raises(PapaError, match="unknown variant 'papa-3'; expected one of baseline, papa, papa-all, papa-2"):
        check("papa-3")


def test_the_window_holds_its_end_not_its_start():
    assert [d for d in range(0, 11) if in_window((0.2, 0.5), d, 10)] == [3, 4, 5]
    assert [d for d in range(0, 5) if in_window((0.0, 1.0), d, 4)] == [1, 2, 3, 4]


@pytest.mark.parametrize(("epochs", "every", "window", "from_start", "expected"), [
    (10, 5, (0.0, 1.0), False, [5]),  # never after the last epoch
    (10, 5, (0.0, 1.0), True, [1, 5]),
    (12, 3, (0.25, 0.75), False, [6, 9]),  # 3 is not past 25% of 12
    (12, 3, (0.25, 0.75), True, [6, 9]),  # nor is the first epoch
    (6, 6, (0.0, 1.0), True, [1]),
    (1, 1, (0.0, 1.0), True, []),  # the first epoch is the last
])
def test_averaging_epochs(epochs, every, window, from_start, expected):
    e = exp(epochs, window, **{"papa-2": {"every": every, "from_start": from_start}})
    assert averaging_epochs(e, "papa-2") == expected


@pytest.mark.parametrize(("epochs", "spe", "every", "window", "expected"), [
    (3, 11, 10, (0.0, 1.0), 10),
    (3, 11, 10, (0.5, 1.0), 20),  # step 16.5 is the window's start
    (3, 11, 40, (0.0, 1.0), None),  # 33 steps
    (3, 10, 10, (0.33, 0.34), 10),  # the window (9.9, 10.2] holds step 10
    (3, 10, 10, (0.34, 0.36), None),  # (10.2, 10.8] holds no step
])
def test_first_push(epochs, spe, every, window, expected):
    assert first_push(exp(epochs, window, papa={"every": every}), "papa", spe) == expected


def test_the_scripts_push_count_starts_again_each_epoch():
    """``epoch_steps`` (fidelity push_steps): the step's 0-based index within its epoch is tested, as main.py:200's
    ``i % ema_every_k == 0``; without, the run's 1-based step."""
    assert [s for s in range(1, 34) if pushes_after(s, 33, 4, (0.0, 1.0))] == [4, 8, 12, 16, 20, 24, 28, 32]
    assert [s for s in range(1, 34) if pushes_after(s, 33, 4, (0.0, 1.0), 11)] == [1, 5, 9, 12, 16, 20, 23, 27, 31]
    assert [s for s in range(1, 34) if pushes_after(s, 33, 4, (0.5, 1.0), 11)] == [20, 23, 27, 31]


@pytest.mark.parametrize(("epochs", "spe", "every", "window", "expected"), [
    (3, 11, 10, (0.0, 1.0), 1),
    (3, 11, 40, (0.0, 1.0), 1),  # more than an epoch: the first step of each epoch
    (3, 11, 10, (0.5, 1.0), 22),  # past step 16.5: index 10 of the second epoch, step 22
    (3, 10, 10, (0.34, 0.36), None),
])
def test_first_push_as_the_scripts_count(epochs, spe, every, window, expected):
    e = exp(epochs, window, papa={"every": every})
    e["fidelity"]["push_steps"] = "authors"
    assert first_push(e, "papa", spe) == expected


def test_swa_start_is_a_fraction_or_an_epoch():
    assert swa_start_epoch(tiny_experiment()) is None
    assert swa_start_epoch(tiny_experiment(train={"epochs": 10, "swa": {"start": 0.75, "lr": 0.1}})) == 8
    assert swa_start_epoch(tiny_experiment(train={"epochs": 10, "swa": {"start": 4, "lr": 0.1}})) == 4
    assert swa_start_epoch(tiny_experiment(train={"epochs": 10, "swa": {"start": 1, "lr": 0.1}})) == 1  # an epoch


def test_smoke_scale_seeks_the_averaging_that_from_start_adds():
    """Averaging after the first epoch only (``every`` = the epochs, ``from_start``) is an event of the full run
    that the smoke run must keep (smoke.events once ignored ``from_start`` and did not seek it)."""
    full = exp(6, **{"papa-all": {"every": 6, "from_start": True}})
    assert averaging_epochs(full, "papa-all") == [1]
    assert "papa-all averaging" in smoke.events(full, None)


# the schemas ------------------------------------------------------------------------------------------------
def _enums(node, path=""):
    """Every ``enum`` in a schema, by path."""
    if isinstance(node, dict):
        found = {path: node["enum"]} if "enum" in node else {}
        for key, value in node.items():
            found |= _enums(value, f"{path}/{key}")
        return found
    if isinstance(node, list):
        return {k: v for i, item in enumerate(node) for k, v in _enums(item, f"{path}/{i}").items()}
    return {}


@pytest.mark.parametrize("name", ["config", "experiment"])
def test_each_schema_lists_the_variants_once(name):
    from papa.config import schema

    sch = schema(name)
    assert sch["$defs"]["variant"]["enum"] == list(VARIANTS)
    assert [path for path, values in _enums(sch).items() if "baseline" in values] == ["/$defs/variant"]
    if name == "config":
        assert set(sch["properties"]["variants"]["default"]) <= set(VARIANTS)


def test_every_variant_that_averages_has_the_block_of_its_unit():
    from papa.config import schema

    sch = schema("experiment")
    blocks = sch["properties"]["averaging"]["properties"]
    averaging = {k for k, b in blocks.items() if b.get("$ref", "").startswith("#/$defs/")}
    assert averaging == {name for name, v in VARIANTS.items() if v.unit != "none"}
    for name in averaging:
        assert blocks[name]["$ref"] == f"#/$defs/{VARIANTS[name].unit}" and blocks[name]["default"] == {}
    filled = tiny_experiment()["averaging"]
    assert filled["papa-2"]["scheme"] == "pair-half" and filled["papa-all"]["scheme"] == "all"  # each its own default
    assert set(filled["papa-2"]) == set(filled["papa-all"]) == set(sch["$defs"]["epochs"]["properties"])
