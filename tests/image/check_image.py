"""``make image-test``: build the service's container image and run it for real.

Run from the repository root as ``.venv/bin/python -m tests.image.check_image`` (as
root: it may install packages and start the Docker engine). Not part of pytest's run;
CI runs it as its own step after ``make test``. Steps:

1. A Docker engine: Debian's ``docker.io`` is installed when ``dockerd`` is absent, and
   ``dockerd --bridge=none --iptables=false`` is started when none answers (and stopped
   again at the end). Without a bridge, containers only get ``--network host``: every
   packet stays on this machine's loopback.
2. A base image made from Debian's packages, because no image registry can be reached
   here: ``debootstrap --variant=minbase bookworm`` with python3 (3.11) and what the
   Dockerfile's stages use, imported with ``docker import``. Built once, then cached
   (skipped while the image exists). A one-layer image on top of it adds this machine's
   CA bundle and a pip.conf that uses it, so pip in the build stage reaches the package
   index the way the host's pip does; that layer is rebuilt only when the bundle changes.
3. The project's image, built from the root Dockerfile with ``BASE_IMAGE`` set to that
   base (its default stays the official slim image). Its size is printed.
4. The container, run as deployed: read-only root filesystem with a tmpfs /tmp, the
   image's own non-root user (checked: 10001:10001), all capabilities dropped, no new
   privileges, host network, against a private broker of this test (port 20300, the
   launcher in deploy/local/).
   A signed callback gets 202 and its change is read back (read_committed). Then traffic
   flows while ``docker stop`` drains the container: it must exit 0, no answer may be a
   5xx other than 503, and after a restart every event that got a 202 appears on the
   changes topic exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import httpx

from schemas.messages import INGEST_PATH
from service import signature
from testkit import free_port, private_broker, read_committed

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "build" / "image-test"  # git-ignored: the dockerd log, scratch files

# The base made from Debian's packages (cached), the layer that adds the host's CA
# bundle, and the project's image built on it.
# What the Dockerfile's stages need of their base: python (3.11 in bookworm) with the
# venv module and `python` on PATH, and groupadd/useradd for the runtime user.
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "passwd")
# The cached base's tag names its package list, so changing the list rebuilds it.
_PACKAGES_KEY = hashlib.sha256(" ".join(BASE_PACKAGES).encode()).hexdigest()[:8]
ROOTFS_IMAGE = f"callstatus-base-rootfs:bookworm-{_PACKAGES_KEY}"
BASE_IMAGE = "callstatus-base:bookworm"
IMAGE = "callstatus:image-test"

BROKER_PORT = 20300  # this test's own broker (and controller on 20301)
APP_UID = "10001:10001"  # the Dockerfile's USER (no --user: the image must say it)
DOCKERD_START_S = 60.0
READY_S = 120.0
STOP_TIMEOUT_S = 40  # above CALLSTATUS_SHUTDOWN_GRACE_SECONDS plus client close
TRAFFIC_BEFORE_STOP = 40  # 202s to collect before `docker stop` is sent
TRAFFIC_MAX = 3000  # requests; the sender stops by itself whatever happens


class Failed(Exception):
    """A check of the image test did not hold."""


PASSED: list[str] = []  # the checks that held, for the closing line


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def passed(check: str) -> None:
    PASSED.append(check)
    print(f"    ok: {check}", flush=True)


def run(
    args: Sequence[str], *, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> str:
    """Run a command, fail with its output when it fails, return its stdout."""
    proc = subprocess.run(
        list(args),
        input=stdin,
        capture_output=True,
        env={**os.environ, **(env or {})},
        check=False,
        timeout=900,
    )
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).decode(errors="replace")
        raise Failed(f"{' '.join(args[:3])} ... failed ({proc.returncode}):\n{output[-4000:]}")
    return proc.stdout.decode(errors="replace")


def succeeds(args: Sequence[str]) -> bool:
    return subprocess.run(list(args), capture_output=True, check=False, timeout=120).returncode == 0


# --------------------------------------------------------------------- 1. the engine


def install_packages() -> None:
    missing = [tool for tool in ("dockerd", "debootstrap") if shutil.which(tool) is None]
    if not missing:
        return
    step(f"installing Debian's docker.io and debootstrap ({', '.join(missing)} absent)")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update"], env=env)
    packages = ["docker.io", "debootstrap"]
    run(["apt-get", "install", "-y", "--no-install-recommends", *packages], env=env)


def docker() -> str:
    found = shutil.which("docker")
    if found is None:
        raise Failed("no docker client on PATH after installing docker.io")
    return found


def start_dockerd() -> subprocess.Popen[bytes] | None:
    """Start the engine unless one answers; returns the process this call started."""
    if succeeds([docker(), "info"]):
        step("Docker engine already running")
        return None
    WORK.mkdir(parents=True, exist_ok=True)
    log_path = WORK / "dockerd.log"
    step(f"starting dockerd --bridge=none --iptables=false (log {log_path})")
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            ["dockerd", "--bridge=none", "--iptables=false"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # not in our process group: Ctrl-C reaches us only
        )
    give_up = time.monotonic() + DOCKERD_START_S
    while not succeeds([docker(), "info"]):
        if proc.poll() is not None or time.monotonic() > give_up:
            proc.kill()
            tail = log_path.read_text(errors="replace")[-3000:]
            raise Failed(f"dockerd did not answer within {DOCKERD_START_S:.0f}s:\n{tail}")
        time.sleep(0.5)  # polling interval
    return proc


def stop_dockerd(proc: subprocess.Popen[bytes]) -> None:
    step("stopping the dockerd this test started")
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


# ------------------------------------------------------------------- 2. the base image


def image_exists(name: str) -> bool:
    return succeeds([docker(), "image", "inspect", name])


def debian_mirror() -> str:
    """The Debian mirror apt is configured with (deb822 or one-line sources)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file() or path.suffix not in ("", ".list", ".sources"):
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and len(words) > 1 and "security" not in words[1]:
                return words[1]
            if words[:1] == ["deb"]:
                uri = next((w for w in words[1:] if "://" in w), "")
                if uri and "security" not in uri and "debian" in uri:
                    return uri
    return "http://deb.debian.org/debian"


