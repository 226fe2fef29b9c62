"""The one training Config. Every field is settable from a TOML/YAML/JSON file ([section] key = value)
or the command line (--section.key=value). Its model section is the model's own GPTConfig;
--model.preset=NAME applies a named size before the other model keys (gptforge.config.presets).
Each section checks its own values (check(): the ranges and the rules between its keys, config.rules;
the model's shape: GPTConfig.validate()); config.validate.check_config runs them all before anything is built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Annotated, Literal, Optional

import tyro

from gptforge.config.presets import preset_model
from gptforge.config.rules import at_least, fail, finite, in_range, positive
from gptforge.data.prepare import check_val_fraction
from gptforge.errors import UserError
from gptforge.hardware import check_device_name
from gptforge.model.gpt import GPTConfig


def _alias(*names: str):
    return tyro.conf.arg(aliases=names)


@dataclass
class DataSection:
    path: Optional[str] = None
    """prepared dataset dir, or text/JSONL files, folders, globs (comma separated); default: Shakespeare"""
    tokenizer: str = "char"
    """for raw inputs: char, gpt2, bpe:N, or a tokenizer.json / dir; with --init-from the model's own tokenizer
    (left out), and any other is refused"""
    field: str = "text"
    """JSONL field holding the text"""
    val_fraction: float = 0.01
    """share of the training data held out for validation (0: none); not used with data.val_path"""
    val_path: Optional[str] = None
    """validate on this text instead of a split of the training data: text/JSONL files, folders, globs, or a
    prepared dataset dir (its val split); tokenized with the training data's tokenizer (a char vocab's unknown
    characters: <|unk|>) and scored whole at every evaluation (train.eval_batches not used), so two runs are
    judged on the same text; all of the training data then trains. SFT/DPO: a JSONL of conversations / pairs"""
    overflow: Literal["truncate", "drop"] = "truncate"
    """SFT conversations and DPO pairs longer than the context: truncate or drop them (counted); was sft.overflow"""
    skip_bad_lines: bool = False
    """SFT/DPO: skip malformed JSONL lines (counted, the first one named) instead of stopping; was sft.skip_bad_lines"""

    def check(self) -> None:
        check_val_fraction(self.val_fraction, "config key 'data.val_fraction'")  # the rule of prepare's too
        if self.val_path is not None and not self.val_path.strip():
            fail("data.val_path", "a file, folder, glob or prepared dataset", self.val_path, "or leave it out")


@dataclass
class TrainSection:
    out_dir: Annotated[str, _alias("--out")] = "runs/default"
    max_steps: Optional[int] = None
    """training length in optimizer steps (or give max_tokens or epochs)"""
    max_tokens: Optional[int] = None
    """training length in tokens (block_size windows per step); grpo: a budget of the tokens it trains on (prompts +
    completions), the run stops at the step that reaches it (its LR schedule spans the steps at full length)"""
    epochs: Optional[float] = None
    stop_after: Optional[int] = None
    """end this invocation after this step (the LR schedule still spans the full length); resume later"""
    micro_batch: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2
    """wsd: fraction of the run spent decaying"""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw: AdamW for every parameter (train.lr); muon: Muon (momentum, then Newton-Schulz orthogonalisation of
    the whole matrix, also when FSDP/TP shard it) for the 2-D weight matrices of the blocks, AdamW (beta1, beta2,
    weight_decay) for the embeddings (embed_lr), the head (head_lr) and norms, biases, gains (scalar_lr). Every
    group's lr follows train.schedule (warmup, decay, min_lr_ratio) scaled to its own peak"""
    muon_lr: float = 0.02
    """optimizer=muon: peak lr of the block matrices, scaled per matrix as muon_adjust_lr says"""
    muon_momentum: float = 0.95
    """optimizer=muon: Muon's (Nesterov) momentum"""
    muon_weight_decay: float = 0.0
    """optimizer=muon: decoupled weight decay of the block matrices (each step W *= 1 - lr x this)"""
    muon_ns_steps: int = 5
    """optimizer=muon: Newton-Schulz iterations per step"""
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "original"
    """optimizer=muon: the per-matrix lr scale: original (Keller Jordan's) sqrt(max(1, rows/cols)), lr ~0.02;
    match_rms_adamw (Moonshot's) 0.2 sqrt(max(rows, cols)): AdamW's lr and weight decay carry over"""
    embed_lr: Optional[float] = None
    """optimizer=muon: AdamW's peak lr for tok_emb, pos_emb (and a tied head); None: train.lr"""
    head_lr: Optional[float] = None
    """optimizer=muon: AdamW's peak lr for an untied lm_head; None: train.lr"""
    scalar_lr: Optional[float] = None
    """optimizer=muon: AdamW's peak lr for norm gains, biases and other non-matrix parameters; None: train.lr"""
    grad_clip: float = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on a GPU that has it (else fp16); on a CPU with bf16 instructions, bf16 only where a ~1-2 s
    start-up measurement of this model's shapes finds it faster than fp32 (cached per CPU and shape in the cache
    dir's cpu_precision.json, the same choice on every rank); fp32 elsewhere"""
    compile: Annotated[bool, _alias("--compile")] = False
    tf32: bool = True
    """GPU: fp32 matmuls on TF32 tensor cores (no effect on a CPU)"""
    activation_checkpointing: bool = False
    loss_impl: Literal["auto", "plain", "chunked", "liger"] = "auto"
    """the LM/DPO loss: plain (full logits, the reference), chunked (torch's linear_cross_entropy: one chunk of
    logits at a time), liger (fused kernel, CUDA/ROCm + liger-kernel); auto: liger if there, else chunked for a
    vocab >= 4 x d_model, else plain (gptforge.objectives.head)"""
    attention: Literal["auto", "sdpa", "flex"] = "auto"
    """packed SFT's document masking: sdpa (dense mask from doc ids) or flex (FlexAttention BlockMask);
    auto: flex on a GPU, else sdpa"""
    device: str = "auto"
    prefetch: int = 2
    """training batches prepared ahead in a background thread (pinned, copied non-blocking on CUDA); 0: none"""
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20
    eval_tasks: str = ""
    """comma list of local task files (gptforge eval's formats) scored every eval_every steps, data-parallel over
    ranks, beside val/loss (chat stages: through the chat template): multiple-choice -> eval/<task>/acc and
    acc_norm; generative ({"prompt", "answer"} lines) -> eval/<task>/acc and reward of the greedy completions,
    judged by grpo.reward (grpo.tolerance, grpo.format_regex; up to grpo.max_new_tokens tokens)"""
    eval_tasks_limit: int = 0
    """examples per task during training (0: all)"""
    save_every: int = 0
    """0: only at the end"""
    keep_last: int = 2
    grace_s: float = 30.0
    """SIGTERM/SIGINT/SIGUSR1: seconds to finish the step, save a checkpoint and exit (exit status 128+signal)"""
    resume: Annotated[str, _alias("--resume")] = "none"
    """none | auto (latest checkpoint in out_dir) | a checkpoint dir"""
    async_save: bool = False
    """write checkpoints in the background (DCP async_save): the loop waits only for a copy of the state"""
    max_bad_steps: int = 5
    """non-finite loss/gradient steps are skipped (no update); after this many in a row, train.on_bad_steps"""
    on_bad_steps: Literal["rollback", "stop"] = "rollback"
    """rollback: reload the last checkpoint (model, optimizer, data position) and go on; stop: exit 2"""
    spike_factor: float = 3.0
    """warn about (and count) a loss above this times the running median of recent losses; 0: off"""
    init_from: Annotated[Optional[str], _alias("--init-from")] = None
    """weights to start from: a gptforge checkpoint or a Hugging Face model folder"""
    sample_tokens: int = 300
    sample_prompt: str = "\n"
    tensorboard: bool = True
    wandb: bool = False
    progress: bool = True
    auto: Annotated[bool, _alias("--auto")] = False
    """pick micro_batch / grad_accum / precision / checkpointing for this hardware"""

    def check(self) -> None:
        positive("train.lr", self.lr, "e.g. --train.lr=3e-4")
        in_range("train.beta1", self.beta1, 0, 1, "e.g. 0.9")
        in_range("train.beta2", self.beta2, 0, 1, "e.g. 0.95")
        in_range("train.min_lr_ratio", self.min_lr_ratio, 0, 1, "0.1 decays to a tenth of train.lr", high_open=False)
        in_range("train.decay_fraction", self.decay_fraction, 0, 1, "e.g. 0.2", high_open=False)
        positive("train.muon_lr", self.muon_lr, "e.g. 0.02 (muon_adjust_lr=original)")
        in_range("train.muon_momentum", self.muon_momentum, 0, 1, "e.g. 0.95")
        finite("train.muon_weight_decay", self.muon_weight_decay)
        at_least("train.muon_weight_decay", self.muon_weight_decay, 0, "0 turns it off")
        in_range("train.muon_ns_steps", self.muon_ns_steps, 1, 100, "e.g. 5")
        for key in ("embed_lr", "head_lr", "scalar_lr"):
            if getattr(self, key) is not None:
                positive(f"train.{key}", getattr(self, key), "or leave it unset for train.lr")
        for key in ("weight_decay", "grad_clip"):
            finite(f"train.{key}", getattr(self, key))
            at_least(f"train.{key}", getattr(self, key), 0, "0 turns it off")
        for key, low in (("micro_batch", 1), ("grad_accum", 1), ("log_every", 1), ("eval_every", 0),
                         ("eval_batches", 1), ("save_every", 0), ("keep_last", 0), ("warmup_steps", 0),
                         ("sample_tokens", 0), ("prefetch", 0)):
            fix = "0 means only at the end" if low == 0 and key.endswith("_every") else ""
            at_least(f"train.{key}", getattr(self, key), low, fix)
        self._check_length()
        check_device_name(self.device, "config key 'train.device'")
        positive("train.grace_s", self.grace_s, "the seconds a stop signal leaves to save a checkpoint, "
                 "e.g. --train.grace_s=30")
        at_least("train.max_bad_steps", self.max_bad_steps, 1,
                 "the number of non-finite steps in a row before train.on_bad_steps applies")
        finite("train.spike_factor", self.spike_factor)
        at_least("train.spike_factor", self.spike_factor, 0, "0 turns spike warnings off")

    def _check_length(self) -> None:
        """One training length at most (none: the stage's default length); each one positive."""
        for key in ("max_steps", "max_tokens", "stop_after"):
            if getattr(self, key) is not None:
                at_least(f"train.{key}", getattr(self, key), 1)
        if self.epochs is not None:
            positive("train.epochs", self.epochs)
        given = [k for k in ("max_steps", "max_tokens", "epochs") if getattr(self, k) is not None]
        if len(given) > 1:
            raise UserError(f"give only one training length, not {' and '.join('train.' + k for k in given)}")


