"""The accounts configuration (service/accounts.py): the file's format and its errors,
the published schema, the book and its lookups, the SIGNING_SECRETS shorthand, the
settings that choose between them, hot reload over a Kubernetes-style symlink swap, a
rotation, the per-account metric's labels, and the CLI's `sign --account`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import structlog
import yaml
from prometheus_client import REGISTRY
from pydantic import SecretStr

from service import accountsfile, cli, metrics, signature
from service.accountbook import Account, AccountBook, shorthand_book
from service.accounts import AccountsWatcher, Reload, StaticAccounts, open_source
from service.accountsfile import AccountsFileError, parse
from service.settings import Role, SettingsError
from tests.conftest import SECRET, make_settings, run_cli

ROOT = Path(__file__).resolve().parents[1]
A = "AC" + "a" * 40
B = "AC" + "b" * 40
C = "AC" + "c" * 40
A_UPPER = "AC" + "A" * 40  # account A as an id in upper case
OLD, NEW = "sigsec_old_" + "1" * 20, "sigsec_new_" + "2" * 20
API_KEY = "apikey_" + "9" * 30
YAML_FILE = f"""\
# two accounts, one of them rotating
accounts:
  {A}:
    signingSecrets: ["{NEW}", "{OLD}"]
    apiKey: "{API_KEY}"
    name: Brand A
  {B}:
    signingSecrets: ["sigsec_b"]
"""
JSON_FILE = json.dumps(
    {
        "accounts": {
            A: {"signingSecrets": [NEW, OLD], "apiKey": API_KEY, "name": "Brand A"},
            B: {"signingSecrets": ["sigsec_b"]},
        }
    }
)


def secrets_of(account: Account | None) -> list[str]:
    assert account is not None
    return [s.get_secret_value() for s in account.secrets]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def signed_ok(book: AccountBook, account_id: str, secret: str, body: bytes = b"{}") -> bool:
    """What the handler will do: the account's secrets only, then the HMAC."""
    account = book.lookup(account_id)
    if account is None:
        return False
    header = signature.sign(secret, int(time.time()), body)
    verdict = signature.verify(header, body, account.secrets, time.time(), 300)
    return verdict is signature.Verdict.VALID


# ------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("name", "text"), [("accounts.yaml", YAML_FILE), ("accounts.json", JSON_FILE)]
)
def test_yaml_and_json_read_the_same(name: str, text: str) -> None:
    book = parse(text.encode(), Path(name))
    assert len(book) == 2
    a = book.lookup(A)
    assert a is not None
    assert a.id == A
    assert secrets_of(a) == [NEW, OLD]
    assert a.current_secret.get_secret_value() == NEW
    assert a.api_key is not None and a.api_key.get_secret_value() == API_KEY
    assert a.name == "Brand A"
    b = book.lookup(B)
    assert b is not None and b.api_key is None and b.name is None
    assert secrets_of(b) == ["sigsec_b"]


def test_a_file_of_any_name_is_read_by_its_content() -> None:
    # A Secret's key may be mounted under any name: `{` means JSON, anything else YAML.
    assert len(parse(JSON_FILE.encode(), Path("accounts"))) == 2
    assert len(parse(YAML_FILE.encode(), Path("accounts"))) == 2


