"""The accounts file's format (``CALLSTATUS_ACCOUNTS_FILE``, YAML or JSON; its JSON Schema
published in ``schemas/config/accounts.schema.json``) and its parse into an
:class:`~service.accountbook.AccountBook`, with errors in the file's terms: one line
naming the file and the field, never quoting the text (it may be a secret).

``python -m service.accountsfile`` rewrites the published schema (``make schemas``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from schemas.call import AccountId
from service.accountbook import Account, AccountBook, canonical_id
from service.settings import SettingsError

# Where the published JSON Schema of the file lives; `make schemas` rewrites it and
# tests/test_accounts.py fails while it and the model disagree. Not next to the message
# schemas in schemas/: the file is configuration, not a message on a topic.
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config" / "accounts.schema.json"

# Each secret costs one HMAC per request (signature.check_body), so this bounds the cost
# of a request; a rotation needs two, three while one overlaps a late revert.
MAX_SECRETS_PER_ACCOUNT = 8
MAX_SECRET_CHARS = 1024
# Far above 1,000 accounts (~250 bytes each); a bigger file is a mistake, not a
# configuration, and must not be read into memory every poll.
MAX_FILE_BYTES = 16 * 1024 * 1024


# A signing secret: checked by AccountEntry's validator (clearer messages than the
# constraint errors), published with the same bounds for editors and linters.
Secret = Annotated[
    SecretStr,
    WithJsonSchema(
        {
            "type": "string",
            "format": "password",
            "writeOnly": True,
            "minLength": 1,
            "maxLength": MAX_SECRET_CHARS,
        }
    ),
]


class AccountEntry(BaseModel):
    """One account of the file."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    signing_secrets: tuple[Secret, ...] = Field(
        alias="signingSecrets",
        title="Signing secrets",
        min_length=1,
        max_length=MAX_SECRETS_PER_ACCOUNT,
        description="The account's webhook signing secrets. Several only during a "
        "rotation: the first is the current one (`callstatus sign` uses it); a request "
        "signed with any of them is accepted.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        alias="apiKey",
        title="API key",
        min_length=1,
        description="The account's FreeClimb API key, for the reconciler's API calls.",
    )
    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="A human-readable name (brand, region, customer), for people only: "
        "metrics and logs name the account by its id.",
    )

    @field_validator("signing_secrets")
    @classmethod
    def _no_padding(cls, secrets: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        # A secret pasted with a space or a line end never matches FreeClimb's HMAC;
        # refusing it here names the account, where a silent mismatch would not.
        for secret in secrets:
            value = secret.get_secret_value()
            if not value:
                raise ValueError("a secret is empty")
            if len(value) > MAX_SECRET_CHARS:
                raise ValueError(f"a secret is longer than {MAX_SECRET_CHARS} characters")
            if value != value.strip():
                raise ValueError("a secret has leading or trailing whitespace")
        return secrets


class AccountsFile(BaseModel):
    """The accounts file: per FreeClimb account id, its signing secrets and API key."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
        title="callstatus accounts file",
    )

    accounts: dict[AccountId, AccountEntry] = Field(
        min_length=1,
        description="Keyed by FreeClimb account id (AC followed by 40 hex digits).",
        # patternProperties alone would let a key that is no account id through.
        json_schema_extra={"additionalProperties": False},
    )


def schema_text() -> str:
    """The published JSON Schema of the file (validation mode: it describes input)."""
    schema: dict[str, Any] = AccountsFile.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def book_of(model: AccountsFile) -> AccountBook:
    return AccountBook(
        [
            Account(canonical_id(account_id), entry.signing_secrets, entry.api_key, entry.name)
            for account_id, entry in model.accounts.items()
        ]
    )


class AccountsFileError(SettingsError):
    """The accounts file cannot be read or is not a valid accounts file. One readable
    line naming the file and the problem, never a secret. A SettingsError: at start it
    stops the service like any bad setting (exit 2)."""


# libyaml's parser where PyYAML was built with it (the wheels are): 1,000 accounts parse
# in ~40 ms instead of ~175 ms, in the watcher's thread but holding the GIL.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SafeLoader):  # type: ignore[valid-type,misc]
    """PyYAML's safe loader, refusing a mapping with the same key twice: by default the
    last one silently wins, which would drop an account's secrets without a word."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str | int | float | bool) and key in seen:
            line = key_node.start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} appears twice (line {line})", None
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _unique_mapping,
)


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def _is_json(data: bytes, source: Path) -> bool:
    if source.suffix.lower() == ".json":
        return True
    if source.suffix.lower() in (".yaml", ".yml"):
        return False
    # A Secret's key mounted as a file may have any name: judge by the content.
    return data.lstrip()[:1] == b"{"