@dataclass
class ParallelSection:
    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """auto: none on one process; on one node fsdp if dp_shard > 1, else ddp; across nodes (dp sizes left at their
    defaults) ddp when the model fits replicated, else HSDP (gptforge.parallel.layout)"""
    dp_replicate: int = 1
    dp_shard: int = -1
    """-1: the rest of the world size"""
    tp: int = 1
    sequence_parallel: bool = False
    mixed_precision: bool = True
    """FSDP2: bf16 params/reductions when train.precision is bf16"""
    timeout_s: int = 60
    """collective timeout: a dead rank ends the job after this long"""
    grad_compression: Literal["none", "bf16", "powersgd"] = "none"
    """DDP only: send gradients as bf16 (half the bytes) or PowerSGD low-rank factors (error feedback)"""
    powersgd_rank: int = 4
    """PowerSGD: rank r of the approximation (an m x n gradient sends r*(m+n) numbers)"""
    powersgd_start: int = 10
    """PowerSGD: optimizer steps of exact all-reduce before compressing (>= 2)"""
    sync_every: int = 1
    """1: gradients all-reduced every step (DDP). H > 1: local SGD / DiLoCo: each replica takes H optimizer steps
    on its own data, then the replicas average their parameter change (H times less communication)"""
    outer_lr: float = 1.0
    """sync_every > 1: step size of the outer update (1.0 with no momentum: plain averaging; DiLoCo: 0.7)"""
    outer_momentum: float = 0.0
    """sync_every > 1: Nesterov momentum of the outer update (DiLoCo: 0.9)"""

    def check(self) -> None:
        for key, low in (("dp_replicate", 1), ("tp", 1), ("timeout_s", 1), ("powersgd_rank", 1),
                         ("powersgd_start", 2), ("sync_every", 1)):
            at_least(f"parallel.{key}", getattr(self, key), low)
        if self.dp_shard != -1 and self.dp_shard < 1:
            fail("parallel.dp_shard", ">= 1 or -1 (the rest of the world size)", self.dp_shard)
        positive("parallel.outer_lr", self.outer_lr)
        in_range("parallel.outer_momentum", self.outer_momentum, 0, 1)


