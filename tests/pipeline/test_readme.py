"""The README and docs/: the README is short (at most 200 lines), its library example runs as written, the quick
start is two make targets, one section per way of running, reference material in one place (docs/,
config/README.md) with every link resolving, and the license and citation files agree with the package."""

import re
import tomllib

import pytest
import yaml

from tests.helpers import REPO

README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "config" / "README.md", REPO / "benchmarks" / "README.md"]
PAPER_URL = "https://openreview.net/forum?id=cPDVjsOytS"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def headings(text: str, level: int = 2) -> list[str]:
    return re.findall(rf"^{'#' * level} (.+)$", text, flags=re.M)


def test_readme_is_at_most_200_lines():
    assert len(README.read_text().splitlines()) <= 200


def test_readme_library_example_runs():
    blocks = python_blocks(README.read_text())
    assert blocks
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    pop, members = namespace["pop"], namespace["members"]
    assert pop.size == 4 and 1 <= len(members) <= 4
    assert namespace["ensemble"].shape == (64, 10)


def test_readme_quick_start_is_two_make_targets_that_exist():
    readme = README.read_text()
    quick = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.strip().splitlines()]
    assert commands == ["make reproduce", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^reproduce:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (REPO / ".ci/run").read_text()


def test_quick_start_table_is_the_committed_report():
    """The table the quick start shows is the one the default pipeline rendered (reports/digits_range.md)."""
    quick = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    table = [line for line in quick.splitlines() if line.startswith("|")]
    assert len(table) >= 3
    rendered = (REPO / "reports" / "digits_range.md").read_text().splitlines()
    assert all(line in rendered for line in table)


def test_readme_is_the_quick_start_then_one_section_per_way_of_running():
    sections = headings(README.read_text())
    ways = ["Run on a laptop", "One table from cached results", "Reproduce a paper table", "Run on a cluster",
            "Using the library"]
    assert sections[0] == "Quick start"
    assert [s for s in sections if s in ways] == ways
    assert sections.index("Quick start") < sections.index(ways[0])


@pytest.mark.parametrize("name", ["architecture.md", "library.md", "cluster.md", "smoke.md", "troubleshooting.md",
                                  "decisions.md", "performance.md", "interfaces.md", "data.md"])
def test_reference_material_has_one_copy_in_docs(name):
    """Each reference document lives in docs/ (the README links it and does not repeat it)."""
    doc = (REPO / "docs" / name).read_text()
    readme = README.read_text()
    assert f"(docs/{name})" in readme
    title = headings(doc, 1)[0]
    assert f"## {title}" not in readme
    for section in headings(doc, 2):  # no section of the document is repeated in the README
        assert f"\n### {section}\n" not in readme and f"\n## {section}\n" not in readme, section


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _links(path):
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if not re.match(r"[a-z]+:", target):
            yield target


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(path):
    for target in _links(path):
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{path.name}: broken link {target}"
        if anchor:
            anchors = {_slug(h) for level in (1, 2, 3) for h in headings(linked.read_text(), level)}
            assert anchor in anchors, f"{path.name}: no heading #{anchor} in {file or path.name}"


def test_paths_the_readme_names_exist():
    text = README.read_text()
    built = {"containers/papa.sif"}  # `apptainer build` writes it
    for path in set(re.findall(r"\b((?:config|docs|workflow|benchmarks|containers)/[\w/.-]+\.\w+)", text)) - built:
        assert (REPO / path).exists(), path


def test_license_and_citation_match_the_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert (REPO / "LICENSE").read_text().startswith("MIT License\n")
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT" and cff["version"] == project["version"]
    assert cff["message"] and cff["authors"]
    paper = cff["preferred-citation"]
    assert paper["title"] == "PopulAtion Parameter Averaging (PAPA)"
    assert [a["family-names"] for a in paper["authors"]] == [
        "Jolicoeur-Martineau", "Gervais", "Fatras", "Zhang", "Lacoste-Julien"]
    assert paper["journal"] == "Transactions on Machine Learning Research" and paper["year"] == 2024
    assert paper["url"] == PAPER_URL
    readme = README.read_text()
    assert PAPER_URL in readme and "(CITATION.cff)" in readme and "(LICENSE)" in readme


def test_no_wording_about_who_wrote_the_software():
    texts = [*DOCS, *(REPO / "workflow" / "report").glob("*.rst"), *(REPO / "reports").glob("*.md")]
    for path in texts:
        found = re.findall(r"\b(?:sessions?|agents?)\b", path.read_text(), flags=re.I)
        assert not found, f"{path.relative_to(REPO)}: {found}"


def test_where_things_are_names_every_module_and_folder():
    """docs/architecture.md's layout lists every module and sub-package of papa/ and every folder of tests/."""
    box = (REPO / "docs" / "architecture.md").read_text().split("## Where things are", 1)[1].split("```")[1]
    listed = set(re.findall(r"[\w.-]+\.py|[\w-]+/", box))
    for package in ("papa", "tests"):
        found = {p.name + "/" if p.is_dir() else p.name for p in (REPO / package).iterdir()
                 if p.name != "__pycache__" and (p.is_dir() or package == "papa" and p.suffix == ".py")}
        assert found - {"__init__.py"} <= listed, sorted(found - {"__init__.py"} - listed)
