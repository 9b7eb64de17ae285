"""The ``fidelity`` switch (papa/fidelity.py): declared once, checked against the schema, resolved once per
experiment, each option settable alone."""

import pytest

from papa import config, fidelity
from papa.errors import PapaError


def test_the_schema_lists_exactly_the_declared_options():
    block = config.schema("experiment")["properties"]["fidelity"]
    assert block["oneOf"][0]["enum"] == list(fidelity.SETTINGS)
    assert set(block["oneOf"][1]["properties"]) == {"setting", *fidelity.OPTIONS}


@pytest.mark.parametrize("setting", fidelity.SETTINGS)
def test_a_setting_sets_every_option(setting):
    resolved = fidelity.resolve(setting)
    assert resolved == {"setting": setting, **dict.fromkeys(fidelity.OPTIONS, setting)}
    assert all(fidelity.authors({"fidelity": setting}, name) == (setting == "authors") for name in fidelity.OPTIONS)


def test_an_option_set_alone_overrides_the_setting_and_nothing_else():
    resolved = fidelity.resolve({"setting": "authors", "papa2_pairs": "paper"})
    assert resolved["papa2_pairs"] == "paper"
    assert {v for k, v in resolved.items() if k != "papa2_pairs"} == {"authors"}
    alone = fidelity.resolve({"elitism": "authors"})
    assert [k for k, v in alone.items() if v == "authors"] == ["elitism"]
    assert fidelity.resolve(None) == fidelity.resolve("paper") == fidelity.resolve({})


def test_experiments_resolve_fidelity_from_defaults_and_their_own_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("defaults: {fidelity: authors}\nexperiments:\n  a: {}\n"
                    "  b: {fidelity: {setting: authors, repair_fusion: paper}}\n  c: {fidelity: paper}\n")
    cfg = config.load_config(path)
    a, b, c = (config.experiment(cfg, name) for name in "abc")
    assert a["fidelity"] == fidelity.resolve("authors")
    assert b["fidelity"]["repair_fusion"] == "paper" and b["fidelity"]["elitism"] == "authors"
    assert c["fidelity"] == fidelity.resolve("paper")


@pytest.mark.parametrize(("value", "message"), [
    ("author", r"fidelity: 'author' is not one of paper, authors"),
    ({"pairs": "authors"}, r"fidelity: unknown key 'pairs'"),
    ({"papa2_pairs": "yes"}, r"fidelity.papa2_pairs: 'yes' is not one of paper, authors, None"),
])
def test_a_wrong_fidelity_is_one_line_naming_it(tmp_path, value, message):
    import yaml
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"experiments": {"a": {"fidelity": value}}}))
    with pytest.raises(PapaError, match=message):
        config.load_config(path)


def test_an_undeclared_option_is_a_programming_error():
    with pytest.raises(LookupError, match="not declared in papa/fidelity.py"):
        fidelity.authors({"fidelity": "paper"}, "nonesuch")
    with pytest.raises(PapaError, match="unknown option 'nonesuch'"):
        fidelity.resolve({"nonesuch": "paper"})


def test_the_comparison_configs_hold_their_originals_apart_from_fidelity():
    """config/compare/: digits-paper is the default config's digits experiment and optdigits-raw A.10's, so the
    comparison measures the switch and nothing else."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]

    def without(exp):
        return {k: v for k, v in exp.items() if k not in ("name", "description", "fidelity")}

    compare = config.load_config(root / "config/compare/fidelity-digits.yaml")
    default = config.load_config(root / "config/config.yaml")
    assert without(config.experiment(compare, "digits-paper")) == without(config.experiment(default, "digits"))
    for name in compare["experiments"]:
        exp = config.experiment(compare, name)
        assert without(exp) == without(config.experiment(default, "digits"))
        authors = [k for k, v in exp["fidelity"].items() if v == "authors" and k != "setting"]
        assert name in ("digits-paper", "digits-authors") or authors == [name.removeprefix("digits-").replace("-", "_")]
    a10, original = (config.load_config(root / f"config/{p}.yaml") for p in ("compare/fidelity-a10", "paper/a10"))
    assert config.experiment(a10, "optdigits-raw") == config.experiment(original, "optdigits-raw")
    uci = without(config.experiment(original, "optdigits-raw"))
    assert without(config.experiment(a10, "optdigits-raw-authors")) == uci


def test_the_differences_table_describes_every_option_and_no_other():
    """docs/decisions.md's differences table is the options' one description: a row per option, named as OPTIONS
    names it, and no row for an undeclared option."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[2] / "docs" / "decisions.md").read_text()
    table = text[text.index("## Differences from the authors' code"):text.index("What no setting changes")]
    rows = re.findall(r"^\| (.+?) \| .+ \| `(\w+)` \| .+ \|$", table, re.MULTILINE)
    assert {name: difference for difference, name in rows} == fidelity.OPTIONS
    assert len(rows) == len(fidelity.OPTIONS)