def build_rootfs_image() -> None:
    if image_exists(ROOTFS_IMAGE):
        step(f"base {ROOTFS_IMAGE}: cached")
        return
    mirror = debian_mirror()
    step(f"building {ROOTFS_IMAGE} with debootstrap from {mirror} (once; a few minutes)")
    with tempfile.TemporaryDirectory(prefix="callstatus-rootfs-", dir="/var/tmp") as scratch:
        rootfs = Path(scratch) / "rootfs"
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                "bookworm",
                str(rootfs),
                mirror,
            ]
        )
        # Package caches and lists are of no use in an image.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.run(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."],
            capture_output=True,
            check=True,
            timeout=600,
        )
        run(
            [
                docker(),
                "import",
                "--change",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change",
                "ENV LANG=C.UTF-8",
                "--change",
                'CMD ["python3"]',
                "-",
                ROOTFS_IMAGE,
            ],
            stdin=tar.stdout,
        )


def build_base_image() -> None:
    """ROOTFS_IMAGE plus this machine's CA bundle and a pip.conf that trusts it."""
    bundle = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
    with tempfile.TemporaryDirectory(prefix="callstatus-base-") as scratch:
        context = Path(scratch)
        lines = [f"FROM {ROOTFS_IMAGE}"]
        pip_conf = ["[global]"]
        if bundle.is_file():
            shutil.copyfile(bundle, context / "ca-certificates.crt")
            lines.append("COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt")
            pip_conf.append("cert = /etc/ssl/certs/ca-certificates.crt")
        if os.environ.get("PIP_INDEX_URL"):
            pip_conf.append(f"index-url = {os.environ['PIP_INDEX_URL']}")
        (context / "pip.conf").write_text("\n".join(pip_conf) + "\n")
        lines.append("COPY pip.conf /etc/pip.conf")
        (context / "Dockerfile").write_text("\n".join(lines) + "\n")
        step(f"base {BASE_IMAGE}: {ROOTFS_IMAGE} + the host's CA bundle for pip")
        build(["-t", BASE_IMAGE, str(context)])


