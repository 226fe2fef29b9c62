"""The Trainer's checkpoints: saving (synchronously or in the background with train.async_save), refusing an
out_dir that holds another run, and rolling back to the last checkpoint after train.max_bad_steps bad steps."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from gptforge import checkpoint as ckpt_mod
from gptforge.errors import UserError
from gptforge.parallel.mesh import on_main
from gptforge.train.preempt import resume_setting


class Checkpointing:
    """Mixed into Trainer (which provides model, optimizer, env, tcfg, out_dir, guard, print, ...)."""

    def resume_setting(self) -> str | None:
        return resume_setting(self.tcfg.resume)

    def _check_out_dir(self) -> None:
        """A new run (no train.resume) must not mix its checkpoints with another run's: refuse, nothing deleted."""
        r = self.resume_setting()
        if r == "auto":
            return

        def other_run() -> str | None:
            found = ckpt_mod.list_checkpoints(self.out_dir)
            if found and r not in ("none", "", None):  # resuming a given checkpoint: its own run's are fine
                rid = ckpt_mod.read_json(ckpt_mod.checkpoint_dir_of(r), ckpt_mod.STATE_FILE).get("run_id")
                found = [p for p in found if ckpt_mod.read_json(p, ckpt_mod.STATE_FILE).get("run_id") != rid]
            return found[-1].name if found else None

        name = on_main(other_run, self.env)
        if name:
            raise UserError(f"train.out_dir '{self.out_dir}' already holds another run's checkpoints ({name}); "
                            "continue that run with --train.resume=auto, or give this one a new --train.out_dir")

    def rollback(self, first_bad: int) -> None:
        """train.on_bad_steps=rollback: reload model, optimizer and data position from this run's last checkpoint."""
        self.finish_pending()

        def newest() -> str | None:
            mine = [p for p in ckpt_mod.list_checkpoints(self.out_dir) if int(p.name[len("step_"):]) <= self.step
                    and ckpt_mod.read_json(p, ckpt_mod.STATE_FILE).get("run_id") == self.run_id]
            return str(mine[-1]) if mine else None

        ck = on_main(newest, self.env)
        k = self.tcfg.max_bad_steps
        if ck is None or ck == self.rolled_back_to:
            why = "no checkpoint of this run to roll back to" if ck is None else f"{Path(ck).name} was already reloaded once"
            raise UserError(f"{k} non-finite steps in a row from step {first_bad} and {why}; lower train.lr, raise "
                            "train.warmup_steps or use bf16, and set train.save_every so there is a checkpoint to go back to")
        extra = self.local_sgd.state_dict() if self.local_sgd else None
        state = ckpt_mod.load_checkpoint(Path(ck), self.model, self.optimizer, self.env, extra=extra)
        if self.local_sgd:
            self.local_sgd.load_state_dict(extra)
        self.optimizer.zero_grad(set_to_none=True)
        self._restore(state)
        self.guard.bad_in_row, self.rolled_back_to = 0, ck
        self.history = self.history[:max(0, self.step - self.step_start)]
        self.print(f"rolled back to step {self.step} ({ck}) after {k} non-finite steps in a row from step {first_bad}",
                   file=sys.stderr)

    def save(self, wait: bool = False) -> Path | None:
        """Save at this step; with train.async_save the tensors are written in the background and the checkpoint
        completes at a later step (-> None; finish_pending) unless `wait` (a preemption or the final save). The
        time the loop is blocked goes to save_stalls."""
        t, t0, train_s = self.tcfg, time.perf_counter(), self.training_seconds()
        self.finish_pending()  # one save at a time
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "loader": self.train_loader.state_dict(),
                 "seqs_per_step": self.seqs_per_step, "total_steps": self.total_steps,
                 "scaler": self.scaler.state_dict() if self.scaler else None, "run_id": self.run_id,
                 "val_loss": self.last_val, "train_loss": self.history[-1] if self.history else None,
                 "train_s": train_s}
        if "tokenizer.json" in self.files:  # a resume checks it is the same tokenizer (not only the same size)
            state["tokenizer_sha256"] = ckpt_mod.tokenizer_id(self.files["tokenizer.json"])
        files = dict(self.files) | {"model_config.json": json.dumps(self.model_cfg.to_dict(), indent=2) + "\n"}
        pending = ckpt_mod.begin_save(self.out_dir, self.step, self.model, self.optimizer, state | self.guard.state_dict(),
                                      self.env, files, keep_last=t.keep_last, shared=self.shared_storage,
                                      replicas=self.local_sgd is not None,
                                      extra=self.local_sgd.state_dict() if self.local_sgd else None,
                                      async_group=self.async_group)
        path = None
        if pending.future is None or wait:
            path = pending.finish()
        else:
            self.pending = pending
        self.save_stalls.append(time.perf_counter() - t0)
        self.log.log(self.step, {"perf/save_stall_ms": self.save_stalls[-1] * 1000})
        return path

    def finish_pending(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.print(f"saved checkpoint {pending.finish()} (written in the background)")

    def _setup_saving(self) -> None:
        self._check_out_dir()
        if not self.tcfg.async_save:
            return
        if not self.shared_storage or self.local_sgd is not None:
            self.print("note: train.async_save needs a shared out_dir and no local SGD; saving synchronously")
        elif self.env.distributed:  # its own gloo group: the background thread's collectives never meet training's
            self.async_group = torch.distributed.new_group(backend="gloo")
        else:
            self.async_group = True
