"""`gptforge serve --checkpoint C`: an OpenAI-compatible API and a web chat page for a checkpoint.

    gptforge serve --checkpoint runs/sft                       # http://127.0.0.1:8000, page at /
    gptforge serve --checkpoint hf_out/ --port 9000 --api-key sk-local --max-batch 16

C is a run folder, a checkpoint folder or an exported Hugging Face folder. Requests are batched on the
device by the scheduler (serve/engine.py: continuous batching over the one decode engine, model/engine.py,
one KV cache row per sequence); the routes and the error table are in serve/api.py, the request and
response bodies in serve/protocol.py, the answers in serve/serving.py. Ctrl-C stops cleanly.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from gptforge.errors import UserError
from gptforge.hardware import check_device_name
from gptforge.hf.inference import load_for_inference


@dataclass
class ServeOptions:
    """Serve a checkpoint: OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) and a web
    chat page at /."""

    checkpoint: str
    """run dir, checkpoint dir, or an exported Hugging Face folder"""
    host: str = "127.0.0.1"
    """address to listen on (0.0.0.0: every interface; then set --api-key)"""
    port: int = 8000
    """port to listen on"""
    api_key: str | None = None
    """require 'Authorization: Bearer KEY' on /v1/*"""
    max_batch: int = 8
    """most sequences decoded together on the device (1 = one at a time)"""
    max_queue: int = 64
    """most requests waiting for a slot; more are answered 429"""
    max_tokens_cap: int | None = None
    """largest max_tokens a request may ask (default: the model's context)"""
    default_max_tokens: int = 256
    """max_tokens of a request that gives none"""
    max_body_bytes: int = 1 << 20
    """largest request body; larger ones are answered 413"""
    model_name: str | None = None
    """the id in /v1/models (default: the checkpoint folder's name)"""
    device: str = "auto"
    """auto (a GPU when there is one) | cpu | cuda | cuda:N"""
    allow_base: bool = False
    """allow /v1/chat/completions on a checkpoint never fine-tuned for chat"""
    log_level: str = "warning"
    """uvicorn's log level (info: one line per request)"""


def check_options(o: ServeOptions) -> None:
    for key, v, low in (("--port", o.port, 0), ("--max-batch", o.max_batch, 1), ("--max-queue", o.max_queue, 0),
                        ("--default-max-tokens", o.default_max_tokens, 1), ("--max-body-bytes", o.max_body_bytes, 1)):
        if v < low:
            raise UserError(f"{key} must be at least {low}, got {v}")
    if o.port > 65535:
        raise UserError(f"--port must be at most 65535, got {o.port}")
    if o.max_tokens_cap is not None and o.max_tokens_cap < 1:
        raise UserError(f"--max-tokens-cap must be at least 1, got {o.max_tokens_cap}")
    if o.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise UserError(f"--log-level must be one of critical, error, warning, info, debug, got {o.log_level!r}")
    check_device_name(o.device, "--device")
    if not Path(o.checkpoint).exists():
        raise UserError(f"--checkpoint '{o.checkpoint}' does not exist; give a run dir, a checkpoint dir or an "
                        "exported Hugging Face folder")


def main(opts: ServeOptions) -> int:
    check_options(opts)
    import uvicorn

    from gptforge.serve.api import build_app
    from gptforge.serve.engine import BatchEngine

    model, tok, chat = load_for_inference(opts.checkpoint, opts.device)
    cap = opts.max_tokens_cap or model.cfg.block_size
    name = opts.model_name or Path(opts.checkpoint).resolve().name
    engine = BatchEngine(model, tok, opts.max_batch, opts.max_queue).start()
    app = build_app(engine, name, api_key=opts.api_key, max_tokens_cap=cap,
                    default_max_tokens=min(opts.default_max_tokens, cap), chat_ok=chat or opts.allow_base,
                    max_body_bytes=opts.max_body_bytes)
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=opts.log_level, access_log=False)
    server = uvicorn.Server(config)
    url = f"http://{opts.host if ':' not in opts.host else f'[{opts.host}]'}:{opts.port}"
    print(f"gptforge serve: {url} (model '{name}', {model.num_params() / 1e6:.1f}M parameters, context "
          f"{model.cfg.block_size}, device {next(model.parameters()).device}, batch up to {opts.max_batch}"
          f"{'' if chat or opts.allow_base else ', completions only: no chat template'}); web chat at {url}/ ; "
          f"Ctrl-C to stop", flush=True)
    try:
        server.run()  # uvicorn handles Ctrl-C / SIGTERM: stops accepting, finishes, returns
    except SystemExit:  # uvicorn exits 1 when it cannot bind
        pass
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the Ctrl-C it caught
        pass
    finally:
        engine.stop()
    if not server.started:
        raise UserError(f"could not listen on {opts.host}:{opts.port} (in use?); pick another with --port")
    print("gptforge serve: stopped", file=sys.stderr, flush=True)
    return 0
