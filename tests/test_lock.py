"""requirements.lock, the image's pinned runtime set, covers what pyproject.toml asks for."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def test_every_runtime_dependency_is_pinned_at_or_above_its_lower_bound() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = {}
    for spec in pyproject["project"]["dependencies"]:
        name, _, bound = spec.partition(">=")
        wanted[_norm(name)] = _version(bound)
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"not pinned with ==: {line}"
            pins[_norm(name)] = _version(version)
    for name, lower in wanted.items():
        assert name in pins, f"{name} is a runtime dependency but not in requirements.lock"
        assert pins[name] >= lower, f"{name} pinned below pyproject's lower bound"
    # Nothing development-only sneaks into the image.
    assert not {"pytest", "mypy", "ruff", "hypothesis"} & set(pins)
