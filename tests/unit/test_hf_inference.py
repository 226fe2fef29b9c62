"""Inference from a Hugging Face folder is the folder's model, as transformers runs it: `eval --text` gives
transformers' loss (no vocabulary rows padded in), and generate, chat, serve and eval load every kind of path
(run dir, checkpoint dir, Hugging Face folder) with one loader, so an export samples what its checkpoint does."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import Regex, decoders, models, pre_tokenizers  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

from gptforge.checkpoint import save_checkpoint  # noqa: E402
from gptforge.cli import main  # noqa: E402
from gptforge.data.tokenizer import train_bpe  # noqa: E402
from gptforge.hf.inference import load_for_inference  # noqa: E402
from gptforge.model.gpt import GPTConfig, build_model  # noqa: E402
from gptforge.parallel.mesh import DistEnv  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog; 快速的棕色狐狸. "
T = 16  # context of every model here
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([TEXT * 3] * 40, 300)


def _hf_model(kind: str, V: int):
    """A tiny random model built by transformers, with non-trivial norms and biases."""
    torch.manual_seed(0)
    if kind == "gpt2":
        conf = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=48, n_layer=2, n_head=4,
                                       layer_norm_epsilon=1e-5)
        model = transformers.GPT2LMHeadModel(conf)
    else:  # GQA, biases, untied
        conf = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T,
                                        rms_norm_eps=1e-5, attention_bias=True, mlp_bias=True,
                                        tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(conf)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape) if p.dim() == 1 else 0.05 * torch.randn(p.shape))
    return model.eval()


def _hf_loss(model, ids: list[int], first_embedding: torch.Tensor | None = None) -> float:
    """transformers' own mean loss over the windows `eval --text` scores: every token after the first
    predicted once, T new tokens a window, each window seeing the T tokens before its last target.
    first_embedding: the first token's input vector when transformers has no row for it."""
    seq, total, count = torch.tensor(ids), 0.0, 0
    for a in range(1, len(seq), T):
        b = min(a + T, len(seq))
        x = seq[max(0, b - 1 - T):b - 1][None]
        y = torch.full_like(x, -100)
        y[0, x.shape[1] - (b - a):] = seq[a:b]  # the positions that predict the new tokens
        with torch.no_grad():
            if a == 1 and first_embedding is not None:
                emb = model.get_input_embeddings()(x.clamp(max=model.config.vocab_size - 1))
                emb[0, 0] = first_embedding
                out = model(inputs_embeds=emb, labels=y, shift_labels=y)
            else:
                out = model(input_ids=x, labels=y, shift_labels=y)
        total += out.loss.item() * (b - a)
        count += b - a
    return total / count


def _eval_loss(folder: Path, text_file: Path, out: Path) -> float:
    assert main(["eval", "--checkpoint", str(folder), "--text", str(text_file), "--out", str(out),
                 "--device", "cpu", "--batch-size", "3"]) == 0
    [res] = json.loads(out.read_text())["results"]
    return res["metrics"]["loss"]["value"]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_eval_text_equals_transformers_loss(tmp_path, bpe, kind):
    V = bpe.vocab_size
    assert V % 64 != 0
    folder = tmp_path / "hf"
    hf = _hf_model(kind, V)
    hf.save_pretrained(folder, safe_serialization=True)
    bpe.save(folder)
    (tmp_path / "t.txt").write_text(TEXT * 2)
    model, tok, _ = load_for_inference(str(folder), "cpu")
    assert model.cfg.vocab_size == V  # the folder's vocabulary, not rounded up to 320
    ours = _eval_loss(folder, tmp_path / "t.txt", tmp_path / "eval.json")
    ids = [tok.doc_end, *tok.encode(TEXT * 2)]  # the folder's end token first (LlamaConfig's default eos: 2)
    assert len(ids) > 3 * T  # several windows
    theirs = _hf_loss(hf, ids)
    assert abs(ours - theirs) < 1e-5, (ours, theirs)


def test_ids_the_tokenizer_adds_are_never_predicted(tmp_path):
    """A foreign tokenizer (no <|endoftext|>): our special tokens get ids past the folder's vocabulary; they
    have input rows (the mean row) but no probability, so the loss is still transformers'."""
    chars = sorted(set(TEXT))
    vocab = {c: i for i, c in enumerate(["<unk>", *chars])}
    htok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    htok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    htok.decoder = decoders.Fuse()
    folder = tmp_path / "hf"
    hf = _hf_model("llama", len(vocab))
    hf.save_pretrained(folder, safe_serialization=True)
    for name in ("config.json", "generation_config.json"):  # a folder without an end token: ours is the prefix
        f = folder / name
        f.write_text(json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k != "eos_token_id"}))
    htok.save(str(folder / "tokenizer.json"))
    (tmp_path / "t.txt").write_text(TEXT * 2)
    model, tok, _ = load_for_inference(str(folder), "cpu")
    V = len(vocab)
    assert tok.eos_id >= V and model.cfg.vocab_size == tok.vocab_size == V + 4
    with torch.no_grad():
        logits = model(torch.tensor([[tok.eos_id, 3, 5]]))
    assert torch.isneginf(logits[..., V:]).all() and torch.isfinite(logits[..., :V]).all()
    ours = _eval_loss(folder, tmp_path / "t.txt", tmp_path / "eval.json")
    mean_row = hf.get_input_embeddings().weight.mean(0)
    theirs = _hf_loss(hf, [tok.eos_id, *tok.encode(TEXT * 2)], first_embedding=mean_row)
    assert abs(ours - theirs) < 1e-5, (ours, theirs)


def _checkpoint(out_dir: Path, tok) -> Path:
    """A random llama checkpoint (vocab padded past the tokenizer's, as training does) with a chat template."""
    cfg = GPTConfig(arch="llama", vocab_size=320, block_size=32, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                    d_ff=96, bias=True, tie_embeddings=False, norm_eps=1e-5)
    model = build_model(cfg, seed=3).eval()
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        files = {f.name: f.read_bytes() for f in Path(d).iterdir()}
    files |= {"model_config.json": json.dumps(cfg.to_dict()), "config.json": json.dumps({}),
              "chat_template.jinja": TEMPLATE}
    return save_checkpoint(out_dir, 5, model, None, {"step": 5}, DistEnv(), files)


def test_generate_and_chat_accept_an_export(tmp_path, bpe, capsys):
    ck = _checkpoint(tmp_path / "run", bpe)
    out = tmp_path / "hf"
    assert main(["export-hf", "--checkpoint", str(ck), "--out", str(out)]) == 0
    capsys.readouterr()

    def run(*argv: str) -> str:
        assert main(list(argv)) == 0
        return capsys.readouterr().out

    texts = [run("generate", "--checkpoint", str(p), "--prompt", "the quick", "--temperature", "0",
                 "--max-new-tokens", "12", "--device", "cpu") for p in (ck, out)]
    assert texts[0] == texts[1] and texts[0].startswith("the quick") and len(texts[0]) > len("the quick\n")
    replies = [run("chat", "--checkpoint", str(p), "--message", "the lazy dog", "--temperature", "0",
                   "--max-new-tokens", "8", "--device", "cpu") for p in (ck, out)]
    assert replies[0] == replies[1]
