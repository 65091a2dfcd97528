"""docs/architecture.md's module map matches the code: every module is in it once, every
module in it exists, and the import rules it states hold (read from the source with
``ast``; imports under ``if TYPE_CHECKING:`` are for the type checker and do not count)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT / "docs" / "architecture.md"
PACKAGES = ("service", "schemas", "testkit")
ROW = re.compile(r"^\| `((?:service|schemas|testkit)/\w+\.py)` \| (.+) \|$")

PURE = {
    "service.fsm",
    "service.batch",
    "service.statecodec",
    "service.signature",
    "service.strictjson",
    "service.partitioner",
    "service.headers",
    "service.traffic",
    "service.oracle",
    "service.tally",
    "service.stats",
    "service.accountbook",
    "service.freeclimbtypes",
    "service.freeclimbretry",
    "service.freeclimbwire",
    "service.standincalls",
    "service.standinquery",
    "service.reconcile",
    "schemas.call",
    "schemas.messages",
    "schemas.export",
}
# Libraries that do I/O, keep time or report: none of them in the pure core.
IMPURE_LIBRARIES = {
    "asyncio",
    "socket",
    "subprocess",
    "threading",
    "time",
    "starlette",
    "uvicorn",
    "httptools",
    "httpx",
    "structlog",
    "prometheus_client",
    "yaml",
}
PURE_AIOKAFKA = {"aiokafka": {"ConsumerRecord"}, "aiokafka.partitioner": {"DefaultPartitioner"}}
HTTP = {
    "service.frontdoor",
    "service.app",
    "service.ingest",
    "service.binding",
    "service.body",
    "service.accesslog",
    "service.problems",
    "service.openapi",
}
SPOOL = {
    "service.producer",
    "service.publisher",
    "service.drainer",
    "service.spool",
    "service.spoolsegments",
    "service.spoolformat",
    "service.spoolfiles",
    "service.deadletter",
}
PROCESSOR = {
    "service.processor",
    "service.assignment",
    "service.worker",
    "service.restore",
    "service.aheadofclock",
}
# The names of aiokafka's private attributes the service relies on.
PRIVATE = re.compile(r"\._(sender|message_accumulator|coordinator|txn_manager|client)\b")


def modules() -> dict[str, Path]:
    return {
        f"{path.parent.name}.{path.stem}": path
        for package in PACKAGES
        for path in sorted((ROOT / package).glob("*.py"))
        if path.stem != "__init__"
    }


def imports(path: Path) -> list[tuple[str, set[str]]]:
    """(module, names) of each runtime import; ``names`` empty for ``import x``."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(node)
        for guard in ast.walk(tree)
        if isinstance(guard, ast.If) and "TYPE_CHECKING" in ast.unparse(guard.test)
        for stmt in guard.body
        for node in ast.walk(stmt)
    }
    found: list[tuple[str, set[str]]] = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, set()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in PACKAGES:  # from service import metrics
                found += [(f"{node.module}.{a.name}", set()) for a in node.names]
            else:
                found.append((node.module, {a.name for a in node.names}))
    return found


def internal(path: Path) -> set[str]:
    return {m for m, _ in imports(path) if m.split(".")[0] in PACKAGES}


def test_the_map_lists_every_module_once_and_nothing_else() -> None:
    rows = [m.group(1) for line in MAP.read_text().splitlines() if (m := ROW.match(line))]
    listed = [row.removesuffix(".py").replace("/", ".") for row in rows]
    assert len(listed) == len(set(listed)), "a module is in the map twice"
    assert set(listed) - set(modules()) == set(), "the map names a module that is gone"
    assert set(modules()) - set(listed) == set(), "a module is missing from the map"


def test_every_module_says_its_one_job() -> None:
    for name, path in modules().items():
        assert ast.get_docstring(ast.parse(path.read_text())), f"{name} has no docstring"


@pytest.mark.parametrize("name", sorted(PURE))
def test_the_pure_core_does_no_io(name: str) -> None:
    for module, names in imports(modules()[name]):
        top = module.split(".")[0]
        assert top not in IMPURE_LIBRARIES, f"{name} imports {module}"
        if top == "aiokafka":
            assert names <= PURE_AIOKAFKA.get(module, set()), f"{name} imports {module}"
        if top in PACKAGES:
            assert module in PURE, f"{name} (pure) imports {module}, which is not"


def test_the_sides_stay_apart() -> None:
    for name, path in modules().items():
        used = internal(path)
        if name in HTTP | SPOOL:
            assert not used & PROCESSOR, f"{name} imports the processor: {used & PROCESSOR}"
        if name in PROCESSOR:
            assert not used & (HTTP | SPOOL), f"{name} imports ingest: {used & (HTTP | SPOOL)}"
        if not name.startswith("testkit."):
            assert not any(m.startswith("testkit") for m in used), f"{name} imports testkit"


def test_only_one_module_touches_aiokafka_internals() -> None:
    for name, path in modules().items():
        if name in ("service.aiokafka_internals",) or name.startswith("testkit."):
            continue
        assert not PRIVATE.search(path.read_text()), f"{name} uses aiokafka's private attributes"
