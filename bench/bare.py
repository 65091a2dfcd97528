"""The floor of the HTTP stack: a Starlette endpoint that reads the body and answers 202,
served by uvicorn on uvloop + httptools (``uvicorn bench.bare:app``). No signature, no
validation, no Kafka: what the framework alone costs per request."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def accept(request: Request) -> Response:
    await request.body()
    return Response(b'{"ok":true}', status_code=202, media_type="application/json")


async def ready(_: Request) -> Response:
    return Response(b"", status_code=200)


app = Starlette(
    routes=[
        Route("/v1/call-status", accept, methods=["POST"]),
        Route("/readyz", ready, methods=["GET"]),
    ]
)