def build(args: Sequence[str]) -> None:
    # The classic builder: BuildKit would fetch the `# syntax=` frontend image from a
    # registry, which cannot be reached here.
    run([docker(), "build", "--network", "host", *args], env={"DOCKER_BUILDKIT": "0"})


# ------------------------------------------------------------------ 3. the project image


def build_project_image() -> int:
    step(f"building {IMAGE} from the root Dockerfile with BASE_IMAGE={BASE_IMAGE}")
    build(["--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", IMAGE, str(ROOT)])
    size = int(run([docker(), "image", "inspect", "-f", "{{.Size}}", IMAGE]).strip())
    # Earlier builds' images, untagged by this one, would pile up run after run.
    run([docker(), "image", "prune", "--force"])
    passed(f"image {IMAGE} built on {BASE_IMAGE}: {size / 1e6:.1f} MB")
    return size


# --------------------------------------------------------------------- 4. run the image


def webhook(call_id: str) -> bytes:
    """A FreeClimb inboundCall callback: the first event of its call, so always accepted."""
    return json.dumps(
        {
            "requestType": "inboundCall",
            "callId": call_id,
            "accountId": "AC" + secrets.token_hex(20),
            "callStatus": "ringing",
            "direction": "inbound",
            "from": "+13121000109",
            "to": "+13121000096",
            "conferenceId": None,
            "parentCallId": None,
            "queueId": None,
        },
        separators=(",", ":"),
    ).encode()


