"""The compiled build (setup.py's ``CALLSTATUS_COMPILE=1``) in a folder of its own,
``build/compiled``: the whole package as the image installs it, with the hot path's
modules as C extensions. ``PYTHONPATH=build/compiled`` runs it (:func:`environ`) while
the dev venv's editable install stays plain Python, so no stale extension ever shadows
an edited source file. The bench builds it with :func:`build`, which does nothing while
the sources are those it was built from.

    python -m testkit.compiled      # build it, or say it is up to date
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from testkit.launcher import ROOT

FOLDER = ROOT / "build" / "compiled"
_STAMP = FOLDER / ".sources"
# What the build is made of: a change to any of these builds it again.
_INPUTS = ("setup.py", "pyproject.toml")
_PACKAGES = ("service", "schemas")


def _sources_digest() -> str:
    digest = hashlib.sha256()
    files = [ROOT / name for name in _INPUTS]
    for package in _PACKAGES:
        files += sorted(p for p in (ROOT / package).rglob("*") if p.suffix in (".py", ".json"))
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def build() -> Path:
    """``build/compiled`` from the current sources (a minute on two cores, once);
    RuntimeError with pip's output when it cannot be built (no C compiler, no Python
    headers)."""
    digest = _sources_digest()
    if _STAMP.is_file() and _STAMP.read_text() == digest:
        return FOLDER
    shutil.rmtree(FOLDER, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation"]
    run = subprocess.run(
        [*pip, "--no-deps", "--target", str(FOLDER), str(ROOT)],
        env={**os.environ, "CALLSTATUS_COMPILE": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        shutil.rmtree(FOLDER, ignore_errors=True)
        raise RuntimeError(f"the compiled build failed:\n{run.stdout}{run.stderr}"[-4000:])
    _STAMP.write_text(digest)
    return FOLDER


def environ(folder: Path) -> dict[str, str]:
    """The environment variables that make a ``callstatus`` process run ``folder``'s
    build instead of the editable install."""
    return {"PYTHONPATH": str(folder)}


if __name__ == "__main__":
    print(build())
