"""The one run of every stage: config -> distributed env -> stage data (tokenizer) -> model -> loaders ->
objective -> parallelize -> Trainer. A stage (gptforge.train.recipes, a Recipe) supplies only its data,
objective and files."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from gptforge import checkpoint as ckpt_mod
from gptforge.config.loader import VOCAB_MULTIPLE, config_json, resolve_model, restore_recipe, save_config
from gptforge.config.schema import Config
from gptforge.errors import UserError
from gptforge.hardware import vocab_multiple
from gptforge.hf.init_from import check_weights_fit, init_model_config, load_init_weights
from gptforge.model.doc_mask import resolve_attention
from gptforge.model.gpt import build_model
from gptforge.objectives.head import resolve_loss_impl
from gptforge.objectives.lm import LMObjective
from gptforge.parallel import hang
from gptforge.parallel.layout import settle_layout
from gptforge.parallel.mesh import DistEnv, init_distributed, on_main, shutdown
from gptforge.parallel.parallelize import parallelize
from gptforge.train.auto import apply_auto
from gptforge.train.lora import setup_lora
from gptforge.train.preempt import resume_setting
from gptforge.train.precision import train_precision
from gptforge.train.trainer import Trainer, autocast


@dataclasses.dataclass
class StageData:
    """What a stage's setup() read, before the model exists: the tokenizer (its vocabulary sizes the model) and
    the data as the stage holds it until the model's context is known. Each stage fills its own fields."""

    tokenizer: Any
    label: str  # the data, as the start line names it
    data_dir: Path | None = None  # pretrain: the prepared token shards
    val_dir: Path | None = None  # pretrain: data.val_path, prepared with the same tokenizer
    records: list | None = None  # sft: the conversations read
    stats: Any = None  # sft: what reading them skipped


@dataclasses.dataclass
class Loaders:
    """The stage's data cut to the model's context: the loaders, and what the objective and sampler use."""

    train: Any
    val: Any | None
    examples: int = 0  # dpo: the pairs read (said when the reference is precomputed)
    sample_prompt: str | None = None  # chat stages: a user message from the data for the end-of-run sample


class Recipe:
    """One training stage; run() calls, in this order and with nothing carried on the recipe between them:
    setup() -> StageData (tokenizer, data read), then, once the model is built, loaders(data, model_cfg) ->
    Loaders, objective(model, data, loaders) (before parallelization: DPO scores its reference with the plain
    model), files(tokenizer), sampler(tokenizer, loaders). The class flags say what a stage needs from the
    command line; the stage command checks them before anything is read."""

    name = "train"
    defaults: dict = {}  # stage defaults, below the config file and the command line
    length: dict = {}  # training length when none of max_steps / max_tokens / epochs is given
    chat = False  # train.eval_tasks through the chat template (the chat stages)
    needs_data_path = False  # data.path must be given (there is no built-in corpus)
    needs_init_from: str | None = None  # why --init-from must be given (None: optional)
    uses_cache = False  # prepares data into GPTFORGE_CACHE
    lora = False  # lora.rank > 0 allowed: adapters on the frozen --init-from model (gptforge.train.lora)

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env

    def say(self, msg: str) -> None:
        if self.env.is_main:
            print(msg, flush=True)

    def setup(self) -> StageData:
        raise NotImplementedError

    def loaders(self, data: StageData, mcfg) -> Loaders:
        raise NotImplementedError

    def objective(self, model, data: StageData, loaders: Loaders):
        return LMObjective(self.loss_impl(model))

    def loss_impl(self, model) -> str:
        """train.loss_impl resolved for this model and device (gptforge.objectives.head), said once."""
        c = model.cfg
        impl, why = resolve_loss_impl(self.cfg.train.loss_impl, self.env.device, c.vocab_size, c.d_model,
                                      self.env.tp_size, c.logit_softcap)
        self.say(f"loss: {impl} ({why})")
        return impl

    def files(self, tok) -> dict:
        """Small files saved in every checkpoint beside the config and the tokenizer."""
        return {}

    def sampler(self, tok, loaders: Loaders):
        return None


