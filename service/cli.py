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
from datetime import UTC, datetime
from pathlib import Path

from pydantic import SecretStr

from schemas.call import ACCOUNT_ID
from service import logs, signature
from service.settings import LOCAL_ENV_FILE, SettingsError, load_settings

# The account of a local one-account file unless --account says otherwise: the one of
# the README's example webhook, so that example is accepted as it stands.
LOCAL_ACCOUNT_ID = "AC1334ffb694cd8d969f51cddf5f7c9b478546d50c"


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
    if secret is not None and (args.account or args.accounts_file):
        return _fail("--secret signs with that secret: not with --account or --accounts-file")
    if secret is None and (args.account or args.accounts_file):
        found = _account_secret(args.account, args.accounts_file)
        if isinstance(found, int):
            return found
        secret = found
    if secret is None:
        settings = load_settings()
        if settings.accounts_file is not None:
            found = _account_secret(None, settings.accounts_file)
            if isinstance(found, int):
                return found
            secret = found
        elif not settings.signing_secrets:
            return _fail(
                "no secret: pass --secret or set CALLSTATUS_SIGNING_SECRETS "
                "(or CALLSTATUS_ACCOUNTS_FILE)"
            )
        else:
            secret = settings.signing_secrets[0]
    body = sys.stdin.buffer.read()
    timestamp = args.timestamp if args.timestamp is not None else int(time.time())
    print(signature.sign(secret, timestamp, body))
    return 0


def _account_secret(account_id: str | None, path: Path | None) -> SecretStr | int:
    """The current secret of ``account_id`` (the only account when None) in the accounts
    file at ``path`` (CALLSTATUS_ACCOUNTS_FILE when None; the shorthand without one), or
    the exit status of a failure already reported."""
    from service import accountbook, accounts

    if path is None:
        settings = load_settings()
        path = settings.accounts_file
        if path is None:
            book = accountbook.shorthand_book(settings.signing_secrets, settings.signing_account_id)
    if path is not None:
        book, _ = accounts.load(path)
    where = str(path) if path is not None else "CALLSTATUS_SIGNING_SECRETS"
    if account_id is None:
        if len(book) != 1:
            return _fail(f"{where} has {len(book)} accounts: pass --account")
        [account] = book
    else:
        found = book.lookup(account_id)
        if found is None:
            return _fail(f"account {account_id} is not in {where}")
        account = found
    return account.current_secret


# The one-account accounts file `make run` creates for local play (git-ignored), and
# what .callstatus.env then holds: its path, so serve, sign and simulate all use it.
LOCAL_ACCOUNTS_FILE = Path(".callstatus-accounts.yaml")
# Local play's reconciliation (issue 19): against the FreeClimb API stand-in that
# `callstatus simulate` runs (service/standin.py's LOCAL_PORT), after seconds rather
# than production's quarter of an hour, so `simulate --lost 0.1` sees lost callbacks
# recovered within a minute (its default wait is these two plus a margin).
LOCAL_RECONCILE_AFTER_SECONDS = 20
LOCAL_RECONCILE_SWEEP_SECONDS = 15


def _local_env() -> str:
    """What .callstatus.env holds for local play."""
    from service.standin import local_url

    return (
        f"CALLSTATUS_ACCOUNTS_FILE={LOCAL_ACCOUNTS_FILE}\n"
        "# Reconciliation against the FreeClimb API stand-in of `callstatus simulate`\n"
        f"CALLSTATUS_FREECLIMB_API_URL={local_url()}\n"
        f"CALLSTATUS_RECONCILE_AFTER_SECONDS={LOCAL_RECONCILE_AFTER_SECONDS}\n"
        f"CALLSTATUS_RECONCILE_SWEEP_SECONDS={LOCAL_RECONCILE_SWEEP_SECONDS}\n"
    )


def cmd_local_secret(args: argparse.Namespace) -> int:
    """Create the accounts for local play once, unless some are configured already: a
    one-account accounts file (``--account``, by default the README example's), named in
    .callstatus.env so that every local command finds it. An existing .callstatus.env is
    kept as it is, also one that holds the shorthand's secret (from before the file)."""
    if args.accounts_file is not None:
        return _local_accounts_file(args.accounts_file, args.account)
    for name in ("CALLSTATUS_ACCOUNTS_FILE", "CALLSTATUS_SIGNING_SECRETS"):
        if os.environ.get(name):
            print(f"callstatus: using {name} from the environment", file=sys.stderr)
            return 0
    if LOCAL_ENV_FILE.exists():
        print(f"callstatus: using the local settings in {LOCAL_ENV_FILE}", file=sys.stderr)
        return 0
    code = _local_accounts_file(LOCAL_ACCOUNTS_FILE, args.account)
    if code:
        return code
    LOCAL_ENV_FILE.write_text(_local_env(), encoding="utf-8")
    LOCAL_ENV_FILE.chmod(0o600)
    print(
        f"callstatus: {LOCAL_ENV_FILE} (git-ignored) points serve, sign and simulate at it; "
        "environment variables override it",
        file=sys.stderr,
    )
    return 0


