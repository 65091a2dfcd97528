"""``callstatus serve`` as a real child process: settings for a test's own topics, the
environment that carries every setting to the child, and the process itself."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
from enum import Enum
from pathlib import Path

import httpx
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import NoDecode

from service.settings import Settings
from testkit.launcher import ROOT

PREFIX: str = Settings.model_config.get("env_prefix") or ""


def settings_for(bootstrap: str, unique: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "kafka_bootstrap_servers": bootstrap,
        "verify_signatures": False,
        "role": "processor",
        "topic_ingest": f"t-{unique}.ingest",
        "topic_changes": f"t-{unique}.changes",
        "topic_rejected": f"t-{unique}.rejected",
        "topic_state": f"t-{unique}.state",
        "consumer_group": f"g-{unique}",
        "log_format": "console",
    }
    values.update(overrides)
    return Settings.model_validate(values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    return PREFIX + field.upper()


def _env_value(value: object, info: FieldInfo) -> str:
    """``value`` written the way the settings parse it back."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, tuple | list):
        items = [_env_value(item, info) for item in value]
        # NoDecode fields are a plain comma-separated list; other collections are JSON,
        # pydantic-settings' default for complex types.
        return ",".join(items) if NoDecode in info.metadata else json.dumps(items)
    return str(value)


def environment(settings: Settings) -> dict[str, str]:
    """Every setting as the variable that sets it to this value, derived from the
    model's fields so that a new setting needs no edit here."""
    fields = type(settings).model_fields
    # A value read from its *_FILE setting travels as the file: both set is refused.
    from_files = {
        name.removesuffix("_file")
        for name in fields
        if name.endswith("_file") and getattr(settings, name) is not None
    }
    env: dict[str, str] = {}
    for name, info in fields.items():
        value = getattr(settings, name)
        if name in from_files:
            continue
        if value is None:
            # An environment cannot spell null: leaving the variable out gives the
            # default, which is only right when the default is None.
            if info.default is not None:
                raise ValueError(f"{name}: None cannot be set through the environment")
            continue
        env[env_name(name)] = _env_value(value, info)
    return env


def settings_env(settings: Settings, port: int, json_logs: bool = True) -> dict[str, str]:
    """The environment that makes ``callstatus serve`` run with these settings, on
    127.0.0.1:``port``, with JSON log lines (:meth:`ServiceProcess.logged` reads them)
    unless ``json_logs`` is False (the bench: the settings' own format). Relative paths
    resolve in the process's working directory (its log folder)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    env.update(environment(settings))
    env[env_name("host")] = "127.0.0.1"
    env[env_name("port")] = str(port)
    if json_logs:
        env[env_name("log_format")] = "json"
    return env


class ServiceProcess:
    """``callstatus serve`` as a real child process, as it runs in production."""

    def __init__(
        self,
        settings: Settings,
        log_dir: Path,
        name: str,
        port: int | None = None,
        json_logs: bool = True,
    ) -> None:
        # A given port: a node started again where its clients already send.
        self.port = port if port is not None else free_port()
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "callstatus"), "serve"],
            env=settings_env(settings, self.port, json_logs),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=log_dir,  # no .callstatus.env there: the environment alone configures it
        )

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()

    def wait(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        self._log.close()
        return code

    def terminate(self, timeout: float = 60) -> bool:
        """SIGTERM, wait, and report whether the process shut down cleanly (uvicorn
        re-raises the signal after its graceful shutdown, so the exit code is -15).
        A process still running after ``timeout`` is killed and reported unclean."""
        self.proc.terminate()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            return False
        finally:
            self._log.close()
        clean_exit = code in (0, -signal.SIGTERM)
        return clean_exit and self.logged("stopped")

    def logged(self, event: str) -> bool:
        """Whether the process wrote a JSON log line with this event."""
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{") and json.loads(line).get("event") == event:
                return True
        return False

    async def wait_ready(self, deadline_s: float = 60) -> None:
        """Poll /readyz until the node says it is ready (for a processor: partitions
        assigned and restored)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + deadline_s
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}") as client:
            while True:
                assert self.alive(), (
                    f"{self.log_path.name} exited: {self.log_path.read_text()[-3000:]}"
                )
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                assert loop.time() < give_up, f"{self.log_path.name} never became ready"
                await asyncio.sleep(0.2)  # polling interval

    def alive(self) -> bool:
        return self.proc.poll() is None
