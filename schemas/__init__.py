"""Pydantic models of the FreeClimb Call resource and of every message the service writes.

JSON Schema files generated from these models sit beside this module
(``python -m schemas.export`` rewrites them; a test fails when they drift).
"""

from schemas.call import AnsweredBy, Call, CallDirection, CallStatus
from schemas.messages import (
    ChangeMessage,
    IngestEvent,
    RejectedMessage,
    RejectReason,
    Source,
    StateMessage,
    WebhookBody,
    normalise_body,
)

__all__ = [
    "AnsweredBy",
    "Call",
    "CallDirection",
    "CallStatus",
    "ChangeMessage",
    "IngestEvent",
    "RejectReason",
    "RejectedMessage",
    "Source",
    "StateMessage",
    "WebhookBody",
    "normalise_body",
]
