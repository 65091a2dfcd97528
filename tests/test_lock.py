"""requirements.lock, the image's pinned runtime set, covers what pyproject.toml asks for;
requirements-build.lock, its build stage's compiler set, what the dev extra asks of it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _pins(lock: str) -> dict[str, tuple[int, ...]]:
    pins = {}
    for line in (ROOT / lock).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"not pinned with ==: {line}"
            pins[_norm(name)] = _version(version)
    return pins


def test_every_runtime_dependency_is_pinned_at_or_above_its_lower_bound() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = {}
    for spec in pyproject["project"]["dependencies"]:
        name, _, bound = spec.partition(">=")
        wanted[_norm(name)] = _version(bound)
    pins = _pins("requirements.lock")
    for name, lower in wanted.items():
        assert name in pins, f"{name} is a runtime dependency but not in requirements.lock"
        assert pins[name] >= lower, f"{name} pinned below pyproject's lower bound"
    # Nothing development-only sneaks into the image.
    assert not {"pytest", "mypy", "ruff", "hypothesis"} & set(pins)


def test_the_build_stage_compiles_with_what_the_dev_extra_asks_for() -> None:
    """The image is compiled by the mypy and setuptools the dev venv tests the compiled
    build with (testkit.compiled): at or above the dev extra's lower bounds."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dev = {}  # name -> lower bound
    for spec in pyproject["project"]["optional-dependencies"]["dev"]:
        name, _, bound = spec.partition(">=")
        dev[_norm(name)] = bound
    pins = _pins("requirements-build.lock")
    # mypy type-checks what it compiles: the runtime set's stubs too (service/ imports yaml).
    for name in ("mypy", "setuptools", "types-pyyaml"):
        assert name in pins, f"{name} is not pinned in requirements-build.lock"
        assert pins[name] >= _version(dev[name]), f"{name} pinned below the dev extra's bound"
    # Only the compiler's set: the runtime's pins are requirements.lock's.
    assert not {"pydantic", "starlette", "aiokafka"} & set(pins)
