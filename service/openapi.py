"""The OpenAPI 3 description served at ``/openapi.json``, built once from the models."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema

from schemas.call import ACCOUNT_ID_PATTERN as ACCOUNT_ID_SHAPE
from schemas.call import Call
from schemas.messages import INGEST_PATH, WebhookBody
from service.binding import ACCOUNT_PATH
from service.problems import CATALOGUE


def _refusals(account_path: bool) -> dict[str, Any]:
    """One response per status an ingest endpoint can answer with, from the catalogue of
    refusals: each names its problem types and causes."""
    by_status: dict[int, list[str]] = {}
    for refusal in CATALOGUE:
        if refusal.public and (account_path or not refusal.account_path_only):
            by_status.setdefault(refusal.status, []).append(f"`{refusal.type}`: {refusal.cause}")
    return {
        str(status): {
            "description": "; ".join(causes),
            "content": {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            },
        }
        for status, causes in sorted(by_status.items())
    }


# The canonical header FreeClimb sends; the parser also tolerates spaces, other keys and
# any order, which only ever leads to the same 401 or 202.
SIGNATURE_PATTERN = "^t=[0-9]{1,12}(,v1=[0-9a-f]{64}){1,16}$"
# Which body shape a request is read as: a webhook when it names either key.
_NAMES_A_WEBHOOK = {"anyOf": [{"required": ["requestType"]}, {"required": ["callStatus"]}]}
# Rules between fields that JSON Schema cannot state; the service refuses them with 422.
CROSS_FIELD_RULES = (
    "connectDuration <= duration; startTime <= connectTime <= endTime (when present)"
)
ACCOUNT_ID_PATTERN = f"^{ACCOUNT_ID_SHAPE}$"
# What binds a body to an account, which JSON Schema cannot state either (403).
ACCOUNT_RULE = (
    "The body's accountId must be the account whose signing secret verified the request "
    "(403 account-mismatch)."
)


def _empty_means_absent(model_schema: dict[str, Any]) -> None:
    """An optional field may also be "" (FreeClimb writes it for fields not reached yet),
    which the models read as absent: say so in the request schema."""
    required = set(model_schema.get("required", ()))
    for name, prop in model_schema["properties"].items():
        if name not in required:
            prop["anyOf"] = [*prop.pop("anyOf", [{}]), {"const": ""}]


def _ingest_operation(account_path: bool) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {
            "name": "FreeClimb-Signature",
            "in": "header",
            "required": True,
            "schema": {"type": "string", "pattern": SIGNATURE_PATTERN},
            "description": "t=<unix seconds>,v1=<hex HMAC-SHA256>[,v1=...]; "
            "judged (401) before the body is read, except the digest",
        }
    ]
    if account_path:
        summary = "Take one FreeClimb webhook body or one Call resource body for one account"
        description = (
            "The preferred endpoint: put it in the statusCallbackUrl. The account is known "
            "before the body is read (an unknown one is refused without reading it); the "
            "body's accountId, when present, must be the path's. " + ACCOUNT_RULE
        )
        parameters.insert(
            0,
            {
                "name": "accountId",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": ACCOUNT_ID_PATTERN},
                "description": "the FreeClimb account id; anything else is a 404",
            },
        )
    else:
        summary = "Take one FreeClimb webhook body or one Call resource body"
        description = (
            "The account is the body's accountId, which must be there when accounts are "
            "configured (401 without it). " + ACCOUNT_RULE
        )
    return {
        "summary": summary,
        "description": description,
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    # Read as a webhook when it names requestType or callStatus, else as
                    # a Call resource.
                    "schema": {
                        "if": _NAMES_A_WEBHOOK,
                        "then": {"$ref": "#/components/schemas/WebhookBody"},
                        "else": {"$ref": "#/components/schemas/Call"},
                    }
                }
            },
        },
        "responses": {
            "202": {
                "description": "Stored durably in the ingest topic",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "eventId": {"type": "string"},
                                "callId": {"type": "string"},
                            },
                        }
                    }
                },
            },
            **_refusals(account_path),
        },
    }


@cache
def openapi_document() -> dict[str, Any]:
    _, defs = models_json_schema(
        [(WebhookBody, "validation"), (Call, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = defs["$defs"]
    for name in ("WebhookBody", "Call"):
        _empty_means_absent(schemas[name])
    schemas["Call"]["description"] = f"{Call.__doc__}\n\nAlso refused: {CROSS_FIELD_RULES}."
    schemas["Problem"] = {
        "type": "object",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "FreeClimb call-status processor", "version": "1"},
        "paths": {
            ACCOUNT_PATH: {"post": _ingest_operation(account_path=True)},
            INGEST_PATH: {"post": _ingest_operation(account_path=False)},
            "/healthz": {
                "get": {"summary": "Liveness", "responses": {"200": {"description": "up"}}}
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: Kafka reachable, processor partitions restored",
                    "responses": {
                        "200": {"description": "ready"},
                        "503": {"description": "not ready"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "text format"}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": {"description": "OpenAPI 3.1"}},
                }
            },
        },
        "components": {"schemas": schemas},
    }
