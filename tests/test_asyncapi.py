"""schemas/asyncapi.yaml describes the topics and messages the code actually uses.

Structural checks only (no AsyncAPI validator): every fact the document states about
topics, headers, keys, the consumer group and payloads is compared with the code, so
changing one without the other fails here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from schemas.export import HERE, MESSAGES, path_for
from schemas.messages import IngestEvent
from service import batch as processor
from service.kafka import topic_specs
from service.settings import Settings
from tests.conftest import make_settings

DOC_PATH = HERE / "asyncapi.yaml"
# The JSON Schema format every AsyncAPI 3.0 tool must support (spec, Multi Format Schema
# Object). The exported files say draft 2020-12, but use only keywords that read the same
# under draft-07: test_exported_schemas_read_the_same_under_draft_07 keeps it that way.
JSON_SCHEMA_FORMAT = "application/schema+json;version=draft-07"

# Channel id in the document -> the Settings field holding that topic's default name.
# The ids are also the names schemas.export.MESSAGES uses for the payload schemas.
TOPIC_FIELDS = {
    "ingest": "topic_ingest",
    "changes": "topic_changes",
    "rejected": "topic_rejected",
    "state": "topic_state",
}


def _default(field: str) -> Any:
    return Settings.model_fields[field].default


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded = yaml.safe_load(DOC_PATH.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _pointer(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"not a local reference: {ref}"
    node: Any = doc
    for raw in ref[2:].split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict), f"{ref} goes through a non-object"
        assert part in node, f"dangling reference {ref}"
        node = node[part]
    return node


def _resolve(doc: dict[str, Any], node: Any) -> Any:
    """Follow local ``$ref`` objects until a real node."""
    while isinstance(node, dict) and str(node.get("$ref", "")).startswith("#/"):
        node = _pointer(doc, node["$ref"])
    return node


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


# Channels that carry a second kind of message next to their main one, and its schema.
EXTRA_MESSAGES = {"rejected": {"callEventUnprocessable": "unprocessable"}}
# Channels whose payload is the processor's private binary format (service/statecodec.py).
BINARY_CHANNELS = {"state"}


def _message(doc: dict[str, Any], channel_id: str) -> dict[str, Any]:
    """The channel's main message: the first, whose payload is named like the channel."""
    messages = doc["channels"][channel_id]["messages"]
    extra = EXTRA_MESSAGES.get(channel_id, {})
    assert len(messages) == 1 + len(extra), f"channel {channel_id}: unexpected messages"
    assert set(extra) <= set(messages)
    message = _resolve(doc, next(iter(messages.values())))
    assert isinstance(message, dict)
    return message


def _header(doc: dict[str, Any], channel_id: str, name: str) -> dict[str, Any]:
    """The schema of one header, with ``allOf`` parts merged (later parts win)."""
    merged: dict[str, Any] = {}
    pending = [_resolve(doc, _message(doc, channel_id)["headers"])]
    while pending:
        schema = pending.pop(0)
        pending[:0] = [_resolve(doc, part) for part in schema.get("allOf", [])]
        if name in schema.get("properties", {}):
            merged.update(_resolve(doc, schema["properties"][name]))
    return merged


def _required_headers(doc: dict[str, Any], channel_id: str) -> set[str]:
    required: set[str] = set()
    pending = [_resolve(doc, _message(doc, channel_id)["headers"])]
    while pending:
        schema = pending.pop()
        pending += [_resolve(doc, part) for part in schema.get("allOf", [])]
        required.update(schema.get("required", []))
    return required


def test_it_is_asyncapi_3(doc: dict[str, Any]) -> None:
    assert str(doc["asyncapi"]).startswith("3.")


def test_channel_addresses_are_the_default_topic_names(doc: dict[str, Any]) -> None:
    addresses = {cid: channel["address"] for cid, channel in doc["channels"].items()}
    assert addresses == {cid: _default(field) for cid, field in TOPIC_FIELDS.items()}


def test_every_local_reference_resolves(doc: dict[str, Any]) -> None:
    for ref in _refs(doc):
        if ref.startswith("#/"):
            _pointer(doc, ref)