@dataclass
class SFTSection:
    packing: bool = True
    """pack short conversations into one sequence with document masking"""

    def check(self) -> None:
        """Nothing to check: packing is a bool (the parser has checked it). SFT's data keys shared with DPO
        are in the data section (data.overflow, data.skip_bad_lines)."""


@dataclass
class DPOSection:
    beta: float = 0.1
    """strength of the pull towards the reference model (higher: stay closer)"""
    label_smoothing: float = 0.0
    """conservative DPO: assumed fraction of flipped preference labels, in [0, 0.5)"""
    precompute_ref: bool = True
    """score the data with the reference once before training and free it (else keep a frozen copy)"""

    def check(self) -> None:
        positive("dpo.beta", self.beta, "e.g. 0.1")
        in_range("dpo.label_smoothing", self.label_smoothing, 0, 0.5)


@dataclass
class GRPOSection:
    group_size: int = 8
    """completions sampled per prompt (G); advantages are normalised within each group"""
    max_new_tokens: int = 64
    """longest completion in tokens (also cut at the model's context)"""
    temperature: float = 1.0
    """sampling temperature T of the rollouts; the loss's log-probs (policy, sampler, reference) are all of
    softmax(logits / T), as TRL's"""
    kl_coef: float = 0.04
    """weight of the per-token KL (k3 estimator) to the reference, the starting model; 0: no reference in memory"""
    clip_eps: float = 0.2
    """PPO clip range of the probability ratio: [1 - clip_eps, 1 + clip_eps]"""
    reward: str = "exact"
    """exact (final answer after '####', else the last number), number (within grpo.tolerance), regex
    (grpo.format_regex matches), or MODULE:FUNCTION, your fn(completion, answer) -> float; comma list: sum"""
    tolerance: float = 1e-6
    """absolute tolerance of the number reward"""
    format_regex: str = ""
    """the pattern of the regex reward (Python re.search over the completion)"""

    def check(self) -> None:
        at_least("grpo.group_size", self.group_size, 2, "advantages compare completions of one prompt, e.g. 8")
        at_least("grpo.max_new_tokens", self.max_new_tokens, 1)
        positive("grpo.temperature", self.temperature, "e.g. 1.0 (greedy completions of a group are all the same)")
        in_range("grpo.kl_coef", self.kl_coef, 0, float("inf"), "e.g. 0.04")
        positive("grpo.clip_eps", self.clip_eps, "e.g. 0.2")
        in_range("grpo.tolerance", self.tolerance, 0, float("inf"))
        if not self.reward.strip():
            fail("grpo.reward", "a checker name (exact, number, regex) or MODULE:FUNCTION", self.reward)


