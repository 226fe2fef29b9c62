"""`gptforge pretrain | sft | dpo`: config -> distributed env -> data -> model -> parallelize -> Trainer."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from gptforge.config.loader import config_json, parse_config, resolve_model, save_config
from gptforge.config.schema import Config
from gptforge.errors import UserError
from gptforge.model.gpt import GPT
from gptforge.parallel.mesh import DistEnv, barrier, init_distributed, shutdown
from gptforge.parallel.parallelize import parallelize

# The zero-argument run: the 3.3M micro GPT on Shakespeare, character level, minutes on a laptop CPU.
DEFAULT_STEPS = 600  # when none of train.max_steps / max_tokens / epochs is given
PRETRAIN_DEFAULTS = {"train": {"out_dir": "runs/shakespeare", "micro_batch": 32,
                               "lr": 2e-3, "warmup_steps": 30, "eval_every": 200, "log_every": 20},
                     "model": {"preset": "micro"}}


def _data_path(cfg: Config):
    p = cfg.data.path
    if p is None:
        return None
    parts = [s for s in p.split(",") if s]
    return parts if len(parts) > 1 else parts[0]


def tokenizer_files(tok) -> dict[str, bytes]:
    """The tokenizer's files, to be copied beside each checkpoint."""
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        return {f.name: f.read_bytes() for f in Path(d).iterdir() if f.is_file()}


def build(cfg: Config, env: DistEnv, vocab_size: int, init_model_cfg=None):
    """Resolve the model config, build on meta, materialise on the device. -> (model, model_cfg)."""
    mcfg = init_model_cfg or resolve_model(cfg.model, vocab_size)
    if mcfg.vocab_size < vocab_size:
        raise UserError(f"the tokenizer has {vocab_size} tokens but the model only {mcfg.vocab_size}; "
                        "use the tokenizer the model was trained with or raise model.vocab_size")
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):
        model = GPT(mcfg)
    model.init_weights(seed=cfg.train.seed, device=env.device)
    return model, mcfg


def init_model(cfg: Config, env: DistEnv, vocab_size: int):
    """build() from the config, or from --init-from's model config and weights. -> (model, model_cfg)."""
    init_cfg = None
    if cfg.train.init_from:
        from gptforge.hf.init_from import init_model_config

        init_cfg = init_model_config(cfg.train.init_from)
    model, mcfg = build(cfg, env, vocab_size, init_cfg)
    if cfg.train.init_from:
        from gptforge.hf.init_from import load_init_weights

        load_init_weights(cfg.train.init_from, model)
    return model, mcfg


def describe_model(cfg: Config, model, mcfg) -> str:
    src = f"init from {cfg.train.init_from}" if cfg.train.init_from else cfg.model.preset
    return (f"model: {src} ({mcfg.arch}) {model.num_params() / 1e6:.2f}M parameters, {mcfg.n_layer} layers, "
            f"d_model {mcfg.d_model}, context {mcfg.block_size}, vocab {mcfg.vocab_size}")


def _sampler(cfg: Config, tok, env: DistEnv):
    from gptforge.serve.generate import generate_text

    def sample(model) -> str:
        prompt = cfg.train.sample_prompt or "\n"
        return prompt + generate_text(model, tok, prompt, cfg.train.sample_tokens, temperature=0.8, top_k=50,
                                      seed=cfg.train.seed)

    return sample


def fit(cfg: Config, env: DistEnv, model, objective, train_loader, val_loader, files: dict, mcfg,
        sample_fn=None) -> dict:
    """The stage-independent end of every run: save the resolved config beside the run, train, return."""
    from gptforge.train.trainer import Trainer

    trainer = Trainer(cfg, env, model, objective, train_loader, val_loader, files, mcfg, sample_fn=sample_fn)
    if env.is_main:
        Path(cfg.train.out_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.train.out_dir) / "config.json")
    result = trainer.fit()
    del trainer
    return result


def default_length(cfg: Config, **length) -> Config:
    """Apply a stage's default training length (e.g. max_steps=600) when none of max_steps / max_tokens /
    epochs was given."""
    t = cfg.train
    if t.max_steps is None and t.max_tokens is None and t.epochs is None:
        for k, v in length.items():
            setattr(t, k, v)
    return cfg


def report(result: dict, cfg: Config, stage: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        v = result["val_loss"]
        print(f"{stage} done: {result['steps']} steps in {result['wall_s']:.0f} s, {result['tok_s']:,.0f} tok/s, "
              f"train loss {result['train_loss']:.4f}" + (f", val loss {v:.4f}" if v is not None else "")
              + f"; checkpoint in {cfg.train.out_dir}/checkpoints", file=sys.stderr)


def run_pretrain(cfg: Config) -> dict:
    from gptforge.data.loader import TokenLoader
    from gptforge.data.prepare import ensure_prepared
    from gptforge.data.tokenizer import load_tokenizer
    from gptforge.objectives.lm import LMObjective

    env = init_distributed(cfg.parallel, cfg.train.device)
    try:
        data_dir = None
        if env.is_main:  # prepare once; the others wait and then find it in the cache
            data_dir = ensure_prepared(_data_path(cfg), cfg.data.tokenizer, val_fraction=cfg.data.val_fraction,
                                       field=cfg.data.field)
        barrier(env)
        if not env.is_main:
            data_dir = ensure_prepared(_data_path(cfg), cfg.data.tokenizer, val_fraction=cfg.data.val_fraction,
                                       field=cfg.data.field, progress=False)
        tok = load_tokenizer(data_dir)
        model, mcfg = init_model(cfg, env, tok.vocab_size)
        if env.is_main:
            print(describe_model(cfg, model, mcfg) + f" | data: {data_dir}")
        if cfg.train.auto:
            from gptforge.hardware import apply_auto

            apply_auto(cfg, world_size=env.world_size)
        model = parallelize(model, env, cfg)
        t = cfg.train
        train_loader = TokenLoader(data_dir, "train", t.micro_batch, mcfg.block_size, env.dp_rank, env.dp_size,
                                   seed=t.seed, accum_steps=t.grad_accum)
        val_loader = TokenLoader(data_dir, "val", t.micro_batch, mcfg.block_size, env.dp_rank, env.dp_size,
                                 seed=t.seed, shuffle=False)
        files = {"config.json": config_json(cfg)} | tokenizer_files(tok)
        result = fit(cfg, env, model, LMObjective(), train_loader, val_loader, files, mcfg, _sampler(cfg, tok, env))
        del model
        return result
    finally:
        shutdown(env)


def _base(defaults: dict) -> Config:
    from gptforge.config.loader import apply_dict

    return apply_dict(Config(), defaults, "in the built-in defaults")


def pretrain_main(argv: list[str]) -> int:
    cfg = default_length(parse_config(argv, _base(PRETRAIN_DEFAULTS), prog="gptforge pretrain"),
                         max_steps=DEFAULT_STEPS)
    report(run_pretrain(cfg), cfg, "pretrain")
    return 0


def sft_main(argv: list[str]) -> int:
    from gptforge.train.stages import sft_main as _sft

    return _sft(argv)


def dpo_main(argv: list[str]) -> int:
    from gptforge.train.stages import dpo_main as _dpo

    return _dpo(argv)
