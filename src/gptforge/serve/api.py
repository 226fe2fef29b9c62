"""The HTTP face of `gptforge serve`: OpenAI-compatible routes on FastAPI, errors in OpenAI's shape.

    GET  /health               {"status": "ok", ...}
    GET  /v1/models            the one model served
    POST /v1/chat/completions  messages -> the chat template saved with the checkpoint -> the engine
    POST /v1/completions       prompt text -> the engine (base models too)
    GET  /                     the web chat page (web/index.html, self-contained)

Every bad input answers {"error": {"message", "type", "param", "code"}} with 400 (malformed JSON or
fields, prompt longer than the context, max_tokens above the cap, n != 1), 401 (--api-key), 413 (body
too large) or 429 (queue full); never a 500.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from importlib import resources
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptforge.data.chat_template import encode_chat, stop_ids
from gptforge.errors import UserError
from gptforge.serve.engine import Engine, Params, QueueFull, Sequence

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields we do not use (presence_penalty, user, ...)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's, but common (vLLM, litgpt)
    stop: str | list[str] | None = None
    ignore_eos: bool = False  # not OpenAI's (vLLM's): generate max_tokens whatever the model samples
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Common):
    prompt: str | list[str]


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
                dict(scope["headers"]).get(b"authorization", b"") != self.expected:
            return await error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer "
                                             "KEY' with the --api-key the server was started with",
                                        code="invalid_api_key")(scope, receive, send)
        return await self.app(scope, receive, send)


def build_app(engine: Engine, name: str, *, api_key: str | None = None, max_tokens_cap: int = 1024,
              default_max_tokens: int = 256, chat_ok: bool = True, max_body_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="gptforge serve", docs_url=None, redoc_url=None, openapi_url=None)
    tok, block = engine.tok, engine.block
    created = int(time.time())
    page = resources.files("gptforge.serve").joinpath("web/index.html").read_text(encoding="utf-8")

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
        return error_response(400, f"{field}: {err.get('msg', 'invalid')}", param=field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _crash(_, e: Exception):  # a bug, not bad input: still an answer, and the server stays up
        return error_response(500, f"internal error: {type(e).__name__}: {e}")


    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "context": block, "active": len(engine.active),
                "waiting": len(engine.waiting), "cancelled": engine.cancelled_total, "max_batch": engine.max_batch, "max_tokens_cap": max_tokens_cap,
                "default_max_tokens": default_max_tokens}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "gptforge", "context_length": block}]}

    def params_of(req: Common, n_prompt: int, max_tokens: int | None, stops: set[int], what: str) -> Params:
        if req.n != 1:
            raise APIError(400, f"n must be 1 (one choice per request), got {req.n}", "n")
        if n_prompt >= block:
            raise APIError(400, f"the prompt is {n_prompt} tokens but the model's context is {block} tokens; "
                                f"shorten the prompt", what, "context_length_exceeded")
        if max_tokens is not None and max_tokens > max_tokens_cap:
            raise APIError(400, f"max_tokens is {max_tokens} but this server allows at most {max_tokens_cap} "
                                f"(--max-tokens-cap)", "max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise APIError(400, f"stop takes at most 4 strings, got {len(stop)}", "stop")
        return Params(max_tokens or default_max_tokens, req.temperature, req.top_k or None,
                      None if req.top_p >= 1 else req.top_p, req.seed,
                      frozenset() if req.ignore_eos else frozenset(stops), tuple(stop))

    async def answer(request: Request, req: Common, prompt: list[int], params: Params, chat: bool):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        seq = Sequence(prompt, params, lambda kind, v: loop.call_soon_threadsafe(q.put_nowait, (kind, v)))
        try:
            engine.submit(seq)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full") from None
        except UserError as e:
            raise APIError(400, str(e)) from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        obj = "chat.completion" if chat else "text_completion"
        now = int(time.time())

        def usage():
            return {"prompt_tokens": len(prompt), "completion_tokens": seq.n_new,
                    "total_tokens": len(prompt) + seq.n_new}

        def reason(r: str) -> str:
            if r.startswith("error"):
                raise RuntimeError(r)
            return r

        if req.stream:
            async def events():
                def chunk(delta_or_text, finish=None, **extra):
                    choice = ({"index": 0, "delta": delta_or_text, "logprobs": None, "finish_reason": finish}
                              if chat else {"index": 0, "text": delta_or_text, "logprobs": None,
                                            "finish_reason": finish})
                    body = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": now, "model": name,
                            "choices": [choice], **extra}
                    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

                try:
                    if chat:
                        yield chunk({"role": "assistant", "content": ""})
                    while True:
                        kind, v = await q.get()
                        if kind == "text":
                            yield chunk({"content": v} if chat else v)
                            continue
                        if str(v).startswith("error"):
                            err = {"error": {"message": str(v), "type": "server_error", "param": None, "code": None}}
                            yield f"data: {json.dumps(err)}\n\n"
                        else:
                            yield chunk({} if chat else "", v)
                            if (req.stream_options or {}).get("include_usage"):
                                body = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": now,
                                        "model": name, "choices": [], "usage": usage()}
                                yield f"data: {json.dumps(body)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                finally:  # the client went away (or we are done): free the slot
                    seq.cancel()

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces: list[str] = []

        async def client_gone():  # the ASGI server sends http.disconnect when the client hangs up
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(client_gone())
        try:
            while True:
                getter = asyncio.ensure_future(q.get())
                await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    seq.cancel()
                    return error_response(400, "client disconnected")
                kind, v = getter.result()
                if kind == "text":
                    pieces.append(v)
                    continue
                finish = reason(str(v))
                break
        finally:
            watcher.cancel()
            seq.cancel()
        text = "".join(pieces)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": finish} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        return {"id": rid, "object": obj, "created": now, "model": name, "choices": [choice], "usage": usage()}

    chat_stops = stop_ids(tok) if chat_ok else set()
    eos = {tok.eos_id} if getattr(tok, "eos_id", None) is not None else set()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, req: ChatRequest):
        if not chat_ok:
            raise APIError(400, "this checkpoint was never fine-tuned for chat (no chat template); use "
                                "/v1/completions, or start the server with --allow-base", "messages")
        try:
            ids, _ = encode_chat(tok, [m.model_dump() for m in req.messages], add_generation_prompt=True)
        except UserError as e:
            raise APIError(400, str(e), "messages") from None
        params = params_of(req, len(ids), req.max_completion_tokens or req.max_tokens, chat_stops,
                           "messages")
        return await answer(request, req, ids, params, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest):
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, f"prompt must be one string (a list of {len(prompt)} was given)", "prompt")
            prompt = prompt[0]
        ids = tok.encode(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty; give at least one token of text", "prompt")
        params = params_of(req, len(ids), req.max_tokens, eos, "prompt")
        return await answer(request, req, ids, params, chat=False)

    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    app.add_middleware(BodyLimit, limit=max_body_bytes)  # outermost: before the body is parsed
    return app
