"""`python -m papa.schemas.reference [OUT]`, the command that regenerates config/README.md: the reference written
to OUT, or to standard output without it."""

import subprocess
import sys

from papa.schemas import reference


def run(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "papa.schemas.reference", *args], cwd=cwd, capture_output=True,
                          text=True, check=True)


def test_reference_script_writes_the_file_or_standard_output(tmp_path):
    expected = reference.reference()
    assert run("docs/README.md", cwd=tmp_path).stdout == ""
    assert (tmp_path / "docs" / "README.md").read_text() == expected
    assert run(cwd=tmp_path).stdout == expected
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["README.md", "docs"]
