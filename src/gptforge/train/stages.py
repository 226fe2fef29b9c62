"""`gptforge sft` and `gptforge dpo`: the pretraining set-up (config, distributed env, model, parallelize,
Trainer) with chat data and another objective.

    gptforge sft --init-from runs/pretrain --data.path chats.jsonl --train.epochs=2
    gptforge dpo --init-from runs/sft --data.path pairs.jsonl --dpo.beta=0.1 --train.epochs=1
"""

from __future__ import annotations

from gptforge.config.loader import config_json, parse_config
from gptforge.config.schema import Config
from gptforge.data.chat_template import CHAT_TEMPLATE_FILE, CHATML_JINJA
from gptforge.errors import UserError
from gptforge.parallel.mesh import DistEnv, init_distributed, shutdown
from gptforge.parallel.parallelize import parallelize, resolve_strategy
from gptforge.train.entry import _base, default_length, describe_model, fit, init_model, report, tokenizer_files

SFT_DEFAULTS = {"train": {"out_dir": "runs/sft", "micro_batch": 16, "lr": 3e-4, "warmup_steps": 20,
                          "eval_every": 200, "log_every": 10, "sample_tokens": 120}}
DPO_DEFAULTS = {"train": {"out_dir": "runs/dpo", "micro_batch": 8, "lr": 2e-5, "warmup_steps": 10,
                          "eval_every": 200, "log_every": 10, "sample_tokens": 120, "weight_decay": 0.0}}


def _say(env: DistEnv, msg: str) -> None:
    if env.is_main:
        print(msg, flush=True)


def _tokenizer(cfg: Config, texts=None):
    """The tokenizer of --init-from, else data.tokenizer (char / bpe:N are built from the chat text)."""
    if cfg.train.init_from:
        from gptforge.hf.init_from import init_tokenizer

        return init_tokenizer(cfg.train.init_from)
    from gptforge.data.tokenizer import build_tokenizer

    return build_tokenizer(cfg.data.tokenizer, texts)


def _conversation_texts(convs):
    yield "system\nuser\nassistant\n"
    for msgs in convs:
        for m in msgs:
            yield m["content"]


def _files(cfg: Config, tok) -> dict:
    """Small files saved in every checkpoint: config, tokenizer, chat template (read by export-hf)."""
    return {"config.json": config_json(cfg)} | tokenizer_files(tok) | {CHAT_TEMPLATE_FILE: CHATML_JINJA}


def _chat_sampler(cfg: Config, tok, prompt: str | None):
    """At the end of a run: the model's reply to one user message (train.sample_prompt or one from the data)."""
    from gptforge.data.chat_template import encode_chat, stop_ids
    from gptforge.serve.generate import generate_ids

    text = cfg.train.sample_prompt if cfg.train.sample_prompt.strip() else prompt
    if not text:
        return None

    def sample(model) -> str:
        ids, _ = encode_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True)
        if len(ids) >= model.cfg.block_size - 1:
            return f"user: {text[:200]}\n(the prompt does not fit the context; no sample)"
        stops = stop_ids(tok)
        out = [t for t in generate_ids(model, ids, cfg.train.sample_tokens, temperature=0.7, top_k=50,
                                       seed=cfg.train.seed, stop_ids=stops) if t not in stops]
        return f"user: {text[:200]}\nassistant: {tok.decode(out)}"

    return sample


def _finish_defaults(cfg: Config) -> Config:
    default_length(cfg, epochs=1.0)
    if cfg.data.path is None:
        raise UserError("give the data: --data.path=FILE_OR_DIR (JSONL; see gptforge.data.sft for the formats)")
    if cfg.train.auto:
        from gptforge.hardware import apply_auto

        apply_auto(cfg)
    return cfg


def _autocast_factory(cfg: Config, env: DistEnv):
    from gptforge.train.trainer import autocast, resolve_precision

    precision = resolve_precision(cfg.train.precision, env.device)
    return lambda: autocast(env.device, precision)


def _fit(cfg: Config, env: DistEnv, model, objective, train_loader, val_loader, tok, mcfg, sample_prompt):
    return fit(cfg, env, model, objective, train_loader, val_loader, _files(cfg, tok), mcfg,
               _chat_sampler(cfg, tok, sample_prompt))


