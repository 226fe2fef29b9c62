"""export-gguf files run in real llama.cpp (built once per machine from the source vendored in llama-cpp-python's
sdist: tests/support/llama_cpp.py). For a trained GPT-2-style char model, a chat model, and GPT-2 / Llama / Qwen3
style models with a trained byte-level BPE (random weights, and GPT-2 / Llama style models trained with it and
fine-tuned for chat): llama.cpp's token ids equal ours, its logits are ours within the
stated bounds, its greedy continuation is ours token for token (f32, f16), the text `llama-simple` prints is the
text `gptforge generate` prints, and a chat turn (prompted with the GGUF's own template) stops at <|im_end|>
in both, with the reply `gptforge chat` prints. bf16 and q8_0 load and run: the
first greedy token agrees and the logits stay within their rounding."""

from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")

from gptforge.checkpoint import checkpoint_dir_of  # noqa: E402
from gptforge.cli import main as cli_main  # noqa: E402
from gptforge.data.chat_template import CHATML_JINJA, FolderTemplate, encode_chat, stop_ids  # noqa: E402
from gptforge.data.tokenizer import EOS, IM_END, gpt2_tokenizer, load_tokenizer  # noqa: E402
from gptforge.hf.gguf_export import write_gguf  # noqa: E402
from gptforge.hf.inference import load_for_inference  # noqa: E402
from gptforge.hf.init_from import load_checkpoint_model  # noqa: E402
from gptforge.model.engine import Engine, Params  # noqa: E402
from gptforge.model.gpt import GPTConfig, build_model  # noqa: E402
from support import llama_cpp  # noqa: E402
from support.checks import run_gptforge  # noqa: E402
from support.decode_reference import recompute_decode  # noqa: E402
from support.stage_fixtures import bpe_chat_runs, sft_reverse_run, shakespeare_bpe  # noqa: E402, F401

# contractions, digit runs, runs of spaces, tabs, blank lines, \r\n, accents, CJK, punctuation, special tokens
TEXT = ("Hello, world! It's 2024: naïve café 東京 — 12345678 tokens.\n\n\tTabs  and   spaces, don't we'll\r\n"
        "<|im_start|>user\nHi there<|im_end|>\n")
# max |logit difference| to ours. gpt2: ggml's CPU GELU reads an fp16 table (about 1e-3 per activation)
BOUND = {"f32": {"gpt2": 5e-3, "llama": 1e-4, "qwen3": 1e-4}, "f16": 0.05, "bf16": 0.4, "q8_0": 1.0}


@pytest.fixture(scope="module")
def llama():
    return llama_cpp.build()


@torch.no_grad()
def our_logits(model, ids: list[int], n_vocab: int) -> torch.Tensor:
    return model(torch.tensor([ids]))[0, -1, :n_vocab].float()


def check_run(llama, model, tok, path, prompt: str, n: int, qtype: str, arch: str, tmp_path) -> tuple[list[int], str]:
    """llama.cpp (probe) against our model on one prompt; -> (our greedy ids, the stop id included; llama.cpp's
    text)."""
    ids = tok.encode(prompt)
    stops = {tok.special[EOS], tok.special[IM_END]}  # what llama.cpp counts as the end of generation
    ours = recompute_decode(model, ids, n, stop_ids=stops)
    r = llama_cpp.probe(llama["probe"], path, prompt, n, tmp_path)
    assert r["tokens"] == ids and r["eog"] == sorted(stops)  # <|endoftext|>, and <|im_end|> ends a turn
    logits = our_logits(model, ids, tok.vocab_size)
    diff = (torch.tensor(r["logits"]) - logits).abs().max().item()
    bound = BOUND[qtype][arch] if qtype == "f32" else BOUND[qtype]
    assert diff < bound, (qtype, arch, diff)
    first = (r["generated"] or [r["stop"]])[0]
    same = r["generated"] == [t for t in ours if t not in stops]
    print(f"{arch} {qtype}: max |logit diff| {diff:.2e}; greedy {len(ours)} tokens, same: {same}")
    if qtype in ("f32", "f16"):
        assert same and r["stop"] == (ours[-1] if ours[-1] in stops else None)
    else:  # rounding may flip a close call: llama.cpp's first pick is within 2 x diff of our best logit
        assert logits[first] >= logits.max() - 2 * diff, (first, ours[0])
    return ours, r["text"]


