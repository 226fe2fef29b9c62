"""`gptforge serve`: the official `openai` client against a real server (a subprocess on loopback), the same
text as `gptforge generate` / `gptforge chat`, the error table, batching under concurrent load."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from gptforge.hf.inference import load_for_inference
from gptforge.model.engine import Engine, Params, Sequence, StopMatcher
from gptforge.serve.engine import BatchEngine
from support.serve_fixtures import API_KEY, get_json, running_server
from support.decode_reference import recompute_decode
from support.stage_fixtures import HELD_OUT, sft_reverse_run  # noqa: F401

CHAT_PROMPT = "<|im_start|>user\nfade<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def server(sft_reverse_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    (log.parent / "key").write_text(API_KEY + "\n")  # the key from a file: not on the command line
    with running_server(sft_reverse_run, log, "--api-key-file", str(log.parent / "key"), "--max-batch", "4",
                        "--max-body-bytes", "4096", "--max-tokens-cap", "40") as (url, proc):
        yield url, proc, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def cli_out(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_openai_client_same_text_as_generate_and_chat(server, client, sft_reverse_run):
    ck = str(sft_reverse_run)
    assert [m.id for m in client.models.list().data] == [sft_reverse_run.name]
    # completions, greedy: the text `gptforge generate` prints after the prompt
    want = cli_out("generate", "--checkpoint", ck, "--prompt", CHAT_PROMPT, "--temperature", "0",
                   "--max-new-tokens", "12")
    r = client.completions.create(model="m", prompt=CHAT_PROMPT, max_tokens=12, temperature=0)
    assert want == CHAT_PROMPT + r.choices[0].text + "\n"
    assert r.choices[0].text == "edaf"  # the model learned the task: 'fade' reversed, then its turn ends
    # a chat model's text ends at <|im_end|> (as its export's generation_config says); the stop is counted
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 5
    stream = client.completions.create(model="m", prompt=CHAT_PROMPT, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text and len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason == "stop"
    # chat, greedy: the replies of `gptforge chat --message` (a fresh conversation per word)
    for w in HELD_OUT[:2]:
        want = cli_out("chat", "--checkpoint", ck, "--message", w, "--temperature", "0").strip()
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": w}], temperature=0)
        assert r.choices[0].message.content == want == w[::-1]
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == len(w) + 1  # + <|im_end|>
        s = client.chat.completions.create(model="m", messages=[{"role": "user", "content": w}], temperature=0,
                                           stream=True, stream_options={"include_usage": True})
        chunks = list(s)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage.total_tokens == r.usage.total_tokens
    # sampling with a seed: the same text as chat with that seed (one engine: same sampler, same stream)
    want = cli_out("chat", "--checkpoint", ck, "--message", "abcd", "--temperature", "1.5", "--top-k", "0",
                   "--seed", "7", "--max-new-tokens", "20").strip()
    got = [client.chat.completions.create(model="m", messages=[{"role": "user", "content": "abcd"}],
                                          temperature=1.5, seed=7, max_tokens=20).choices[0].message.content
           for _ in range(2)]
    assert got == [want, want]
    # multi-turn with a system message, and a stop string
    sysmsg = [{"role": "system", "content": "ab"}, {"role": "user", "content": "bead"}]
    assert client.chat.completions.create(model="m", messages=sysmsg, temperature=0).choices[0].message.content == \
        cli_out("chat", "--checkpoint", ck, "--message", "bead", "--system", "ab", "--temperature", "0").strip()
    msgs = [{"role": "user", "content": "cafe"}, {"role": "assistant", "content": "efac"},
            {"role": "user", "content": "bead"}]
    assert client.chat.completions.create(model="m", messages=msgs, temperature=0).choices[0].message.content == "daeb"
    r = client.chat.completions.create(model="m", messages=msgs, temperature=0, stop=["e"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("da", "stop")
    s = client.completions.create(model="m", prompt=CHAT_PROMPT, temperature=0, stop="af", stream=True)
    assert "".join(c.choices[0].text for c in s) == "ed"


def test_engine_matches_the_reference_sampler_and_batching_does_not_change_text(sft_reverse_run):
    """The engine's slot cache (masked rows) against a plain loop recomputing the whole sequence each step."""
    model, tok, _ = load_for_inference(str(sft_reverse_run), "cpu")
    eng = Engine(model, tok)
    for prompt, seed, temp in ((CHAT_PROMPT, None, 0.0), ("ROMEO:", 3, 1.0), ("a", 11, 0.8)):
        ids = tok.encode(prompt)
        ref = tok.decode(recompute_decode(model, ids, 30, temp, None, None, seed))
        text, reason, n = eng.run(ids, Params(30, temp, None, None, seed))[:3]
        assert (text, reason, n) == (ref, "length", 30)
    m = StopMatcher(("<|im_end|>",))
    assert [m.push(p) for p in ("ab<|im", "_e", "nd|>x")] == ["ab", "", ""] and m.hit
    # batched: 6 sequences of different prompt lengths in 3 slots give their single-sequence text
    prompts = [tok.encode(f"<|im_start|>user\n{w}<|im_end|>\n<|im_start|>assistant\n") for w in HELD_OUT]
    prompts[1] = tok.encode("a much longer prompt than the others")
    single = [eng.run(p, Params(25, 0.0))[0] for p in prompts]
    batched = BatchEngine(model, tok, max_batch=3).start()
    outs = [[] for _ in prompts]
    done = threading.Semaphore(0)
    try:
        for i, p in enumerate(prompts):
            batched.submit(Sequence(p, Params(25, 0.0), lambda k, v, i=i: outs[i].append(v) if k == "text"
                                    else done.release()))
        for _ in prompts:
            assert done.acquire(timeout=60)
    finally:
        batched.stop()
    assert ["".join(o) for o in outs] == single
    assert batched.batched_rows / batched.steps > 1.5  # sequences really ran together


