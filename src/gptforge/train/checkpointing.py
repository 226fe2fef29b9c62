"""CheckpointManager: the one owner of a run's checkpoints, as torchtitan's is. The Trainer owns one and asks it
to set up, load, save when due and roll back; nothing else in the trainer touches checkpoint files.

What it saves: the model, the optimizer, local SGD's state (replicas) and the trainer's progress, a Stateful
(`state_dict()` / `load_state_dict()` / `rolled_back()`), plus the run's id and its files (config, tokenizer).
The files themselves (format, agreement between ranks, rename, rotation) are `gptforge.checkpoint`'s."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from gptforge import checkpoint as ckpt_mod
from gptforge.errors import UserError
from gptforge.parallel.mesh import on_main
from gptforge.train.lora import check_lora_resume
from gptforge.train.preempt import elastic_restart, resume_setting


class CheckpointManager:
    def __init__(self, tcfg, env, model, optimizer, progress, files: dict, model_cfg, local_sgd, log, say):
        self.tcfg, self.env, self.model, self.optimizer = tcfg, env, model, optimizer
        self.progress = progress  # the trainer: step, tokens, data position, scaler, guard (Stateful)
        self.files, self.model_cfg, self.local_sgd, self.log, self.say = files, model_cfg, local_sgd, log, say
        self.out_dir = Path(tcfg.out_dir)
        self.resume = resume_setting(tcfg.resume)  # None: a fresh run; "auto" also after a torchrun restart
        self.run_id: str | None = None  # kept across resumes: rotation deletes only this run's checkpoints
        self.shared = True  # do all ranks see out_dir? (setup)
        self.pending = None  # a checkpoint being written in the background (train.async_save)
        self.async_group = None
        self.stalls: list[float] = []  # seconds the loop was blocked by each save
        self.saved_at, self.last_path, self.rolled_back_to = -1, None, None

    # ---- set-up -----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Before the first step: is out_dir shared, does it hold another run, can saves run in the background."""
        self.shared = ckpt_mod.storage_is_shared(self.out_dir, self.env)
        if not self.shared:
            self.say(f"checkpoints: the ranks do not share {self.out_dir} (machines with disks of their own): "
                     "node 0 keeps each full checkpoint, and a resume sends it to the other nodes")
        self._check_out_dir()
        if not self.tcfg.async_save:
            return
        if not self.shared or self.local_sgd is not None:
            self.say("note: train.async_save needs a shared out_dir and no local SGD; saving synchronously")
        elif self.env.distributed:  # its own gloo group: the background thread's collectives never meet training's
            self.async_group = torch.distributed.new_group(backend="gloo")
        else:
            self.async_group = True

    def _check_out_dir(self) -> None:
        """A new run (no train.resume) must not mix its checkpoints with another run's: refuse, nothing deleted."""
        if self.resume == "auto":
            return

        def other_run() -> str | None:
            found = ckpt_mod.list_checkpoints(self.out_dir)
            if found and self.resume is not None:  # resuming a given checkpoint: its own run's are fine
                rid = ckpt_mod.read_json(ckpt_mod.checkpoint_dir_of(self.resume), ckpt_mod.STATE_FILE).get("run_id")
                mine = set(ckpt_mod.run_checkpoints(self.out_dir, rid))
                found = [p for p in found if p not in mine]
            return found[-1].name if found else None

        name = on_main(other_run, self.env)
        if name:
            raise UserError(f"train.out_dir '{self.out_dir}' already holds another run's checkpoints ({name}); "
                            "continue that run with --train.resume=auto, or give this one a new --train.out_dir")

    # ---- load ---------------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Resume (train.resume, or a torchrun restart) from the newest usable checkpoint; with resume=auto a
        broken newest one is skipped for the one before."""
        r = self.resume
        if r is not None and r != self.tcfg.resume:  # torchrun restarted us (launch --max-restarts)
            self.say(f"torchrun restart {elastic_restart()}: resuming from the newest complete checkpoint")
        if r is None:
            return
        candidates = ckpt_mod.resume_candidates(r, self.out_dir, self.env)
        if not candidates:
            self.say(f"resume=auto: no checkpoint in {self.out_dir / 'checkpoints'}, starting from step 0")
            return
        for i, ck in enumerate(candidates):
            self._check_compatible(ck)
            try:
                state = self._load_tensors(ck)
            except UserError as e:
                if r == "auto" and i + 1 < len(candidates):
                    self.say(f"warning: {e}; trying the previous checkpoint", file=sys.stderr)
                    continue
                raise
            self.run_id = state.get("run_id")
            self.progress.load_state_dict(state)
            self.say(f"resumed from {ck} at step {state['step']}")
            return

    def _load_tensors(self, ck: Path) -> dict:
        extra = self.local_sgd.state_dict() if self.local_sgd else None
        state = ckpt_mod.load_checkpoint(ck, self.model, self.optimizer, self.env, extra=extra)
        if self.local_sgd:
            self.local_sgd.load_state_dict(extra)
        return state

    def _check_compatible(self, ck: Path) -> None:
        saved = ckpt_mod.saved_model_config(ck, self.env)
        ckpt_mod.check_same_tokenizer(ck, self.files.get("tokenizer.json"), self.env)
        check_lora_resume(ck, self.files, self.env)
        now = self.model_cfg.to_dict()
        diff = [f"{k}={saved.get(k)!r} there, {now[k]!r} now" for k in now
                if k not in ("dropout", "preset") and saved.get(k) != now[k]]
        if diff:
            raise UserError(f"cannot resume from '{ck}': the model differs ({'; '.join(diff[:3])}); "
                            "use the same model config or a new train.out_dir")

        def saved_optimizer() -> str:  # a checkpoint from before train.optimizer existed: AdamW
            train = ckpt_mod.read_json(ck, "config.json").get("train") if (ck / "config.json").is_file() else None
            return train.get("optimizer", "adamw") if isinstance(train, dict) else "adamw"

        was = on_main(saved_optimizer, self.env)
        if was != self.tcfg.optimizer:
            raise UserError(f"cannot resume from '{ck}': it was trained with train.optimizer={was}, not "
                            f"{self.tcfg.optimizer} (the optimizer state differs); resume with "
                            f"--train.optimizer={was}, or start from its weights with --init-from in a new train.out_dir")

    # ---- save ---------------------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Is a periodic save due after this step (train.save_every)? The trainer adds the end and a stop."""
        return bool(self.tcfg.save_every and step % self.tcfg.save_every == 0)

    def save(self, step: int, wait: bool = False) -> Path | None:
        """Save at this step; with train.async_save the tensors are written in the background and the checkpoint
        completes at a later step (-> None; finish_pending) unless `wait` (a preemption or the final save). The
        time the loop is blocked goes to `stalls`."""
        t0 = time.perf_counter()
        self.finish_pending()  # one save at a time
        state = self.progress.state_dict() | {"run_id": self.run_id}
        if "tokenizer.json" in self.files:  # a resume checks it is the same tokenizer (not only the same size)
            state["tokenizer_sha256"] = ckpt_mod.tokenizer_id(self.files["tokenizer.json"])
        files = dict(self.files) | {"model_config.json": json.dumps(self.model_cfg.to_dict(), indent=2) + "\n"}
        pending = ckpt_mod.begin_save(self.out_dir, step, self.model, self.optimizer, state, self.env, files,
                                      keep_last=self.tcfg.keep_last, shared=self.shared,
                                      replicas=self.local_sgd is not None,
                                      extra=self.local_sgd.state_dict() if self.local_sgd else None,
                                      async_group=self.async_group)
        path = None
        if pending.future is None or wait:
            path = pending.finish()
            self.say(f"saved checkpoint {path}")
        else:
            self.pending = pending
        self.saved_at, self.last_path = step, path
        self.stalls.append(time.perf_counter() - t0)
        self.log.log(step, {"perf/save_stall_ms": self.stalls[-1] * 1000})
        return path

    def in_flight(self) -> bool:
        """A background save whose tensors this rank is still writing."""
        return self.pending is not None and not self.pending.done()

    def finish_pending(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.last_path = pending.finish()
            self.say(f"saved checkpoint {self.last_path} (written in the background)")

    # ---- roll back ------------------------------------------------------------------------------------------------
    def rollback(self, step: int, first_bad: int) -> None:
        """train.on_bad_steps=rollback: reload model, optimizer and data position from this run's last checkpoint
        at or before `step`; the trainer's progress is told (rolled_back)."""
        self.finish_pending()

        def newest() -> str | None:
            mine = ckpt_mod.run_checkpoints(self.out_dir, self.run_id, step)
            return str(mine[-1]) if mine else None

        ck = on_main(newest, self.env)
        k = self.tcfg.max_bad_steps
        if ck is None or ck == self.rolled_back_to:
            why = "no checkpoint of this run to roll back to" if ck is None else f"{Path(ck).name} was already reloaded once"
            raise UserError(f"{k} non-finite steps in a row from step {first_bad} and {why}; lower train.lr, raise "
                            "train.warmup_steps or use bf16, and set train.save_every so there is a checkpoint to go back to")
        state = self._load_tensors(Path(ck))
        self.optimizer.zero_grad(set_to_none=True)
        self.rolled_back_to = ck
        self.progress.rolled_back(state)
        self.say(f"rolled back to step {state['step']} ({ck}) after {k} non-finite steps in a row from step "
                 f"{first_bad}", file=sys.stderr)
