"""The ``papa`` command's surface: help text on every subcommand and flag, ``--version``, ``python -m papa``,
and the report commands starting without torch."""

import argparse
import json
import os
import subprocess
import sys
from importlib.metadata import version

from papa import cli
from tests.helpers import REPO


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_and_flag_has_help():
    parser = cli.build_parser()
    commands = subcommands(parser)
    assert {"prepare", "train", "soups", "evaluate", "similarity", "bench", "aggregate", "render", "plot"} <= set(
        commands
    )
    listed = {a.dest: a.help for a in next(a for a in parser._actions if a.choices)._choices_actions}
    missing = [f"papa {name}" for name in commands if not listed.get(name)]
    for name, sub in {"": parser, **commands}.items():
        missing += [
            f"papa {name} {'/'.join(a.option_strings) or a.dest}"
            for a in sub._actions
            if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction) and not (a.help or "").strip()
        ]
        if name:
            assert sub.description, f"papa {name} has no description"
    assert not missing, f"no help text: {missing}"


def run(*args, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert not check or out.returncode == 0, out.stderr
    return out


def test_version_and_python_dash_m():
    out = run("-m", "papa", "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"papa {version('papa')}"
    out = run("-m", "papa", "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: papa ")
    assert "render" in out.stdout and "--version" in out.stdout


def test_library_names_load_on_first_use():
    """``import papa`` is light; ``papa.Population`` and friends import their module when first used."""
    code = (
        "import sys, papa; light = 'torch' not in sys.modules; p = papa.Population; "
        "print(light, p.__module__, 'greedy_soup' in dir(papa), 'torch' in sys.modules)"
    )
    out = run("-c", code, check=True)
    assert out.stdout.split() == ["True", "papa.population", "True", "True"]
    # importing the submodule papa.repair (as the library itself does) leaves papa.repair the function
    out = run("-c", "import papa.repair, papa; print(papa.repair.__module__, callable(papa.repair))", check=True)
    assert out.stdout.split() == ["papa.repair", "True"]
    out = run("-c", "import papa; papa.nope")
    assert "module 'papa' has no attribute 'nope'" in out.stderr


def test_every_exported_name_resolves():
    import papa

    for name in papa.__all__:
        value = getattr(papa, name)
        assert getattr(value, "__name__", name) == name and name in vars(papa)  # cached after the first use


def test_report_commands_do_not_import_torch(tmp_path):
    """--help, aggregate, render and plot run in one process; torch is never imported."""
    run_dir = tmp_path / "results" / "exp" / "papa" / "seed1"
    run_dir.mkdir(parents=True)
    metrics = {"experiment": "exp", "variant": "papa", "seed": 1, "population": 2, "mean": 90.0, "min": 89.0,
               "max": 91.0, "std": 1.0, "ensemble": 92.0, "avg_soup": 91.5, "greedy_soup": 91.0,
               "greedy_soup_size": 1, "avg_soup_repair": 91.6, "greedy_soup_repair": 91.1, "num_classes": 10}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    config = tmp_path / "c.yaml"
    config.write_text(
        "variants: [papa]\nseeds: [1]\nexperiments: {exp: {}}\n"
        "tables: [{name: t, layout: main, rows: [{label: CNN, experiment: exp}]}]\n"
        "figures: [{name: f, kind: variants, experiments: [exp]}]\n"
    )
    calls = [
        ["--help"],
        ["render", "--help"],
        ["aggregate", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "m.csv")],
        ["render", "--config", str(config), "--table", "t", "--metrics", str(tmp_path / "m.csv"),
         "--md", str(tmp_path / "t.md")],
        ["plot", "--config", str(config), "--figure", "f", "--metrics", str(tmp_path / "m.csv"),
         "--out", str(tmp_path / "f.png")],
    ]
    code = (
        "import json, sys\nfrom papa.cli import main\ncodes = []\n"
        f"for argv in {calls!r}:\n"
        "    try:\n        codes.append(main(argv))\n    except SystemExit as e:\n        codes.append(e.code)\n"
        "print(json.dumps([codes, sorted(m for m in sys.modules if m.split('.')[0] == 'torch')]))\n"
    )
    out = run("-c", code, check=True)
    codes, torch_modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert codes == [0] * len(calls)
    assert torch_modules == []
    for name in ("m.csv", "t.md", "t.csv", "t.html", "f.png"):
        assert (tmp_path / name).is_file(), name
