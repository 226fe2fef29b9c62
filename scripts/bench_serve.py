"""Bounded load test of `gptforge serve` on loopback: batch 1 against batch N, side by side in one run.

Starts one server per --batches value (all at once, each on a free port), then runs ROUNDS rounds; in each
round every server gets the same load in turn (interleaved, so a busy shared machine slows both alike):
CLIENTS concurrent clients x REQUESTS requests each, alternately streaming and not, greedy, prompts
cycling over a few chat prompts. Every answer is checked against the text the server gave for that prompt
alone (before the load), the server must still answer /health after, and the report gives per setting:
requests, errors, p50/p95 latency (s), p50 time to first token (streaming), generated tokens/s.

    python scripts/bench_serve.py --checkpoint runs/sft --clients 32 --requests 4 --batches 1,8
    python scripts/bench_serve.py ... --json out.json   # the numbers, for a test or a note

Only ratios between settings measured in the same run mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.serve_fixtures import running_server  # noqa: E402

WORDS = ("abcd", "fedc", "cafe", "bead", "face", "deaf", "bade", "aced")


def chat_body(word: str, max_tokens: int, stream: bool) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": word}], "temperature": 0,
            "max_tokens": max_tokens, "stream": stream}


async def one(c: httpx.AsyncClient, url: str, word: str, max_tokens: int, stream: bool) -> dict:
    t0 = time.perf_counter()
    first = None
    if not stream:
        r = await c.post(url + "/v1/chat/completions", json=chat_body(word, max_tokens, False))
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code, "latency": time.perf_counter() - t0}
        j = r.json()
        return {"ok": True, "text": j["choices"][0]["message"]["content"], "tokens": j["usage"]["completion_tokens"],
                "latency": time.perf_counter() - t0, "ttft": None, "word": word}
    text, n, done = [], 0, False
    async with c.stream("POST", url + "/v1/chat/completions", json={
            **chat_body(word, max_tokens, True), "stream_options": {"include_usage": True}}) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code, "latency": time.perf_counter() - t0}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            j = json.loads(line[6:])
            if j.get("usage"):
                n = j["usage"]["completion_tokens"]
            for ch in j.get("choices", []):
                piece = ch["delta"].get("content")
                if piece:
                    first = first or time.perf_counter() - t0
                    text.append(piece)
    return {"ok": done, "text": "".join(text), "tokens": n, "latency": time.perf_counter() - t0, "ttft": first,
            "word": word}


async def load(url: str, clients: int, requests: int, max_tokens: int) -> tuple[list[dict], float]:
    async def client(i: int) -> list[dict]:
        out = []
        async with httpx.AsyncClient(timeout=300) as c:
            for k in range(requests):
                out.append(await one(c, url, WORDS[(i + k) % len(WORDS)], max_tokens, stream=(i + k) % 2 == 0))
        return out

    t0 = time.perf_counter()
    per = await asyncio.gather(*[client(i) for i in range(clients)])
    return [r for p in per for r in p], time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8", help="comma list of --max-batch values to compare")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--log-dir", default="/tmp", help="server logs go here")
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    from contextlib import ExitStack

    results = {b: {"records": [], "wall": 0.0} for b in batches}
    bad: list[str] = []
    with ExitStack() as stack:
        urls = {}
        for b in batches:
            url, proc = stack.enter_context(running_server(
                Path(a.checkpoint), Path(a.log_dir) / f"bench_serve_b{b}.log", "--max-batch", str(b),
                "--max-queue", str(a.clients * 2), "--device", a.device))
            urls[b] = (url, proc)
        # reference: each prompt alone, greedy, on each server (they must agree)
        refs = {}
        for b, (url, _) in urls.items():
            for w in WORDS:
                r = httpx.post(url + "/v1/chat/completions", json=chat_body(w, a.max_tokens, False), timeout=60)
                text = r.json()["choices"][0]["message"]["content"]
                if refs.setdefault(w, text) != text:
                    bad.append(f"batch {b}: '{w}' alone gave {text!r}, another server {refs[w]!r}")
        for _ in range(a.rounds):
            for b, (url, _) in urls.items():  # interleaved: each setting once per round
                recs, wall = asyncio.run(load(url, a.clients, a.requests, a.max_tokens))
                results[b]["records"] += recs
                results[b]["wall"] += wall
        for b, (url, proc) in urls.items():
            if proc.poll() is not None or httpx.get(url + "/health", timeout=10).json()["status"] != "ok":
                bad.append(f"batch {b}: the server is down after the load")
    report = {"clients": a.clients, "requests_per_client": a.requests, "rounds": a.rounds,
              "max_tokens": a.max_tokens, "settings": {}}
    for b in batches:
        recs = results[b]["records"]
        ok = [r for r in recs if r["ok"]]
        wrong = [r for r in ok if r["text"] != refs[r["word"]]]
        bad += [f"batch {b}: '{r['word']}' gave {r['text']!r}, alone {refs[r['word']]!r}" for r in wrong[:3]]
        if len(ok) != len(recs):
            bad.append(f"batch {b}: {len(recs) - len(ok)} requests failed")
        lat = [r["latency"] for r in ok]
        ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
        tokens = sum(r["tokens"] for r in ok)
        report["settings"][str(b)] = {
            "requests": len(recs), "failed": len(recs) - len(ok), "wrong": len(wrong),
            "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95), "ttft_p50_s": pct(ttft, 0.5),
            "tokens": tokens, "tokens_per_s": tokens / results[b]["wall"], "wall_s": results[b]["wall"]}
    report["problems"] = bad
    print(f"{a.clients} clients x {a.requests} requests x {a.rounds} rounds, max_tokens {a.max_tokens}, "
          f"settings interleaved per round")
    print(f"{'max_batch':>9} {'requests':>8} {'failed':>6} {'wrong':>5} {'p50 s':>7} {'p95 s':>7} "
          f"{'ttft p50':>8} {'tok/s':>8}")
    for b, s in report["settings"].items():
        print(f"{b:>9} {s['requests']:>8} {s['failed']:>6} {s['wrong']:>5} {s['p50_s']:>7.3f} {s['p95_s']:>7.3f} "
              f"{s['ttft_p50_s']:>8.3f} {s['tokens_per_s']:>8.1f}")
    for p in bad:
        print("PROBLEM:", p)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
