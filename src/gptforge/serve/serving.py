"""The answers of `gptforge serve`: a validated request (serve/protocol.py) becomes a prompt and the engine's
Params, goes to the scheduler (serve/engine.py), and its text comes back as one OpenAI body or as a stream
of server-sent events. The routes that call these are in serve/api.py.

Tokens reach the asyncio side with `loop.call_soon_threadsafe`. A stream's generator cancels its sequence
in `finally` (the client went away: the slot is freed before the next step); a full answer waits on the token
queue and on `request.receive()` at once, so a client that hangs up is noticed (http.disconnect) as well.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from gptforge.data.chat_template import encode_chat, stop_ids
from gptforge.errors import UserError
from gptforge.model.engine import Params, Sequence
from gptforge.serve.engine import BatchEngine, QueueFull
from gptforge.serve.protocol import (APIError, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                                     ChatMessage, ChatRequest, Completion, CompletionChoice, CompletionChunk,
                                     CompletionRequest, Delta, ErrorResponse, SamplingRequest, Usage, UsageChunk,
                                     error_response)


MAX_STOPS, MAX_STOP_CHARS = 4, 1000  # per request (OpenAI's count); the length bounds the text held back


def sse(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


@dataclass
class Job:
    """One request on its way through the engine: its sequence, the queue its pieces arrive on, and how its
    answer is written (chat or completion, the id/created/model every body and chunk of it carries)."""

    seq: Sequence
    queue: asyncio.Queue
    chat: bool
    head: dict  # id, created, model: the same in every chunk of the answer

    def usage(self) -> Usage:
        n, new = len(self.seq.prompt), self.seq.n_new
        return Usage(prompt_tokens=n, completion_tokens=new, total_tokens=n + new)

    def chunk(self, text: str | None, finish: str | None = None) -> str:
        """A stream chunk with `text` (None: the chat stream's first chunk, which names the role)."""
        if self.chat:
            delta = Delta(role="assistant", content="") if text is None else Delta(content=text or None)
            return sse(ChatCompletionChunk(**self.head, choices=[ChatChunkChoice(delta=delta, finish_reason=finish)]))
        return sse(CompletionChunk(**self.head, choices=[CompletionChoice(text=text, finish_reason=finish)]))

    def body(self, text: str, finish: str) -> ChatCompletion | Completion:
        if self.chat:
            choice = ChatChoice(message=ChatMessage(content=text), finish_reason=finish)
            return ChatCompletion(**self.head, choices=[choice], usage=self.usage())
        return Completion(**self.head, choices=[CompletionChoice(text=text, finish_reason=finish)], usage=self.usage())


def engine_failed(reason: str) -> APIError:
    """A request the engine could not finish ("error: ..."; out of memory, non-finite logits): 503."""
    return APIError(503, f"the engine failed on this request ({reason.removeprefix('error: ')}); the server is "
                         "still up", code="engine_error")


class Serving:
    """Requests -> (prompt ids, Params) -> the engine -> answers, for one model."""

    def __init__(self, engine: BatchEngine, name: str, max_tokens_cap: int, default_max_tokens: int,
                 chat_ok: bool):
        self.engine, self.name, self.block = engine, name, engine.block
        self.max_tokens_cap, self.default_max_tokens, self.chat_ok = max_tokens_cap, default_max_tokens, chat_ok
        tok = engine.tok
        self.chat_stops = stop_ids(tok) if chat_ok else set()
        self.eos = set(tok.end_ids)  # the folder's eos ids; a chat checkpoint's <|im_end|> too

    # ---- requests -----------------------------------------------------------------------------------------
    def chat_prompt(self, req: ChatRequest) -> tuple[list[int], Params]:
        if not self.chat_ok:
            raise APIError(400, "this checkpoint was never fine-tuned for chat (no chat template); use "
                                "/v1/completions, or start the server with --allow-base", "messages")
        try:
            ids, _ = encode_chat(self.engine.tok, [m.model_dump() for m in req.messages], add_generation_prompt=True)
        except UserError as e:
            raise APIError(400, str(e), "messages") from None
        return ids, self.params(req, len(ids), req.max_completion_tokens or req.max_tokens, self.chat_stops,
                                "messages")

    def completion_prompt(self, req: CompletionRequest) -> tuple[list[int], Params]:
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, f"prompt must be one string (a list of {len(prompt)} was given)", "prompt")
            prompt = prompt[0]
        ids = self.engine.tok.encode_prompt(prompt)
        if not prompt or not ids:
            raise APIError(400, "the prompt is empty; give at least one token of text", "prompt")
        return ids, self.params(req, len(ids), req.max_tokens, self.eos, "prompt")

    def params(self, req: SamplingRequest, n_prompt: int, max_tokens: int | None, stops: set[int],
               what: str) -> Params:
        if req.n != 1:
            raise APIError(400, f"n must be 1 (one choice per request), got {req.n}", "n")
        if n_prompt >= self.block:
            raise APIError(400, f"the prompt is {n_prompt} tokens but the model's context is {self.block} tokens; "
                                f"shorten the prompt", what, "context_length_exceeded")
        if max_tokens is not None and max_tokens > self.max_tokens_cap:
            raise APIError(400, f"max_tokens is {max_tokens} but this server allows at most {self.max_tokens_cap} "
                                f"(--max-tokens-cap)", "max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOPS:
            raise APIError(400, f"stop takes at most {MAX_STOPS} strings, got {len(stop)}", "stop")
        if max(map(len, stop), default=0) > MAX_STOP_CHARS:
            raise APIError(400, f"a stop string may be at most {MAX_STOP_CHARS} characters, got one of "
                                f"{max(map(len, stop))}", "stop")
        return Params(max_tokens or self.default_max_tokens, req.temperature, req.top_k or None,
                      None if req.top_p >= 1 else req.top_p, req.seed,
                      frozenset() if req.ignore_eos else frozenset(stops), tuple(stop))

    # ---- answers ------------------------------------------------------------------------------------------
    async def answer(self, request: Request, req: SamplingRequest, prompt: list[int], params: Params, chat: bool):
        job = self.submit(prompt, params, chat)
        if not req.stream:
            return await self.full(request, job)
        usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(self.events(job, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def submit(self, prompt: list[int], params: Params, chat: bool) -> Job:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        seq = Sequence(prompt, params, lambda kind, v: loop.call_soon_threadsafe(queue.put_nowait, (kind, v)))
        try:
            self.engine.submit(seq)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full") from None
        except UserError as e:
            raise APIError(400, str(e)) from None
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": self.name}
        return Job(seq, queue, chat, head)

    async def events(self, job: Job, include_usage: bool):
        """The stream: pieces of text, the finishing chunk (or an error event), the usage if asked, [DONE]."""
        try:
            if job.chat:
                yield job.chunk(None)
            while True:
                kind, v = await job.queue.get()
                if kind == "text":
                    yield job.chunk(v)
                    continue
                if str(v).startswith("error"):
                    e = engine_failed(str(v))
                    yield sse(ErrorResponse.of(e.status, e.message, e.param, e.code))
                else:
                    yield job.chunk("", v)
                    if include_usage:
                        yield sse(UsageChunk(**job.head, object="chat.completion.chunk" if job.chat
                                             else "text_completion", usage=job.usage()))
                yield "data: [DONE]\n\n"
                return
        finally:  # the client went away (or we are done): free the slot
            job.seq.cancel()

    async def full(self, request: Request, job: Job) -> ChatCompletion | Completion | JSONResponse:
        """The whole answer at once; a client that hangs up meanwhile cancels its sequence."""
        pieces: list[str] = []

        async def client_gone():  # the ASGI server sends http.disconnect when the client hangs up
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(client_gone())
        try:
            while True:
                getter = asyncio.ensure_future(job.queue.get())
                await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return error_response(400, "client disconnected")
                kind, v = getter.result()
                if kind != "text":
                    break
                pieces.append(v)
        finally:
            watcher.cancel()
            job.seq.cancel()
        if str(v).startswith("error"):
            raise engine_failed(str(v))
        return job.body("".join(pieces), str(v))
