"""`gptforge serve --checkpoint C`: an OpenAI-compatible API and a web chat page for a checkpoint.

    gptforge serve --checkpoint runs/sft                       # http://127.0.0.1:8000, page at /
    GPTFORGE_API_KEY=sk-local gptforge serve --checkpoint hf_out/ --host 0.0.0.0 --port 9000 --max-batch 16

C is a run folder, a checkpoint folder or an exported Hugging Face folder. Requests are batched on the
device by the scheduler (serve/engine.py: continuous batching over the one decode engine, model/engine.py,
one KV cache row per sequence); the routes and the error table are in serve/api.py, the request and
response bodies in serve/protocol.py, the answers in serve/serving.py, the connections' deadline and cap in
serve/connections.py. Ctrl-C stops cleanly.

Exposure: a non-loopback --host needs an API key (GPTFORGE_API_KEY, --api-key-file, or --api-key, which other
local users can read in the process list) or an explicit --allow-no-key; a loopback bind answers only Host
headers naming the machine itself (localhost, 127.0.0.1, [::1]) and --allowed-hosts, against DNS rebinding.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

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
    """address to listen on (0.0.0.0: every interface; any address but loopback needs an API key or
    --allow-no-key)"""
    port: int = 8000
    """port to listen on"""
    api_key: str | None = None
    """require 'Authorization: Bearer KEY' on /v1/* (visible to local users in the process list: prefer the
    environment variable GPTFORGE_API_KEY, used when no key option is given, or --api-key-file)"""
    api_key_file: str | None = None
    """read the API key from this file (one line)"""
    allow_no_key: Annotated[bool, tyro.conf.arg(aliases=("--insecure",))] = False
    """serve a non-loopback --host without an API key (anyone who can reach the port can use the model);
    --insecure is the same flag"""
    allowed_hosts: str = ""
    """comma-separated names the Host header may give besides localhost, 127.0.0.1 and [::1] (checked on a
    loopback --host, against DNS rebinding; on another --host only when given; * turns the check off)"""
    timeout_keep_alive: int = 5
    """seconds an idle kept-alive connection stays open"""
    read_timeout: float = 10.0
    """seconds a client has to send a whole request (from connecting, or from the first byte of its next
    request); slower connections are closed"""
    max_connections: int = 256
    """most open connections; more are answered 503 and closed"""
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
                        ("--default-max-tokens", o.default_max_tokens, 1), ("--max-body-bytes", o.max_body_bytes, 1),
                        ("--timeout-keep-alive", o.timeout_keep_alive, 0), ("--max-connections", o.max_connections, 1)):
        if v < low:
            raise UserError(f"{key} must be at least {low}, got {v}")
    if not o.read_timeout > 0:
        raise UserError(f"--read-timeout must be a positive number of seconds, got {o.read_timeout}")
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


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def api_key(o: ServeOptions) -> str | None:
    """The key from --api-key, --api-key-file or GPTFORGE_API_KEY (in that order); refuses a non-loopback
    --host without one unless --allow-no-key."""
    if o.api_key and o.api_key_file:
        raise UserError("give the API key once: --api-key or --api-key-file, not both")
    key, where = o.api_key, "--api-key"
    if o.api_key_file:
        try:
            with open(o.api_key_file, encoding="utf-8") as f:
                key, where = f.read(4097).strip(), f"--api-key-file '{o.api_key_file}'"
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--api-key-file '{o.api_key_file}' cannot be read ({getattr(e, 'strerror', e)}); "
                            "give a file holding the key on one line") from None
        if not key:
            raise UserError(f"--api-key-file '{o.api_key_file}' is empty; write the key into it")
    elif not key and os.environ.get("GPTFORGE_API_KEY"):
        key, where = os.environ["GPTFORGE_API_KEY"].strip(), "GPTFORGE_API_KEY"
    if key and not (key.isascii() and key.isprintable() and " " not in key and len(key) <= 4096):
        raise UserError(f"the API key from {where} must be one word of printable ASCII (it goes in an HTTP header)")
    if not key and not is_loopback(o.host) and not o.allow_no_key:
        raise UserError(f"--host {o.host} can be reached from other machines but no API key is set; set "
                        "GPTFORGE_API_KEY or give --api-key-file FILE (or pass --allow-no-key to serve it open)")
    return key or None


def allowed_hosts(o: ServeOptions) -> list[str] | None:
    """The names a Host header may give (None: any): on a loopback bind the machine's own names, plus
    --allowed-hosts; elsewhere only --allowed-hosts, when given."""
    extra = [h.strip().strip("[]").lower() for h in o.allowed_hosts.split(",") if h.strip()]
    if "*" in extra:
        return None
    if is_loopback(o.host):
        return sorted({"localhost", "127.0.0.1", "::1", o.host.strip("[]").lower(), *extra})
    return extra or None


def main(opts: ServeOptions) -> int:
    check_options(opts)
    key, hosts = api_key(opts), allowed_hosts(opts)
    if key is None and not is_loopback(opts.host):
        print(f"gptforge serve: warning: listening on {opts.host} without an API key (--allow-no-key): anyone who "
              "can reach this port can use the model", file=sys.stderr, flush=True)
    import uvicorn

    from gptforge.serve.api import build_app
    from gptforge.serve.connections import guarded_protocol
    from gptforge.serve.engine import BatchEngine

    model, tok, chat = load_for_inference(opts.checkpoint, opts.device)
    cap = opts.max_tokens_cap or model.cfg.block_size
    name = opts.model_name or Path(opts.checkpoint).resolve().name
    engine = BatchEngine(model, tok, opts.max_batch, opts.max_queue).start()
    app = build_app(engine, name, api_key=key, max_tokens_cap=cap,
                    default_max_tokens=min(opts.default_max_tokens, cap), chat_ok=chat or opts.allow_base,
                    max_body_bytes=opts.max_body_bytes, allowed_hosts=hosts)
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=opts.log_level, access_log=False,
                            http=guarded_protocol(opts.read_timeout, opts.max_connections),
                            timeout_keep_alive=opts.timeout_keep_alive)
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
