"""Typed configuration. Every field is settable from a TOML/YAML/JSON file ([section] key = value)
or the command line (--section.key=value). Model fields left at None come from model.preset."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Optional


@dataclass
class ModelSection:
    preset: str = "nano"
    """named size: micro, nano, minimind, tiny, small, medium, large, llama-1b"""
    arch: Optional[Literal["gpt2", "llama"]] = None
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_kv_head: Optional[int] = None
    d_model: Optional[int] = None
    d_ff: Optional[int] = None
    block_size: Optional[int] = None
    """context length in tokens"""
    vocab_size: Optional[int] = None
    """default: the tokenizer's vocab rounded up to a multiple of 64"""
    bias: Optional[bool] = None
    tie_embeddings: Optional[bool] = None
    dropout: float = 0.0
    norm_eps: Optional[float] = None
    rope_theta: Optional[float] = None


@dataclass
class DataSection:
    path: Optional[str] = None
    """prepared dataset dir, or text/JSONL files, folders, globs (comma separated); default: Shakespeare"""
    tokenizer: str = "char"
    """for raw inputs: char, gpt2, or a tokenizer.json / dir"""
    field: str = "text"
    """JSONL field holding the text"""
    val_fraction: float = 0.01


@dataclass
class TrainSection:
    out_dir: str = "runs/default"
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
    grad_clip: float = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    device: str = "auto"
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 0
    """0: only at the end"""
    keep_last: int = 2
    resume: str = "none"
    """none | auto (latest checkpoint in out_dir) | a checkpoint dir"""
    init_from: Optional[str] = None
    """weights to start from: a gptforge checkpoint or a Hugging Face model folder"""
    sample_tokens: int = 300
    sample_prompt: str = "\n"
    tensorboard: bool = True
    wandb: bool = False
    progress: bool = True
    auto: bool = False
    """pick micro_batch / grad_accum / precision / checkpointing for this hardware"""


@dataclass
class ParallelSection:
    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """auto: none on one process, else fsdp if dp_shard > 1, else ddp"""
    dp_replicate: int = 1
    dp_shard: int = -1
    """-1: the rest of the world size"""
    tp: int = 1
    sequence_parallel: bool = False
    mixed_precision: bool = True
    """FSDP2: bf16 params/reductions when train.precision is bf16"""
    timeout_s: int = 60
    """collective timeout: a dead rank ends the job after this long"""


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


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    sft: SFTSection = field(default_factory=SFTSection)
    dpo: DPOSection = field(default_factory=DPOSection)

    def to_dict(self) -> dict:
        return asdict(self)