def _post(url: str, path: str, body, headers=None, **kw) -> httpx.Response:
    h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=data, headers=h, timeout=30, **kw)


def _err(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and "\n" not in e["message"]
    for w in words:
        assert w in e["message"], e["message"]
    return e


def test_error_table(server, client):
    url, proc, _ = server
    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "abcd"}]
    _err(_post(url, chat, b"{not json"), 400, "not valid JSON")
    _err(_post(url, chat, b"[1, 2]"), 400, "JSON object")
    _err(_post(url, chat, {"messages": []}), 400, "messages")
    _err(_post(url, chat, {"messages": [{"role": "robot", "content": "x"}]}), 400, "messages.0.role")
    _err(_post(url, chat, {"messages": msgs, "temperature": "hot"}), 400, "temperature")
    _err(_post(url, chat, {"messages": msgs, "top_p": 0}), 400, "top_p")
    _err(_post(url, chat, {"messages": msgs, "n": 2}), 400, "n must be 1")
    _err(_post(url, chat, {"messages": msgs, "stop": ["a", "b", "c", "d", "e"]}), 400, "at most 4")
    # a stop string's length is bounded (the text held back for it is): 1,000 characters
    assert _err(_post(url, chat, {"messages": msgs, "stop": ["e", "x" * 1001]}), 400,
                "at most 1000 characters", "1001")["param"] == "stop"
    r = _post(url, chat, {"messages": msgs, "stop": ["x" * 999 + "d", "y" * 1000], "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "dcba", r.text
    e = _err(_post(url, "/v1/completions", {"prompt": "abcdef" * 20}), 400, "120 tokens", "context is 64")
    assert (e["param"], e["code"]) == ("prompt", "context_length_exceeded")
    _err(_post(url, chat, {"messages": [{"role": "user", "content": "ab" * 40}]}), 400, "context is 64")
    _err(_post(url, chat, {"messages": msgs, "max_tokens": 41}), 400, "max_tokens is 41", "at most 40")
    _err(_post(url, chat, {"messages": msgs, "max_tokens": 0}), 400, "max_tokens")
    _err(_post(url, "/v1/completions", {"prompt": ""}), 400, "empty")
    big = json.dumps({"messages": [{"role": "user", "content": "a" * 5000}]})
    _err(_post(url, chat, big), 413, "4096 bytes")
    chunked = (big[i:i + 1000].encode() for i in range(0, len(big), 1000))  # no Content-Length
    _err(httpx.post(url + chat, content=chunked, headers={"Authorization": f"Bearer {API_KEY}"}), 413)
    _err(_post(url, chat, {"messages": msgs}, headers={"Authorization": ""}), 401, "Bearer")
    _err(_post(url, chat, {"messages": msgs}, headers={"Authorization": "Bearer wrong"}), 401)
    _err(httpx.get(url + "/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"}), 404)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="bad", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="m", prompt="x" * 64)
    # never a crash: the server answers, the same process, after all of the above
    assert proc.poll() is None and get_json(url + "/health")["status"] == "ok"
    assert client.chat.completions.create(model="m", messages=msgs, temperature=0).choices[0].message.content == "dcba"


