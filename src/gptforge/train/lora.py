"""LoRA in a training run (lora.rank > 0; the adapters themselves: gptforge.lora): which runs may use it, the
adapters added to the --init-from model before parallelization, lora.json in every checkpoint (settings, base path
and sha256), a resume only onto the same adapters and base, and DPO's reference as the base without adapters."""

from __future__ import annotations

import json
from pathlib import Path

from gptforge import checkpoint as ckpt_mod
from gptforge.errors import UserError
from gptforge.hf.init_from import base_reference
from gptforge.lora import (LORA_FILE, adapters_disabled, apply_lora, is_adapter_key, lora_record, record_token_ids,
                          train_token_ids)
from gptforge.parallel.mesh import on_main


def check_lora_run(cfg, recipe) -> None:
    """LoRA needs a stage that allows it (sft, dpo), a base (--init-from) and no tensor parallelism."""
    r = cfg.lora.rank
    if not recipe.lora:
        raise UserError(f"lora.rank={r}: LoRA is for the sft and dpo stages, not {recipe.name}; leave lora.rank at 0")
    if not cfg.train.init_from:
        raise UserError(f"lora.rank={r} trains adapters on a frozen base model: pass --init-from=RUN_OR_CHECKPOINT_DIR "
                        "(or a Hugging Face folder)")
    if cfg.parallel.tp > 1:
        raise UserError(f"lora.rank={r} with parallel.tp={cfg.parallel.tp}: peft's LoRA layers cannot be "
                        "tensor-parallel; use parallel.tp=1 (DDP or FSDP shard the model instead)")


def setup_lora(cfg, recipe, model, env, tok) -> dict[str, str]:
    """lora.rank > 0: adapters on `model` (plain, base weights loaded) and the lora.train_tokens rows of its
    embedding, base frozen -> {lora.json: text} for the checkpoints; {} when LoRA is off."""
    lc = cfg.lora
    if not lc.rank:
        return {}
    check_lora_run(cfg, recipe)
    base = on_main(lambda: base_reference(cfg.train.init_from), env)
    tokens = train_token_ids(lc.train_tokens, tok)
    apply_lora(model, lc, tokens[1])
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for n, p in model.named_parameters() if not is_adapter_key(n))  # the base's
    rows = f" + embedding rows {', '.join(tokens[0])}" if tokens[0] else ""
    recipe.say(f"lora: rank {lc.rank}, alpha {lc.alpha:g}, dropout {lc.dropout:g} on {lc.targets}{rows}: "
               f"{n_train:,} trainable parameters ({n_train / n_all:.2%} of the model's {n_all:,}); "
               f"base {base['path']} frozen")
    return {LORA_FILE: json.dumps(lora_record(lc, base, tokens), indent=2) + "\n"}


def check_lora_resume(ck: Path, files: dict, env) -> None:
    """A run resumes only with the adapters (rank, alpha, targets) and base (sha256) its checkpoint holds."""
    def saved() -> dict | None:
        f = ck / LORA_FILE
        return ckpt_mod.read_json(ck, LORA_FILE) if f.is_file() else None

    was = on_main(saved, env)
    now = json.loads(files[LORA_FILE]) if LORA_FILE in files else None
    key = lambda r: None if r is None else (r["rank"], r["alpha"], r["targets"], record_token_ids(r),  # noqa: E731
                                            r["base"].get("sha256"))
    if key(was) == key(now):
        return
    if was is None:
        raise UserError(f"cannot resume from '{ck}': it was trained without LoRA; resume with --lora.rank=0, or "
                        "start the LoRA run in a new train.out_dir")
    if now is not None and key(was)[:4] == key(now)[:4]:
        raise UserError(f"cannot resume from '{ck}': its adapters were trained on base {was['base']['path']} "
                        f"(sha256 {was['base']['sha256'][:12]}), not on this --init-from; pass that base")
    raise UserError(f"cannot resume from '{ck}': it holds LoRA adapters of another shape; resume with "
                    f"--lora.rank={was['rank']} --lora.alpha={was['alpha']:g} --lora.targets={was['targets']} "
                    f"--lora.train_tokens={','.join(was.get('train_tokens', [])) or 'none'}")


class BaseOnly:
    """A LoRA model called with its adapters switched off: DPO's reference is the base itself, no second copy
    of the model in memory (gptforge.lora.adapters_disabled)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)