def entry(**fields: object) -> str:
    return json.dumps({"accounts": {A: fields}})


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.yaml", "", "the accounts file is empty"),
        ("a.yaml", "- just\n- a list\n", "expected a mapping with `accounts` at the top"),
        ("a.yaml", "accounts: {}\n", "accounts: is empty"),
        ("a.yaml", "accounts:\n  AC12: {signingSecrets: [x]}\n", "accounts.AC12: not an account"),
        ("a.yaml", f"accounts:\n  {A}: {{apiKey: k}}\n", f"accounts.{A}.signingSecrets: missing"),
        (
            "a.json",
            entry(signingSecrets=[]),
            f"accounts.{A}.signingSecrets: is empty",
        ),
        ("a.json", entry(signingSecrets=["s"] * 9), "signingSecrets: has more than 8 entries"),
        ("a.json", entry(signingSecrets=[""]), f"accounts.{A}.signingSecrets: a secret is empty"),
        (
            "a.json",
            entry(signingSecrets=["s"], colour="red"),
            f"accounts.{A}.colour: not a known field",
        ),
        ("a.json", entry(signingSecrets=["s"], apiKey=""), f"accounts.{A}.apiKey: is empty"),
        # YAML reads an unquoted number as one: refused rather than turned into text.
        (
            "a.yaml",
            f"accounts:\n  {A}: {{signingSecrets: [12345]}}\n",
            "signingSecrets.0: must be a string (in YAML, quote it)",
        ),
        ("a.json", '{"accounts": ', "not valid JSON: Expecting value (line 1, column 14)"),
        ("a.yaml", "accounts: [\n", "not valid YAML:"),
        (
            "a.yaml",
            f"accounts:\n  {A_UPPER}: {{signingSecrets: [s]}}\n  {A}: {{signingSecrets: [t]}}\n",
            "listed twice",
        ),
    ],
)
def test_errors_name_the_file_and_the_problem(name: str, text: str, message: str) -> None:
    with pytest.raises(AccountsFileError) as caught:
        parse(text.encode(), Path("/etc/callstatus/accounts") / name)
    error = str(caught.value)
    assert error.startswith(f"/etc/callstatus/accounts/{name}: "), error
    assert message in error, error
    assert isinstance(caught.value, SettingsError)  # at start: exit 2, one line


@pytest.mark.parametrize(
    ("name", "text"),
    [
        (
            "a.yaml",
            f"accounts:\n  {A}: {{signingSecrets: [{OLD}]}}\n  {A}: {{signingSecrets: [x]}}\n",
        ),
        ("a.json", f'{{"accounts": {{"{A}": {{"signingSecrets": ["{OLD}"]}}, "{A}": {{}}}}}}'),
    ],
)
def test_a_key_given_twice_is_refused_not_overwritten(name: str, text: str) -> None:
    # Both parsers let the last one win by default: an account's secrets would vanish.
    with pytest.raises(AccountsFileError, match="appears twice"):
        parse(text.encode(), Path(name))


@pytest.mark.parametrize(
    "text",
    [
        f'accounts:\n  {A}:\n    signingSecrets: ["{OLD}", ]]\n',  # YAML syntax error on it
        f'{{"accounts": {{"{A}": {{"signingSecrets": ["{OLD}" "x"]}}}}}}',  # JSON
        f'accounts:\n  {A}:\n    signingSecrets: ["{OLD} "]\n',  # padded
        f'accounts:\n  {A}:\n    signingSecrets: "{OLD}"\n',  # not a list
    ],
)
def test_no_error_shows_a_secret(text: str) -> None:
    name = "a.json" if text.startswith("{") else "a.yaml"
    with pytest.raises(AccountsFileError) as caught:
        parse(text.encode(), Path(name))
    assert OLD not in str(caught.value)
    assert "sigsec" not in str(caught.value)


def test_every_problem_is_listed_once_without_echoes() -> None:
    text = f'accounts:\n  {A}: {{signingSecrets: [12345], apiKey: "", extra: 1}}\n'
    with pytest.raises(AccountsFileError) as caught:
        parse(text.encode(), Path("a.yaml"))
    where = f"a.yaml: accounts.{A}"
    assert str(caught.value) == (
        f"{where}.signingSecrets.0: must be a string (in YAML, quote it); "
        f"accounts.{A}.apiKey: is empty; accounts.{A}.extra: not a known field"
    )  # no "signingSecrets: is empty": the list is only empty because its item failed


def test_padding_around_a_secret_is_refused() -> None:
    with pytest.raises(AccountsFileError, match="leading or trailing whitespace"):
        parse(entry(signingSecrets=[" s"]).encode(), Path("a.json"))


def test_reprs_never_show_secrets() -> None:
    book = parse(YAML_FILE.encode(), Path("a.yaml"))
    shown = repr(book) + repr(list(book)) + str(book.lookup(A))
    for secret in (NEW, OLD, API_KEY):
        assert secret not in shown
    assert repr(book) == "AccountBook(2 accounts)"


# ------------------------------------------------------------------------- schema

