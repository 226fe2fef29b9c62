"""The three stages as recipes sharing one run(): pretrain (token shards, LM loss), SFT (chat data, LM
loss on assistant tokens) and DPO (preference pairs against a frozen reference).

    gptforge pretrain                               # the micro GPT on Shakespeare, characters, minutes on a CPU
    gptforge sft --init-from runs/pretrain --data.path chats.jsonl --train.epochs=2
    gptforge dpo --init-from runs/sft --data.path pairs.jsonl --dpo.beta=0.1 --train.epochs=1
"""

from __future__ import annotations

import time

from gptforge.config.schema import Config
from gptforge.config.validate import check_run_paths
from gptforge.data.chat_template import CHAT_TEMPLATE_FILE, CHATML_JINJA, encode_chat, stop_ids
from gptforge.data.loader import FullPassLoader, TokenLoader, read_meta
from gptforge.data.preference import PairLoader, read_pairs
from gptforge.data.prepare import ensure_prepared, ensure_val_prepared
from gptforge.data.records import split_val
from gptforge.data.sft import SFTLoader, read_conversations, tokenize_conversations
from gptforge.data.tokenizer import build_tokenizer, load_tokenizer
from gptforge.errors import UserError
from gptforge.hf.init_from import init_tokenizer
from gptforge.lora import adapters_disabled
from gptforge.objectives.dpo import DPOObjective, precompute_reference
from gptforge.parallel.mesh import barrier
from gptforge.parallel.layout import resolve_strategy, settle_layout
from gptforge.parallel.parallelize import parallelize
from gptforge.model.engine import Engine, Params
from gptforge.train.run import Loaders, Recipe, StageData, default_length, init_model, report, run
from gptforge.train.lora import BaseOnly
from gptforge.train.trainer import autocast


