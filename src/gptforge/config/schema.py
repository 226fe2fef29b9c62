"""The one training Config. Every field is settable from a TOML/YAML/JSON file ([section] key = value)
or the command line (--section.key=value). Its model section is the model's own GPTConfig;
--model.preset=NAME applies a named size before the other model keys (gptforge.config.presets)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Annotated, Literal, Optional

import tyro

from gptforge.config.presets import preset_model
from gptforge.model.gpt import GPTConfig


def _alias(*names: str):
    return tyro.conf.arg(aliases=names)


@dataclass
class DataSection:
    path: Optional[str] = None
    """prepared dataset dir, or text/JSONL files, folders, globs (comma separated); default: Shakespeare"""
    tokenizer: str = "char"
    """for raw inputs: char, gpt2, or a tokenizer.json / dir"""
    field: str = "text"
    """JSONL field holding the text"""
    val_fraction: float = 0.01
    """share of the training data held out for validation (0: none); not used with data.val_path"""
    val_path: Optional[str] = None
    """validate on this text instead of a split of the training data: text/JSONL files, folders, globs, or a
    prepared dataset dir (its val split); tokenized with the training data's tokenizer (a char vocab's unknown
    characters: <|unk|>) and scored whole at every evaluation (train.eval_batches not used), so two runs are
    judged on the same text; all of the training data then trains. SFT/DPO: a JSONL of conversations / pairs"""


@dataclass
class TrainSection:
    out_dir: Annotated[str, _alias("--out")] = "runs/default"
    max_steps: Optional[int] = None
    """training length in optimizer steps (or give max_tokens or epochs)"""
    max_tokens: Optional[int] = None
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
    """comma list of local multiple-choice task files (gptforge eval's format) scored every eval_every steps,
    data-parallel over ranks: curves eval/<task>/acc and acc_norm beside val/loss (chat stages: through the
    chat template)"""
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


@dataclass
class SFTSection:
    packing: bool = True
    """pack short conversations into one sequence with document masking"""
    overflow: Literal["truncate", "drop"] = "truncate"
    """conversations (and DPO pairs) longer than the context: truncate them or drop them (counted)"""
    skip_bad_lines: bool = False
    """skip malformed JSONL lines (counted, first one named) instead of stopping at the first (SFT and DPO)"""


@dataclass
class DPOSection:
    beta: float = 0.1
    """strength of the pull towards the reference model (higher: stay closer)"""
    label_smoothing: float = 0.0
    """conservative DPO: assumed fraction of flipped preference labels, in [0, 0.5)"""
    precompute_ref: bool = True
    """score the data with the reference once before training and free it (else keep a frozen copy)"""


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

    def to_dict(self) -> dict:
        return asdict(self)
