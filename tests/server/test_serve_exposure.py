"""`gptforge serve` facing hostile clients and networks (issue 22 rows 2, 9, 10), through the real command:
connections that never finish their request are closed and capped while /health and generation go on; a
non-loopback bind refuses to start without an API key, which can come from the environment (never the
command line); a loopback bind answers only Host headers that name the machine itself (DNS rebinding)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import httpx

from support.serve_fixtures import API_KEY, free_port, get_json, running_server


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _closed_by_server(sock: socket.socket, wait: float = 30.0) -> bytes:
    """Everything the server sent until it closed the connection (AssertionError if it is still open after
    `wait` seconds: a bound on a hang, not a timing measurement)."""
    sock.settimeout(wait)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except socket.timeout:
        raise AssertionError(f"the server left the connection open (got {got[:80]!r})") from None
    except ConnectionResetError:
        pass
    return got


def _trickle_until_closed(sock: socket.socket, tries: int = 150) -> bool:
    """A slowloris client: a header line every 0.2 s, never the blank line; True once the server hangs up."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    sock.settimeout(0.2)
    for _ in range(tries):
        try:
            sock.sendall(b"X-Slow: 1\r\n")
            if sock.recv(4096) == b"":
                return True
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return True
    return False


def test_slow_connections_are_closed_capped_and_generation_goes_on(trained_run, tmp_path):
    """Before: uvicorn kept a connection that never sent its request open for ever (3,000 still open after
    70 s in the probe) and took as many as the file descriptors allowed. Now each has --read-timeout to send
    its request, and past --max-connections a new one is answered 503 and closed."""
    cap = 12
    with running_server(trained_run, tmp_path / "log", "--read-timeout", "1", "--timeout-keep-alive", "1",
                        "--max-connections", str(cap)) as (url, proc):
        addr = ("127.0.0.1", _port(url))
        # the cap: past `cap` open connections, the next ones are answered 503 and closed at once
        socks = [socket.create_connection(addr) for _ in range(cap + 2)]
        got = [_closed_by_server(s) for s in socks]
        assert all(g.startswith(b"HTTP/1.1 503") and b"too_many_connections" in g for g in got[cap:]), got[cap:]
        assert got[:cap - 1] == [b""] * (cap - 1)  # (the fixture's last /health may still count a moment)
        for s in socks:
            s.close()
        # header-less, half a header, half a body, a header a line at a time: all closed by the server ...
        idle = [socket.create_connection(addr) for _ in range(6)]
        half_head, half_body = socket.create_connection(addr), socket.create_connection(addr)
        half_head.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        half_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        slow = socket.create_connection(addr)
        trickled: dict = {}
        trickler = threading.Thread(target=lambda: trickled.update(closed=_trickle_until_closed(slow)))
        trickler.start()
        # ... and while they are open, /health answers and the engine generates
        assert get_json(url + "/health")["status"] == "ok"
        r = httpx.post(url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 8, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8, r.text
        for s in [*idle, half_head, half_body]:
            assert _closed_by_server(s) == b""
            s.close()
        trickler.join(timeout=60)
        assert trickled.get("closed") is True
        slow.close()
        # a kept-alive connection that stays idle after its answer is closed after --timeout-keep-alive
        with socket.create_connection(addr) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert _closed_by_server(s).startswith(b"HTTP/1.1 200")
        assert proc.poll() is None and get_json(url + "/health")["status"] == "ok"


def test_loopback_answers_only_its_own_host_names(trained_run, tmp_path):
    """DNS rebinding: a page on attacker.example, its name then resolved to 127.0.0.1, makes the user's browser
    send requests to the key-less local server with 'Host: attacker.example'. Before: answered 200."""
    with running_server(trained_run, tmp_path / "log", "--allowed-hosts", "gptforge.internal, [fd00::1]") \
            as (url, proc):
        port = _port(url)
        body = {"prompt": "ROMEO:", "max_tokens": 2}
        for host in ("attacker.example", f"attacker.example:{port}", "localhost.attacker.example",
                     "127.0.0.1.nip.io", "[::2]"):
            for r in (httpx.get(url + "/", headers={"Host": host}),
                      httpx.post(url + "/v1/completions", json=body, headers={"Host": host}, timeout=30)):
                assert r.status_code == 400, (host, r.status_code)
                e = r.json()["error"]
                assert e["code"] == "invalid_host" and "--allowed-hosts" in e["message"] and "\n" not in e["message"]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST", "gptforge.internal",
                     "gptforge.internal:443", "[fd00::1]:80"):
            assert httpx.get(url + "/health", headers={"Host": host}).status_code == 200, host
        r = httpx.post(url + "/v1/completions", json=body, headers={"Host": "gptforge.internal"}, timeout=30)
        assert r.status_code == 200, r.text
        assert proc.poll() is None


def _serve_fails(*args: str, env: dict | None = None) -> str:
    """Runs `gptforge serve ARGS`, which must exit 2; its one error line."""
    r = subprocess.run([sys.executable, "-m", "gptforge", "serve", *args], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("gptforge: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


def test_public_bind_needs_a_key_from_the_environment_or_a_file(trained_run, tmp_path):
    """Before: `--host 0.0.0.0` without a key served anyone, silently, and the key could only be given on the
    command line (readable by every local user in /proc/PID/cmdline)."""
    ck = str(trained_run)
    env = {k: v for k, v in os.environ.items() if k != "GPTFORGE_API_KEY"}
    err = _serve_fails("--checkpoint", ck, "--host", "0.0.0.0", "--port", str(free_port()), env=env)
    assert "--host 0.0.0.0" in err and "GPTFORGE_API_KEY" in err and "--allow-no-key" in err
    assert "cannot be read" in _serve_fails("--checkpoint", ck, "--api-key-file", str(tmp_path / "nope"), env=env)
    (tmp_path / "empty").write_text("\n")
    assert "is empty" in _serve_fails("--checkpoint", ck, "--api-key-file", str(tmp_path / "empty"), env=env)
    # --allow-no-key (or its alias --insecure) passes the check (with a warning); the port is taken, so it stops there
    for flag in ("--allow-no-key", "--insecure"):
        with socket.socket() as busy:
            busy.bind(("0.0.0.0", 0))
            busy.listen()
            err = _serve_fails("--checkpoint", ck, "--host", "0.0.0.0", "--port", str(busy.getsockname()[1]),
                               flag, env=env)
        assert "warning: listening on 0.0.0.0 without an API key" in err and "could not listen" in err, flag
    # the key from the environment: required on /v1, absent from the command line; the Host is not checked
    # on a public bind (clients name it by any address)
    with running_server(trained_run, tmp_path / "log", "--host", "0.0.0.0", env={"GPTFORGE_API_KEY": API_KEY}) \
            as (url, proc):
        assert API_KEY.encode() not in open(f"/proc/{proc.pid}/cmdline", "rb").read()
        body = {"prompt": "ROMEO:", "max_tokens": 2}
        assert httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 401
        for auth in (f"Bearer {API_KEY[:-1]}", f"Bearer {API_KEY}x", API_KEY, "Bearer"):
            r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": auth}, timeout=30)
            assert r.status_code == 401, auth
        r = httpx.post(url + "/v1/completions", json=body, timeout=30,
                       headers={"Authorization": f"Bearer {API_KEY}", "Host": "attacker.example"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
        assert proc.poll() is None
