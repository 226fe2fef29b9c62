"""`gptforge distill`: knowledge distillation (gptforge.objectives.distill) as a recipe on the one Trainer: a
student of any shape (model.* keys, from scratch, or --init-from) learns a teacher's next-token distribution.

    gptforge distill --teacher runs/big --data.path input.txt --model.preset=micro     # text, as pretrain reads it
    gptforge distill --teacher runs/sft --data.path chats.jsonl --init-from runs/small  # conversations, as sft

The data is read as pretrain reads it (token shards; distill.data=text) or as sft reads it (JSONL conversations,
the loss on the assistant's tokens; distill.data=chat); distill.data=auto picks chat for a JSONL file whose first
record is a conversation. The student reads the teacher's tokenizer: an --init-from model, a data.tokenizer or a
prepared data.path with another is refused (the two distributions are compared id by id). The teacher is loaded
as generate/chat/eval load a model (hf.inference.load_for_inference), whole on every rank, frozen, in inference
mode, in bf16 on a GPU. Checkpoints, exact resume, DDP/FSDP and the launcher are the Trainer's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptforge.config.schema import Config
from gptforge.data.tokenizer import build_tokenizer
from gptforge.errors import UserError
from gptforge.hf.inference import load_for_inference
from gptforge.hf.init_from import init_tokenizer
from gptforge.hf.load import is_hf_folder, read_hf_config
from gptforge.objectives.distill import DistillObjective
from gptforge.train.recipes import SFT, Pretrain, _stage
from gptforge.train.run import Loaders, StageData

CHAT_KEYS = ("messages", "conversations")


def _describe(tok) -> str:
    return f"{tok.kind}, {tok.vocab_size} tokens"


def check_same_tokenizer(tok, teacher_tok, what: str, teacher: str) -> None:
    """UserError (one line) unless `tok` is exactly the teacher's tokenizer (its full definition)."""
    if tok.hf.to_str() != teacher_tok.hf.to_str():
        raise UserError(f"{what} has another tokenizer ({_describe(tok)}) than the teacher {teacher} "
                        f"({_describe(teacher_tok)}); distillation compares the two models' next-token "
                        "distributions id by id: use a student and data with the teacher's own tokenizer")


def teacher_vocab(path: str, tok) -> int:
    """The teacher's real output rows: a Hugging Face folder's config vocab_size, else its tokenizer's."""
    return int(read_hf_config(path)["vocab_size"]) if is_hf_folder(path) else tok.vocab_size


class _Distill:
    """What both data kinds share: the teacher's tokenizer for the student and the data, the distillation loss."""

    name = "distill"
    lora = False
    needs_data_path = True

    def student_tokenizer(self):
        """The teacher's tokenizer; an --init-from model or an explicit data.tokenizer must be exactly it."""
        cfg = self.cfg
        path = cfg.distill.teacher
        tok = init_tokenizer(path)
        if cfg.train.init_from:
            check_same_tokenizer(init_tokenizer(cfg.train.init_from), tok, f"the student (--init-from "
                                 f"{cfg.train.init_from})", path)
        spec = cfg.data.tokenizer
        if "data.tokenizer" in getattr(cfg, "explicit", set()):
            if spec == "char" or spec.startswith("bpe:"):
                raise UserError(f"data.tokenizer={spec} builds a new tokenizer from the data; distill reads the "
                                f"teacher's ({path}): leave data.tokenizer out")
            check_same_tokenizer(build_tokenizer(spec), tok, f"data.tokenizer={spec}", path)
        return tok

    def objective(self, model, data: StageData, loaders: Loaders):
        env, d = self.env, self.cfg.distill
        if env.tp_size > 1:
            raise UserError("distill does not support tensor parallel (parallel.tp > 1): use parallel.tp=1 "
                            "(DDP or FSDP)")
        teacher, ttok, _ = load_for_inference(d.teacher, str(env.device))
        check_same_tokenizer(data.tokenizer, ttok, f"the data ({data.label})", d.teacher)
        if teacher.cfg.block_size < model.cfg.block_size:
            raise UserError(f"the teacher's context ({teacher.cfg.block_size} tokens) is shorter than the student's "
                            f"model.block_size={model.cfg.block_size}; set model.block_size <= "
                            f"{teacher.cfg.block_size}")
        if env.device.type == "cuda":
            teacher.to(torch.bfloat16)  # inference only: half the memory and the GPU's fast matmuls
        teacher.attention = model.attention  # the same document masking as the student's (packed SFT)
        n_t, n_s = teacher.num_params(), model.num_params()
        self.say(f"teacher: {d.teacher} ({teacher.cfg.arch}) {n_t / 1e6:.2f}M parameters ({n_t / n_s:.1f}x the "
                 f"student's), {teacher.cfg.n_layer} layers, d_model {teacher.cfg.d_model} | distill: alpha "
                 f"{d.alpha:g}, temperature {d.temperature:g} | val loss: the student's cross-entropy")
        return DistillObjective(teacher, data.tokenizer.vocab_size, d.alpha, d.temperature,
                                teacher_vocab=teacher_vocab(d.teacher, ttok))


class TextDistill(_Distill, Pretrain):
    """Text as pretrain reads it (raw files or a prepared dataset), tokenized with the teacher's tokenizer."""

    def _tokenizer(self):
        return self.student_tokenizer()


class ChatDistill(_Distill, SFT):
    """Conversations as sft reads them; the loss on the assistant's tokens."""

    def chat_tokenizer(self, texts=None):
        return self.student_tokenizer()


def data_kind(cfg: Config) -> str:
    """distill.data, auto resolved: chat when data.path is one JSONL file whose first record is a conversation."""
    kind = cfg.distill.data
    if kind != "auto":
        return kind
    p = Path(cfg.data.path or "").expanduser()
    if p.suffix not in (".jsonl", ".json") or not p.is_file():
        return "text"
    with open(p, encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        rec = json.loads(first)
    except ValueError:
        return "text"
    return "chat" if isinstance(rec, dict) and any(k in rec for k in CHAT_KEYS) else "text"


_text, _chat = _stage(TextDistill), _stage(ChatDistill)


def distill(cfg: Config) -> int:
    if not cfg.distill.teacher:
        raise UserError("distill needs a teacher: pass --teacher=RUN_CHECKPOINT_OR_HF_FOLDER")
    if cfg.data.path is None:
        raise UserError("give the data: --data.path=FILE_OR_DIR (text as for pretrain, or JSONL conversations "
                        "as for sft)")
    return (_chat if data_kind(cfg) == "chat" else _text)(cfg)


distill.defaults = {"train": {"out_dir": "runs/distill", "micro_batch": 16, "lr": 1e-3, "warmup_steps": 30,
                              "eval_every": 200, "log_every": 20}, "model": {"preset": "micro"}}
distill.__doc__ = "gptforge distill: train a student on a teacher's next-token distribution (--teacher)."