def test_payloads_are_the_exported_json_schemas(doc: dict[str, Any]) -> None:
    extra_names = {name for extra in EXTRA_MESSAGES.values() for name in extra.values()}
    assert (set(TOPIC_FIELDS) - BINARY_CHANNELS) | extra_names == set(MESSAGES)
    referenced: set[str] = set()
    for channel_id, channel in doc["channels"].items():
        if channel_id in BINARY_CHANNELS:
            continue
        expected = {
            next(iter(channel["messages"])): channel_id,
            **EXTRA_MESSAGES.get(channel_id, {}),
        }
        for message_id, message_ref in channel["messages"].items():
            payload = _resolve(doc, message_ref)["payload"]
            assert payload["schemaFormat"] == JSON_SCHEMA_FORMAT
            ref = payload["schema"]["$ref"]
            assert ref == f"./{path_for(expected[message_id]).name}"
            target = (DOC_PATH.parent / ref).resolve()
            assert target.parent == HERE.resolve() and target.is_file(), f"{ref} is missing"
            referenced.add(target.name)
    assert referenced == {path_for(name).name for name in MESSAGES}


def test_the_state_channel_is_binary_and_says_where_its_layout_is(doc: dict[str, Any]) -> None:
    from service import statecodec

    message = _message(doc, "state")
    assert message["contentType"] == "application/octet-stream"
    assert message["payload"] == {"type": "string", "format": "binary"}
    assert "headers" not in message  # the processor writes state records without any
    assert "service/statecodec.py" in message["description"]
    assert f"{statecodec._HEAD.size} bytes plus 8 per judged" in message["description"]


# Keywords that are new in draft 2019-09 or 2020-12, or changed meaning there.
_NEWER_KEYWORDS = {
    "$anchor",
    "$dynamicAnchor",
    "$dynamicRef",
    "$recursiveAnchor",
    "$recursiveRef",
    "$vocabulary",
    "dependentRequired",
    "dependentSchemas",
    "maxContains",
    "minContains",
    "prefixItems",
    "unevaluatedItems",
    "unevaluatedProperties",
}
# Siblings of $ref that draft-07 ignores harmlessly (it ignores every sibling).
_ANNOTATIONS = {"$ref", "title", "description", "default", "examples"}