def _decode(data: bytes, source: Path) -> object:
    """The file's document. Errors say where, never what: the text around a syntax
    error may be a secret."""
    if _is_json(data, source):
        try:
            return json.loads(data, object_pairs_hook=_unique_object)
        except json.JSONDecodeError as exc:
            raise AccountsFileError(
                f"{source}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise AccountsFileError(f"{source}: not valid JSON: {exc}") from None
    try:
        return yaml.load(data, Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except yaml.MarkedYAMLError as exc:
        where = ""
        if exc.problem_mark is not None:
            where = f" (line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1})"
        raise AccountsFileError(f"{source}: not valid YAML: {exc.problem}{where}") from None
    except yaml.YAMLError as exc:
        raise AccountsFileError(f"{source}: not valid YAML: {type(exc).__name__}") from None


def _message(error: Any) -> str:
    """pydantic's message, in the file's terms where its own would puzzle an operator
    (a secret's length is not "items"; YAML turns an unquoted 12345 into a number)."""
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "missing":
        return "missing"
    if kind == "extra_forbidden":
        return "not a known field"
    if kind == "too_short":
        return "is empty" if ctx.get("min_length") == 1 else error["msg"]
    if kind == "too_long":
        return f"has more than {ctx.get('max_length')} entries"
    if kind == "string_type":
        return "must be a string (in YAML, quote it)"
    return str(error["msg"]).removeprefix("Value error, ")


def _describe(exc: ValidationError) -> str:
    problems = []
    errors = exc.errors()
    for error in errors:
        loc = error["loc"]
        if error["type"] == "too_short" and any(
            other["loc"][: len(loc)] == loc and len(other["loc"]) > len(loc) for other in errors
        ):
            continue  # a list "empty" only because its items failed: they say why
        parts = [str(part) for part in loc]
        if parts and parts[-1] == "[key]":
            # An account id that is not one: the key itself is the location.
            problems.append(f"{'.'.join(parts[:-1])}: not an account id (AC + 40 hex digits)")
            continue
        problems.append(f"{'.'.join(parts) or 'the file'}: {_message(error)}")
    return "; ".join(problems)


def parse(data: bytes, source: Path) -> AccountBook:
    """An accounts file's bytes as a book; :class:`AccountsFileError` if it is not one.
    ``source`` names the file in errors, and its suffix chooses JSON or YAML."""
    if not data.strip():
        raise AccountsFileError(f"{source}: the accounts file is empty")
    document = _decode(data, source)
    if not isinstance(document, dict):
        raise AccountsFileError(f"{source}: expected a mapping with `accounts` at the top")
    try:
        model = AccountsFile.model_validate(document)
    except ValidationError as exc:
        raise AccountsFileError(f"{source}: {_describe(exc)}") from None
    try:
        return book_of(model)
    except ValueError as exc:  # two ids that differ in case only
        raise AccountsFileError(f"{source}: {exc}") from None


def main() -> None:
    """``python -m service.accountsfile``: rewrite the published JSON Schema."""
    SCHEMA_PATH.parent.mkdir(parents=True, exist_ok=True)
    SCHEMA_PATH.write_text(schema_text(), encoding="utf-8")
    print(f"wrote {SCHEMA_PATH.relative_to(SCHEMA_PATH.parents[2])}")


if __name__ == "__main__":
    main()