REGENERATE = "run `make schemas` (python -m service.accountsfile) and commit the result"


def test_published_schema_is_the_models() -> None:
    assert accountsfile.SCHEMA_PATH == ROOT / "schemas" / "config" / "accounts.schema.json"
    assert accountsfile.SCHEMA_PATH.is_file(), f"the accounts schema is missing: {REGENERATE}"
    published = accountsfile.SCHEMA_PATH.read_text(encoding="utf-8")
    assert published == accountsfile.schema_text(), f"the accounts schema is stale: {REGENERATE}"


def test_published_schema_agrees_with_the_parser(tmp_path: Path) -> None:
    schema = json.loads(accountsfile.SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors(yaml.safe_load(YAML_FILE)))
    local = tmp_path / "local.yaml"  # as `callstatus local-secret --accounts-file` writes it
    assert cli.main(["local-secret", "--accounts-file", str(local)]) == 0
    assert not list(validator.iter_errors(yaml.safe_load(local.read_text())))
    invalid: list[dict[str, Any]] = [
        {"accounts": {"AC12": {"signingSecrets": ["s"]}}},  # not an account id
        {"accounts": {A: {"signingSecrets": []}}},
        {"accounts": {A: {"signingSecrets": ["s"], "colour": "red"}}},
        {"accounts": {}},
        {},
    ]
    for bad in invalid:
        assert list(validator.iter_errors(bad)), bad
        with pytest.raises(AccountsFileError):
            parse(json.dumps(bad).encode(), Path("a.json"))


# ----------------------------------------------------------------- book, shorthand


def test_lookup_is_one_accounts_secrets_or_unknown() -> None:
    book = parse(YAML_FILE.encode(), Path("a.yaml"))
    assert secrets_of(book.lookup(A)) == [NEW, OLD]
    assert book.lookup(C) is None  # not configured
    assert book.lookup(None) is None  # the request names no account
    assert book.lookup("not an id") is None
    # FreeClimb writes ids in lower case; the Call model accepts either.
    assert book.lookup("AC" + "A" * 40) is book.lookup(A)
    assert book.binds_accounts


def test_a_thousand_accounts_are_looked_up_without_visiting_the_others() -> None:
    ids = [f"AC{n:040x}" for n in range(1000)]
    book = AccountBook([Account(i, (SecretStr(f"s{n}"),)) for n, i in enumerate(ids)])
    assert len(book) == 1000
    found = book.lookup(ids[777])
    assert found is not None and secrets_of(found) == ["s777"]  # one account's secrets
    # The cost of a request is that account's HMACs: one here, not a thousand.
    assert signed_ok(book, ids[777], "s777")
    assert not signed_ok(book, ids[777], "s778")


def test_ids_that_differ_only_in_case_are_one_account() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        AccountBook([Account(A, (SecretStr("x"),)), Account(A_UPPER, ())])


def test_the_shorthand_unbound_verifies_any_account_as_before() -> None:
    book = shorthand_book((SecretStr(SECRET),), None)
    assert len(book) == 1 and not book.binds_accounts
    for account_id in (A, C, None):
        account = book.lookup(account_id)
        assert account is not None and secrets_of(account) == [SECRET]
        assert account.metric_label == "default"
    assert signed_ok(book, C, SECRET)


def test_the_shorthand_bound_to_an_account_refuses_the_others() -> None:
    book = shorthand_book((SecretStr(SECRET),), A)
    assert book.binds_accounts
    assert secrets_of(book.lookup(A)) == [SECRET]
    assert book.lookup(B) is None
    assert book.lookup(None) is None


def test_no_secrets_make_an_empty_book() -> None:
    book = shorthand_book((), None)
    assert len(book) == 0 and book.lookup(A) is None


def test_open_source_follows_the_settings(tmp_path: Path) -> None:
    source = open_source(make_settings())
    assert isinstance(source, StaticAccounts) and not source.book.binds_accounts
    bound = open_source(make_settings(signing_account_id=A))
    assert bound.book.lookup(A) is not None and bound.book.lookup(B) is None
    path = tmp_path / "accounts.yaml"
    path.write_text(YAML_FILE)
    watched = open_source(make_settings(signing_secrets=(), accounts_file=str(path)))
    assert isinstance(watched, AccountsWatcher)
    assert watched.interval == 5.0
    assert len(watched.book) == 2
    assert sample("callstatus_accounts") == 2


