"""RFC 9457 problem+json responses: every refusal the API gives, defined in one place."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.responses import Response

MEDIA_TYPE = "application/problem+json"


def problem(
    status: int,
    slug: str,
    title: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> Response:
    body = {
        "type": f"urn:callstatus:problem:{slug}",
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }
    return Response(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        media_type=MEDIA_TYPE,
        headers=headers,
    )