# ---- pretrain -----------------------------------------------------------------------------------------
class Pretrain(Recipe):
    name = "pretrain"
    defaults = {"train": {"out_dir": "runs/shakespeare", "micro_batch": 32, "lr": 2e-3, "warmup_steps": 30,
                          "eval_every": 200, "log_every": 20},
                "model": {"preset": "micro"}, "preset_recipe": True}  # + config.presets.PRESET_RECIPES
    length = {"max_steps": 600}  # the zero-argument run: minutes on a laptop CPU

    uses_cache = True

    def setup(self) -> StageData:
        cfg, env = self.cfg, self.env
        parts = [s for s in (cfg.data.path or "").split(",") if s]
        path = None if not parts else parts if len(parts) > 1 else parts[0]
        # data.val_path: the whole training data trains (raw inputs are prepared without a validation split)
        kw = dict(val_fraction=0.0 if cfg.data.val_path else cfg.data.val_fraction, field=cfg.data.field)
        tokenizer = self._tokenizer()

        def prepare(progress: bool) -> tuple:
            data_dir = ensure_prepared(path, tokenizer, progress=progress, **kw)
            val_dir = None
            if cfg.data.val_path:  # tokenized like the training data, cached on each machine's own disk
                val_dir = ensure_val_prepared(cfg.data.val_path, data_dir, field=cfg.data.field, progress=progress)
            return data_dir, val_dir

        if env.is_main:  # prepare once; the others wait and then find it in the cache (or prepare their own)
            data_dir, val_dir = prepare(True)
        barrier(env)
        if not env.is_main:
            data_dir, val_dir = prepare(False)
        tok = load_tokenizer(data_dir)
        if cfg.train.init_from and tok.hf.to_str() != tokenizer.hf.to_str():  # data.path: a prepared dataset dir
            raise UserError(f"data.path {data_dir} was prepared with another tokenizer ({tok.kind}, {tok.vocab_size} "
                            f"tokens) than the model of --init-from {cfg.train.init_from} reads "
                            f"({tokenizer.kind}, {tokenizer.vocab_size}); give the raw text, tokenized then with "
                            "the model's tokenizer")
        return StageData(tok, self._label(data_dir, val_dir), data_dir=data_dir, val_dir=val_dir)

    def _tokenizer(self):
        """data.tokenizer; with --init-from, the tokenizer of the model started from (a data.tokenizer given as
        well must be that one: the model reads the ids it was trained with)."""
        cfg = self.cfg
        if not cfg.train.init_from:
            return cfg.data.tokenizer
        own, spec = init_tokenizer(cfg.train.init_from), cfg.data.tokenizer
        if "data.tokenizer" in getattr(cfg, "explicit", set()) or spec != "char":
            built = spec == "char" or spec.startswith("bpe:")  # made from the data: a new vocabulary
            if built or build_tokenizer(spec).hf.to_str() != own.hf.to_str():
                what = "builds a new tokenizer from the data, not" if built else "is not"
                raise UserError(f"data.tokenizer={spec} {what} the tokenizer of the model of --init-from "
                                f"{cfg.train.init_from} ({own.kind}, {own.vocab_size} tokens); leave data.tokenizer "
                                "out to tokenize the data with the model's own")
        return own

    def _label(self, data_dir, val_dir) -> str:
        if val_dir is None:
            return str(data_dir)
        meta, own = read_meta(val_dir), read_meta(data_dir)["splits"].get("val", 0)
        unknown = meta.get("unknown", 0)
        return (f"{data_dir} | validation: {self.cfg.data.val_path} ({meta['splits']['val']:,} tokens, all "
                f"scored at every evaluation; all of the training data trains"
                + (f", its own validation split of {own:,} tokens unused" if own else ", no split taken")
                + (f"; characters not in the char vocabulary, counted as <|unk|>: {unknown:,}" if unknown else "")
                + ")")

    def loaders(self, data: StageData, mcfg) -> Loaders:
        t, env = self.cfg.train, self.env
        common = dict(micro_batch=t.micro_batch, block_size=mcfg.block_size, dp_rank=env.dp_rank,
                      dp_size=env.dp_size, seed=t.seed)
        train = TokenLoader(data.data_dir, "train", accum_steps=t.grad_accum, **common)
        if data.val_dir is not None:
            return Loaders(train, FullPassLoader(data.val_dir, "val", name=f"data.val_path {self.cfg.data.val_path}",
                                                 **common))
        if read_meta(data.data_dir)["splits"].get("val", 0) == 0:
            self.say(f"note: {data.data_dir} has no validation split (data.val_fraction 0): no val loss; "
                     "give data.val_path to validate on a text of your choice")
            return Loaders(train, None)
        return Loaders(train, TokenLoader(data.data_dir, "val", shuffle=False, **common))

    def sampler(self, tok, loaders: Loaders):
        t = self.cfg.train

        def sample(model) -> str:
            prompt = t.sample_prompt or "\n"
            params = Params(t.sample_tokens, 0.8, 50, None, t.seed, frozenset({tok.eos_id}))
            return prompt + Engine(model, tok).run(tok.encode(prompt), params).text

        return sample


# ---- chat stages ----------------------------------------------------------------------------------------
class ChatRecipe(Recipe):
    """SFT and DPO: chat-formatted data, the chat template saved with each checkpoint."""

    chat = True  # train.eval_tasks go through the chat template
    needs_data_path = True

    def chat_tokenizer(self, texts=None):
        """The tokenizer of --init-from, else data.tokenizer (char / bpe:N are built from the chat text)."""
        if self.cfg.train.init_from:
            return init_tokenizer(self.cfg.train.init_from)
        return build_tokenizer(self.cfg.data.tokenizer, texts)

    def files(self, tok) -> dict:
        return {CHAT_TEMPLATE_FILE: CHATML_JINJA}

    def sampler(self, tok, loaders: Loaders):
        """At the end of a run: the model's reply to one user message (train.sample_prompt or one from the data)."""
        t = self.cfg.train
        text = t.sample_prompt if t.sample_prompt.strip() else loaders.sample_prompt
        if not text:
            return None

        def sample(model) -> str:
            ids, _ = encode_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True)
            if len(ids) >= model.cfg.block_size - 1:
                return f"user: {text[:200]}\n(the prompt does not fit the context; no sample)"
            stops = frozenset(stop_ids(tok))
            r = Engine(model, tok).run(ids, Params(t.sample_tokens, 0.7, 50, None, t.seed, stops))
            out = [i for i in r.ids if i not in stops]
            return f"user: {text[:200]}\nassistant: {tok.decode(out)}"

        return sample


