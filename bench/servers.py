"""The HTTP servers under test, each a real process on a free port of its own: the
service (``callstatus serve``), the bare Starlette floor and the Go peer."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.data import ACCOUNT_ID, SECRET
from service.settings import Role
from testkit import ServiceProcess, free_port, settings_for

INGEST = "/v1/call-status"
ROOT = Path(__file__).resolve().parents[1]


def _stat(pid: int) -> list[str]:
    # The fields after "(comm)": comm may hold spaces and parentheses itself.
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, all its threads (Linux /proc:
    utime and stime, fields 14 and 15 of proc(5))."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its descendants so far: the live ones
    (found by their parent pid in /proc) and the ended ones their parents waited for
    (cutime and cstime). A server that forks a helper is charged for it."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(_stat(int(entry.name))[1])
            except (OSError, IndexError, ValueError):
                continue  # ended while we looked: its time is in its parent's cutime
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    ticks = 0
    for member in tree:
        try:
            fields = _stat(member)
        except OSError:
            continue  # ended since the scan
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")


def _spawn(args: list[str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)


@dataclass
class Server:
    """A running server: its name in the report, its ingest URL and its process."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    topic: str | None = None
    service: ServiceProcess | None = field(default=None, repr=False)
    # The processor's consumer group, when the server runs one (ROLE=all).
    group: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    async def stop(self) -> None:
        if self.service is not None:
            await asyncio.to_thread(self.service.terminate, 60)
            return
        self.proc.terminate()
        try:
            await asyncio.to_thread(self.proc.wait, 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait, 30)


async def _wait_ready(server: Server, deadline_s: float = 90) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline_s
    base = server.url.removesuffix(INGEST)
    async with httpx.AsyncClient(base_url=base) as client:
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited: {server.log_path.read_text()[-3000:]}")
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            if loop.time() > give_up:
                raise TimeoutError(f"{server.name} never became ready")
            await asyncio.sleep(0.2)  # polling interval


async def service(
    name: str, bootstrap: str, unique: str, role: Role, log_dir: Path, **overrides: object
) -> Server:
    """``callstatus serve`` as installed and as ``make run`` configures it: a
    one-account accounts file (``callstatus local-secret``'s, bound to the bodies'
    account), signatures checked, console logs (its CALLSTATUS_LOG_FORMAT default) with
    the access line of every request, the spool on in a folder of its own (two nodes
    started from one folder must not share it)."""
    accounts = log_dir / f"{name}-accounts.yaml".replace(" ", "-").replace("=", "-")
    accounts.write_text(
        f"accounts:\n  {ACCOUNT_ID}:\n    name: bench\n    signingSecrets: [{SECRET!r}]\n"
    )
    config: dict[str, object] = {
        "verify_signatures": True,
        "accounts_file": accounts,
        "log_format": "console",
        "spool_enabled": True,
        "spool_dir": log_dir / f"{name}-spool",
    }
    settings = settings_for(bootstrap, unique, role=role, **{**config, **overrides})
    # Its own log format (testkit makes every other service process log JSON).
    proc = ServiceProcess(settings, log_dir, name, json_logs=False)
    server = Server(
        name,
        f"http://127.0.0.1:{proc.port}{INGEST}",
        proc.proc,
        proc.log_path,
        settings.topic_ingest,
        proc,
        settings.consumer_group if role.runs_processor else None,
    )
    await _wait_ready(server)
    return server


async def bare_starlette(log_dir: Path) -> Server:
    port = free_port()
    log_path = log_dir / "bare-starlette.log"
    uvicorn = [sys.executable, "-m", "uvicorn", "bench.bare:app", "--host", "127.0.0.1"]
    options = ["--loop", "uvloop", "--http", "httptools", "--no-access-log"]
    proc = _spawn(
        [*uvicorn, "--port", str(port), *options, "--log-level", "warning"], log_path, ROOT
    )
    server = Server("bare Starlette", f"http://127.0.0.1:{port}{INGEST}", proc, log_path)
    await _wait_ready(server)
    return server


async def go_peer(binary: Path, bootstrap: str, topic: str, log_dir: Path) -> Server:
    """The Go peer; it uses every core (GOMAXPROCS defaults to the machine's count)."""
    port = free_port()
    log_path = log_dir / "go-peer.log"
    flags = [f"-addr=127.0.0.1:{port}", f"-brokers={bootstrap}", f"-topic={topic}"]
    proc = _spawn([str(binary), *flags, f"-secrets={SECRET}"], log_path)
    server = Server("Go peer", f"http://127.0.0.1:{port}{INGEST}", proc, log_path, topic)
    await _wait_ready(server)
    return server