def test_inputs_that_answered_500_are_400_or_served(server, client):
    """What reached the catch-all handler (500) or failed in the engine: a lone surrogate (the tokenizer's
    TypeError), a seed torch cannot take (ValueError), a temperature so small that logits / T overflow
    (NaN probabilities). Now bad input is a 400 naming the field, and a tiny temperature samples greedily."""
    url, proc, _ = server
    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "abcd"}]
    e = _err(_post(url, "/v1/completions", '{"prompt": "ab\\ud800cd", "max_tokens": 3}'), 400, "lone surrogate")
    assert e["param"] == "prompt"
    e = _err(_post(url, chat, '{"messages": [{"role": "user", "content": "\\udfff"}]}'), 400, "lone surrogate")
    assert e["param"] == "messages.0.content"
    _err(_post(url, chat, '{"messages": [{"role": "user", "content": "ab"}], "stop": ["\\ud800"]}'), 400,
         "lone surrogate")
    for seed in (1 << 64, -(1 << 63) - 1):
        assert _err(_post(url, chat, {"messages": msgs, "seed": seed}), 400)["param"] == "seed"
    for seed in ((1 << 64) - 1, -(1 << 63)):  # the ends of the range torch takes: served
        assert _post(url, chat, {"messages": msgs, "seed": seed, "max_tokens": 3}).status_code == 200
    for stream in (False, True):
        tiny = client.chat.completions.create(model="m", messages=msgs, temperature=1e-40, stream=stream)
        text = tiny.choices[0].message.content if not stream else \
            "".join(c.choices[0].delta.content or "" for c in tiny)
        assert text == "dcba"  # the greedy reply
    assert proc.poll() is None and get_json(url + "/health")["status"] == "ok"


def _raw(url: str, method: str, path: str, body: bytes = b"", key: str | None = None) -> tuple[int, bytes]:
    """One request with the path sent byte for byte (httpx would normalise dot segments): (status, body)."""
    host, port = url.removeprefix("http://").split(":")
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    head += "Content-Type: application/json\r\n" + (f"Authorization: Bearer {key}\r\n" if key else "")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    status, _, rest = answer.partition(b"\r\n\r\n")
    return int(status.split()[1]), rest