def default_length(cfg: Config, **length) -> Config:
    """Apply a stage's default training length when none of max_steps / max_tokens / epochs was given."""
    t = cfg.train
    if t.max_steps is None and t.max_tokens is None and t.epochs is None:
        for k, v in length.items():
            setattr(t, k, v)
    return cfg


def tokenizer_files(tok) -> dict[str, bytes]:
    """The tokenizer's files, to be copied beside each checkpoint."""
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        return {f.name: f.read_bytes() for f in Path(d).iterdir() if f.is_file()}


def restore_recipe_on_resume(cfg: Config, env: DistEnv) -> None:
    """A resume (train.resume, or a torchrun restart) trains on with the model and recipe the run started with:
    config.loader.restore_recipe from the newest checkpoint's config.json as rank 0 reads it, the same on every rank."""
    r = resume_setting(cfg.train.resume)
    if r is None:
        return
    found = ckpt_mod.resume_candidates(r, Path(cfg.train.out_dir), env)
    if not found:
        return
    ck = found[0]
    saved = on_main(lambda: ckpt_mod.read_json(ck, "config.json") if (ck / "config.json").is_file() else {}, env)
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint '{ck}': config.json is not a table of config sections; resume from another "
                        "checkpoint")
    # the model as built (vocab_size resolved: a run started on a CPU resumes on a GPU with its own vocab)
    saved = {k: v for k, v in saved.items() if k == "train"} | {"model": ckpt_mod.saved_model_config(ck, env)}
    changed = restore_recipe(cfg, saved, f"checkpoint '{ck}'")
    if changed and env.is_main:
        print(f"resume: the run's own settings from {ck.name}/config.json: {', '.join(changed)}", flush=True)


def init_model(cfg: Config, env: DistEnv, vocab_size: int):
    """Build on meta and materialise on the device, from the config or from --init-from's config and weights.
    -> (model, complete GPTConfig)."""
    init_from = cfg.train.init_from
    mcfg = init_model_config(init_from) if init_from else resolve_model(
        cfg.model, vocab_size, vocab_multiple(env.device, VOCAB_MULTIPLE))
    if mcfg.vocab_size < vocab_size:
        raise UserError(f"the tokenizer has {vocab_size} tokens but the model only {mcfg.vocab_size}; "
                        "use the tokenizer the model was trained with or raise model.vocab_size")
    if init_from:  # its config may come from elsewhere: checked against its weights before any allocation
        check_weights_fit(init_from, mcfg)
    torch.manual_seed(cfg.train.seed)
    model = build_model(mcfg, env.device, seed=cfg.train.seed)
    model.attention = resolve_attention(cfg.train.attention, env.device, mcfg.dropout)
    if init_from:
        load_init_weights(init_from, model)
    return model, model.cfg


def describe_model(cfg: Config, model, mcfg) -> str:
    src = f"init from {cfg.train.init_from}" if cfg.train.init_from else mcfg.preset or "custom"
    return (f"model: {src} ({mcfg.arch}) {model.num_params() / 1e6:.2f}M parameters, {mcfg.n_layer} layers, "
            f"d_model {mcfg.d_model}, context {mcfg.block_size}, vocab {mcfg.vocab_size}")


