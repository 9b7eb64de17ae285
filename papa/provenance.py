"""The code version every output records, so that a number can be followed to the code that made it: the git
commit and whether ``CODE`` had changes from a checkout, the package version otherwise. No torch (the tables'
renderer reads it)."""

import contextlib
import subprocess
from functools import cache
from pathlib import Path

from papa import __version__

CHECKOUT = Path(__file__).resolve().parents[1]  # the checkout papa runs from, when it does
CODE = ("papa", "workflow", "pyproject.toml", "uv.lock")  # what makes a result; configs are recorded in full


@cache
def code_version() -> dict:
    """``{"commit": <sha>, "changed": <bool>}`` from a git checkout, else (or should git fail or hang: provenance
    never stops a run) ``{"version": <papa's>}``."""
    if (CHECKOUT / ".git").exists():
        git = ["git", "--no-optional-locks", "-C", str(CHECKOUT)]  # no index lock: jobs run side by side
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
            status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", *CODE],
                                    capture_output=True, text=True, timeout=10, check=True)
            return {"commit": head.stdout.strip(), "changed": bool(status.stdout.strip())}
    return {"version": __version__}


def describe(code: dict | None) -> str:
    """One line: ``<commit>``, ``<commit>+changes`` or ``papa <version>``; empty when unknown."""
    if not code:
        return ""
    if "commit" in code:
        return code["commit"] + ("+changes" if code["changed"] else "")
    return f"papa {code['version']}"
