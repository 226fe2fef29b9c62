"""LoRA (lora.rank > 0, gptforge.lora through peft): zero-initialised adapters leave the output unchanged, merging
equals the unmerged forward, an SFT run trains only the adapters and checkpoints only them (exact resume), the
export merges them (transformers' greedy text equals ours) and writes them in PEFT's format (peft loads them onto
the exported base with our unmerged logits), DPO's reference is the base with the adapters off."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import read_losses
from gptforge.checkpoint import checkpoint_dir_of, save_checkpoint
from gptforge.cli import main
from gptforge.config.schema import LoRASection
from gptforge.errors import UserError
from gptforge.hf.export import export_hf
from gptforge.hf.inference import load_for_inference
from gptforge.hf.init_from import base_reference, load_checkpoint_model
from gptforge.hf.peft_export import export_peft_adapter
from gptforge.lora import adapters_disabled, apply_lora, has_lora, lora_record, merge_lora, train_token_ids
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.parallel.mesh import DistEnv
from support.stage_fixtures import reverse_conversations, sft_args, write_jsonl

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 96
LC = LoRASection(rank=4, alpha=8.0, targets="attn,mlp")


def small(arch: str, vocab: int = VOCAB) -> GPTConfig:
    kv = 2 if arch == "llama" else 4  # llama: grouped-query attention; gpt2 exports only without
    return GPTConfig(arch=arch, vocab_size=vocab, block_size=32, n_layer=2, n_head=4, n_kv_head=kv, d_model=32,
                     d_ff=48, bias=arch == "gpt2", tie_embeddings=arch == "gpt2")


def randomise_adapters(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "trainable_tokens_delta" in n:  # (trained embedding rows: their values)
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_zero_init_unchanged_merge_equals_unmerged_and_disable_gives_base(arch):
    model = build_model(small(arch), seed=3).eval()
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(x)
        apply_lora(model, LC)
        assert torch.equal(model(x), base)  # B = 0: exactly the base
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        projs = 7 if arch == "llama" else 6  # q k v o + gate up down (SwiGLU) / up down (GELU)
        assert len(names) == 2 * projs * 2 and all(".lora_" in n for n in names)
        randomise_adapters(model)
        unmerged = model(x)
        assert (unmerged - base).abs().max() > 1e-2  # the adapters do change the output
        with adapters_disabled(model):
            assert torch.equal(model(x), base)
        assert torch.equal(model(x), unmerged)  # switched back on
        merge_lora(model)
        assert not has_lora(model) and all(p.requires_grad for p in model.parameters())
        assert type(model.layers["0"].attn.q_proj) is torch.nn.Linear
        d = (model(x) - unmerged).abs().max().item()
    assert d < 1e-5, d


def test_only_adapters_change_in_optimizer_steps():
    model = build_model(small("llama"), seed=1)
    apply_lora(model, LC)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed), sorted(changed)[:3]
    assert {n for n in before if ".lora_B." in n} <= changed  # every B left zero


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # gpt2: a tied head (the embedding's rows), llama: untied
def test_train_tokens_change_only_their_rows_merge_equals_unmerged(arch):
    """lora.train_tokens: the rows of the chosen tokens train (in the embedding and an untied head, with the
    adapters), no other row; zero change at the start, the base with the adapters off, merge equals unmerged."""
    ids = [3, 7]
    model = build_model(small(arch), seed=2)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(3))
    x[:, ::4] = 3  # the chosen tokens as inputs and as targets
    x[:, 2::4] = 7
    with torch.no_grad():
        want0 = model(x[:, :-1])
        apply_lora(model, LC, ids)
        assert torch.equal(model(x[:, :-1]), want0)  # rows start as the base's, B = 0
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    rows = {n for n in trained if "trainable_tokens_delta" in n}
    assert rows == ({"tok_emb.token_adapter.trainable_tokens_delta.default"} | (
        set() if arch == "gpt2" else {"lm_head.token_adapter.trainable_tokens_delta.default"}))
    assert all(".lora_" in n for n in trained - rows)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        unmerged = model(x[:, :-1])
        with adapters_disabled(model):
            assert torch.equal(model(x[:, :-1]), want0)
        merge_lora(model)
        d = (model(x[:, :-1]) - unmerged).abs().max().item()
    assert d < 1e-5, d
    assert type(model.tok_emb) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
    assert (model.lm_head.weight is model.tok_emb.weight) == (arch == "gpt2")  # still tied / untied
    merged = dict(model.named_parameters())
    for name in ("tok_emb.weight", "lm_head.weight"):
        if name not in merged:
            continue  # tied: the embedding itself
        moved = (merged[name] != base[name]).any(1).nonzero().flatten().tolist()
        assert moved == ids, (name, moved)
    assert {n for n in base if n in merged and not torch.equal(base[n], merged[n])} == \
        {n for n in merged if n.endswith("_proj.weight")} | ({"tok_emb.weight"} | (
            set() if arch == "gpt2" else {"lm_head.weight"}))


def test_train_tokens_resolve_from_the_tokenizer():
    from gptforge.data.tokenizer import build_tokenizer

    tok = build_tokenizer("char", ["hello"])
    names, ids = train_token_ids("chat", tok)
    assert names == ["<|im_start|>", "<|im_end|>"] and ids == [tok.hf.token_to_id(s) for s in names]
    assert train_token_ids("none", tok) == ([], [])
    assert train_token_ids("<|endoftext|>, h", tok)[1] == [tok.eos_id, tok.encode("h")[0]]
    with pytest.raises(UserError, match="lora.train_tokens: hel is not a token"):
        train_token_ids("h,hel", tok)


def _lora_checkpoint(root: Path, arch: str):
    """A base checkpoint and a LoRA checkpoint on it (random adapters), as a LoRA run saves them."""
    from gptforge.data.tokenizer import build_tokenizer

    tok = build_tokenizer("char", ["abcdefgh ijklmnop qrstuvwxyz the quick brown fox jumps over the lazy dog"])
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        files = {f.name: f.read_bytes() for f in Path(d).iterdir()}
    cfg = small(arch, tok.vocab_size)  # no padded rows: export-hf and our inference keep the same vocabulary
    files["model_config.json"] = json.dumps(cfg.complete().to_dict())
    model = build_model(cfg, seed=5).eval()
    base = save_checkpoint(root / "base", 3, model, None, {"step": 3}, DistEnv(), files)
    tokens = train_token_ids("chat", tok)
    apply_lora(model, LC, tokens[1])
    randomise_adapters(model, seed=7)  # and the chat tokens' rows
    rec = json.dumps(lora_record(LC, base_reference(root / "base"), tokens))
    ck = save_checkpoint(root / "lora", 5, model, None, {"step": 5}, DistEnv(), files | {"lora.json": rec})
    return base, ck, model, tok


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_export_merges_and_peft_adapter_gives_our_unmerged_logits(tmp_path, arch):
    from gptforge.model.engine import Engine, Params

    base, ck, ours, tok = _lora_checkpoint(tmp_path, arch)
    assert base_reference(base)["sha256"] == json.loads((ck / "lora.json").read_text())["base"]["sha256"]
    x = torch.randint(0, tok.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ours(x)  # unmerged
    merged = load_checkpoint_model(ck)
    with torch.no_grad():
        assert (merged(x) - want).abs().max() < 1e-5
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(export_hf(ck, tmp_path / "hf_merged")).eval()
    prompt = tok.encode("the quick")
    mine = Engine(merged, tok).run(prompt, Params(12, 0.0)).ids
    with torch.no_grad():
        assert (hf_merged(x).logits - want).abs().max() < 1e-5
        theirs = hf_merged.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                                    pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
    assert tok.decode(mine) == tok.decode(theirs) and len(mine) == 12

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(export_hf(base, tmp_path / "hf_base")).eval()
    adapter = export_peft_adapter(ck, tmp_path / "adapter")
    keys = json.loads((adapter / "adapter_config.json").read_text())
    assert keys["peft_type"] == "LORA" and keys["r"] == 4
    chat = [tok.hf.token_to_id(s) for s in ("<|im_start|>", "<|im_end|>")]
    assert keys["trainable_token_indices"] == (chat if arch == "gpt2" else {"embed_tokens": chat, "lm_head": chat})
    peft_model = peft.PeftModel.from_pretrained(hf_base, adapter).eval()
    with torch.no_grad():
        d = (peft_model(x).logits - want).abs().max().item()
        with peft_model.disable_adapter():  # and the base alone is the base
            d_base = (peft_model(x).logits - load_checkpoint_model(base).eval()(x)).abs().max().item()
    assert d < 1e-5 and d_base < 1e-5, (d, d_base)


def test_changed_base_is_refused(tmp_path):
    base, ck, _, _ = _lora_checkpoint(tmp_path, "llama")
    rec = json.loads((ck / "lora.json").read_text())
    rec["base"]["sha256"] = "0" * 64
    (ck / "lora.json").write_text(json.dumps(rec))
    with pytest.raises(UserError, match="other weights than it was trained on"):
        load_checkpoint_model(ck)


# ---- runs -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("lora_chats") / "rev.jsonl", reverse_conversations(96))


def lora_sft(out, data, base, *extra) -> int:
    return main(["sft", *sft_args(out, data, f"--init-from={base}", "--train.max_steps=6", "--train.log_every=1",
                                  "--lora.rank=4", "--lora.alpha=8", "--lora.dropout=0.1", *extra)])


def test_sft_lora_run_saves_only_adapters_resumes_exactly_and_loads_merged(tmp_path, trained_run, chats):
    import torch.distributed.checkpoint as dcp

    assert lora_sft(tmp_path / "a", chats, trained_run, "--train.save_every=3") == 0
    assert lora_sft(tmp_path / "b", chats, trained_run, "--train.save_every=3", "--train.stop_after=3") == 0
    assert lora_sft(tmp_path / "b", chats, trained_run, "--train.save_every=3", "--train.resume=auto") == 0
    full = read_losses(tmp_path / "a")
    assert len(full) == 6 and read_losses(tmp_path / "b") == full  # exact resume (adapter dropout included)

    ck = checkpoint_dir_of(tmp_path / "a")
    keys = dcp.FileSystemReader(str(ck)).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    rows = {f"model.{m}.token_adapter.trainable_tokens_delta.default" for m in ("tok_emb", "lm_head")}
    assert model_keys and all(".lora_" in k for k in set(model_keys) - rows), model_keys
    assert rows & set(model_keys)  # lora.train_tokens=chat (the default): the chat tokens' rows
    rec = json.loads((ck / "lora.json").read_text())
    assert rec["base"] == base_reference(trained_run) and rec["rank"] == 4
    assert rec["train_tokens"] == ["<|im_start|>", "<|im_end|>"] and len(rec["train_token_ids"]) == 2

    base, merged = load_checkpoint_model(checkpoint_dir_of(trained_run)), load_checkpoint_model(ck)
    b, m = dict(base.named_parameters()), dict(merged.named_parameters())
    changed = {n for n in b if not torch.equal(b[n], m[n])}
    heads = {n for n in b if n in ("tok_emb.weight", "lm_head.weight")}
    assert changed == {n for n in b if n.endswith("_proj.weight")} | heads  # the adapted projections, the rows:
    for n in heads:
        assert (b[n] != m[n]).any(1).nonzero().flatten().tolist() == sorted(rec["train_token_ids"])
    model, tok, _ = load_for_inference(str(tmp_path / "a"), "cpu")  # generate/chat/serve/eval's loader
    x = torch.randint(0, tok.vocab_size, (1, 16))
    with torch.no_grad():  # (it masks the rows a padded vocabulary adds past the tokenizer's)
        n = tok.vocab_size
        assert torch.equal(model(x)[..., :n], merged(x)[..., :n])

    # DPO with LoRA on the LoRA SFT checkpoint: its base is that checkpoint, merged in turn at load
    from test_dpo import reverse_pairs

    pairs = write_jsonl(tmp_path / "pairs.jsonl", reverse_pairs(16))
    assert main(["dpo", *sft_args(tmp_path / "dpo", pairs, f"--init-from={tmp_path / 'a'}", "--train.max_steps=2",
                                  "--lora.rank=2", "--train.lr=1e-2")]) == 0
    dpo = dict(load_checkpoint_model(checkpoint_dir_of(tmp_path / "dpo")).named_parameters())
    assert {n for n in m if not torch.equal(m[n], dpo[n])} == changed

    # resuming with other adapter settings is refused in one line
    assert lora_sft(tmp_path / "a", chats, trained_run, "--train.resume=auto", "--lora.rank=8",
                    "--train.max_steps=8") == 2


def test_dpo_lora_reference_is_the_base_without_adapters(tmp_path, trained_run):
    """The live reference (the policy with its adapters off) gives the losses of the precomputed one (scored on
    the base before training); at step 1 the policy is the base: ln 2."""
    from test_dpo import reverse_pairs

    pairs = write_jsonl(tmp_path / "pairs.jsonl", reverse_pairs(48))
    losses = []
    for ref in ("true", "false"):
        out = tmp_path / f"dpo_{ref}"
        assert main(["dpo", *sft_args(out, pairs, f"--init-from={trained_run}", "--train.max_steps=4",
                                      "--train.log_every=1", "--lora.rank=4", "--train.lr=1e-2",
                                      f"--dpo.precompute_ref={ref}")]) == 0
        losses.append(read_losses(out))
    assert abs(losses[0][0] - math.log(2)) < 1e-5
    assert abs(losses[0][-1] - math.log(2)) > 1e-3  # the adapters moved the policy (a reference with them: ln 2)
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


@pytest.mark.parametrize("argv,match", [
    (["--lora.rank=-1"], "lora.rank"),
    (["--lora.targets=attn,ffn"], "lora.targets"),
    (["--lora.rank=4", "--lora.dropout=1"], "lora.dropout"),
    (["--lora.rank=4", "--lora.train_tokens=<|im_end|>,"], "lora.train_tokens"),
    (["--lora.rank=4", "--lora.train_tokens=<|im_end|>,<|nope|>"], "lora.train_tokens: <|nope|> is not a token"),
])
def test_config_refusals(tmp_path, chats, trained_run, capsys, argv, match):
    assert main(["sft", *sft_args(tmp_path, chats, f"--init-from={trained_run}", "--train.max_steps=1", *argv)]) == 2
    assert match in capsys.readouterr().err


def test_lora_needs_a_base_and_a_chat_stage(tmp_path, chats, char_data, capsys):
    assert main(["sft", *sft_args(tmp_path / "s", chats, "--train.max_steps=1", "--lora.rank=4")]) == 2
    assert "--init-from" in capsys.readouterr().err
    from conftest import tiny_args
    assert main(["pretrain", *tiny_args(tmp_path / "p", char_data, "--train.max_steps=1", "--lora.rank=4")]) == 2
    assert "not pretrain" in capsys.readouterr().err