def _schema_objects(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for key, value in node.items():
            if key in ("properties", "$defs", "patternProperties"):
                for sub in value.values():
                    yield from _schema_objects(sub)
            elif key not in ("enum", "const", "default", "examples"):
                yield from _schema_objects(value)
    elif isinstance(node, list):
        for item in node:
            yield from _schema_objects(item)


@pytest.mark.parametrize("name", list(MESSAGES))
def test_exported_schemas_read_the_same_under_draft_07(name: str) -> None:
    schema = json.loads(path_for(name).read_text(encoding="utf-8"))
    for obj in _schema_objects(schema):
        newer = _NEWER_KEYWORDS & obj.keys()
        assert not newer, f"{name}: {sorted(newer)} has no draft-07 meaning"
        if "$ref" in obj:
            assert obj.keys() <= _ANNOTATIONS, f"{name}: draft-07 ignores $ref siblings {obj}"
        assert not isinstance(obj.get("items"), list), f"{name}: array items changed in 2020-12"


def test_cloudevents_types_and_source_are_the_processors(doc: dict[str, Any]) -> None:
    changed = processor.CE_TYPE_CHANGED.decode()
    rejected = processor.CE_TYPE_REJECTED.decode()
    assert _header(doc, "changes", "ce_type")["const"] == changed
    assert _header(doc, "rejected", "ce_type")["const"] == rejected
    for channel_id in ("changes", "rejected"):
        assert _header(doc, channel_id, "ce_type")["enum"] == [changed, rejected]
        assert _header(doc, channel_id, "ce_source")["const"] == processor.CE_SOURCE.decode()


def test_cloudevents_headers_are_the_ones_the_processor_writes(doc: dict[str, Any]) -> None:
    event = IngestEvent.model_validate(
        {
            "eventId": "0b8c5a5e-6f0e-4c55-9d0c-6f3f1f0a7d11",
            "receivedAt": "2024-05-01T12:00:00.000Z",
            "source": "webhook",
            "requestType": "callStatus",
            "call": {"callId": "CA" + "a" * 40, "status": "ringing"},
            "body": {},
        }
    )
    subject = event.call.callId
    t = b"2024-05-01T12:00:01.000Z"
    plain = processor._ce_headers(event.eventId, subject, processor.CE_TYPE_CHANGED, t, None)
    traced = processor._ce_headers(
        event.eventId, subject, processor.CE_TYPE_CHANGED, b"x", b"00-" + b"1" * 49
    )
    for channel_id in ("changes", "rejected"):
        assert _required_headers(doc, channel_id) == {name for name, _ in plain}
        for name, value in traced:
            schema = _header(doc, channel_id, name)
            assert schema, f"{channel_id}: header {name} is not described"
            if "const" in schema and name != "ce_type":
                assert schema["const"] == value.decode()


def test_unprocessable_headers_are_the_ones_the_processor_writes(doc: dict[str, Any]) -> None:
    headers = _resolve(doc, doc["components"]["messages"]["CallEventUnprocessable"]["headers"])
    written = processor._ce_headers("id", None, processor.CE_TYPE_REJECTED, b"t", None)
    assert set(headers["required"]) == {name for name, _ in written}
    assert headers["properties"]["ce_type"]["const"] == processor.CE_TYPE_REJECTED.decode()
    assert headers["properties"]["ce_source"]["const"] == processor.CE_SOURCE.decode()


def test_message_keys_are_the_call_id(doc: dict[str, Any]) -> None:
    changes = json.loads(path_for("changes").read_text(encoding="utf-8"))
    call_id_pattern = changes["$defs"]["Call"]["properties"]["callId"]["pattern"]
    for channel_id in doc["channels"]:
        key = _resolve(doc, _message(doc, channel_id)["bindings"]["kafka"]["key"])
        assert key["type"] == "string"
        assert key["pattern"] == call_id_pattern


def test_topic_configuration_is_what_the_service_creates(doc: dict[str, Any]) -> None:
    specs = {spec.name: spec.configs for spec in topic_specs(make_settings())}
    for channel in doc["channels"].values():
        binding = channel["bindings"]["kafka"]
        assert binding["partitions"] == _default("topic_partitions")
        described = dict(binding["topicConfiguration"])
        configs = specs[channel["address"]]
        expected: dict[str, Any] = {"cleanup.policy": [configs.get("cleanup.policy", "delete")]}
        if "retention.ms" in configs:
            expected["retention.ms"] = int(configs["retention.ms"])
        assert described == expected, channel["address"]


def test_operations_use_existing_channels_and_their_messages(doc: dict[str, Any]) -> None:
    channels = doc["channels"]
    seen: set[tuple[str, str]] = set()
    for op_id, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), op_id
        channel_ref = op["channel"]["$ref"]
        channel_id = channel_ref.removeprefix("#/channels/")
        assert channel_id in channels, f"{op_id}: no channel {channel_ref}"
        assert _pointer(doc, channel_ref) is channels[channel_id]
        assert op["messages"], f"{op_id} names no message"
        for message in op["messages"]:
            ref = message["$ref"]
            assert ref.startswith(f"{channel_ref}/messages/"), f"{op_id}: {ref} is not its own"
            _pointer(doc, ref)
        seen.add((op["action"], channel_id))
    expected = {("send", cid) for cid in TOPIC_FIELDS} | {("receive", "ingest")}
    assert expected <= seen


def test_the_processor_consumer_group_is_the_default(doc: dict[str, Any]) -> None:
    groups = [
        op["bindings"]["kafka"]["groupId"]["enum"]
        for op in doc["operations"].values()
        if op["action"] == "receive" and "groupId" in op.get("bindings", {}).get("kafka", {})
    ]
    assert groups == [[_default("consumer_group")]]