@dataclass
class DistillSection:
    """distill: a student (model.* or --init-from) trained on a teacher's next-token distribution (same tokenizer)."""

    teacher: Annotated[Optional[str], _alias("--teacher")] = None
    """the teacher: a gptforge run/checkpoint dir or a Hugging Face folder (frozen, inference mode; bf16 on a GPU)"""
    alpha: float = 0.5
    """loss = alpha * tau^2 * KL(teacher || student) + (1 - alpha) * cross-entropy on the data's tokens; 1: KL alone"""
    temperature: float = 1.0
    """tau: both distributions softened as softmax(logits / tau) in the KL term (the CE stays at 1)"""
    data: Literal["auto", "text", "chat"] = "auto"
    """text: data.path read as pretrain reads it; chat: JSONL conversations as sft reads them (loss on assistant
    tokens); auto: chat when data.path is a JSONL file whose first record is a conversation, else text"""

    def check(self) -> None:
        in_range("distill.alpha", self.alpha, 0, 1, "1: the KL alone, 0: the cross-entropy alone", high_open=False)
        positive("distill.temperature", self.temperature, "e.g. 1.0 or 2.0")
        if self.teacher is not None and not self.teacher.strip():
            fail("distill.teacher", "a run/checkpoint dir or a Hugging Face folder", self.teacher)


