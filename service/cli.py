"""The ``callstatus`` command: ``serve``, ``sign``, ``tail``, ``simulate``, ``local-secret``
and ``spool dead-letter list|replay``."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
from collections.abc import Sequence

from service import logs, signature
from service.settings import LOCAL_ENV_FILE, SettingsError, load_settings


def _fail(message: str) -> int:
    print(f"callstatus: {message}", file=sys.stderr)
    return 2


def cmd_serve(_: argparse.Namespace) -> int:
    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format)
    if not settings.verify_signatures:
        import structlog

        structlog.get_logger(logger_name="callstatus").warning(
            "SIGNATURE VERIFICATION IS OFF: anyone can post events; local play only"
        )
    from service.server import build

    server = build(settings)
    server.run()
    # uvicorn returns normally after a failed start-up, and we stop the server when the
    # processor dies: both must be failed exits for the supervisor to see them.
    if not server.started:
        return 3
    return 1 if server.failed else 0


def cmd_sign(args: argparse.Namespace) -> int:
    secret = args.secret
    if secret is None:
        configured = load_settings().signing_secrets
        if not configured:
            return _fail("no secret: pass --secret or set CALLSTATUS_SIGNING_SECRETS")
        secret = configured[0]
    body = sys.stdin.buffer.read()
    timestamp = args.timestamp if args.timestamp is not None else int(time.time())
    print(signature.sign(secret, timestamp, body))
    return 0


def cmd_local_secret(_: argparse.Namespace) -> int:
    """Create a signing secret for local play once, unless one is configured already."""
    if os.environ.get("CALLSTATUS_SIGNING_SECRETS"):
        print("callstatus: using CALLSTATUS_SIGNING_SECRETS from the environment", file=sys.stderr)
        return 0
    if LOCAL_ENV_FILE.exists():
        print(f"callstatus: using the signing secret in {LOCAL_ENV_FILE}", file=sys.stderr)
        return 0
    value = "sigsec_" + secrets.token_hex(20)
    LOCAL_ENV_FILE.write_text(f"CALLSTATUS_SIGNING_SECRETS={value}\n", encoding="utf-8")
    LOCAL_ENV_FILE.chmod(0o600)
    print(
        f"callstatus: created a local signing secret in {LOCAL_ENV_FILE} (git-ignored); "
        "`callstatus sign` uses it, and CALLSTATUS_SIGNING_SECRETS overrides it",
        file=sys.stderr,
    )
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    settings = load_settings()
    from service.tail import tail

    try:
        return asyncio.run(
            tail(
                settings,
                as_json=args.json,
                from_beginning=args.from_beginning,
                max_messages=args.max_messages,
                idle_timeout=args.idle_timeout,
            )
        )
    except KeyboardInterrupt:  # Ctrl-C is how a person stops following
        return 130


def cmd_dead_letter(args: argparse.Namespace) -> int:
    """List or replay the spool's dead letters (service/deadletter.py): events answered
    202 from the spool that Kafka refused for good."""
    settings = load_settings()
    from service import deadletter

    directory = deadletter.directory_of(settings.spool_dir)
    if not directory.is_dir():
        print(f"callstatus: no dead letters ({directory} does not exist)", file=sys.stderr)
        return 0
    if args.action == "list":
        for letter in deadletter.entries(directory):
            received = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(letter.received_ms / 1000))
            print(
                f"{letter.path.name}\teventId={letter.event_id}\tkey={letter.key.decode()}"
                f"\treceived={received}\tbytes={len(letter.value)}"
            )
        return 0
    results = asyncio.run(deadletter.replay(settings, directory))
    kept = 0
    for letter, error in results:
        if error is None:
            print(f"sent {letter.path.name}")
        else:
            kept += 1
            print(f"callstatus: kept {letter.path.name}: {error}", file=sys.stderr)
    return 1 if kept else 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="callstatus", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the service (role from CALLSTATUS_ROLE)").set_defaults(
        func=cmd_serve
    )
    sign = sub.add_parser("sign", help="print a FreeClimb-Signature value for the body on stdin")
    sign.add_argument("--secret", help="signing secret (default: the first configured one)")
    sign.add_argument("--timestamp", type=int, help="unix seconds (default: now)")
    sign.set_defaults(func=cmd_sign)
    tail = sub.add_parser("tail", help="follow the changes and rejected topics")
    tail.add_argument("--json", action="store_true", help="print each message's raw JSON")
    tail.add_argument("--from-beginning", action="store_true", help="start at the oldest message")
    tail.add_argument("--max-messages", type=int, help="stop after this many messages")
    tail.add_argument("--idle-timeout", type=float, help="stop after this many quiet seconds")
    tail.set_defaults(func=cmd_tail)
    from service import simulate  # the command's own options live with it

    sim = sub.add_parser(
        "simulate", help="send realistic FreeClimb callbacks and account for every one"
    )
    simulate.add_arguments(sim)
    sim.set_defaults(func=simulate.main)
    sub.add_parser(
        "local-secret", help="create a git-ignored signing secret for local play, once"
    ).set_defaults(func=cmd_local_secret)
    spool = sub.add_parser("spool", help="the ingest spool (CALLSTATUS_SPOOL_DIR)")
    spool_sub = spool.add_subparsers(dest="spool_command", required=True)
    dead = spool_sub.add_parser(
        "dead-letter", help="spooled events Kafka refused for good: list them, or replay them"
    )
    dead.add_argument(
        "action",
        choices=("list", "replay"),
        help="list: one line per event; replay: send each to the ingest topic in order, "
        "deleting its file once Kafka acknowledged it (stops at the first refusal)",
    )
    dead.set_defaults(func=cmd_dead_letter)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except SettingsError as exc:  # one readable line, never a traceback
        return _fail(str(exc))
    return code


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["main"]
