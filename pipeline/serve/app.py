"""The HTTP API and its web page: ``create_app(bundle) -> FastAPI``.

Endpoints:

``POST /caption``
    The image as a ``multipart/form-data`` upload (file field ``image``; form fields ``caption_mode`` and
    ``attention``), as JSON ``{"image": "<base64 or data: URL>", "caption_mode": "...", "attention": false}``,
    or as a raw ``image/*`` body. ``caption_mode`` (also accepted as a query parameter) is one of
    :data:`pipeline.inference.decoding.CAPTION_MODES` (default ``consistent``); ``attention`` asks for per-word
    attention heatmaps (attention decoders only). Answers ``caption``, ``score``, ``alternatives``,
    ``mode``, ``timings`` (and ``attention``).
``GET /health``
    Liveness plus what the page needs: the model, the modes, whether a key is required, limits, batching.
``GET /``
    The web page (``static/``: no remote asset). Every HTML response carries a strict
    Content-Security-Policy, ``nosniff`` and ``no-referrer``; every response ``nosniff``.
``GET /docs``, ``GET /openapi.json``
    OpenAPI docs; Swagger UI is served from the locally installed ``swagger-ui-py`` package (no CDN);
    without it ``/docs`` is off and ``/openapi.json`` still describes the API.

Every error is JSON ``{"error": {"code": "...", "message": "..."}}``: 400 malformed request (bad JSON or
base64, missing or unknown field, unknown caption mode — the valid ones are listed), 401 missing or wrong
API key, 403 a request sent by a page of another site (its ``Origin`` is neither this server nor one of
``cors_origin``: a page elsewhere cannot drive this server through a visitor's browser), 404/405, 408 a body
not received within ``body_timeout`` seconds, 413 body over ``max_request_bytes`` (refused from
``Content-Length`` before reading, or once the streamed body passes the limit), 415 unsupported
``Content-Type``, 421 a ``Host`` that is not one of this server's names (``allowed_hosts``: a page of
another site that rebinds its DNS name to this address cannot use the server either), 422 an upload that
is not a usable image (not an image, truncated, corrupt, empty, more than ``max_pixels`` pixels or
``max_aspect_ratio``:1, judged from the header), 503 the model queue is full, or no upload slot freed in
time. A catch-all handler turns any other failure into a 500 JSON error (logged with its traceback), never
a bare trace. The server loads nothing but the bundle's safetensors and JSON files.

Slow clients are bounded too: a request has ``body_timeout`` seconds from its headers to send its whole
body (408 after, the connection closed), and at most ``max_uploads`` bodies are received at once (the
others wait for a slot within the same deadline), so a crowd of clients that send a few bytes and stall
holds each slot for ``body_timeout`` at most, and never ``/health`` or the requests already received.

The work per request is bounded: parsing, decoding and preprocessing run in a bounded thread pool
(``decode_threads``), never on the event loop, so a slow image never stalls another request or
``/health``; an image of extreme aspect ratio is trimmed before it is resized
(:func:`pipeline.data.images.trim_for_eval`), so accepted images cost their decoded size and little more.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import anyio
import anyio.lowlevel
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.data.images import ImageDecodeError
from pipeline.inference.bundle import Captioner
from pipeline.inference.decoding import CAPTION_MODES
from pipeline.inference.engine import (
    DEFAULT_MODE,
    SERVE_FORMATS,
    CaptionEngine,
    mode_list,
    unknown_mode_message,
)
from pipeline.serve.batcher import BatcherClosed, DynamicBatcher, QueueFull
from pipeline.serve.settings import (  # noqa: F401 - ServeSettings re-exported
    SERVE_DEFAULTS,
    AllowedHosts,
    ServeSettings,
    check_api_key,
    check_origins,
)
from pipeline.threads import model_workers as size_model_workers

log = logging.getLogger(__name__)

DRAIN_SECONDS = 2.0  # at most this long reading (and dropping) the rest of an oversized body, see _read_body
FORM_CHUNK_BYTES = 256 * 1024  # the multipart parser's share of the event loop: ~1 ms of parsing at a time
JSON_FIELDS = ("image", "caption_mode", "attention")
FILE_FIELDS = ("image", "file")
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HTML_HEADERS = {"content-security-policy": PAGE_CSP, "x-content-type-options": "nosniff",
                "referrer-policy": "no-referrer"}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DECODE_REASON_CODES = {
    "empty file": "empty_image",
    "not an image": "not_an_image",
    "truncated image": "truncated_image",
    "corrupt image": "corrupt_image",
    "image too large": "too_many_pixels",
    "extreme aspect ratio": "extreme_aspect_ratio",
}
ModeName = Literal[tuple(CAPTION_MODES)]  # type: ignore[valid-type]


# --------------------------------------------------------------------------- schemas (OpenAPI docs)
class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_base64, unknown_mode, not_an_image.")
    message: str = Field(description="What is wrong, for a person.")


class ErrorResponse(BaseModel):
    error: ErrorBody


class CaptionJSONRequest(BaseModel):
    image: str = Field(description="The image file's bytes in base64, or a data: URL (data:image/png;base64,...).")
    caption_mode: Optional[ModeName] = Field(None, description=f"Caption mode; default {DEFAULT_MODE}.")
    attention: bool = Field(False, description="Return per-word attention heatmaps (attention decoders only).")


class CaptionMultipartRequest(BaseModel):
    image: bytes = Field(description="The image file (field name `image`; `file` is accepted too).")
    caption_mode: Optional[ModeName] = Field(None, description=f"Caption mode; default {DEFAULT_MODE}.")
    attention: bool = Field(False, description="Return per-word attention heatmaps (attention decoders only).")


class Alternative(BaseModel):
    caption: str
    score: Optional[float] = Field(description="Length-normalised log-probability (null: none, e.g. -inf).")


class AttentionWord(BaseModel):
    word: str
    heatmap: str = Field(description="JPEG data URL: the image as the backbone saw it, this word's attention over it.")


class AttentionMaps(BaseModel):
    image: str = Field(description="JPEG data URL of the image as the backbone saw it (resized, centre-cropped).")
    width: int
    height: int
    source: str = Field(description="What the weights are, e.g. the cross-attention of the last decoder block, "
                                    "mean over its heads.")
    shown: str = Field(description="What a map covers: the grid of visual tokens, or several token sets summed.")
    words: list[AttentionWord]


class Timings(BaseModel):
    decode_ms: float = Field(description="Reading and decoding the image.")
    queue_ms: float = Field(description="Waiting for the model (dynamic batching window and earlier batches).")
    model_ms: float = Field(description="The model call this image shared (backbone + decoding).")
    attention_ms: Optional[float] = Field(None, description="Rendering the heatmaps, when asked for.")
    total_ms: float = Field(description="From receiving the request to answering it.")
    batch_size: int = Field(description="Images in the model call this image shared.")


class CaptionResponse(BaseModel):
    caption: str
    score: Optional[float]
    alternatives: list[Alternative] = Field(description="The other distinct captions, best first.")
    mode: str
    timings: Timings
    attention: Optional[AttentionMaps] = Field(None, description="Present when asked for; null without attention.")
    attention_unavailable: Optional[str] = Field(
        None, description="When attention was asked for but is null: why (the decoder has no visual attention, "
                          "e.g. the Perceiver attends to latents, not to the image; or the maps could not be drawn).")


ERROR_DOCS = {
    400: "Malformed request: bad JSON or base64, missing or unknown field, unknown caption mode.",
    401: "Missing or wrong API key (`X-API-Key: KEY` or `Authorization: Bearer KEY`).",
    403: "Sent by a page of another site (its Origin is not this server's nor an allowed one).",
    408: "The request body did not arrive within the server's body timeout.",
    413: "Request body larger than the server's limit.",
    415: "Content-Type is not multipart/form-data, application/json or image/*.",
    421: "The Host header names a host that is not this server's (see --allowed-host).",
    422: "Not a usable image: not an image, truncated, corrupt, empty, too many pixels or too extreme an aspect ratio.",
    503: "Too many requests waiting for the model, or for an upload slot; retry shortly.",
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: Optional[dict[str, str]] = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.extra = status, code, message, headers, extra


def error_response(status: int, code: str, message: str, headers: Optional[dict[str, str]] = None,
                   **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers)


class HostGuard:
    """ASGI middleware: answers 421 to a request whose ``Host`` header is not one of this server's names
    (:class:`~pipeline.serve.settings.AllowedHosts`), before anything reads its body, and closes the
    connection. Such a request comes through a name that is not this server's: a proxy it was not told of,
    or a page of another site that rebound its DNS name to this address (DNS rebinding), whose requests the
    origin check cannot tell from this server's own page's."""

    def __init__(self, app: ASGIApp, allowed: AllowedHosts) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host")
        if self.allowed.allows(host):
            await self.app(scope, receive, send)
            return
        named = f"the host {host[:200]!r}" if host else "no host"
        response = error_response(
            421, "unknown_host", f"this request names {named}, and this server answers as "
            f"{self.allowed.describe()}; its operator can add a name with --allowed-host NAME",
            headers={"Connection": "close"})
        await response(scope, receive, send)


class OriginGuard:
    """ASGI middleware: refuses (403) a request that acts (not GET, HEAD or OPTIONS) sent by a page of another
    site — browsers say whose page sent a request in ``Origin`` — unless that origin is allowed; requests
    without an ``Origin`` (curl, scripts) and from this server's own page pass. It also gives every
    response ``nosniff`` and every HTML response :data:`HTML_HEADERS` (a response's own values win)."""

    def __init__(self, app: ASGIApp, allowed_origins: Sequence[str] = ()) -> None:
        self.app = app
        self.any_origin = "*" in allowed_origins
        self.allowed = frozenset(allowed_origins)

    def allows(self, origin: str, host: Optional[str]) -> bool:
        """Whether a page of ``origin`` may call a server reached as ``host`` (the Host header)."""
        if self.any_origin or origin.lower().rstrip("/") in self.allowed:
            return True
        _, sep, netloc = origin.partition("://")
        return bool(sep) and host is not None and netloc.lower() == host.lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if scope["method"] not in SAFE_METHODS and origin is not None and not self.allows(origin, headers.get("host")):
            response = error_response(403, "forbidden_origin", f"this server does not take requests from pages of "
                                      f"{origin}; its operator can allow them with --cors-origin {origin}")
            await response(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                extra = HTML_HEADERS if out.get("content-type", "").startswith("text/html") else {}
                for name, value in {"x-content-type-options": "nosniff", **extra}.items():
                    out.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --------------------------------------------------------------------------- the app
def create_app(
    model: Union[str, Path, Captioner, CaptionEngine],
    *,
    api_key: Optional[str] = None,
    max_request_bytes: int = SERVE_DEFAULTS.max_request_bytes,
    body_timeout: float = SERVE_DEFAULTS.body_timeout,
    max_uploads: int = SERVE_DEFAULTS.max_uploads,
    max_pixels: int = SERVE_DEFAULTS.max_pixels,
    max_aspect_ratio: float = SERVE_DEFAULTS.max_aspect_ratio,
    max_batch_size: int = SERVE_DEFAULTS.max_batch_size,
    max_wait_ms: float = SERVE_DEFAULTS.max_wait_ms,
    max_queue: int = SERVE_DEFAULTS.max_queue,
    cors_origin: Sequence[str] = (),
    allowed_hosts: Optional[AllowedHosts] = None,
    decode_threads: int = SERVE_DEFAULTS.decode_threads,
    model_workers: int = SERVE_DEFAULTS.model_workers,
    device: Optional[str] = None,
    warm_up: bool = True,
) -> FastAPI:
    """The captioning API for a bundle folder (or a loaded Captioner / CaptionEngine).

    The limits, batching and threads default to :data:`pipeline.serve.settings.SERVE_DEFAULTS` (``pipeline
    serve``'s defaults too); ``create_app(engine, **ServeSettings(...).app_limits())`` applies a whole settings
    object. ``model_workers`` 0: as many as :func:`pipeline.threads.model_workers` sizes for torch's threads
    and the model's device (as ``pipeline serve`` does). ``device``: where a bundle folder is loaded (None:
    :meth:`CaptionEngine.load`'s default). ``api_key``: None serves without one; an empty or blank key is a
    ``ConfigError``. ``cors_origin``: web origins (``scheme://host[:port]``, or ``*``) whose pages may call
    the API besides this server's own. ``allowed_hosts``: the host names the server answers to
    (``ServeSettings.allowed_hosts()``, as ``pipeline serve`` passes); None checks no ``Host`` (an app
    embedded behind something that does).
    """
    api_key = check_api_key(api_key)
    origins = check_origins(cors_origin)
    if max_request_bytes < 1 or max_pixels < 1 or max_aspect_ratio < 1 or body_timeout <= 0 or max_uploads < 1:
        raise ValueError("max_request_bytes, max_pixels, max_uploads and body_timeout must be positive, "
                         "max_aspect_ratio >= 1")
    engine = _engine(model, device)
    if warm_up:
        engine.warm_up()
    state = _State(engine, api_key, max_request_bytes, max_pixels, max_aspect_ratio, decode_threads,
                   body_timeout=body_timeout, max_uploads=max_uploads)
    workers = size_model_workers(model_workers, torch.get_num_threads(), engine.captioner.device.type)
    state.batcher = DynamicBatcher(state.run_batch, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                   max_queue=max_queue, pending=lambda: state.pending, workers=workers)

    app = _new_app(state)
    _install_error_handlers(app)
    _add_guards(app, origins, allowed_hosts)
    _add_page(app)
    _add_docs(app)
    _add_api(app, state)
    return app


def _engine(model: Union[str, Path, Captioner, CaptionEngine], device: Optional[str]) -> CaptionEngine:
    """``model`` as an engine: as given, around a loaded Captioner, or loaded from a bundle folder."""
    if isinstance(model, CaptionEngine):
        return model
    if isinstance(model, Captioner):
        return CaptionEngine(model)
    return CaptionEngine.load(model) if device is None else CaptionEngine.load(model, device=device)


def _new_app(state: "_State") -> FastAPI:
    """The FastAPI app, its description naming the model and the caption modes; it closes the batcher on exit."""
    info = state.engine.info()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await state.batcher.close()

    app = FastAPI(
        title="Image captioning API",
        version="1",
        description=(f"Captions images with the model bundle `{info['bundle']}` "
                     f"({info['decoder']} on {info['backbone']}). The page at [/](/) does "
                     "it in a browser.\n\nCaption modes:\n\n"
                     + "\n".join(f"* `{m['name']}`: {m['description']}" for m in mode_list())
                     + "\n\nErrors are JSON `{\"error\": {\"code\": ..., \"message\": ...}}`."),
        docs_url=None, redoc_url=None, lifespan=lifespan,
    )
    app.state.captioning = state
    return app


def _add_guards(app: FastAPI, origins: list[str], allowed_hosts: Optional[AllowedHosts]) -> None:
    """CORS for the allowed origins, the host check and the origin check (outermost last)."""
    if origins:  # preflights and Access-Control-* headers for the allowed origins (the guard refuses others)
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["content-type", "x-api-key", "authorization"], max_age=600)
    if allowed_hosts is not None:  # outside CORS (a preflight with a foreign Host is refused too), inside the
        app.add_middleware(HostGuard, allowed=allowed_hosts)  # origin guard (which adds nosniff to its 421)
    app.add_middleware(OriginGuard, allowed_origins=origins)


def _add_page(app: FastAPI) -> None:
    """The web page at ``/`` and its files under ``/static``."""
    static = resources.files("pipeline.serve") / "static"

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=str(static)), name="static")


