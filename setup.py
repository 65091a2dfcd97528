"""The package's build. Plain Python by default; with ``CALLSTATUS_COMPILE=1`` the
modules every ingest request runs through are compiled to C extensions by mypyc (part of
mypy; the code is the same, already ``mypy --strict``): less CPU per request (the
bench's plain-Python row; bench/README.md, "The sixth round"). The image's build
stage builds it so (the Dockerfile), and in a checkout ``testkit.compiled`` does, for
``make run``, the bench and the integration tests (README, "The compiled build"). The dev
venv's editable install stays plain Python, so an edit takes effect at once.

Compiling needs a C compiler, Python's headers, and mypy with the runtime set's stubs in
the build environment (pip's ``--no-build-isolation``: the dev extra, or the image's
requirements-build.lock)."""

from __future__ import annotations

import os

from setuptools import setup

# The ingest request's hot path, each module compiled whole: only modules without
# coroutines. mypyc's compiled coroutines are not safe to cancel: a service built with
# the producer, publisher and access log compiled crashed with SIGSEGV at shutdown, in
# one of ten runs, formatting the exception of a start-up task cancelled mid-await
# (mypy issue 12867, open, is the same crash). An ingest node that dies so loses the
# callbacks in flight, which FreeClimb never sends again: tests/test_compiled.py keeps
# `async def` out of this list. The lane's accepted path is callbacks, not coroutines.
# Also not here: service.ingest (mypyc 2.4 crashes compiling it together with
# service.producer), the pydantic models of schemas/ (mypyc cannot compile pydantic's
# metaclass), uvicorn's protocol subclass (service.frontdoor: a compiled class cannot
# extend an interpreted one).
COMPILED = [
    "service/accountbook.py",
    "service/binding.py",
    "service/hotmetrics.py",
    "service/lane.py",
    "service/logs.py",
    "service/partitioner.py",
    "service/signature.py",
    "service/strictjson.py",
]

ext_modules = []
if os.environ.get("CALLSTATUS_COMPILE") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(COMPILED, opt_level="3")

setup(ext_modules=ext_modules)