def _conversation_texts(convs):
    yield "system\nuser\nassistant\n"
    for msgs in convs:
        for m in msgs:
            yield m["content"]


class SFT(ChatRecipe):
    name = "sft"
    lora = True
    defaults = {"train": {"out_dir": "runs/sft", "micro_batch": 16, "lr": 3e-4, "warmup_steps": 20,
                          "eval_every": 200, "log_every": 10, "sample_tokens": 120}}
    length = {"epochs": 1.0}

    def setup(self) -> StageData:
        convs, stats = read_conversations(self.cfg.data.path, self.cfg.data.skip_bad_lines)
        return StageData(self.chat_tokenizer(_conversation_texts(convs)), str(self.cfg.data.path), records=convs,
                         stats=stats)

    def loaders(self, data: StageData, mcfg) -> Loaders:
        cfg, env, t, tok = self.cfg, self.env, self.cfg.train, data.tokenizer
        if cfg.data.val_path:  # a fixed validation set: every conversation of data.path trains
            train_convs, (val_convs, _) = data.records, read_conversations(cfg.data.val_path, cfg.data.skip_bad_lines)
        else:
            train_convs, val_convs = split_val(data.records, cfg.data.val_fraction, seed=0)
        train_ex, stats = tokenize_conversations(train_convs, tok, mcfg.block_size, cfg.data.overflow, data.stats)
        val_ex, _ = tokenize_conversations(val_convs, tok, mcfg.block_size, cfg.data.overflow)
        common = dict(block_size=mcfg.block_size, micro_batch=t.micro_batch, pad_id=tok.pad_id,
                      packing=cfg.sft.packing, dp_rank=env.dp_rank, dp_size=env.dp_size, seed=t.seed)
        train_loader = SFTLoader(train_ex, accum_steps=t.grad_accum, **common)
        val_loader = SFTLoader(val_ex, shuffle=False, **common) if len(val_ex) >= env.dp_size else None
        layout = (f"packed into {train_loader.n} rows of {mcfg.block_size} tokens ({train_loader.fill:.0%} filled)"
                  if cfg.sft.packing else f"{train_loader.n} padded sequences (length-bucketed)")
        self.say(f"sft data: {stats.summary()} | {layout} | "
                 f"{int(train_loader.unit_labels.sum()):,} label tokens | {len(val_ex)} validation examples"
                 + (f" (data.val_path {cfg.data.val_path})" if cfg.data.val_path else ""))
        prompt = next((m["content"] for m in (val_convs or train_convs)[0] if m["role"] == "user"), None)
        return Loaders(train_loader, val_loader, sample_prompt=prompt)