def report(result: dict, cfg: Config, stage: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0 and result.get("stopped"):
        print(f"{stage}: stopped by {result['stopped']} at step {result['steps']}, saved checkpoint "
              f"{result['checkpoint']}; resume with --train.resume=auto (exit status {result['status']})",
              file=sys.stderr, flush=True)
    elif int(os.environ.get("RANK", "0")) == 0:
        v = result["val_loss"]
        if result.get("finished"):
            print(f"{stage}: already finished at step {result['steps']}; checkpoint in {cfg.train.out_dir}/checkpoints",
                  file=sys.stderr)
            return
        print(f"{stage} done: {result['steps']} steps in {result['wall_s']:.0f} s, {result['tok_s']:,.0f} tok/s, "
              f"train loss {result['train_loss']:.4f}" + (f", val loss {v:.4f}" if v is not None else "")
              + f"; checkpoint in {cfg.train.out_dir}/checkpoints", file=sys.stderr)


def grpo_check(g):
    """The grpo section's reward as the judge of generative eval tasks (train.eval_tasks, grpo's data.val_path)."""
    from gptforge.objectives.rewards import Check

    return Check(g.reward, g.tolerance, g.format_regex, g.max_new_tokens)


def task_evaluator(cfg: Config, env, tok, chat: bool):
    """train.eval_tasks -> model -> {"eval/<task>/acc": .., "eval/<task>/acc_norm": ..} (None: no tasks); a
    generative task: eval/<task>/acc and reward, judged by the grpo section's reward (grpo_check).
    The task files are read (and checked) now, before training starts."""
    from gptforge.data.tasks import load_task
    from gptforge.objectives.scoring import score_task
    from gptforge.parallel.layout import resolve_strategy

    specs = [t.strip() for t in cfg.train.eval_tasks.split(",") if t.strip()]
    if not specs:
        return None
    tasks = [load_task(t, cfg.train.eval_tasks_limit or None) for t in specs]
    gen = [t.name for t in tasks if t.generative]
    if gen and (env.tp_size > 1 or resolve_strategy(env, cfg.parallel) == "fsdp"):
        raise UserError(f"train.eval_tasks: the generative task {gen[0]} decodes with the whole model on every rank; "
                        "use --parallel.strategy=ddp or leave it out of train.eval_tasks")
    precision, check = cfg.train.precision, grpo_check(cfg.grpo)

    def evaluate(model) -> dict[str, float]:
        out = {}
        with autocast(env.device, precision):
            for task in tasks:
                r = score_task(model, tok, task, chat, env.dp_rank, env.dp_size, cfg.train.micro_batch, check)
                out |= {f"eval/{task.name}/{m}": v for m, (v, _) in r["metrics"].items()}
        return out

    return evaluate


def run(cfg: Config, recipe_cls: type[Recipe]) -> dict:
    """Train one stage on this process (torchrun starts one per rank); returns the Trainer's result."""
    env = init_distributed(cfg.parallel, cfg.train.device)
    try:
        restore_recipe_on_resume(cfg, env)
        recipe = recipe_cls(cfg, env)
        data = recipe.setup()
        tok = data.tokenizer
        model, mcfg = init_model(cfg, env, tok.vocab_size)
        if cfg.train.init_from:  # config.json records the model that trains (--init-from's), not the stage's default
            cfg.model = dataclasses.replace(mcfg)
        lora_files = setup_lora(cfg, recipe, model, env, tok)  # {} unless lora.rank > 0
        settle_layout(env, cfg, mcfg)  # the mesh across nodes depends on the model's size
        recipe.say(describe_model(cfg, model, mcfg) + f" | data: {data.label}")
        if cfg.train.auto:
            apply_auto(cfg, mcfg, world_size=env.world_size)
        # auto on a CPU with bf16: measured for this model's shapes, the same on every rank (train.precision)
        cfg.train.precision, precision_why = train_precision(cfg.train.precision, env, mcfg, cfg.train.micro_batch)
        loaders = recipe.loaders(data, mcfg)
        objective = recipe.objective(model, data, loaders)
        model = parallelize(model, env, cfg)
        files = {"config.json": config_json(cfg)} | tokenizer_files(tok) | recipe.files(tok) | lora_files
        trainer = Trainer(cfg, env, model, objective, loaders.train, loaders.val, files, mcfg,
                          sample_fn=recipe.sampler(tok, loaders), task_eval=task_evaluator(cfg, env, tok, recipe.chat))
        trainer.precision_why = precision_why
        if env.is_main:
            Path(cfg.train.out_dir).mkdir(parents=True, exist_ok=True)
            save_config(cfg, Path(cfg.train.out_dir) / "config.json")
        try:
            result = trainer.fit()
        except Exception as e:  # a collective timed out: name the stuck rank, stacks of each (parallel.hang)
            if env.distributed and (why := hang.explain(e, env.rank)):
                raise UserError(why) from None
            raise
        del trainer, model, objective
        return result
    finally:
        shutdown(env)

