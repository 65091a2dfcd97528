"""The compiled build (setup.py's ``CALLSTATUS_COMPILE=1``) in a folder of its own,
``build/compiled``: the whole package as the image installs it, with the hot path's
modules as C extensions. ``PYTHONPATH=build/compiled`` runs it (:func:`environ`) while
the dev venv's editable install stays plain Python, so no stale extension ever shadows
an edited source file. The bench builds it with :func:`build`, which does nothing while
the sources are those it was built from.

    python -m testkit compiled      # build it, or say it is up to date
    python -m testkit compiled --or-plain
        # `make run`: the folder to put on PYTHONPATH, or nothing (plain Python) with a
        # message on stderr when this machine cannot compile it
"""

from __future__ import annotations

import ast
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from testkit.launcher import ROOT

# What the build is made of: a change to any of these builds it again.
_INPUTS = ("setup.py", "pyproject.toml")
_PACKAGES = ("service", "schemas")


def listed(root: Path = ROOT) -> list[Path]:
    """The modules setup.py's ``COMPILED`` lists (read from its source: importing
    setup.py would run setup())."""
    tree = ast.parse((root / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED":
            return [root / path for path in ast.literal_eval(node.value)]
    raise LookupError("setup.py has no COMPILED list")


def _folder(root: Path) -> Path:
    return root / "build" / "compiled"


def _stamp(root: Path) -> Path:
    """The digest of the sources the folder was built from."""
    return _folder(root) / ".sources"


def _sources_digest(root: Path) -> str:
    digest = hashlib.sha256()
    files = [root / name for name in _INPUTS]
    for package in _PACKAGES:
        files += sorted(p for p in (root / package).rglob("*") if p.suffix in (".py", ".json"))
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _built_from(root: Path) -> str | None:
    """The digest of the sources the folder holds a build of, if it holds one."""
    stamp = _stamp(root)
    return stamp.read_text() if stamp.is_file() else None


def up_to_date(root: Path = ROOT) -> bool:
    return _built_from(root) == _sources_digest(root)


def build(root: Path = ROOT) -> Path:
    """``build/compiled`` of the project at ``root`` from its current sources (a minute
    on two cores, once); RuntimeError with pip's output when it cannot be built (no C
    compiler, no Python headers), and then no folder is left behind. It is built beside
    the folder and renamed into place, so a process running the earlier build keeps
    what it imported."""
    folder = _folder(root)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # One build at a time (test workers, `make run`): two must not fill one scratch
    # folder, and the second build of the same sources is a no-op.
    with (folder.parent / "compiled.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        digest = _sources_digest(root)
        if _built_from(root) == digest:
            return folder
        scratch = folder.with_name("compiled.new")
        shutil.rmtree(scratch, ignore_errors=True)
        # setuptools' own staging folders keep what an earlier build made, and it would
        # ship a module compiled then but no longer listed beside the new ones.
        for staged in folder.parent.glob("*"):
            name = staged.name
            if staged.is_dir() and (name == "lib" or name.startswith(("lib.", "temp.", "bdist."))):
                shutil.rmtree(staged)
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation"]
        run = subprocess.run(
            [*pip, "--no-deps", "--target", str(scratch), str(root)],
            env={**os.environ, "CALLSTATUS_COMPILE": "1"},
            capture_output=True,
            text=True,
            check=False,
        )
        if run.returncode != 0:
            # Neither half a build nor one of older sources is left to run by mistake.
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)
            raise RuntimeError(f"the compiled build failed:\n{run.stdout}{run.stderr}"[-4000:])
        (scratch / ".sources").write_text(digest)
        # Swapped in whole, by renames: a service still running from the folder keeps the
        # modules it loaded (open files survive the rename), and none sees half a build.
        old = folder.with_name("compiled.old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        scratch.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
        return folder


def environ(folder: Path) -> dict[str, str]:
    """The environment variables that make a ``callstatus`` process run ``folder``'s
    build instead of the editable install."""
    return {"PYTHONPATH": str(folder)}


@functools.cache
def test_build() -> Path | None:
    """What testkit's ``callstatus serve`` processes run: the compiled build's folder, as
    the image runs it; None, plain Python, when ``CALLSTATUS_TEST_BUILD=plain`` (a
    machine without a C compiler). Built once per test process: a source edited during a
    run neither stalls the run's next service start for a rebuild nor mixes two builds
    in one test."""
    if os.environ.get("CALLSTATUS_TEST_BUILD") == "plain":
        return None
    return build()


USAGE = "usage: python -m testkit compiled [--or-plain]"


def main(argv: list[str], root: Path = ROOT) -> int:
    """``python -m testkit``'s arguments: ``compiled``, then ``--or-plain`` or nothing."""
    if argv[:1] != ["compiled"] or argv[1:] not in ([], ["--or-plain"]):
        print(USAGE, file=sys.stderr)
        return 2
    if not argv[1:]:
        print(build(root))
        return 0
    if not up_to_date(root):
        print(
            "compiling the hot path with mypyc (once per change; about a minute)", file=sys.stderr
        )
    try:
        print(build(root))
    except RuntimeError as exc:
        # `make run` must still run where there is no compiler: plain Python behaves the
        # same, it only costs more CPU per request.
        print(f"{exc}\nrunning plain Python instead (slower, the same behaviour)", file=sys.stderr)
    return 0