# lora.targets: a group name stands for its projections (gptforge.model.gpt's module names)
LORA_GROUPS = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
LORA_NAMES = LORA_GROUPS["attn"] + LORA_GROUPS["mlp"]


def lora_target_names(spec: str) -> list[str]:
    """lora.targets -> the projection names it stands for; UserError naming an unknown one."""
    out: list[str] = []
    for part in (s.strip() for s in str(spec).split(",")):
        if part not in LORA_GROUPS and part not in LORA_NAMES:
            fail("lora.targets", f"a comma list of attn, mlp or {', '.join(LORA_NAMES)}", spec, "e.g. attn,mlp")
        out += [n for n in LORA_GROUPS.get(part, (part,)) if n not in out]
    return out


@dataclass
class LoRASection:
    """sft and dpo: train low-rank adapters (LoRA, through peft) on the frozen --init-from model instead of every
    weight; checkpoints hold only the adapters and name the base (path, sha256); chat/serve/eval/export-hf merge them."""

    rank: int = 0
    """0: off (every weight trains); r > 0: adapters of rank r (e.g. 8) on lora.targets"""
    alpha: float = 16.0
    """the adapters' output is scaled by alpha / rank"""
    dropout: float = 0.0
    """dropout on the adapters' input (e.g. 0.05)"""
    targets: str = "attn,mlp"
    """comma list: attn (q, k, v, o_proj), mlp (gate, up, down_proj) or single projection names"""
    train_tokens: str = "chat"
    """embedding (and untied head) rows trained with the adapters, so that a base that never saw the chat
    template learns its tokens: chat (<|im_start|>, <|im_end|>), none, or a comma list of tokens"""

    def check(self) -> None:
        if type(self.rank) is not int or self.rank < 0:
            fail("lora.rank", "an integer >= 0", self.rank, "0 turns LoRA off, e.g. 8")
        positive("lora.alpha", self.alpha, "e.g. 16")
        in_range("lora.dropout", self.dropout, 0, 1, "e.g. 0.05")
        lora_target_names(self.targets)
        if not isinstance(self.train_tokens, str) or not all(s.strip() for s in self.train_tokens.split(",")):
            fail("lora.train_tokens", "chat, none or a comma list of tokens", self.train_tokens,
                 "e.g. <|im_start|>,<|im_end|>")

# The train keys that make up a run's recipe: a resume takes them from the checkpoint's config.json unless the
# command line sets them (config.loader.restore_recipe), so that changed defaults never alter a run under way.
RECIPE_KEYS = frozenset({
    "optimizer", "lr", "embed_lr", "head_lr", "scalar_lr", "muon_lr", "muon_momentum", "muon_weight_decay",
    "muon_ns_steps", "muon_adjust_lr", "min_lr_ratio", "warmup_steps", "schedule", "decay_fraction",
    "weight_decay", "beta1", "beta2", "grad_clip", "micro_batch", "grad_accum",
})


@dataclass
class Config:
    model: GPTConfig = field(default_factory=lambda: preset_model("nano"))
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    sft: SFTSection = field(default_factory=SFTSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    lora: LoRASection = field(default_factory=LoRASection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    distill: DistillSection = field(default_factory=DistillSection)

    def to_dict(self) -> dict:
        return asdict(self)
