"""The HTTP face of `gptforge serve`: OpenAI-compatible routes on FastAPI, errors in OpenAI's shape.

    GET  /health               {"status": "ok", ...}
    GET  /v1/models            the one model served
    POST /v1/chat/completions  messages -> the chat template saved with the checkpoint -> the engine
    POST /v1/completions       prompt text -> the engine (base models too)
    GET  /                     the web chat page (web/index.html, self-contained)

Three modules, as vLLM's entrypoints: the bodies (serve/protocol.py), the answers (serve/serving.py), and
here only the wiring: routes, the error handlers, the middleware for the Host allow-list, the body limit and
the API key (connections: serve/connections.py).

Every error answers {"error": {"message", "type", "param", "code"}}. Bad input: 400 (malformed JSON or
fields, text that is not valid Unicode, prompt longer than the context, max_tokens above the cap, n != 1,
a stop string over 1000 characters, a Host header not allowed (code invalid_host)), 401 (the API key),
404/405 (no such route), 413 (body too large), 429 (queue full). 503 (code engine_error): the engine failed
on this request (out of memory, a checkpoint whose logits are not finite); a stream that has begun ends with
that error as its last event instead. Nothing a client sends answers 500: only a bug
(an exception no check foresaw) does, still in this shape, and the server stays up.
"""

from __future__ import annotations

import hmac
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptforge.serve.engine import BatchEngine
from gptforge.serve.protocol import (APIError, ChatRequest, CompletionRequest, Health, ModelCard, ModelList,
                                     error_response)
from gptforge.serve.serving import Serving


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes (by Content-Length, or counted as it arrives)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = error_response(413, f"the request body is larger than {self.limit} bytes (--max-body-bytes)")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        if length is not None or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        body, more = b"", True  # chunked: read it here (at most limit + 1 chunk), then hand it on
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                return await too_big(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class ApiKey:
    """ASGI middleware: 401 on /v1/ without 'Authorization: Bearer KEY' (plain ASGI like BodyLimit: it
    leaves `receive` alone, which the non-streaming path reads to notice a client that hung up)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and \
                not hmac.compare_digest(dict(scope["headers"]).get(b"authorization", b""), self.expected):
            return await error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer "
                                             "KEY' with the --api-key the server was started with",
                                        code="invalid_api_key")(scope, receive, send)
        return await self.app(scope, receive, send)


def host_name(header: str) -> str:
    """The name in a Host header, without the port and the brackets of an IPv6 address, in lower case."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.index("]")] if "]" in h else h
    return (h.rsplit(":", 1)[0] if h.count(":") == 1 else h).rstrip(".")


class HostCheck:
    """ASGI middleware: 400 unless the Host header names one of `hosts` (any port). Against DNS rebinding: a
    page on attacker.example, its name then pointed at 127.0.0.1, reaching a loopback server from the user's
    browser, which still sends 'Host: attacker.example'."""

    def __init__(self, app, hosts: list[str]):
        self.app, self.hosts = app, frozenset(hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(host) not in self.hosts:
                shown = host if len(host) <= 80 else host[:80] + "..."
                return await error_response(400, f"the Host header {shown!r} is not a name this server answers to "
                                                 f"({', '.join(sorted(self.hosts))}); add it with --allowed-hosts",
                                            code="invalid_host")(scope, receive, send)
        return await self.app(scope, receive, send)


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape; FastAPI's 422 for a malformed body becomes a 400 naming the field."""

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        err = (e.errors() or [{}])[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}".strip())
        field = ".".join(loc) or "body"
        if field == "body" and err.get("type") in ("model_attributes_type", "dict_type", "missing"):
            return error_response(400, "the body must be a JSON object (and the request should carry "
                                       "'Content-Type: application/json')")
        msg = err.get("msg", "invalid").removeprefix("Value error, ")  # pydantic's prefix for our validators
        return error_response(400, f"{field}: {msg}", param=field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _crash(_, e: Exception):  # a bug, not bad input: still an answer, and the server stays up
        return error_response(500, f"internal error: {type(e).__name__}: {e}")


def build_app(engine: BatchEngine, name: str, *, api_key: str | None = None, max_tokens_cap: int = 1024,
              default_max_tokens: int = 256, chat_ok: bool = True, max_body_bytes: int = 1 << 20,
              allowed_hosts: list[str] | None = None) -> FastAPI:
    """allowed_hosts: the names the Host header may give (None: any)."""
    app = FastAPI(title="gptforge serve", docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    serving = Serving(engine, name, max_tokens_cap, default_max_tokens, chat_ok)
    created = int(time.time())
    page = resources.files("gptforge.serve").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> Health:
        return Health(model=name, context=engine.block, active=len(engine.active), waiting=len(engine.waiting),
                      cancelled=engine.cancelled_total, max_batch=engine.max_batch, max_tokens_cap=max_tokens_cap,
                      default_max_tokens=default_max_tokens)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=created, context_length=engine.block)])

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, req: ChatRequest):
        return await serving.answer(request, req, *serving.chat_prompt(req), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest):
        return await serving.answer(request, req, *serving.completion_prompt(req), chat=False)

    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    app.add_middleware(BodyLimit, limit=max_body_bytes)  # before the body is parsed
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, hosts=allowed_hosts)  # outermost: a foreign Host gets nothing else
    return app
