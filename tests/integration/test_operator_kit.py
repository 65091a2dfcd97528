"""Every metric the Grafana dashboard and the alert rules name is exported by a running
``callstatus serve`` (a real process, both stages, on the shared broker)."""

from __future__ import annotations

from pathlib import Path

import httpx

from testkit import ServiceProcess, settings_for
from tests.conftest import BOOTSTRAP
from tests.test_operator_kit import named_metrics

# The sample names each metric type exposes, from its `# TYPE` name.
SUFFIXES = {
    "counter": ("",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def exported(exposition: str) -> set[str]:
    """Sample names the exposition can carry. Read from the `# TYPE` lines, which
    prometheus_client writes for every registered metric, even a labelled one with no
    sample yet (a counter's TYPE name already ends in _total)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.update(name + suffix for suffix in SUFFIXES[kind])
    return names


def test_exported_reads_type_lines() -> None:
    text = "# TYPE a_total counter\n# TYPE b_seconds histogram\nc_total 1\n"
    assert exported(text) == {"a_total", "b_seconds_bucket", "b_seconds_sum", "b_seconds_count"}


async def test_dashboard_and_alerts_name_only_exported_metrics(unique: str, tmp_path: Path) -> None:
    node = ServiceProcess(settings_for(BOOTSTRAP, unique, role="all"), tmp_path, "metrics")
    try:
        await node.wait_ready()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.port}") as client:
            response = await client.get("/metrics")
    finally:
        assert node.terminate()
    assert response.status_code == 200
    names = exported(response.text)
    named = named_metrics()
    assert len(named) >= 10, named  # the kit is read at all
    assert not named - names, f"named but not exported: {sorted(named - names)}"