def _new_secret() -> str:
    return "sigsec_" + secrets.token_hex(20)


def _new_api_key() -> str:
    return "local-" + secrets.token_hex(20)


def _local_accounts_file(path: Path, account_id: str) -> int:
    """A one-account accounts file at ``path``, made once (owner-only), kept after."""
    if not ACCOUNT_ID.fullmatch(account_id):
        return _fail(f"--account {account_id!r} is not an account id (AC + 40 hex digits)")
    text = (
        "# Accounts for local play, made by `callstatus local-secret`: never commit it.\n"
        "# Schema: schemas/config/accounts.schema.json. Edits are picked up while the\n"
        "# service runs (CALLSTATUS_ACCOUNTS_RELOAD_SECONDS).\n"
        "accounts:\n"
        f"  {account_id}:\n"
        "    name: local\n"
        f'    signingSecrets: ["{_new_secret()}"]\n'
        "    # For reconciliation: the key the FreeClimb API stand-in of `callstatus\n"
        "    # simulate` accepts for this account (a real account's comes from FreeClimb).\n"
        f'    apiKey: "{_new_api_key()}"\n'
    )
    try:
        # O_EXCL: an existing file, whoever made it, is never overwritten.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"callstatus: using the accounts in {path}", file=sys.stderr)
        return 0
    except OSError as exc:
        return _fail(f"cannot create {path}: {exc.strerror}")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    print(
        f"callstatus: created a one-account accounts file {path} (account {account_id}); "
        f"serve with CALLSTATUS_ACCOUNTS_FILE={path}, sign with "
        f"`callstatus sign --accounts-file {path}`",
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


def _utc_time(text: str) -> datetime:
    """A --since/--until value: ISO 8601; without a zone it is UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def cmd_backfill(args: argparse.Namespace) -> int:
    """List an account's calls from FreeClimb's REST API and publish each to the ingest
    topic as an ``api`` event (service/reconciler.py): after a known outage."""
    if ACCOUNT_ID.fullmatch(args.account) is None:
        return _fail("--account is AC followed by 40 hex digits")
    if args.until <= args.since:
        return _fail("--until must be after --since")
    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format)
    from service.reconciler import backfill

    try:
        asyncio.run(backfill(settings, args.account, args.since, args.until))
    except LookupError as exc:
        return _fail(f"{exc.args[0]} (CALLSTATUS_FREECLIMB_API_KEY or the accounts file)")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="callstatus", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the service (role from CALLSTATUS_ROLE)").set_defaults(
        func=cmd_serve
    )
    sign = sub.add_parser("sign", help="print a FreeClimb-Signature value for the body on stdin")
    sign.add_argument(
        "--secret", help="signing secret (default: the configured one, see --account)"
    )
    sign.add_argument(
        "--account",
        help="sign with this account's current (first) secret in the accounts file "
        "(default: its only account, or the CALLSTATUS_SIGNING_SECRETS shorthand's)",
    )
    sign.add_argument(
        "--accounts-file",
        type=Path,
        help="the accounts file to take it from (default: CALLSTATUS_ACCOUNTS_FILE)",
    )
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
    local = sub.add_parser(
        "local-secret",
        help="create a git-ignored one-account accounts file for local play, once",
    )
    local.add_argument(
        "--accounts-file",
        type=Path,
        help="make only a one-account accounts file at this path (default: "
        f"{LOCAL_ACCOUNTS_FILE}, named in .callstatus.env)",
    )
    local.add_argument(
        "--account",
        default=LOCAL_ACCOUNT_ID,
        help=f"that file's account id (default: {LOCAL_ACCOUNT_ID}, the README's example)",
    )
    local.set_defaults(func=cmd_local_secret)
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
    back = sub.add_parser(
        "backfill",
        help="fetch an account's calls from FreeClimb's REST API into the ingest topic",
    )
    back.add_argument("--account", required=True, help="the FreeClimb account id")
    back.add_argument(
        "--since", required=True, type=_utc_time, help="calls started at or after (ISO 8601)"
    )
    back.add_argument("--until", required=True, type=_utc_time, help="calls ended by (ISO 8601)")
    back.set_defaults(func=cmd_backfill)
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