# ---- SFT ----------------------------------------------------------------------------------------------
def run_sft(cfg: Config) -> dict:
    from gptforge.data.sft import SFTLoader, read_conversations, split_val, tokenize_conversations
    from gptforge.objectives.lm import LMObjective

    env = init_distributed(cfg.parallel, cfg.train.device)
    try:
        convs, stats = read_conversations(cfg.data.path, cfg.sft.skip_bad_lines)
        tok = _tokenizer(cfg, _conversation_texts(convs))
        model, mcfg = init_model(cfg, env, tok.vocab_size)
        _say(env, describe_model(cfg, model, mcfg) + f" | data: {cfg.data.path}")
        train_convs, val_convs = split_val(convs, cfg.data.val_fraction, seed=0)
        train_ex, stats = tokenize_conversations(train_convs, tok, mcfg.block_size, cfg.sft.overflow, stats)
        val_ex, _ = tokenize_conversations(val_convs, tok, mcfg.block_size, cfg.sft.overflow)
        t = cfg.train
        common = dict(block_size=mcfg.block_size, micro_batch=t.micro_batch, pad_id=tok.pad_id,
                      packing=cfg.sft.packing, dp_rank=env.dp_rank, dp_size=env.dp_size, seed=t.seed)
        train_loader = SFTLoader(train_ex, accum_steps=t.grad_accum, **common)
        val_loader = SFTLoader(val_ex, shuffle=False, **common) if len(val_ex) >= env.dp_size else None
        layout = (f"packed into {train_loader.n} rows of {mcfg.block_size} tokens ({train_loader.fill:.0%} filled)"
                  if cfg.sft.packing else f"{train_loader.n} padded sequences (length-bucketed)")
        _say(env, f"sft data: {stats.summary()} | {layout} | "
                  f"{int(train_loader.unit_labels.sum()):,} label tokens | {len(val_ex)} validation examples")
        model = parallelize(model, env, cfg)
        prompt = next((m["content"] for m in (val_convs or train_convs)[0] if m["role"] == "user"), None)
        result = _fit(cfg, env, model, LMObjective(), train_loader, val_loader, tok, mcfg, prompt)
        del model
        return result
    finally:
        shutdown(env)


# ---- DPO ----------------------------------------------------------------------------------------------
def _frozen_reference(cfg: Config, env: DistEnv, vocab_size: int):
    """A second, frozen copy of the starting model, sharded like the policy (FSDP2 / TP), never DDP-wrapped."""
    ref, _ = init_model(cfg, env, vocab_size)
    ref.requires_grad_(False)
    strategy = resolve_strategy(env, cfg.parallel)
    if strategy == "fsdp":
        ref = parallelize(ref, env, cfg)
    elif env.tp_size > 1:
        from gptforge.parallel.tp import apply_tp

        apply_tp(ref, env.mesh["tp"], sequence_parallel=cfg.parallel.sequence_parallel)
    return ref.eval()


def run_dpo(cfg: Config) -> dict:
    from gptforge.data.preference import PairLoader, read_pairs
    from gptforge.data.sft import split_val
    from gptforge.objectives.dpo import DPOObjective, precompute_reference

    if not cfg.train.init_from:
        raise UserError("dpo starts from the SFT model, which is also the frozen reference: "
                        "pass --init-from=RUN_OR_CHECKPOINT_DIR")
    env = init_distributed(cfg.parallel, cfg.train.device)
    try:
        tok = _tokenizer(cfg)
        model, mcfg = init_model(cfg, env, tok.vocab_size)
        _say(env, describe_model(cfg, model, mcfg) + f" | data: {cfg.data.path}")
        pairs, stats = read_pairs(cfg.data.path, tok, mcfg.block_size, cfg.sft.overflow, cfg.sft.skip_bad_lines)
        train_pairs, val_pairs = split_val(pairs, cfg.data.val_fraction, seed=0)
        t = cfg.train
        common = dict(micro_batch=t.micro_batch, pad_id=tok.pad_id, dp_rank=env.dp_rank, dp_size=env.dp_size,
                      seed=t.seed)
        train_loader = PairLoader(train_pairs, accum_steps=t.grad_accum, **common)
        val_loader = PairLoader(val_pairs, shuffle=False, **common) if len(val_pairs) >= env.dp_size else None
        _say(env, f"dpo data: {stats.summary('pairs')} | {len(train_pairs)} training, {len(val_pairs)} validation "
                  f"pairs | beta {cfg.dpo.beta}, label smoothing {cfg.dpo.label_smoothing}, reference "
                  + ("precomputed" if cfg.dpo.precompute_ref else "live (a second model in memory)"))
        ref_model = None
        if cfg.dpo.precompute_ref:
            import time

            t0 = time.perf_counter()
            ac = _autocast_factory(cfg, env)
            for loader in (train_loader, val_loader):
                if loader is not None:
                    loader.set_reference(precompute_reference(model, loader, env, t.micro_batch, ac))
            _say(env, f"reference log-probs of {len(pairs)} pairs precomputed in {time.perf_counter() - t0:.1f} s")
        else:
            ref_model = _frozen_reference(cfg, env, tok.vocab_size)
        model = parallelize(model, env, cfg)
        objective = DPOObjective(cfg.dpo.beta, cfg.dpo.label_smoothing, ref_model)
        result = _fit(cfg, env, model, objective, train_loader, val_loader, tok, mcfg, None)
        del model, ref_model, objective
        return result
    finally:
        shutdown(env)


# ---- entry points -------------------------------------------------------------------------------------
def sft_main(argv: list[str]) -> int:
    cfg = _finish_defaults(parse_config(argv, _base(SFT_DEFAULTS), prog="gptforge sft"))
    report(run_sft(cfg), cfg, "sft")
    return 0


def dpo_main(argv: list[str]) -> int:
    cfg = _finish_defaults(parse_config(argv, _base(DPO_DEFAULTS), prog="gptforge dpo"))
    report(run_dpo(cfg), cfg, "dpo")
    return 0