def test_key_bypass_paths_are_refused_and_deep_json_is_400(server):
    """Spellings of /v1/... that a proxy or a router might read differently (percent-encoded, doubled or dot
    segments, a trailing slash) never answer without the key: the key is checked on the decoded path the routes
    match, and a path it does not cover matches no route (404). JSON nested deeper than Python's recursion
    limit is a 400, not a crash."""
    url, proc, _ = server
    assert _raw(url, "GET", "/v1/models", key=API_KEY)[0] == 200  # control: the route, with the key
    for path in ("/v1/models", "/%76%31/models", "/v1%2Fmodels", "/v1/../v1/models", "/x/../v1/models", "//v1/models",
                 "/v1//models", "/./v1/models", "/v1/models/", "/V1/models", "/v1/models?x=1"):
        status, body = _raw(url, "GET", path)
        assert status in (401, 404) and b'"object":"list"' not in body, (path, status, body[:200])
    prompt = json.dumps({"prompt": "abcd", "max_tokens": 2}).encode()
    for path in ("/%76%31/completions", "//v1/completions", "/v1/../v1/completions"):
        assert _raw(url, "POST", path, prompt)[0] in (401, 404), path
    for deep in (b'{"prompt": ' + b"[" * 1900 + b"]" * 1900 + b"}",
                 b'{"messages": [{"role": "user", "content": ' + b"[" * 1800 + b"]" * 1800 + b"}]}"):
        assert len(deep) < 4096  # under the fixture's --max-body-bytes
        status, body = _raw(url, "POST", "/v1/completions" if deep.startswith(b'{"p') else "/v1/chat/completions",
                            deep, key=API_KEY)
        assert status == 400 and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}, body[:300]
    assert proc.poll() is None and get_json(url + "/health")["status"] == "ok"

def test_engine_failure_is_503_and_the_server_stays_up(sft_reverse_run, tmp_path):
    """A checkpoint whose logits are NaN (a diverged run, exported): sampling cannot draw from them, the engine
    fails that request. The answer is 503 engine_error (a stream ends with that error event), never a 500;
    the slot is freed and the server answers the next request."""
    import torch

    from gptforge.checkpoint import checkpoint_dir_of
    from gptforge.hf.export import export_model

    model, _, _ = load_for_inference(str(sft_reverse_run), "cpu")
    with torch.no_grad():
        model.layers["0"].mlp.up_proj.weight[0, 0] = float("nan")
    export_model(model, model.cfg, tmp_path / "hf", tokenizer_dir=checkpoint_dir_of(str(sft_reverse_run)))
    body = {"prompt": "ROMEO:", "max_tokens": 5, "temperature": 1.0, "seed": 1}
    with running_server(tmp_path / "hf", tmp_path / "log") as (url, proc):
        e = _err(httpx.post(url + "/v1/completions", json=body, timeout=30), 503, "engine failed", "probability")
        assert (e["type"], e["code"]) == ("server_error", "engine_error")
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            assert r.status_code == 200  # the header is out before the first step fails
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_error", events
        h = get_json(url + "/health")
        assert (h["active"], h["waiting"]) == (0, 0), h
        greedy = httpx.post(url + "/v1/completions", json={**body, "temperature": 0}, timeout=30)
        assert greedy.status_code == 200 and greedy.json()["usage"]["prompt_tokens"] == 6, greedy.text
        assert proc.poll() is None


@pytest.fixture(scope="module")
def long_context_run(tmp_path_factory, char_data):
    """A 1-layer char model with a 4096-token context, trained one step: slow enough to hold a slot
    (4,000 tokens take seconds) so the tests of a full queue and of disconnects do not race."""
    from conftest import tiny_args
    from gptforge.cli import main

    out = tmp_path_factory.mktemp("long_context")
    args = [a for a in tiny_args(out, char_data, "--train.max_steps=1", "--train.micro_batch=1",
                                 "--train.warmup_steps=0") if "block_size" not in a and "n_layer" not in a]
    assert main(["pretrain", *args, "--model.block_size=4096", "--model.n_layer=1"]) == 0
    return out


def _wait_health(url, what, ok, timeout=30.0):
    import time

    t0 = time.monotonic()
    while True:
        h = get_json(url + "/health")
        if ok(h):
            return h
        assert time.monotonic() - t0 < timeout, f"{what}: /health still says {h}"
        time.sleep(0.05)


