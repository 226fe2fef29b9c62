"""Real llama.cpp for the GGUF tests: the llama.cpp source vendored in llama-cpp-python's source distribution
(a pinned version, fetched with pip from PyPI), built once per machine under GPTFORGE_CACHE with cmake:
only libllama + ggml (CPU), the `llama-simple` example, and `probe` (below, ~80 lines against llama.h) that
prints what a test compares: the prompt's token ids, the logits at the prompt's last position (fp32 KV cache,
one thread), the greedy continuation's ids, stopping where llama.cpp sees an end of generation, and its text
(pieces as llama-simple prints them).

Measured on this project's 2-core machine: the download (76 MB) and ~3 minutes of build with one job
(-j1: 2 min 48 s wall, 2 min 16 s CPU), the first time only. The build uses GPTFORGE_LLAMA_CPP_JOBS jobs (default 2)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

VERSION = "0.3.36"  # llama-cpp-python; it vendors llama.cpp's source at vendor/llama.cpp

PROBE_CPP = r"""
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

// probe MODEL.gguf N_PREDICT PROMPT_FILE  ->  lines "tokens ...", "eog ...", "logits ...", "generated ...",
// "stop ID|none", "text HEX"
int main(int argc, char ** argv) {
    if (argc != 4) { fprintf(stderr, "usage: probe MODEL N_PREDICT PROMPT_FILE\n"); return 2; }
    std::ifstream f(argv[3], std::ios::binary);
    std::stringstream ss; ss << f.rdbuf();
    const std::string prompt = ss.str();
    const int n_predict = atoi(argv[2]);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "probe: cannot load %s\n", argv[1]); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n = -llama_tokenize(vocab, prompt.data(), prompt.size(), nullptr, 0, false, true);
    std::vector<llama_token> toks(n);
    if (llama_tokenize(vocab, prompt.data(), prompt.size(), toks.data(), n, false, true) != n) return 1;
    printf("tokens");
    for (auto t : toks) printf(" %d", t);
    printf("\n");
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n + n_predict + 1;
    cp.n_batch = cp.n_ubatch = n + n_predict + 1;
    cp.n_threads = cp.n_threads_batch = 1;
    cp.type_k = cp.type_v = GGML_TYPE_F32;  // llama.cpp's default f16 cache would round keys and values
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "probe: no context\n"); return 1; }
    const int n_vocab = llama_vocab_n_tokens(vocab);
    printf("eog");  // the ids that end a generation (and so a chat turn)
    for (int i = 0; i < n_vocab; i++) if (llama_vocab_is_eog(vocab, i)) printf(" %d", i);
    printf("\n");
    if (llama_decode(ctx, llama_batch_get_one(toks.data(), n))) return 1;
    const float * lg = llama_get_logits_ith(ctx, -1);
    printf("logits");
    for (int i = 0; i < n_vocab; i++) printf(" %.9g", lg[i]);
    printf("\ngenerated");
    llama_token stop = -1;
    std::string text;
    for (int k = 0; k < n_predict; k++) {
        lg = llama_get_logits_ith(ctx, -1);
        llama_token best = 0;
        for (int i = 1; i < n_vocab; i++) if (lg[i] > lg[best]) best = i;
        if (llama_vocab_is_eog(vocab, best)) { stop = best; break; }
        printf(" %d", best);
        char buf[256];  // the text as llama-simple prints it: each piece, special tokens rendered
        const int m = llama_token_to_piece(vocab, best, buf, sizeof(buf), 0, true);
        if (m < 0) return 1;
        text.append(buf, m);
        if (llama_decode(ctx, llama_batch_get_one(&best, 1))) return 1;
    }
    if (stop >= 0) printf("\nstop %d\n", stop); else printf("\nstop none\n");
    printf("text ");  // hex: the pieces may split a UTF-8 character
    for (unsigned char c : text) printf("%02x", c);
    printf("\n");
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
"""

CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_OPENMP=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_EXAMPLES=ON", "-DBUILD_SHARED_LIBS=ON"]


def cache_dir() -> Path:
    """One build per machine and version (CI's GPTFORGE_CACHE lives in its fresh clone, so not there);
    GPTFORGE_LLAMA_CPP_DIR overrides."""
    env = os.environ.get("GPTFORGE_LLAMA_CPP_DIR")
    return Path(env) if env else Path.home() / ".cache" / "gptforge" / f"llama-cpp-{VERSION}"


def _run(cmd: list[str], log: Path, **kw) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if r.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}); see {log}")


def _source(root: Path, log: Path) -> Path:
    src = root / "src" / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    dl = root / "sdist"
    _run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-binary", ":all:",
          "--no-deps", "-d", str(dl)], log)
    part = root / "src.partial"  # renamed when whole: an interrupted extraction is never taken for the source
    shutil.rmtree(part, ignore_errors=True)
    with tarfile.open(next(dl.glob("llama_cpp_python-*.tar.gz"))) as tar:
        members = [m for m in tar.getmembers()
                   if "/vendor/llama.cpp/" in m.name or m.name.endswith("/vendor/llama.cpp")]
        tar.extractall(part, members=members, filter="data")
    shutil.rmtree(root / "src", ignore_errors=True)
    part.rename(root / "src")
    shutil.rmtree(dl, ignore_errors=True)
    return src


def build() -> dict[str, Path]:
    """-> {"simple": llama-simple, "probe": probe}; built once (a finished build leaves `ok`; the probe is
    named by its source's hash, so an edit of PROBE_CPP compiles only the probe again)."""
    root = cache_dir()
    digest = hashlib.sha256(PROBE_CPP.encode()).hexdigest()[:12]
    out = {"simple": root / "build" / "bin" / "llama-simple", "probe": root / "build" / "bin" / f"probe-{digest}"}
    if (root / "ok").is_file() and all(p.is_file() for p in out.values()):
        return out
    if shutil.which("cmake") is None or shutil.which("g++") is None:
        if os.environ.get("CI"):  # .ci/run installs them: a missing one there is a failure, not a skip
            raise RuntimeError("building llama.cpp needs cmake and g++; .ci/run must apt-get install them")
        pytest.skip("building llama.cpp needs cmake and g++ (apt-get install cmake g++)")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "w") as lock:  # two test runs at once: one builds, the other waits
        fcntl.flock(lock, fcntl.LOCK_EX)
        log = root / "build.log"
        src = _source(root, log)
        if not ((root / "ok").is_file() and out["simple"].is_file()):
            jobs = os.environ.get("GPTFORGE_LLAMA_CPP_JOBS", "2")
            _run(["cmake", "-S", str(src), "-B", str(root / "build"), *CMAKE_FLAGS], log)
            _run(["cmake", "--build", str(root / "build"), "--target", "llama-simple", "-j", jobs], log)
            (root / "ok").write_text(VERSION + "\n")
        if not out["probe"].is_file():
            (root / "probe.cpp").write_text(PROBE_CPP)
            lib = root / "build" / "bin"
            _run(["g++", "-std=c++17", "-O2", str(root / "probe.cpp"), "-I", str(src / "include"),
                  "-I", str(src / "ggml" / "include"), "-L", str(lib), "-lllama", "-lggml", "-lggml-base",
                  f"-Wl,-rpath,{lib}", "-o", str(out["probe"])], log)
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def probe(binary: Path, model: Path, prompt: str, n_predict: int, tmp: Path) -> dict:
    """-> {"tokens", "logits", "generated" (ids), "stop" (id or None), "text", "eog" (the end-of-generation ids)}."""
    pf = tmp / "prompt.txt"
    pf.write_bytes(prompt.encode("utf-8"))
    r = subprocess.run([str(binary), str(model), str(n_predict), str(pf)], capture_output=True, text=True,
                       timeout=120, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split(" ", 1)[0]: line.split()[1:] for line in r.stdout.splitlines() if line}
    stop = rows["stop"][0]
    text = bytes.fromhex(rows["text"][0] if rows["text"] else "").decode("utf-8", errors="replace")
    return {"tokens": [int(x) for x in rows["tokens"]], "logits": [float(x) for x in rows["logits"]],
            "generated": [int(x) for x in rows["generated"]], "stop": None if stop == "none" else int(stop),
            "text": text, "eog": [int(x) for x in rows["eog"]]}


def simple(binary: Path, model: Path, prompt: str, n_predict: int) -> str:
    """llama-simple's greedy text after the prompt (it echoes the prompt, then the new text, then a newline).
    It runs llama.cpp's default 4 threads (no flag to change it): slow on a busy 2-core machine (18 s for 12
    tokens of a tiny model at a load of 6.5), so the tests call it once, briefly; probe() gives the same text."""
    r = subprocess.run([str(binary), "-m", str(model), "-n", str(n_predict), "-ngl", "0", prompt],
                       capture_output=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    out = r.stdout.decode("utf-8", errors="replace")  # pieces may split a character, as in tokenizer.decode
    assert out.startswith(prompt) and out.endswith("\n"), out[:300]
    return out[len(prompt):-1]
