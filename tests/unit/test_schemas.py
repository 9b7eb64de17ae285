"""The schemas are the one source of the defaults: every default sits where papa.config.fill_defaults finds it,
and a config read without jsonschema (a machine that has only torch and its like: benchmarks/gpu.sh) gets the
same defaults, unchecked, with one warning."""

import copy
import sys

import pytest

from tests.helpers import REPO, TINY


def schema_defaults(node, path=""):
    """Every ``default`` in a schema, by path."""
    if isinstance(node, dict):
        found = {path} if "default" in node else set()
        for key, value in node.items():
            found |= schema_defaults(value, f"{path}/{key}")
        return found
    if isinstance(node, list):
        return set().union(*(schema_defaults(v, f"{path}/{i}") for i, v in enumerate(node)))
    return set()


def reached_defaults(node, root, path="", seen=None):
    """The defaults config.fill_defaults can reach: along properties, additionalProperties, items and $ref."""
    seen = set() if seen is None else seen
    if path in seen or not isinstance(node, dict):
        return set()
    seen.add(path)
    found = {path} if "default" in node else set()
    if "$ref" in node:
        ref = node["$ref"].removeprefix("#")
        target = root
        for part in ref.strip("/").split("/"):
            target = target[part]
        found |= reached_defaults(target, root, ref, seen)
    for key, sub in node.get("properties", {}).items():
        found |= reached_defaults(sub, root, f"{path}/properties/{key}", seen)
    for key in ("additionalProperties", "items"):
        found |= reached_defaults(node.get(key), root, f"{path}/{key}", seen)
    return found


@pytest.mark.parametrize("name", ["config", "experiment"])
def test_every_schema_default_is_where_fill_defaults_looks(name):
    from papa import config as cfg

    sch = cfg.schema(name)
    assert reached_defaults(sch, sch) == schema_defaults(sch)


def test_without_jsonschema_configs_get_the_same_defaults_unchecked(monkeypatch, capsys):
    from papa import config as cfg

    raw = {"experiments": {"tiny": copy.deepcopy(TINY)}}
    checked = cfg.experiment(cfg.validate(copy.deepcopy(raw), "config", "test"), "tiny")
    paper = cfg.load_config(REPO / "config" / "paper" / "table1.yaml")
    bad = copy.deepcopy(raw) | {"seeds": "none"}
    try:
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "jsonschema", None)  # import jsonschema now fails
            cfg._validator_class.cache_clear()
            assert cfg.experiment(cfg.validate(copy.deepcopy(raw), "config", "test"), "tiny") == checked
            assert cfg.load_config(REPO / "config" / "paper" / "table1.yaml") == paper
            assert cfg.validate(copy.deepcopy(bad), "config", "test")["seeds"] == "none"  # unchecked, as it says
            assert capsys.readouterr().err.count("jsonschema is not installed") == 1
    finally:
        cfg._validator_class.cache_clear()
    with pytest.raises(cfg.PapaError, match="seeds"):
        cfg.validate(bad, "config", "test")


def test_the_schemes_a_config_may_name_are_the_ones_averaging_builds():
    """A scheme the schema accepts but papa.averaging cannot build would fail at the first averaging, hours in."""
    from papa import config as cfg
    from papa.averaging import SCHEMES

    assert cfg.schema("experiment")["$defs"]["epochs"]["properties"]["scheme"]["enum"] == [*SCHEMES, "greedy"]