def test_queue_full_is_429_and_disconnects_free_the_slot(long_context_run, tmp_path):
    """One slot, one waiting place. A streams a 4,000-token reply (ignore_eos) and holds the slot; B waits;
    C and D get 429 in the OpenAI shape. A's client hangs up -> its sequence is cancelled, B runs and
    answers. E (non-streaming) times out on the client side -> cancelled too. The server stays up."""
    long = {"prompt": "ROMEO:", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
    with running_server(long_context_run, tmp_path / "log", "--max-batch", "1", "--max-queue", "1",
                        "--max-tokens-cap", "4096") as (url, proc):
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", url + "/v1/completions", json={**long, "stream": True}) as a:
                assert a.status_code == 200
                lines = a.iter_lines()  # kept alive: closing this iterator would close the connection
                first = ""
                while not first.startswith("data: "):
                    first = next(lines)
                assert json.loads(first[6:])["choices"][0]["text"]
                _wait_health(url, "A holds the slot", lambda h: h["active"] == 1)
                b_result: dict = {}
                b = threading.Thread(target=lambda: b_result.update(r=httpx.post(
                    url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 3, "temperature": 0},
                    timeout=60)))
                b.start()
                _wait_health(url, "B waits", lambda h: h["waiting"] == 1)
                for _ in range(2):  # C, D: the one waiting place is taken
                    _err(c.post(url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 3}), 429,
                         "--max-queue 1")
                h = get_json(url + "/health")
                assert (h["active"], h["waiting"], h["cancelled"]) == (1, 1, 0), h  # A still generating
            # A's client is gone (stream closed after one chunk): its sequence is cancelled, B runs
            _wait_health(url, "A cancelled", lambda h: h["cancelled"] == 1)
            b.join(timeout=60)
            rb = b_result["r"]
            assert rb.status_code == 200 and rb.json()["usage"]["completion_tokens"] == 3, rb.text
            # a non-streaming client that gives up is noticed too (the server polls for the disconnect)
            with pytest.raises(httpx.ReadTimeout):
                c.post(url + "/v1/completions", json=long, timeout=0.5)
            _wait_health(url, "E cancelled", lambda h: h["cancelled"] == 2 and h["active"] == 0)
        assert proc.poll() is None and get_json(url + "/health")["waiting"] == 0
    # the startup line names the URL; Ctrl-C (SIGINT, sent by running_server) stops it cleanly
    log = (tmp_path / "log").read_text()
    assert log.startswith(f"gptforge serve: {url} ") and "gptforge serve: stopped" in log, log
    assert proc.returncode == 0


def test_bounded_load_batch_1_vs_n(sft_reverse_run, tmp_path):
    """scripts/bench_serve.py, small: 8 clients x 2 requests (streaming and not) on batch 1 and batch 4
    servers side by side; every answer equals that prompt's answer alone, both servers stay up."""
    out = tmp_path / "load.json"
    r = subprocess.run([sys.executable, "scripts/bench_serve.py", "--checkpoint", str(sft_reverse_run),
                        "--clients", "8", "--requests", "2", "--batches", "1,4", "--rounds", "1",
                        "--max-tokens", "16", "--json", str(out), "--log-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(out.read_text())
    assert rep["problems"] == [] and set(rep["settings"]) == {"1", "4"}
    for s in rep["settings"].values():
        assert (s["requests"], s["failed"], s["wrong"]) == (16, 0, 0)
        assert s["tokens"] >= 16 * 5 and s["p95_s"] >= s["p50_s"] > 0  # each reply: 4 letters + <|im_end|>


def test_bad_flags_and_busy_port_are_one_line_errors(sft_reverse_run, capsys):
    import socket

    from gptforge.cli import main

    assert main(["serve", "--checkpoint", str(sft_reverse_run), "--max-batch", "0"]) == 2
    assert main(["serve", "--checkpoint", str(sft_reverse_run / "nope")]) == 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", "--checkpoint", str(sft_reverse_run), "--port", str(s.getsockname()[1])]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gptforge: error:")]
    assert len(err) == 3 and "--max-batch must be at least 1" in err[0] and "does not exist" in err[1]
    assert "could not listen" in err[2] and "--port" in err[2]
