"""`gptforge serve`: the official `openai` client against a real server (a subprocess on loopback), the same
text as `gptforge generate` / `gptforge chat`, the error table, batching under concurrent load."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from gptforge.serve.engine import Engine, Params, StopMatcher
from gptforge.serve.generate import load_for_inference
from gptforge.model.sampling import generate_ids
from serve_fixtures import API_KEY, get_json, running_server
from stage_fixtures import HELD_OUT, sft_reverse_run  # noqa: F401

CHAT_PROMPT = "<|im_start|>user\nfade<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def server(sft_reverse_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(sft_reverse_run, log, "--api-key", API_KEY, "--max-batch", "4", "--max-body-bytes",
                        "4096", "--max-tokens-cap", "40") as (url, proc):
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
    assert r.choices[0].text.startswith("edaf<|im_end|>")  # the model learned the task: 'fade' reversed
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    stream = client.completions.create(model="m", prompt=CHAT_PROMPT, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text and len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason == "length"
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
    s = client.completions.create(model="m", prompt=CHAT_PROMPT, temperature=0, stop="af<", stream=True)
    assert "".join(c.choices[0].text for c in s) == "ed"


def test_engine_matches_the_reference_sampler_and_batching_does_not_change_text(sft_reverse_run):
    """The engine's slot cache (masked rows) against model.sampling.generate_ids (plain KV cache)."""
    model, tok, _ = load_for_inference(str(sft_reverse_run), "cpu")
    eng = Engine(model, tok)
    for prompt, seed, temp in ((CHAT_PROMPT, None, 0.0), ("ROMEO:", 3, 1.0), ("a", 11, 0.8)):
        ids = tok.encode(prompt)
        ref = tok.decode(list(generate_ids(model, ids, 30, temp, None, None, seed)))
        text, reason, n = eng.run(ids, Params(30, temp, None, None, seed))
        assert (text, reason, n) == (ref, "length", 30)
    m = StopMatcher(("<|im_end|>",))
    assert [m.push(p) for p in ("ab<|im", "_e", "nd|>x")] == ["ab", "", ""] and m.hit
    # batched: 6 sequences of different prompt lengths in 3 slots give their single-sequence text
    prompts = [tok.encode(f"<|im_start|>user\n{w}<|im_end|>\n<|im_start|>assistant\n") for w in HELD_OUT]
    prompts[1] = tok.encode("a much longer prompt than the others")
    single = [eng.run(p, Params(25, 0.0))[0] for p in prompts]
    batched = Engine(model, tok, max_batch=3).start()
    outs = [[] for _ in prompts]
    done = threading.Semaphore(0)
    try:
        from gptforge.serve.engine import Sequence
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


def test_queue_full_is_429_and_the_server_stays_up(sft_reverse_run, tmp_path):
    """One slot, one waiting place: of 24 requests sent at once, the ones beyond get 429, the rest answer."""
    import asyncio

    with running_server(sft_reverse_run, tmp_path / "log", "--max-batch", "1", "--max-queue", "1") as (url, proc):
        async def go():
            async with httpx.AsyncClient(timeout=60) as c:
                body = {"prompt": CHAT_PROMPT, "max_tokens": 40, "temperature": 0}
                return await asyncio.gather(*[c.post(url + "/v1/completions", json=body) for _ in range(24)])

        rs = asyncio.run(go())
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 2, codes
        texts = {r.json()["choices"][0]["text"] for r in rs if r.status_code == 200}
        assert len(texts) == 1 and texts.pop().startswith("edaf")
        for r in rs:
            if r.status_code == 429:
                _err(r, 429, "--max-queue 1")
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
