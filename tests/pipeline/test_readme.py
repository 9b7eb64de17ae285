"""The README's library example runs as written, and its claims about commands hold."""

import re

from tests.helpers import REPO


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_library_example_runs():
    blocks = python_blocks((REPO / "README.md").read_text())
    assert blocks
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    pop, members = namespace["pop"], namespace["members"]
    assert pop.size == 4 and 1 <= len(members) <= 4
    assert namespace["ensemble"].shape == (64, 10)


def test_readme_quick_start_is_two_make_targets_that_exist():
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.strip().splitlines()]
    assert commands == ["make reproduce", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^reproduce:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (REPO / ".ci/run").read_text()


def test_what_is_in_the_box_names_every_module_and_folder():
    """The README's layout lists every module and sub-package of papa/ and every folder of tests/."""
    box = (REPO / "README.md").read_text().split("## What is in the box", 1)[1].split("```")[1]
    listed = set(re.findall(r"[\w.-]+\.py|[\w-]+/", box))
    for package in ("papa", "tests"):
        found = {p.name + "/" if p.is_dir() else p.name for p in (REPO / package).iterdir()
                 if p.name != "__pycache__" and (p.is_dir() or package == "papa" and p.suffix == ".py")}
        assert found - {"__init__.py"} <= listed, sorted(found - {"__init__.py"} - listed)