class Container:
    """One ``docker run`` of the image, configured by environment variables."""

    def __init__(self, bootstrap: str, unique: str) -> None:
        self.name = f"callstatus-image-test-{unique}"
        self.port = free_port()
        self.secret = "sigsec_" + secrets.token_hex(20)
        self.changes_topic = f"t-img-{unique}.changes"
        self.env = {
            "CALLSTATUS_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "CALLSTATUS_SIGNING_SECRETS": self.secret,
            "CALLSTATUS_ROLE": "all",
            "CALLSTATUS_HOST": "127.0.0.1",  # host network: listen on loopback only
            "CALLSTATUS_PORT": str(self.port),
            "CALLSTATUS_TOPIC_INGEST": f"t-img-{unique}.ingest",
            "CALLSTATUS_TOPIC_CHANGES": self.changes_topic,
            "CALLSTATUS_TOPIC_REJECTED": f"t-img-{unique}.rejected",
            "CALLSTATUS_TOPIC_STATE": f"t-img-{unique}.state",
            "CALLSTATUS_TOPIC_PARTITIONS": "2",
            "CALLSTATUS_TOPIC_REPLICATION_FACTOR": "1",
            "CALLSTATUS_CREATE_TOPICS": "true",
            "CALLSTATUS_CONSUMER_GROUP": f"g-img-{unique}",
            "CALLSTATUS_LOG_FORMAT": "json",
            "CALLSTATUS_SHUTDOWN_GRACE_SECONDS": "20",
        }
        self.url = f"http://127.0.0.1:{self.port}"

    def start_new(self) -> None:
        env_args = [arg for key, value in self.env.items() for arg in ("-e", f"{key}={value}")]
        run(
            [
                docker(),
                "run",
                "--detach",
                "--name",
                self.name,
                "--network",
                "host",
                "--read-only",
                "--tmpfs",
                "/tmp:size=64m",
                "--cap-drop",
                "ALL",
                "--security-opt",
                "no-new-privileges",
                *env_args,
                IMAGE,
            ]
        )

    def restart(self) -> None:
        run([docker(), "start", self.name])

    def state(self) -> dict[str, object]:
        out = run([docker(), "inspect", "-f", "{{json .State}}", self.name])
        state: dict[str, object] = json.loads(out)
        return state

    def logs(self) -> str:
        proc = subprocess.run(
            [docker(), "logs", "--tail", "60", self.name],
            capture_output=True,
            check=False,
            timeout=60,
        )
        return (proc.stdout + proc.stderr).decode(errors="replace")

    async def stop(self) -> int:
        """``docker stop``: SIGTERM, then SIGKILL after the timeout. Returns the exit code."""
        proc = await asyncio.create_subprocess_exec(
            docker(), "stop", "-t", str(STOP_TIMEOUT_S), self.name, stdout=subprocess.DEVNULL
        )
        await proc.wait()
        state = await asyncio.to_thread(self.state)
        if state.get("OOMKilled"):
            raise Failed(f"the container was killed for memory:\n{self.logs()}")
        code = state.get("ExitCode")
        assert isinstance(code, int)
        return code

    def remove(self) -> None:
        subprocess.run(
            [docker(), "rm", "--force", "--volumes", self.name],
            capture_output=True,
            check=False,
            timeout=120,
        )

    async def wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + READY_S
        async with httpx.AsyncClient(base_url=self.url) as client:
            while True:
                state = await asyncio.to_thread(self.state)
                if not state.get("Running"):
                    raise Failed(f"the container exited ({state.get('ExitCode')}):\n{self.logs()}")
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                if loop.time() > give_up:
                    raise Failed(f"not ready within {READY_S:.0f}s:\n{self.logs()}")
                await asyncio.sleep(0.5)  # polling interval

    async def post(self, client: httpx.AsyncClient, body: bytes) -> httpx.Response:
        header = signature.sign(self.secret, int(time.time()), body)
        return await client.post(
            INGEST_PATH,
            content=body,
            headers={"Content-Type": "application/json", signature.HEADER: header},
        )


async def first_event(app: Container, bootstrap: str) -> str:
    """One signed callback: 202, and its change read back from the changes topic."""
    async with httpx.AsyncClient(base_url=app.url, timeout=30) as client:
        response = await app.post(client, webhook("CA" + secrets.token_hex(20)))
    if response.status_code != 202:
        raise Failed(f"signed callback answered {response.status_code}: {response.text}")
    event_id: str = response.json()["eventId"]
    records = await read_committed(bootstrap, app.changes_topic, 1, settle_s=0)
    if event_id not in {json.loads(r.value or b"{}")["eventId"] for r in records}:
        raise Failed(f"event {event_id} got 202 but never appeared on {app.changes_topic}")
    passed(f"signed callback: 202 (event {event_id}), its change read back")
    return event_id


