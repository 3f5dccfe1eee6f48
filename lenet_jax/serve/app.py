"""The explorer's web server: a Starlette app over an ``Explorer``.

Routes (the contract the tests and the page use):

* ``GET /`` — the page (``page.html``), self-contained.
* ``GET /api/info`` — the run's model, dataset, classes, methods and composites.
* ``GET /api/digit?kind=random|misclassified`` — a test digit ``{"index", "label", "image"}``.
* ``POST /api/explain`` — ``{"image": 28x28 floats in [0, 1] (ink = 1)}`` or ``{"png": "<base64>"}``
  (a PNG, JPEG or any picture Pillow reads, at most ``image_files.MAX_PIXELS`` pixels),
  with optional ``"methods"`` (default: all but occlusion), ``"target"`` (``null``: the predicted
  class) and ``"composite"`` (LRP's) -> ``{"probabilities", "predicted", "target", "heatmaps":
  {method: [[...]]}, "lrp": {...}}``, each map at the model's input resolution.

Every bad request is status 400 with ``{"error": "one line"}``; the server keeps serving. The run is
fixed at start: no file path ever comes from a request. Other web pages cannot drive it: a request
must name one of the server's own host names (``Host``: 127.0.0.1, localhost, or what ``--host``
names; a DNS-rebinding page's host is refused) and ``POST /api/explain`` must be
``application/json`` (what a browser sends cross-site without asking, ``text/plain``, is refused).
``server_config`` bounds slow clients: each request must arrive whole within ``REQUEST_TIMEOUT``
seconds, idle connections close after 5 s, and at most ``MAX_CONNECTIONS`` are open at once.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from typing import TYPE_CHECKING

import numpy as np

from lenet_jax.serve.explorer import Explorer, RequestError

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.responses import Response

MAX_BODY = 1 << 20  # 1 MB
REQUEST_TIMEOUT = 10.0  # seconds from a request's first byte (or the connection) to its last
MAX_CONNECTIONS = 64
HOSTS = ("127.0.0.1", "localhost", "[::1]")
log = logging.getLogger("lenet_jax.serve")


def create_app(
    explorer: Explorer, *, seed: int | None = None, hosts: tuple[str, ...] = HOSTS
) -> Starlette:
    """The app serving ``explorer``; ``seed`` fixes the random test digits (tests); ``hosts``: the
    host names requests may name (``Host`` without the port).

    Needs the ``serve`` extra (Starlette), imported here so that the module imports (and its API
    documents) without it."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    page = resources.files("lenet_jax.serve").joinpath("page.html").read_text(encoding="utf-8")
    rng = np.random.default_rng(seed)
    allowed = {h.lower() for h in hosts}

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def info(request: Request) -> Response:
        return JSONResponse(explorer.info())

    async def digit(request: Request) -> Response:
        try:
            return JSONResponse(explorer.digit(request.query_params.get("kind", "random"), rng))
        except RequestError as e:
            return _error(str(e))

    async def explain(request: Request) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return _error(f"the body must be application/json, not {kind or 'untyped'}")
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY:
            return _error(f"the body must be at most {MAX_BODY} bytes")
        body = b""
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY:
                    return _error(f"the body must be at most {MAX_BODY} bytes")
        except ClientDisconnect:
            log.warning("a client disconnected before sending its whole request")
            return _error("the client disconnected")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _error("the body is not JSON")
        except RecursionError:
            return _error("the body's JSON is nested too deeply")
        try:
            answer = await run_in_threadpool(explorer.explain, payload)
        except RequestError as e:
            return _error(str(e))
        return JSONResponse(answer)

    def host_checked(endpoint):
        async def route(request: Request) -> Response:
            host = request.headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.lower() not in allowed:
                return _error(f"unknown host {host!r}: this server answers to {sorted(allowed)}")
            return await endpoint(request)

        return route

    return Starlette(
        routes=[
            Route("/", host_checked(index)),
            Route("/api/info", host_checked(info)),
            Route("/api/digit", host_checked(digit)),
            Route("/api/explain", host_checked(explain), methods=["POST"]),
        ]
    )


def server_config(app, host: str, port: int, *, request_timeout: float = REQUEST_TIMEOUT):
    """The uvicorn configuration that bounds slow clients (see the module docstring)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_timely_h11(request_timeout),
        timeout_keep_alive=5,
        limit_concurrency=MAX_CONNECTIONS,
        log_level="warning",
    )


def _timely_h11(timeout: float):
    """uvicorn's h11 protocol with a deadline: a request not whole within ``timeout`` seconds of its
    first byte (or of the connection) closes the connection (slow headers or bodies)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimelyH11(H11Protocol):
        deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.deadline is None:
                self._arm()
            super().data_received(data)

        def on_response_complete(self) -> None:
            self._disarm()
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self):
            self.deadline = self.loop.call_later(timeout, self._expire)

        def _disarm(self):
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def _expire(self):
            self.deadline = None
            if self.conn.their_state is not h11.DONE and not self.transport.is_closing():
                log.warning("closed a connection whose request took over %.0f s", timeout)
                self.transport.close()

    return TimelyH11


def _error(message: str) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=400)