def test_a_malformed_file_at_start_is_a_start_up_error(tmp_path: Path) -> None:
    path = tmp_path / "accounts.yaml"
    path.write_text(f"accounts:\n  {A}: {{}}\n")
    settings = make_settings(signing_secrets=(), accounts_file=str(path))
    with pytest.raises(AccountsFileError, match=f"{path}: accounts.{A}.signingSecrets: missing"):
        open_source(settings)
    with pytest.raises(AccountsFileError, match="cannot read the accounts file"):
        open_source(make_settings(signing_secrets=(), accounts_file=str(tmp_path / "nope")))


# ------------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"accounts_file": "/x.yaml"},
            "set CALLSTATUS_ACCOUNTS_FILE or CALLSTATUS_SIGNING_SECRETS, not both",
        ),
        ({"signing_secrets": ()}, "set it or CALLSTATUS_ACCOUNTS_FILE"),
        ({"signing_secrets": (), "signing_account_id": A}, "SIGNING_ACCOUNT_ID names the account"),
        ({"signing_account_id": "AC12"}, "String should match pattern"),
        ({"accounts_reload_seconds": 0}, "greater than 0"),
    ],
)
def test_settings_refuse_what_cannot_be_told_apart(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_settings(**overrides)


def test_settings_take_either_the_file_or_the_secrets() -> None:
    with_file = make_settings(signing_secrets=(), accounts_file="/etc/callstatus/accounts.yaml")
    assert with_file.accounts_file == Path("/etc/callstatus/accounts.yaml")
    assert with_file.accounts_reload_seconds == 5.0
    assert make_settings().accounts_file is None
    # Empty is unset (how `make run LOCAL_ACCOUNTS=1` drops .callstatus.env's secret).
    assert make_settings(accounts_file="", signing_account_id=" ").accounts_file is None
    # The processor verifies nothing and needs neither.
    assert make_settings(role=Role.PROCESSOR, signing_secrets=()).accounts_file is None


def test_accounts_file_is_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.settings import load_settings

    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith("CALLSTATUS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CALLSTATUS_ACCOUNTS_FILE", "/etc/callstatus/accounts/accounts.yaml")
    monkeypatch.setenv("CALLSTATUS_ACCOUNTS_RELOAD_SECONDS", "2.5")
    settings = load_settings()
    assert settings.accounts_file == Path("/etc/callstatus/accounts/accounts.yaml")
    assert settings.accounts_reload_seconds == 2.5
    monkeypatch.setenv("CALLSTATUS_SIGNING_SECRETS", "sigsec_x")
    with pytest.raises(SettingsError, match="not both"):
        load_settings()


# -------------------------------------------------------------------------- reload


class SecretVolume:
    """A directory laid out as the kubelet mounts a Secret: ``accounts.yaml`` ->
    ``..data/accounts.yaml``, ``..data`` -> ``..<timestamp>/``; an update writes a new
    timestamped directory, swaps ``..data`` atomically (rename of a new symlink) and
    deletes the old directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir(exist_ok=True)
        self.path = root / "accounts.yaml"

    def publish(self, text: str) -> None:
        self.generation += 1
        new = self.root / f"..2026_12_01_12_00_{self.generation:02d}.{self.generation}"
        new.mkdir()
        (new / "accounts.yaml").write_text(text, encoding="utf-8")
        data = self.root / "..data"
        old = data.resolve() if data.is_symlink() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(new.name)
        tmp.replace(data)  # rename(2): atomic, readers see the old or the new
        if not self.path.is_symlink():
            self.path.symlink_to("..data/accounts.yaml")
        if old is not None:
            for child in old.iterdir():
                child.unlink()
            old.rmdir()


def rotation_file(*secrets: str) -> str:
    listed = ", ".join(f'"{s}"' for s in secrets)
    return (
        f"accounts:\n  {A}:\n    signingSecrets: [{listed}]\n"
        f"  {B}:\n    signingSecrets: [sigsec_b]\n"
    )


@pytest.fixture
def volume(tmp_path: Path) -> SecretVolume:
    return SecretVolume(tmp_path / "accounts")


def failures() -> float:
    return sample("callstatus_accounts_reload_failures_total")


def stale() -> float:
    return sample("callstatus_accounts_file_stale")


def test_a_symlink_swap_is_picked_up_and_the_old_book_still_serves(volume: SecretVolume) -> None:
    volume.publish(rotation_file(OLD))
    watcher = AccountsWatcher.open(volume.path, 5.0)
    assert watcher.poll() is Reload.UNCHANGED
    in_flight = watcher.book  # a request that started before the swap

    volume.publish(rotation_file(NEW, OLD))
    assert watcher.poll() is Reload.RELOADED
    assert secrets_of(watcher.book.lookup(A)) == [NEW, OLD]
    # The request holding the old snapshot finishes with it, unrefused.
    assert signed_ok(in_flight, A, OLD)
    assert secrets_of(in_flight.lookup(A)) == [OLD]
    assert watcher.poll() is Reload.UNCHANGED


def test_the_same_content_republished_is_no_reload(volume: SecretVolume) -> None:
    volume.publish(rotation_file(OLD))
    watcher = AccountsWatcher.open(volume.path, 5.0)
    book = watcher.book
    volume.publish(rotation_file(OLD))  # a new inode, the same bytes
    assert watcher.poll() is Reload.UNCHANGED
    assert watcher.book is book


def test_a_malformed_new_file_keeps_the_old_book_and_raises_the_metric(
    volume: SecretVolume, caplog: pytest.LogCaptureFixture
) -> None:
    volume.publish(rotation_file(OLD))
    watcher = AccountsWatcher.open(volume.path, 5.0)
    good = watcher.book
    before = failures()
    assert stale() == 0

    volume.publish(f"accounts:\n  {A}:\n    signingSecrets: [{NEW}\n")  # torn YAML
    assert watcher.poll() is Reload.FAILED
    assert watcher.book is good
    assert signed_ok(watcher.book, A, OLD)
    assert failures() == before + 1
    assert stale() == 1
    # The same bad version polled again: still failed, counted (and logged) once.
    assert watcher.poll() is Reload.FAILED
    assert failures() == before + 1

    # Another bad version (the same kind of mistake) is another failure.
    volume.publish(f"accounts:\n  {A}:\n    signingSecrets: [{NEW}, \n")
    assert watcher.poll() is Reload.FAILED
    assert failures() == before + 2
    assert watcher.book is good

    volume.publish(rotation_file(NEW, OLD))
    assert watcher.poll() is Reload.RELOADED
    assert stale() == 0
    assert signed_ok(watcher.book, A, NEW)
    assert failures() == before + 2


def test_an_error_line_names_the_file_and_never_a_secret(
    volume: SecretVolume, capsys: pytest.CaptureFixture[str]
) -> None:
    from service import logs

    logs.configure("INFO", "json")
    try:
        volume.publish(rotation_file(OLD))
        watcher = AccountsWatcher.open(volume.path, 5.0)
        volume.publish(f'accounts:\n  {A}:\n    signingSecrets: ["{NEW}", ]]\n')
        assert watcher.poll() is Reload.FAILED
    finally:
        # The configured stream is this test's captured stderr, closed after it.
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    lines = [
        json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")
    ]
    [error] = [line for line in lines if line.get("level") == "error"]
    assert error["event"] == "accounts file not reloaded; the last good one stays in use"
    assert error["path"] == str(volume.path)
    assert "not valid YAML" in error["problem"]
    assert error["accounts"] == 2
    assert all(NEW not in json.dumps(line) and OLD not in json.dumps(line) for line in lines)


def test_a_vanished_file_keeps_the_book_until_it_is_back(volume: SecretVolume) -> None:
    volume.publish(rotation_file(OLD))
    watcher = AccountsWatcher.open(volume.path, 5.0)
    good = watcher.book
    before = failures()
    target = (volume.root / "..data").resolve()
    hidden = target.with_name("..hidden")
    target.rename(hidden)  # the symlink now dangles
    assert watcher.poll() is Reload.FAILED
    assert watcher.poll() is Reload.FAILED
    assert failures() == before + 1  # one outage, one count
    assert watcher.book is good
    hidden.rename(target)
    assert watcher.poll() is Reload.UNCHANGED  # the same content is back
    assert stale() == 0


def test_a_rotation_under_steady_traffic_refuses_nothing(volume: SecretVolume) -> None:
    """The runbook's order: add the new secret first (old kept), let FreeClimb switch
    to it, then remove the old one. Each step is a Secret update; at every step a
    request signed as FreeClimb signs at that moment is accepted, with no restart."""
    volume.publish(rotation_file(OLD))
    watcher = AccountsWatcher.open(volume.path, 5.0)
    refused = 0
    steps = [
        (None, OLD),  # before: FreeClimb signs with the old secret
        (rotation_file(NEW, OLD), OLD),  # overlap published, FreeClimb still on old
        (None, NEW),  # FreeClimb switched
        (rotation_file(NEW), NEW),  # the old one removed
    ]
    for text, freeclimb_signs_with in steps:
        if text is not None:
            volume.publish(text)
        for n in range(50):
            if n == 25:
                watcher.poll()  # the reload lands in the middle of the traffic
            book = watcher.book  # what a request reads once, at its start
            refused += not signed_ok(book, A, freeclimb_signs_with, b'{"n": %d}' % n)
    assert refused == 0
    assert secrets_of(watcher.book.lookup(A)) == [NEW]
    assert not signed_ok(watcher.book, A, OLD)  # the old secret is gone for good
    assert not signed_ok(watcher.book, B, NEW)  # and never verified account B


async def test_the_watcher_task_reloads_within_its_interval(volume: SecretVolume) -> None:
    volume.publish(rotation_file(OLD))
    watcher = AccountsWatcher.open(volume.path, 0.01)
    task = asyncio.create_task(watcher.run())
    try:
        volume.publish(rotation_file(NEW))
        deadline = time.monotonic() + 10
        while secrets_of(watcher.book.lookup(A)) != [NEW]:
            assert time.monotonic() < deadline, "the watcher did not reload in 10 s"
            await asyncio.sleep(0.01)
        assert sample("callstatus_accounts") == 2
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_the_watcher_task_outlives_an_unexpected_error(
    volume: SecretVolume, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume.publish(rotation_file(OLD))
    watcher = AccountsWatcher.open(volume.path, 0.01)
    real_poll = watcher.poll
    calls: list[str] = []

    def flaky_poll() -> Reload:
        calls.append("poll")
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real_poll()

    monkeypatch.setattr(watcher, "poll", flaky_poll)
    task = asyncio.create_task(watcher.run())
    try:
        volume.publish(rotation_file(NEW))
        deadline = time.monotonic() + 10
        while secrets_of(watcher.book.lookup(A)) != [NEW]:
            assert time.monotonic() < deadline, "the watcher stopped after an error"
            await asyncio.sleep(0.01)
        assert len(calls) >= 2
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# ------------------------------------------------------------------------- metrics


def test_the_account_metric_labels_only_configured_accounts() -> None:
    book = parse(YAML_FILE.encode(), Path("a.yaml"))
    before_a = sample("callstatus_account_requests_total", account=A, outcome="accepted")
    before_unknown = sample(
        "callstatus_account_requests_total", account="unknown", outcome="unknown_account"
    )
    metrics.count_account_request(book.lookup(A_UPPER), "accepted")
    metrics.count_account_request(book.lookup(C), "unknown_account")
    metrics.count_account_request(book.lookup("AC" + "f" * 40), "unknown_account")
    assert sample("callstatus_account_requests_total", account=A, outcome="accepted") == (
        before_a + 1
    )
    assert (
        sample("callstatus_account_requests_total", account="unknown", outcome="unknown_account")
        == before_unknown + 2
    )
    assert sample("callstatus_account_requests_total", account=C, outcome="unknown_account") == 0
    shorthand = shorthand_book((SecretStr(SECRET),), None)
    metrics.count_account_request(shorthand.lookup(C), "accepted")
    assert sample("callstatus_account_requests_total", account="default", outcome="accepted") >= 1
    assert sample("callstatus_account_requests_total", account=C, outcome="accepted") == 0


# ----------------------------------------------------------------------------- CLI


def run(
    args: list[str], cwd: Path, env: dict[str, str], stdin: bytes = b"{}"
) -> subprocess.CompletedProcess[bytes]:
    return run_cli(args, cwd, env, stdin)


def test_sign_with_an_accounts_current_secret(tmp_path: Path) -> None:
    path = tmp_path / "accounts.yaml"
    path.write_text(YAML_FILE)
    env = {"CALLSTATUS_ACCOUNTS_FILE": str(path)}
    result = run(["sign", "--account", A, "--timestamp", "1700000000"], tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == signature.sign(NEW, 1700000000, b"{}")
    by_option = run(
        ["sign", "--accounts-file", str(path), "--account", B, "--timestamp", "1"], tmp_path, {}
    )
    assert by_option.stdout.decode().strip() == signature.sign("sigsec_b", 1, b"{}")

    several = run(["sign"], tmp_path, env)
    assert several.returncode == 2
    assert b"has 2 accounts: pass --account" in several.stderr
    unknown = run(["sign", "--account", C], tmp_path, env)
    assert unknown.returncode == 2
    assert f"account {C} is not in {path}".encode() in unknown.stderr
    both = run(["sign", "--account", A, "--secret", "s"], tmp_path, env)
    assert both.returncode == 2


def test_sign_with_a_malformed_file_says_so_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "accounts.yaml"
    path.write_text(f"accounts:\n  {A}:\n    signingSecrets: [{OLD}\n")
    result = run(["sign", "--account", A], tmp_path, {"CALLSTATUS_ACCOUNTS_FILE": str(path)})
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"callstatus: {path}: not valid YAML")
    assert OLD not in lines[0]


def test_sign_with_the_shorthand_for_an_account(tmp_path: Path) -> None:
    env = {"CALLSTATUS_SIGNING_SECRETS": SECRET, "CALLSTATUS_SIGNING_ACCOUNT_ID": A}
    ok = run(["sign", "--account", A, "--timestamp", "1"], tmp_path, env)
    assert ok.stdout.decode().strip() == signature.sign(SECRET, 1, b"{}")
    other = run(["sign", "--account", B], tmp_path, env)
    assert other.returncode == 2
    assert b"is not in CALLSTATUS_SIGNING_SECRETS" in other.stderr


def test_local_secret_makes_a_one_account_file_once(tmp_path: Path) -> None:
    first = run(["local-secret", "--accounts-file", "local.yaml"], tmp_path, {})
    assert first.returncode == 0, first.stderr
    assert b"created a one-account accounts file local.yaml" in first.stderr
    path = tmp_path / "local.yaml"
    assert path.stat().st_mode & 0o077 == 0  # not readable by others
    assert not (tmp_path / ".callstatus.env").exists()
    text = path.read_text()
    book = parse(text.encode(), path)
    [account] = book
    assert account.id == "AC1334ffb694cd8d969f51cddf5f7c9b478546d50c"  # the README's
    secret = account.current_secret.get_secret_value()
    assert secret.startswith("sigsec_") and len(secret) == 47

    again = run(["local-secret", "--accounts-file", "local.yaml"], tmp_path, {})
    assert b"using the accounts in local.yaml" in again.stderr
    assert path.read_text() == text  # kept, not replaced

    # The file serves on its own: sign picks its only account, no --account needed.
    env = {"CALLSTATUS_ACCOUNTS_FILE": str(path)}
    signed = run(["sign", "--timestamp", "5"], tmp_path, env)
    assert signed.stdout.decode().strip() == signature.sign(secret, 5, b"{}")

    other = run(["local-secret", "--accounts-file", "b.yaml", "--account", B], tmp_path, {})
    assert other.returncode == 0
    [b_account] = parse((tmp_path / "b.yaml").read_bytes(), tmp_path / "b.yaml")
    assert b_account.id == B
    bad = run(["local-secret", "--accounts-file", "c.yaml", "--account", "AC12"], tmp_path, {})
    assert bad.returncode == 2 and not (tmp_path / "c.yaml").exists()