class DPO(ChatRecipe):
    name = "dpo"
    lora = True  # the reference is then the base with the adapters off (gptforge.train.lora.BaseOnly)
    defaults = {"train": {"out_dir": "runs/dpo", "micro_batch": 8, "lr": 2e-5, "warmup_steps": 10,
                          "eval_every": 200, "log_every": 10, "sample_tokens": 120, "weight_decay": 0.0}}
    length = {"epochs": 1.0}
    needs_init_from = "dpo starts from the SFT model, which is also the frozen reference"

    def setup(self) -> StageData:
        return StageData(self.chat_tokenizer(), str(self.cfg.data.path))

    def loaders(self, data: StageData, mcfg) -> Loaders:
        cfg, env, t, tok = self.cfg, self.env, self.cfg.train, data.tokenizer
        pairs, stats = read_pairs(cfg.data.path, tok, mcfg.block_size, cfg.data.overflow, cfg.data.skip_bad_lines)
        if cfg.data.val_path:  # a fixed validation set: every pair of data.path trains
            train_pairs, (val_pairs, _) = pairs, read_pairs(cfg.data.val_path, tok, mcfg.block_size, cfg.data.overflow,
                                                            cfg.data.skip_bad_lines)
        else:
            train_pairs, val_pairs = split_val(pairs, cfg.data.val_fraction, seed=0)
        common = dict(micro_batch=t.micro_batch, pad_id=tok.pad_id, dp_rank=env.dp_rank, dp_size=env.dp_size,
                      seed=t.seed)
        train_loader = PairLoader(train_pairs, accum_steps=t.grad_accum, **common)
        val_loader = PairLoader(val_pairs, shuffle=False, **common) if len(val_pairs) >= env.dp_size else None
        self.say(f"dpo data: {stats.summary('pairs')} | {len(train_pairs)} training, {len(val_pairs)} validation "
                 f"pairs{' (data.val_path)' if cfg.data.val_path else ''} | beta {cfg.dpo.beta}, "
                 f"label smoothing {cfg.dpo.label_smoothing}, reference "
                 + ("precomputed" if cfg.dpo.precompute_ref else "live (the base: adapters off)" if cfg.lora.rank
                    else "live (a second model in memory)"))
        return Loaders(train_loader, val_loader, examples=len(pairs))

    def objective(self, model, data: StageData, loaders: Loaders):
        cfg, env = self.cfg, self.env
        ref, impl = None, self.loss_impl(model)
        if cfg.dpo.precompute_ref:
            t0 = time.perf_counter()
            ac = lambda: autocast(env.device, cfg.train.precision)  # noqa: E731
            with adapters_disabled(model):  # LoRA: the reference is the base alone
                for loader in (loaders.train, loaders.val):
                    if loader is not None:
                        loader.set_reference(precompute_reference(model, loader, env, cfg.train.micro_batch, ac,
                                                                    loss_impl=impl))
            self.say(f"reference log-probs of {loaders.examples} pairs precomputed in {time.perf_counter() - t0:.1f} s")
        else:
            ref = BaseOnly(model) if cfg.lora.rank else self.frozen_reference(data.tokenizer.vocab_size)
        return DPOObjective(cfg.dpo.beta, cfg.dpo.label_smoothing, ref, loss_impl=impl)

    def frozen_reference(self, vocab_size: int):
        """A second, frozen copy of the starting model, sharded like the policy (FSDP2 / TP), never DDP-wrapped."""
        cfg, env = self.cfg, self.env
        ref, _ = init_model(cfg, env, vocab_size)
        ref.requires_grad_(False)
        settle_layout(env, cfg, ref.cfg)
        if resolve_strategy(env, cfg.parallel) == "fsdp":
            ref = parallelize(ref, env, cfg)
        elif env.tp_size > 1:
            from gptforge.parallel.tp import apply_tp  # only when used (see parallelize.parallelize)
            apply_tp(ref, env.mesh["tp"], sequence_parallel=cfg.parallel.sequence_parallel)
        return ref.eval()


# ---- commands -------------------------------------------------------------------------------------------
def _stage(recipe: type[Recipe]):
    def command(cfg: Config) -> int:
        default_length(cfg, **recipe.length)
        check_run_paths(cfg, needs_cache=recipe.uses_cache)
        if recipe.needs_data_path and cfg.data.path is None:
            raise UserError("give the data: --data.path=FILE_OR_DIR (JSONL; see gptforge.data.sft for the formats)")
        if recipe.needs_init_from and not cfg.train.init_from:
            raise UserError(f"{recipe.needs_init_from}: pass --init-from=RUN_OR_CHECKPOINT_DIR")
        result = run(cfg, recipe)
        report(result, cfg, recipe.name)
        return result.get("status", 0)  # 128 + signal number after a stop signal (gptforge.train.preempt)

    command.defaults = recipe.defaults
    command.__name__ = command.__qualname__ = recipe.name
    command.__doc__ = f"gptforge {recipe.name}: train with the {recipe.name} recipe."
    return command


pretrain = _stage(Pretrain)
sft = _stage(SFT)
dpo = _stage(DPO)
