"""`gptforge grpo`: reinforcement learning with verifiable rewards (GRPO, gptforge.objectives.grpo) as a recipe
on the one Trainer: the same checkpoints, exact resume, logging and launcher as the other stages.

    gptforge grpo --init-from runs/sft --data.path prompts.jsonl --grpo.group_size=8 --grpo.reward=exact

Each optimizer step: every data-parallel rank takes its own micro_batch prompts (train.micro_batch prompts x
grad_accum x ranks per step), samples grpo.group_size completions of each with the serving engine (one
seeded generator per completion: the seed depends on train.seed, the epoch and the prompt only, so the
same completions on one rank or several and after a resume), scores them and takes the GRPO loss; DDP
averages the gradients. With data.val_path (prompt/answer records as well) the end of the run reports the
greedy held-out accuracy (the reward >= 1) of the trained model, as `gptforge eval --tasks VAL` does (a generative
task, objectives.scoring.score_generation); train.eval_tasks with such files gives its curve during the run.
The log line's tok/s counts the prompt + completion tokens each step ran (and tok/step), without MFU.
"""

from __future__ import annotations

from gptforge.data.chat_template import encode_chat, stop_ids
from gptforge.data.prompts import PromptLoader, read_prompts
from gptforge.data.tasks import GenExample, Task
from gptforge.errors import UserError
from gptforge.objectives.grpo import GRPOObjective
from gptforge.objectives.rewards import build_reward
from gptforge.objectives.scoring import score_generation
from gptforge.parallel.layout import resolve_strategy
from gptforge.train.recipes import DPO, ChatRecipe, _stage
from gptforge.train.run import Loaders, StageData, grpo_check


def encode_prompts(tok, records: list[tuple[str, str]], block_size: int) -> tuple[list[list[int]], list[str], int]:
    """The user turns through the chat template (generation prompt added); prompts that leave no room for a
    completion in the context are dropped. -> (prompt ids, answers, dropped)."""
    prompts, answers = [], []
    for prompt, answer in records:
        ids, _ = encode_chat(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        if len(ids) < block_size:
            prompts.append(ids)
            answers.append(answer)
    return prompts, answers, len(records) - len(prompts)


class GRPO(ChatRecipe):
    name = "grpo"
    defaults = {"train": {"out_dir": "runs/grpo", "micro_batch": 4, "lr": 1e-5, "warmup_steps": 0,
                          "eval_every": 0, "log_every": 1, "sample_tokens": 64, "weight_decay": 0.0},
                "parallel": {"strategy": "ddp"}}
    length = {"epochs": 1.0}
    needs_init_from = "grpo starts from the SFT model, which is also the reference of its KL term"

    def setup(self) -> StageData:
        records, stats = read_prompts(self.cfg.data.path, self.cfg.data.skip_bad_lines)
        return StageData(self.chat_tokenizer(), str(self.cfg.data.path), records=records, stats=stats)

    def loaders(self, data: StageData, mcfg) -> Loaders:
        cfg, env, t = self.cfg, self.env, self.cfg.train
        prompts, answers, dropped = encode_prompts(data.tokenizer, data.records, mcfg.block_size)
        if not prompts:
            raise UserError(f"every prompt of {cfg.data.path} fills the model's context of {mcfg.block_size} tokens; "
                            "shorten the prompts")
        loader = PromptLoader(len(prompts), t.micro_batch, env.dp_rank, env.dp_size, t.seed, accum_steps=t.grad_accum)
        loader.prompts, loader.answers = prompts, answers
        g = cfg.grpo
        self.say(f"grpo data: {len(prompts)} prompts" + (f" ({dropped} longer than the context dropped)" if dropped
                                                         else "")
                 + f" | {g.group_size} completions each, up to {g.max_new_tokens} tokens, temperature {g.temperature}"
                 f" | reward {g.reward} | kl_coef {g.kl_coef}, clip_eps {g.clip_eps}")
        return Loaders(loader, None, examples=len(prompts), sample_prompt=data.records[0][0])

    frozen_reference = DPO.frozen_reference  # the starting model, frozen (never DDP-wrapped)

    def objective(self, model, data: StageData, loaders: Loaders):
        cfg, env, g = self.cfg, self.env, self.cfg.grpo
        if resolve_strategy(env, cfg.parallel) == "fsdp" or env.tp_size > 1:
            raise UserError("grpo samples with the whole model on every rank: use --parallel.strategy=ddp "
                            "(FSDP and tensor parallel are not supported by grpo)")
        impl = self.loss_impl(model)
        impl = "chunked" if impl == "liger" else impl  # per-token log-probs (as DPO's)
        reward = build_reward(g.reward, g.tolerance, g.format_regex)
        ref = self.frozen_reference(data.tokenizer.vocab_size) if g.kl_coef > 0 else None
        tr = loaders.train
        return GRPOObjective(data.tokenizer, tr.prompts, tr.answers, reward, g.reward, ref, g.group_size,
                             g.max_new_tokens, g.temperature, g.kl_coef, g.clip_eps,
                             frozenset(stop_ids(data.tokenizer)), loss_impl=impl)

    def sampler(self, tok, loaders: Loaders):
        """At the end: the held-out greedy accuracy on data.val_path (when given), then one reply."""
        reply = super().sampler(tok, loaders)
        cfg = self.cfg
        if not cfg.data.val_path:
            return reply
        records, _ = read_prompts(cfg.data.val_path, cfg.data.skip_bad_lines)
        task = Task("val", str(cfg.data.val_path), tuple(GenExample(p, a) for p, a in records))

        def sample(model) -> str:  # what `gptforge eval --tasks VAL --check ...` says of the checkpoint
            r = score_generation(model, tok, task, grpo_check(cfg.grpo), chat=True, batch_size=cfg.train.micro_batch)
            return (f"held-out greedy accuracy (data.val_path, reward >= 1): {r['metrics']['acc'][0]:.4f} of "
                    f"{r['examples']} prompts\n" + (reply(model) if reply else ""))

        return sample


grpo = _stage(GRPO)
grpo.__doc__ = "gptforge grpo: reinforcement learning with verifiable rewards (GRPO) from an SFT checkpoint."
