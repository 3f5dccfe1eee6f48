"""The explorer's web server: a Starlette app over an ``Explorer``.

Routes (the contract the tests and the page use):

* ``GET /`` — the page (``page.html``), self-contained.
* ``GET /api/info`` — the run's model, dataset, classes, methods and composites.
* ``GET /api/digit?kind=random|misclassified`` — a test digit ``{"index", "label", "image"}``.
* ``POST /api/explain`` — ``{"image": 28x28 floats in [0, 1] (ink = 1)}`` or ``{"png": "<base64>"}``,
  with optional ``"methods"`` (default: all but occlusion), ``"target"`` (``null``: the predicted
  class) and ``"composite"`` (LRP's) -> ``{"probabilities", "predicted", "target", "heatmaps":
  {method: [[...]]}, "lrp": {...}}``, each map at the model's input resolution.

Every bad request is status 400 with ``{"error": "one line"}``; the server keeps serving. The run is
fixed at start: no file path ever comes from a request.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from lenet_jax.serve.explorer import Explorer, RequestError

MAX_BODY = 1 << 20  # 1 MB


def create_app(explorer: Explorer, *, seed: int | None = None) -> Starlette:
    """The app serving ``explorer``; ``seed`` fixes the random test digits (tests)."""
    page = resources.files("lenet_jax.serve").joinpath("page.html").read_text(encoding="utf-8")
    rng = np.random.default_rng(seed)

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
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY:
            return _error(f"the body must be at most {MAX_BODY} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return _error(f"the body must be at most {MAX_BODY} bytes")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _error("the body is not JSON")
        try:
            answer = await run_in_threadpool(explorer.explain, payload)
        except RequestError as e:
            return _error(str(e))
        return JSONResponse(answer)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/info", info),
            Route("/api/digit", digit),
            Route("/api/explain", explain, methods=["POST"]),
        ]
    )


def _error(message: str) -> Response:
    return JSONResponse({"error": message}, status_code=400)