async def traffic_through_stop(app: Container) -> tuple[list[str], Counter[str], int]:
    """Send callbacks (one new call each) and ``docker stop`` the container once
    TRAFFIC_BEFORE_STOP were accepted. Returns the accepted event ids, the answers by
    status (or transport error), and the container's exit code."""
    accepted: list[str] = []
    answers: Counter[str] = Counter()
    enough = asyncio.Event()

    async def sender(client: httpx.AsyncClient, count: int) -> None:
        for _ in range(count):
            try:
                response = await app.post(client, webhook("CA" + secrets.token_hex(20)))
            except httpx.TransportError:
                answers["connection refused or reset"] += 1
                return  # the server is gone: the stop has happened
            answers[str(response.status_code)] += 1
            if response.status_code == 202:
                accepted.append(response.json()["eventId"])
                if len(accepted) >= TRAFFIC_BEFORE_STOP:
                    enough.set()

    async with httpx.AsyncClient(base_url=app.url, timeout=30) as client:
        senders = [asyncio.create_task(sender(client, TRAFFIC_MAX // 4)) for _ in range(4)]
        waiter = asyncio.create_task(enough.wait())
        all_done = asyncio.create_task(asyncio.wait(senders))
        await asyncio.wait([waiter, all_done], timeout=300, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not enough.is_set():
            raise Failed(f"only {len(accepted)} callbacks accepted before the stop: {answers}")
        code = await app.stop()
        await asyncio.wait(senders, timeout=120)
    return accepted, answers, code


async def run_container(bootstrap: str) -> None:
    app = Container(bootstrap, uuid.uuid4().hex[:8])
    step(f"docker run {IMAGE}: read-only, its own user, --cap-drop ALL, --network host")
    app.start_new()
    try:
        await app.wait_ready()
        user = run([docker(), "exec", app.name, "id", "-u"]).strip()
        group = run([docker(), "exec", app.name, "id", "-g"]).strip()
        if f"{user}:{group}" != APP_UID:
            raise Failed(f"the service runs as {user}:{group}, not {APP_UID}")
        passed(f"ready (/readyz 200) on a read-only root filesystem as {user}:{group}")
        # The ingest spool's directory (the image's volume) is writable by that user.
        run([docker(), "exec", app.name, "sh", "-c", 'test -w "$CALLSTATUS_SPOOL_DIR"'])
        passed("the spool directory is writable under the read-only root")
        first = await first_event(app, bootstrap)

        step("traffic flowing while `docker stop` drains the container")
        accepted, answers, code = await traffic_through_stop(app)
        print(f"    answers: {dict(sorted(answers.items()))}; exit code {code}", flush=True)
        if code != 0:
            raise Failed(f"docker stop: exit code {code}, expected 0:\n{app.logs()}")
        server_errors = {k: n for k, n in answers.items() if k.startswith("5") and k != "503"}
        if server_errors:
            raise Failed(f"answers other than 503 among the 5xx: {server_errors}")
        passed(
            f"docker stop under traffic: exit 0, {len(accepted)} accepted, no 5xx other than 503"
        )

        step("restart the stopped container; every accepted event appears exactly once")
        app.restart()
        await app.wait_ready()
        expected = {first, *accepted}
        records = await read_committed(bootstrap, app.changes_topic, len(expected))
        seen = Counter(json.loads(r.value or b"{}")["eventId"] for r in records)
        lost = expected - set(seen)
        twice = {e: n for e, n in seen.items() if n > 1}
        if lost or twice:
            raise Failed(f"lost: {sorted(lost)}; more than once: {twice}")
        passed(f"after a restart: all {len(expected)} accepted events are changes, once each")
        code = await app.stop()
        if code != 0:
            raise Failed(f"second docker stop: exit code {code}:\n{app.logs()}")
        passed("second docker stop: exit 0")
    finally:
        app.remove()


async def with_broker() -> None:
    step(f"private Kafka broker on 127.0.0.1:{BROKER_PORT} (deploy/local/kafka)")
    async with private_broker(BROKER_PORT) as broker:
        await run_container(broker["address"])


def main() -> int:
    started = time.monotonic()
    if os.geteuid() != 0:
        print("image-test: needs root (installs packages, starts dockerd)", file=sys.stderr)
        return 2
    dockerd: subprocess.Popen[bytes] | None = None
    try:
        install_packages()
        dockerd = start_dockerd()
        passed("Docker engine answers")
        build_rootfs_image()
        build_base_image()
        size = build_project_image()
        asyncio.run(with_broker())
    except Failed as exc:
        print(f"image-test: FAILED: {exc}", file=sys.stderr, flush=True)
        print(f"image-test: {len(PASSED)} passed, 1 failed")
        return 1
    finally:
        if dockerd is not None:
            stop_dockerd(dockerd)
    minutes = (time.monotonic() - started) / 60
    print(f"image {IMAGE}: {size / 1e6:.1f} MB; image test took {minutes:.1f} min")
    print(f"image-test: {len(PASSED)} passed, 0 failed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