def test_trained_char_model_same_tokens_logits_and_text(tmp_path, llama, trained_run):
    ck = checkpoint_dir_of(trained_run)
    model, tok = load_checkpoint_model(ck).eval(), load_tokenizer(ck)
    prompt = "ROMEO:\nWhat say"
    for qtype in ("f32", "f16", "q8_0"):
        path = tmp_path / f"char-{qtype}.gguf"
        assert cli_main(["export-gguf", "--checkpoint", str(trained_run), "--out", str(path), "--type", qtype]) == 0
        _, text = check_run(llama, model, tok, path, prompt, 40, qtype, "gpt2", tmp_path)
    # the programs a person runs: llama.cpp's llama-simple and `gptforge generate`, both greedy (8 tokens: llama-simple
    # runs 4 threads, slow on a busy 2-core machine)
    simple = llama_cpp.simple(llama["simple"], tmp_path / "char-f32.gguf", prompt, 8)
    r = run_gptforge("generate", "--checkpoint", str(trained_run), "--prompt", prompt, "--temperature", "0",
                     "--max-new-tokens", "8", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout == prompt + simple + "\n" and simple == text[:8] and len(simple) == 8
    print(f"char: {prompt!r} -> {simple!r} in llama-simple and gptforge generate")


def test_chat_turn_stops_at_im_end(tmp_path, llama, sft_reverse_run):
    ck = checkpoint_dir_of(sft_reverse_run)
    model, tok = load_checkpoint_model(ck).eval(), load_tokenizer(ck)
    path = tmp_path / "chat.gguf"
    assert cli_main(["export-gguf", "--checkpoint", str(sft_reverse_run), "--out", str(path), "--type", "f32"]) == 0
    ids, _ = encode_chat(tok, [{"role": "user", "content": "cafe"}], add_generation_prompt=True)
    prompt = tok.decode(ids)
    assert tok.encode(prompt) == ids and prompt.endswith("<|im_start|>assistant\n")
    ours, text = check_run(llama, model, tok, path, prompt, 16, "f32", "gpt2", tmp_path)
    assert ours[-1] == tok.special[IM_END] and len(ours) <= 6  # the turn ends at <|im_end|>
    assert text == tok.decode(ours[:-1]) and IM_END not in text  # llama.cpp stops there too, without printing it
    print(f"chat: user 'cafe' -> assistant {text!r}, then <|im_end|> in both")


@pytest.fixture(scope="module")
def bpe(shakespeare_bpe):
    return shakespeare_bpe


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
def test_bpe_models_by_arch(tmp_path, llama, bpe, arch):
    """Random weights (std 0.3, so the greedy choices are clear-cut; norms and biases not 1 and 0), the
    tokenizer's own vocabulary size; llama: grouped-query attention with biases, untied head."""
    kw = {"gpt2": dict(arch="gpt2", bias=True),
          "llama": dict(arch="llama", n_kv_head=2, bias=True, tie_embeddings=False),
          "qwen3": dict(arch="llama", qk_norm=True, bias=False, rope_theta=5000.0)}[arch]
    cfg = GPTConfig(vocab_size=bpe.vocab_size, block_size=160, n_layer=2, n_head=4, d_model=64, d_ff=160,
                    init_std=0.3, **kw)
    model = build_model(cfg, seed=6 if arch == "gpt2" else 5).eval()  # gpt2 seed 5 ends at <|endoftext|> after 4
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    for qtype in ("f32", "f16", "bf16", "q8_0"):
        path = write_gguf(model, model.cfg, bpe, tmp_path / f"{arch}-{qtype}.gguf", qtype, chat_template=CHATML_JINJA)
        ours, text = check_run(llama, model, bpe, path, TEXT, 24, qtype, arch, tmp_path)
        if qtype == "f32":
            assert text == bpe.decode([t for t in ours if t not in (bpe.special[EOS], bpe.special[IM_END])])


@torch.no_grad()
def engine_greedy(model, tok, ids: list[int], n: int, stops) -> tuple[list[int], float]:
    """gptforge's greedy decode (the engine of generate, chat and serve, with its KV cache) -> (the new ids, a stop
    included; the smallest gap between the best and second-best logit along them: how clear-cut each pick was)."""
    new = Engine(model, tok).run(ids, Params(n, 0.0, None, None, None, frozenset(stops))).ids
    logits = model(torch.tensor([ids + new[:-1]]))[0, len(ids) - 1:, :tok.vocab_size]
    top2 = logits.topk(2, dim=-1).values
    return new, (top2[:, 0] - top2[:, 1]).min().item()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_trained_bpe_models_greedy_text_and_chat_turn(tmp_path, capsys, llama, bpe_chat_runs, arch):
    """Tiny models with the trained BPE (bpe_chat_runs: pretrained on Shakespeare, then fine-tuned on the reverse
    task), exported f32. (a) A plain prompt, greedy: llama.cpp's ids are those of gptforge's engine and of the
    reference decode, and its text is what `gptforge generate --temperature 0` prints: the pretrained model's 24
    tokens; the chat model's few tokens, then the end of its turn in both. (b) A chat turn: the user message
    rendered with the chat template the GGUF carries is our ChatML prompt, id for id; the reply's ids agree, both
    stop at <|im_end|>, and `gptforge chat --temperature 0` prints llama.cpp's text."""
    pre, sft = bpe_chat_runs(arch)
    prompt = "First Citizen:\n"  # clear-cut picks: the best logit leads the next by >= 0.03 at every step (0.15: gpt2)
    for run in (pre, sft):
        path = tmp_path / f"{run.name}.gguf"
        assert cli_main(["export-gguf", "--checkpoint", str(run), "--out", str(path), "--type", "f32"]) == 0
        model, tok, chat = load_for_inference(str(run), "cpu")
        ours, text = check_run(llama, model, tok, path, prompt, 24, "f32", arch, tmp_path)
        mine, margin = engine_greedy(model, tok, tok.encode_prompt(prompt), 24, tok.end_ids)
        assert mine == ours and (ours[-1] in tok.end_ids if chat else len(ours) == 24), (mine, ours)
        diff = capsys.readouterr().out.strip()  # check_run's line: the max |logit difference|
        assert cli_main(["generate", "--checkpoint", str(run), "--prompt", prompt, "--temperature", "0",
                         "--max-new-tokens", "24", "--device", "cpu"]) == 0
        assert capsys.readouterr().out == prompt + text + "\n"
        with capsys.disabled():
            stop = {tok.special[EOS]: EOS, tok.special[IM_END]: IM_END}.get(ours[-1], "none: 24 ids")
            print(f"{diff}\n{arch} {'sft' if chat else 'pretrain'}: {prompt!r} -> {text!r} ({len(ours)} ids, stop "
                  f"{stop}) in llama.cpp, generate and the engine; "
                  f"smallest top-2 logit gap {margin:.3g}")
    msgs = [{"role": "user", "content": "cafe"}]  # the chat model (model, tok, path: the loop's last)
    ids, _ = encode_chat(tok, msgs, add_generation_prompt=True)
    template = gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"].contents()
    prompt = FolderTemplate(template).render(msgs, add_generation_prompt=True)
    assert tok.encode(prompt) == ids  # check_run: and llama.cpp's tokenization of it
    ours, text = check_run(llama, model, tok, path, prompt, 16, "f32", arch, tmp_path)
    mine, margin = engine_greedy(model, tok, ids, 16, stop_ids(tok))
    assert mine == ours and ours[-1] == tok.special[IM_END] and text == tok.decode(ours[:-1]), (mine, ours, text)
    diff = capsys.readouterr().out.strip()
    assert cli_main(["chat", "--checkpoint", str(sft), "--message", "cafe", "--temperature", "0",
                     "--max-new-tokens", "16", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == text + "\n"
    with capsys.disabled():
        print(f"{diff}\n{arch} chat: user 'cafe' -> assistant {text!r} ({len(ours) - 1} ids), then <|im_end|> in "
              f"llama.cpp, chat and the engine; smallest top-2 logit gap {margin:.3g}")


# what decides a split: combining marks, other digits (Arabic-Indic, Roman numeral), emoji, NBSP, U+2028, \x0b,
# \x1c, ideographic space, contractions in capitals, doubled quotes, \r\n, URLs, scripts without spaces
HARD = ["naïve e\u0301 ٣٤ ⅷ 🙂🙂 x\u00a0y a\u2028b c\x0bd e\x1cf \u3000z  \n \n\n   end",
        "I'M HE'S we've 'll don't''s  \t\t x\r\n\r\ny 12,345.67 $100 #tag @user http://a.b/c?d=e&f",
        "Ünïcödé ñ 日本語のテキスト 한국어 русский العربية עברית ελληνικά"]


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_pre_tokenizer_gpt_2_splits_as_ours(tmp_path, llama, bpe, kind):
    """tokenizer.ggml.pre "gpt-2" is the split rule of GPT-2's tokenizer and of our trained BPE: same ids."""
    tok = gpt2_tokenizer() if kind == "gpt2" else bpe
    cfg = GPTConfig(arch="llama", vocab_size=tok.vocab_size, block_size=256, n_layer=1, n_head=2, d_model=32, d_ff=64)
    model = build_model(cfg).eval()
    path = write_gguf(model, model.cfg, tok, tmp_path / "t.gguf", "f16")
    for text in HARD:
        assert llama_cpp.probe(llama["probe"], path, text, 1, tmp_path)["tokens"] == tok.encode(text), text