def _add_api(app: FastAPI, state: "_State") -> None:
    """``GET /health`` and ``POST /caption``, and the OpenAPI schema of the request bodies ``/caption`` takes."""
    engine = state.engine

    @app.get("/health", summary="Liveness, model, caption modes, limits and batching statistics")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": engine.info(),
            "modes": mode_list(),
            "default_mode": DEFAULT_MODE,
            "auth_required": state.api_key is not None,
            "limits": {"max_request_bytes": state.max_request_bytes, "max_pixels": state.max_pixels,
                       "max_aspect_ratio": state.max_aspect_ratio, "image_formats": list(SERVE_FORMATS),
                       "body_timeout": state.body_timeout, "max_uploads": state.max_uploads},
            "uploads": {"receiving": state.max_uploads - state.upload_slots.value, "waiting": state.waiting_uploads},
            "batching": {"max_batch_size": state.batcher.max_batch_size, "model_workers": state.batcher.workers,
                         "max_wait_ms": state.batcher.max_wait * 1000.0, "queued": state.batcher.queued,
                         **state.batcher.stats.as_dict()},
        }

    @app.post(
        "/caption",
        summary="Caption one image",
        response_model=CaptionResponse,
        responses={code: {"model": ErrorResponse, "description": text} for code, text in ERROR_DOCS.items()},
        openapi_extra={"requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/CaptionMultipartRequest"}},
            "application/json": {"schema": {"$ref": "#/components/schemas/CaptionJSONRequest"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        }}},
    )
    async def caption(
        request: Request,
        caption_mode: Optional[str] = Query(None, description="Caption mode (a body field of the same name wins)."),
        attention: Optional[bool] = Query(None, description="Ask for attention heatmaps (a body field wins)."),
    ) -> Response:
        return await state.handle(request, caption_mode, attention)

    # Schemas only referenced from openapi_extra must be added to the components by hand.
    original_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original_openapi()
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for model_cls in (CaptionJSONRequest, CaptionMultipartRequest):
                comps[model_cls.__name__] = model_cls.model_json_schema(ref_template="#/components/schemas/{model}")
            if state.api_key is not None:
                schema["components"]["securitySchemes"] = {
                    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                    "Bearer": {"type": "http", "scheme": "bearer"},
                }
                schema["paths"]["/caption"]["post"]["security"] = [{"ApiKey": []}, {"Bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class _State:
    """Everything a request needs: the engine, the batcher, the limits and the in-flight count."""

    def __init__(self, engine: CaptionEngine, api_key: Optional[str], max_request_bytes: int, max_pixels: int,
                 max_aspect_ratio: float, decode_threads: int, *, body_timeout: float, max_uploads: int) -> None:
        self.engine = engine
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes
        self.max_pixels = max_pixels
        self.max_aspect_ratio = max_aspect_ratio
        self.body_timeout = body_timeout
        self.max_uploads = max_uploads
        self.upload_slots = anyio.Semaphore(max_uploads)  # bodies being received at once
        self.waiting_uploads = 0  # requests waiting for one of those slots
        # Parsing, decoding and preprocessing: CPU work that must never run on the event loop.
        self.decode_limiter = anyio.CapacityLimiter(max(1, decode_threads))
        self.pending = 0  # requests received but not yet handed to the batcher (the batcher waits only for these)
        self.batcher: DynamicBatcher  # set by create_app

    # -- the model call (in the batcher's model thread) ------------------------------------------
    def run_batch(self, key: tuple[str, bool], pixels: list[Any]) -> list[Any]:
        mode, attention = key
        return self.engine.run(pixels, self.engine.options(mode), attention=attention).captions

    # -- one request -----------------------------------------------------------------------------
    async def handle(self, request: Request, query_mode: Optional[str], query_attention: Optional[bool]) -> Response:
        started = time.perf_counter()
        body_deadline = anyio.current_time() + self.body_timeout
        self.pending += 1
        submitted = False
        try:
            try:
                self._check_key(request)
                data, mode, attention = await self._read_request(request, query_mode, query_attention, body_deadline)
            except ApiError:
                if not getattr(request.state, "body_done", False):  # refused before reading (401, 415)
                    await self._drain(request, 4 * self.max_request_bytes)
                raise
            mode = mode or DEFAULT_MODE
            if mode not in CAPTION_MODES:
                raise ApiError(400, "unknown_mode", unknown_mode_message(mode), valid=list(CAPTION_MODES))
            t = time.perf_counter()
            image, pixels = await anyio.to_thread.run_sync(self._decode, data, limiter=self.decode_limiter)
            decode_ms = (time.perf_counter() - t) * 1000.0
            wants_maps = bool(attention) and self.engine.has_attention
            self.pending -= 1
            submitted = True
            try:
                captions, info = await self.batcher.submit((mode, wants_maps), pixels)
            except QueueFull as e:
                raise ApiError(503, "busy", f"server busy: {e}; retry shortly", headers={"Retry-After": "1"}) from None
            except BatcherClosed as e:
                raise ApiError(503, "shutting_down", str(e)) from None
            attention_ms = None
            if attention:
                t = time.perf_counter()
                body = await anyio.to_thread.run_sync(
                    lambda: self.engine.result(captions, mode=mode, image=image, attention=True),
                    limiter=self.decode_limiter)
                attention_ms = round((time.perf_counter() - t) * 1000.0, 3)
            else:
                body = self.engine.result(captions, mode=mode)
            body["timings"] = {
                "decode_ms": round(decode_ms, 3), "queue_ms": round(info.queue_ms, 3),
                "model_ms": round(info.model_ms, 3), "attention_ms": attention_ms,
                "total_ms": round((time.perf_counter() - started) * 1000.0, 3), "batch_size": info.batch_size,
            }
            return JSONResponse(body)
        finally:
            if not submitted:
                self.pending -= 1

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("x-api-key")
        if given is None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else None
        if given is None:
            raise ApiError(401, "unauthorized", "this server needs an API key: send it as `X-API-Key: KEY` "
                           "or `Authorization: Bearer KEY`", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.api_key.encode("utf-8")):
            raise ApiError(401, "unauthorized", "wrong API key", headers={"WWW-Authenticate": "Bearer"})

    def _decode(self, data: bytes):
        try:
            image = self.engine.decode(data, "upload", self.max_pixels, self.max_aspect_ratio)
        except ImageDecodeError as e:
            code = DECODE_REASON_CODES.get(e.reason, "not_an_image")
            message = e.reason + (f": {e.detail}" if e.detail else "")
            if code == "too_many_pixels":
                message += f" (this server accepts at most {self.max_pixels:,} pixels)"
            elif code == "extreme_aspect_ratio":
                message += f" (this server accepts sides of at most {self.max_aspect_ratio:g}:1)"
            raise ApiError(422, code, message) from None
        try:
            return image, self.engine.prepare(image)
        except Exception as e:  # noqa: BLE001 - e.g. an image too small for the backbone's transform
            raise ApiError(422, "unusable_image", f"cannot prepare this image for the model: {e}") from None

    async def _read_request(self, request: Request, query_mode: Optional[str], query_attention: Optional[bool],
                            deadline: float) -> tuple[bytes, Optional[str], Optional[bool]]:
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";", 1)[0].strip().lower()
        if media == "multipart/form-data":
            kind = "multipart"
        elif media == "application/json" or media.endswith("+json"):
            kind = "json"
        elif media.startswith("image/") or media == "application/octet-stream":
            kind = "raw"
        else:
            got = f"Content-Type {media!r}" if media else "no Content-Type"
            raise ApiError(415, "unsupported_media_type",
                           f"{got}: send multipart/form-data (file field `image`), application/json "
                           "({\"image\": base64 or data URL}) or a raw image/* body")
        body = await self._read_body(request, deadline)
        if kind == "raw":
            return body, query_mode, query_attention
        if kind == "json":  # json.loads and base64 of a body up to the limit: milliseconds, off the loop
            return await anyio.to_thread.run_sync(self._parse_json, body, query_mode, query_attention,
                                                  limiter=self.decode_limiter)
        return await self._parse_multipart(request, body, query_mode, query_attention)

    async def _read_body(self, request: Request, deadline: float) -> bytes:
        """The body, refusing (413) one over the limit: by its Content-Length before reading it, else as it
        streams in. The refused rest is read and dropped (up to 4x the limit, for at most DRAIN_SECONDS)
        so the client sees the 413: closing a socket with unread data resets the connection, and the
        client may lose the answer. (Requests refused before their body is read, 401 and 415, are drained
        the same way.) A Content-Length over 4x the limit is answered at once, and the connection closed.

        Receiving takes one of ``max_uploads`` slots, waited for until ``deadline`` (``body_timeout`` after
        the request arrived; 503 if none frees by then); the whole body must be in by the same deadline
        (408, the connection closed: a client that stalls holds its slot that long at most)."""
        limit = self.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise ApiError(400, "invalid_request", f"bad Content-Length {declared!r}") from None
            if n > limit:
                if n <= 4 * limit:
                    await self._drain(request, 4 * limit)
                request.state.body_done = True
                raise ApiError(413, "request_too_large", f"{self._too_large} (Content-Length {n:,})",
                               headers={"Connection": "close"})
        self.waiting_uploads += 1
        try:
            with anyio.move_on_at(deadline) as waiting:
                await self.upload_slots.acquire()
        finally:
            self.waiting_uploads -= 1
        if waiting.cancelled_caught:
            request.state.body_done = True
            raise ApiError(503, "busy", f"server busy: it is receiving {self.max_uploads} uploads at once; retry "
                           "shortly", headers={"Retry-After": "1", "Connection": "close"})
        try:
            with anyio.move_on_at(deadline):
                return await self._receive_body(request)
            request.state.body_done = True
            raise ApiError(408, "request_timeout", f"the request body did not arrive within {self.body_timeout:g} s "
                           "(this server's body timeout)", headers={"Connection": "close"})
        finally:
            self.upload_slots.release()

    @property
    def _too_large(self) -> str:
        return f"request body over this server's limit of {self.max_request_bytes:,} bytes"

    async def _receive_body(self, request: Request) -> bytes:
        """The body as it streams in, refused (413) once it passes the limit."""
        limit = self.max_request_bytes
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    await self._drain(request, 4 * limit - size)
                    request.state.body_done = True
                    raise ApiError(413, "request_too_large", self._too_large, headers={"Connection": "close"})
                chunks.append(chunk)
        except ClientDisconnect:
            request.state.body_done = True
            raise ApiError(400, "client_disconnected", "the client went away before sending the whole body") from None
        request.state.body_done = True
        return b"".join(chunks)

    @staticmethod
    async def _drain(request: Request, budget: int) -> None:
        read = 0
        with anyio.move_on_after(DRAIN_SECONDS):
            try:
                async for chunk in request.stream():
                    read += len(chunk)
                    if read > budget:
                        break
            except (ClientDisconnect, RuntimeError):  # gone, or the stream already ended
                pass

    def _parse_json(self, body: bytes, query_mode, query_attention) -> tuple[bytes, Optional[str], Optional[bool]]:
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(doc, dict):
            raise ApiError(400, "invalid_json", f"expected a JSON object with an `image` field, got {type(doc).__name__}")
        unknown = sorted(set(doc) - set(JSON_FIELDS))
        if unknown:
            raise ApiError(400, "unknown_field", f"unknown field(s) {', '.join(map(repr, unknown))}; "
                           f"valid fields: {', '.join(JSON_FIELDS)}")
        if "image" not in doc:
            raise ApiError(400, "missing_field", "missing field `image` (the image as base64 or a data: URL)")
        image = doc["image"]
        if not isinstance(image, str):
            raise ApiError(400, "invalid_field", f"`image` must be a base64 string or data: URL, got {type(image).__name__}")
        mode = doc.get("caption_mode", query_mode)
        if mode is not None and not isinstance(mode, str):
            raise ApiError(400, "unknown_mode", unknown_mode_message(str(mode)), valid=list(CAPTION_MODES))
        attention = doc.get("attention", query_attention)
        if attention is not None and not isinstance(attention, bool):
            raise ApiError(400, "invalid_field", "`attention` must be true or false")
        return decode_base64(image), mode, attention

    async def _parse_multipart(self, request: Request, body: bytes, query_mode,
                               query_attention) -> tuple[bytes, Optional[str], Optional[bool]]:
        from starlette.datastructures import UploadFile

        offset = 0

        async def replay() -> dict[str, Any]:  # the size-checked body, for a parser that reads a stream
            # The parser runs on the event loop: a chunk at a time, letting other requests in between.
            nonlocal offset
            await anyio.lowlevel.checkpoint()
            chunk = body[offset:offset + FORM_CHUNK_BYTES]
            offset += FORM_CHUNK_BYTES
            return {"type": "http.request", "body": chunk, "more_body": offset < len(body)}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
        except Exception as e:  # noqa: BLE001 - MultiPartException and the parser's own errors alike
            detail = getattr(e, "message", None) or str(e)
            raise ApiError(400, "invalid_multipart", f"cannot parse the multipart body: {detail[:200]}") from None
        try:
            unknown = sorted(set(form) - set(FILE_FIELDS) - {"caption_mode", "attention"})
            if unknown:
                raise ApiError(400, "unknown_field", f"unknown form field(s) {', '.join(map(repr, unknown))}; "
                               "valid fields: image (the file), caption_mode, attention")
            upload = next((form[k] for k in FILE_FIELDS if k in form), None)
            if upload is None:
                raise ApiError(400, "missing_field", "missing file field `image`")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "invalid_field", "`image` must be a file upload, not a text field")
            data = await upload.read()
            mode = form.get("caption_mode", query_mode)
            if mode is not None and not isinstance(mode, str):
                raise ApiError(400, "invalid_field", "`caption_mode` must be a text field")
            attention = query_attention
            if "attention" in form:
                attention = _form_bool(form["attention"])
            return data, (mode or None), attention
        finally:
            await form.close()


