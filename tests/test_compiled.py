"""testkit.compiled, the compiled build of the bench and `make run`, on tiny projects of
its own: built once per change of the sources, and a failed build leaves nothing behind
and, for `make run`, falls back to plain Python with a message."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testkit import ROOT, compiled

PYPROJECT = """\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "tiny-callstatus"
version = "0"

[tool.setuptools]
packages = ["service", "schemas"]
"""


# setup.py of a project that builds, and of one whose build fails as without a compiler.
BUILDS = "from setuptools import setup\nsetup()\n"
NO_COMPILER = "raise SystemExit('error: no C compiler on this machine')\n"


def _project(root: Path, setup_py: str) -> Path:
    for package in ("service", "schemas"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "service" / "lane.py").write_text("WHICH = 1\n")
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / "setup.py").write_text(setup_py)
    return root


def test_a_build_is_made_once_per_change_of_the_sources(tmp_path: Path) -> None:
    root = _project(tmp_path, BUILDS)
    folder = compiled.build(root)
    assert (folder / "service" / "lane.py").read_text() == "WHICH = 1\n"
    assert compiled.up_to_date(root)
    # The same sources: no second build (it would start from an empty folder).
    (folder / "left-by-the-first-build").touch()
    assert compiled.build(root) == folder
    assert (folder / "left-by-the-first-build").exists()
    # An edited module: built again, from scratch.
    (root / "service" / "lane.py").write_text("WHICH = 2\n")
    assert not compiled.up_to_date(root)
    compiled.build(root)
    assert (folder / "service" / "lane.py").read_text() == "WHICH = 2\n"
    assert not (folder / "left-by-the-first-build").exists()


def test_a_module_removed_from_the_sources_is_gone_from_the_rebuild(tmp_path: Path) -> None:
    """setuptools' staging folder (build/lib.*) keeps what an earlier build made: a
    module compiled then, no longer listed, must not ship beside the new build."""
    root = _project(tmp_path, BUILDS)
    (root / "service" / "gone.py").write_text("")
    folder = compiled.build(root)
    assert (folder / "service" / "gone.py").exists()
    (root / "service" / "gone.py").unlink()
    compiled.build(root)
    assert not (folder / "service" / "gone.py").exists()


def test_a_failed_build_says_why_and_leaves_no_folder(tmp_path: Path) -> None:
    root = _project(tmp_path, NO_COMPILER)
    with pytest.raises(RuntimeError, match="no C compiler on this machine") as failed:
        compiled.build(root)
    assert str(failed.value).startswith("the compiled build failed")
    assert not (root / "build" / "compiled").exists()
    assert not compiled.up_to_date(root)


def test_a_failed_rebuild_leaves_no_build_of_older_sources_to_run(tmp_path: Path) -> None:
    root = _project(tmp_path, BUILDS)
    folder = compiled.build(root)
    (root / "setup.py").write_text(NO_COMPILER)
    with pytest.raises(RuntimeError, match="no C compiler"):
        compiled.build(root)
    assert not folder.exists()
    # Nor the scratch folder it was being built in (setuptools' own bdist/lib may stay).
    assert sorted(p.name for p in folder.parent.glob("compiled*")) == ["compiled.lock"]


def test_make_run_falls_back_to_plain_python_when_it_cannot_compile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _project(tmp_path, NO_COMPILER)
    assert compiled.main(["compiled", "--or-plain"], root) == 0
    out, err = capsys.readouterr()
    # Nothing on stdout: `make run` puts it on PYTHONPATH, and empty means plain Python.
    assert out == ""
    assert "no C compiler on this machine" in err
    assert "running plain Python instead" in err


def test_make_run_gets_the_folder_when_it_compiles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _project(tmp_path, BUILDS)
    assert compiled.main(["compiled", "--or-plain"], root) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(root / "build" / "compiled")
    assert "compiling the hot path" in err
    # Built already: said nothing, the folder again.
    compiled.main(["compiled", "--or-plain"], root)
    out, err = capsys.readouterr()
    assert (out.strip(), err) == (str(root / "build" / "compiled"), "")


def test_no_compiled_module_has_a_coroutine() -> None:
    """mypyc's compiled coroutines are not safe to cancel (setup.py says what crashed):
    the compiled build holds synchronous code only, which the lane's callbacks are."""
    modules = compiled.listed()
    assert any(path.name == "lane.py" for path in modules)
    for path in modules:
        tree = ast.parse(path.read_text())
        coroutines = [
            getattr(node, "name", type(node).__name__)
            for node in ast.walk(tree)
            if isinstance(node, (ast.AsyncFunctionDef, ast.Await, ast.AsyncFor, ast.AsyncWith))
        ]
        assert not coroutines, f"{path.name} is compiled and has {coroutines}"


def test_the_command_refuses_what_it_does_not_know(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["compile"], ["compiled", "--or-plan"], ["compiled", "--or-plain", "x"]):
        assert compiled.main(argv, Path("/nonexistent")) == 2  # refused before any build
        assert capsys.readouterr().err.strip() == compiled.USAGE


def test_a_run_meant_for_the_compiled_build_refuses_the_plain_modules() -> None:
    """tests/integration/test_compiled_units.py's guard (tests/conftest.py): without the
    build on PYTHONPATH, the run stops before any test instead of passing on plain code."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "pytest"),
            *("-q", "-p", "no:cacheprovider", "--import-mode=importlib"),
            "tests/test_signature.py",
        ],
        env={**env, "TESTKIT_EXPECT_COMPILED": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert "not the compiled build" in run.stderr
    assert " passed" not in run.stdout