def _form_bool(value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("", "0", "false", "no", "off"):
        return False
    raise ApiError(400, "invalid_field", "`attention` must be true or false")


def decode_base64(text: str) -> bytes:
    """Base64 (standard or URL-safe, padding optional, whitespace ignored) or a base64 data: URL -> bytes."""
    s = text.strip()
    if s[:5].lower() == "data:":
        header, sep, payload = s.partition(",")
        if not sep or ";base64" not in header.lower():
            raise ApiError(400, "invalid_base64", "a data: URL must be base64-encoded (data:image/...;base64,...)")
        s = payload
    s = "".join(s.split())
    if not s:
        raise ApiError(400, "invalid_base64", "`image` is empty")
    altchars = b"-_" if ("-" in s or "_" in s) else None
    s += "=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "invalid_base64", f"`image` is not valid base64: {e}") from None


# --------------------------------------------------------------------------- errors and docs
_STATUS_CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(exc.status_code, code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(400, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", "internal server error; the server log has the details")


def _add_docs(app: FastAPI) -> None:
    """Swagger UI from the installed swagger-ui-py package's files (no CDN); /openapi.json always."""
    try:
        import swagger_ui
    except ImportError:
        log.info("swagger-ui-py not installed: /docs is off (/openapi.json describes the API)")
        return
    assets = Path(swagger_ui.__file__).parent / "static"
    if not (assets / "swagger-ui-bundle.js").is_file():
        return
    from fastapi.openapi.docs import get_swagger_ui_html

    app.mount("/docs-assets", StaticFiles(directory=str(assets)), name="docs-assets")
    html = get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} — docs",
                               swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                               swagger_css_url="/docs-assets/swagger-ui.css",
                               swagger_favicon_url="/docs-assets/favicon-32x32.png").body
    # The page's CSP, plus Swagger UI's one inline script (its start-up call), allowed by its hash.
    scripts = re.findall(rb"<script>(.*?)</script>", html, flags=re.DOTALL)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(js).digest()).decode()}'" for js in scripts)
    csp = PAGE_CSP.replace("script-src 'self'", f"script-src 'self' {hashes}")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(html, headers={"content-security-policy": csp})

