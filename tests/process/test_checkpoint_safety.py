"""Never lose a checkpoint: another run's out_dir is refused, rotation deletes only this run's older
checkpoints, export-hf keeps a non-empty folder unless --force, a finished run resumes to exit 0, a full disk
is one line and keeps the previous checkpoint, and async saves resume exactly like synchronous ones."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import read_losses, tiny_args
from support.checks import assert_same_weights, one_line_error, tree_digest, weights  # noqa: F401
from gptforge.checkpoint import STATE_FILE, list_checkpoints, save_checkpoint
from gptforge.cli import main
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.parallel.mesh import DistEnv


# ---- (a) another run's out_dir, rotation -------------------------------------------------------------
def test_new_run_into_another_runs_out_dir_is_refused(tmp_path, char_data, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *tiny_args(out, char_data, "--train.max_steps=3")]) == 0
    before = tree_digest(out / "checkpoints")
    capsys.readouterr()
    assert main(["pretrain", *tiny_args(out, char_data, "--train.max_steps=2")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "--train.resume=auto" in line and "--train.out_dir" in line and "step_0000003" in line
    assert tree_digest(out / "checkpoints") == before  # nothing deleted or changed
    # the refusal is for a new run only: resume=auto continues it (and keeps its run id)
    assert main(["pretrain", *tiny_args(out, char_data, "--train.max_steps=5", "--train.resume=auto")]) == 0
    ids = {json.loads((p / STATE_FILE).read_text())["run_id"] for p in list_checkpoints(out)}
    assert len(ids) == 1 and [p.name for p in list_checkpoints(out)] == ["step_0000003", "step_0000005"]
    # resuming one of its own checkpoints by path is fine; a new run resuming another folder's run here is not
    assert main(["pretrain", *tiny_args(out, char_data, "--train.max_steps=4",
                                        f"--train.resume={out / 'checkpoints/step_0000003'}")]) == 0
    other = tmp_path / "other"
    assert main(["pretrain", *tiny_args(other, char_data, "--train.max_steps=2")]) == 0
    capsys.readouterr()
    assert main(["pretrain", *tiny_args(out, char_data, "--train.max_steps=4",
                                        f"--train.resume={other / 'checkpoints/step_0000002'}")]) == 2
    assert "another run's checkpoints" in one_line_error(capsys.readouterr().err)


def _save(out: Path, step: int, run_id: str | None, keep_last: int = 1) -> Path:
    cfg = GPTConfig(n_layer=1, n_head=2, d_model=16, d_ff=32, block_size=8, vocab_size=64).complete()
    model = build_model(cfg, "cpu", seed=step)
    return save_checkpoint(out, step, model, None, {"step": step, "run_id": run_id}, DistEnv(),
                           {"model_config.json": json.dumps(cfg.to_dict())}, keep_last=keep_last)


def test_rotation_deletes_only_this_runs_older_checkpoints(tmp_path):
    _save(tmp_path, 10, "old", keep_last=5)
    _save(tmp_path, 20, "old", keep_last=5)
    names = lambda: [p.name for p in list_checkpoints(tmp_path)]  # noqa: E731
    _save(tmp_path, 5, "new")  # keep_last=1: the old run's higher steps must not push this one out
    assert names() == ["step_0000005", "step_0000010", "step_0000020"]
    _save(tmp_path, 8, "new")  # only the new run's older step 5 goes
    assert names() == ["step_0000008", "step_0000010", "step_0000020"]
    # the same run resumed from an older checkpoint: its newer step 20 is never deleted by a lower save
    _save(tmp_path, 15, "old")
    assert names() == ["step_0000008", "step_0000015", "step_0000020"]
    assert json.loads((tmp_path / "checkpoints/step_0000008" / STATE_FILE).read_text())["run_id"] == "new"


def test_rotation_never_follows_a_planted_symlink(tmp_path):
    """A run folder from elsewhere (or a shared one) may hold symlinks: a step folder that is a link to another
    folder of this run's id, and a link inside an old checkpoint. Rotation deletes neither target's files."""
    victims = {name: tmp_path / name for name in ("linked_step", "inside")}
    for v in victims.values():
        v.mkdir()
        (v / "precious.txt").write_text("keep me")
    (victims["linked_step"] / STATE_FILE).write_text(json.dumps({"run_id": "r", "step": 0}))
    out = tmp_path / "run"
    first = _save(out, 1, "r")
    (first / "link").symlink_to(victims["inside"])
    (out / "checkpoints/step_0000000").symlink_to(victims["linked_step"])  # listed as this run's step 0
    assert [p.name for p in list_checkpoints(out)] == ["step_0000000", "step_0000001"]
    _save(out, 2, "r")  # keep_last=1: rotation removes steps 0 and 1
    assert not first.exists()
    for v in victims.values():
        assert (v / "precious.txt").read_text() == "keep me", v


# ---- (b) export-hf ------------------------------------------------------------------------------------
def test_export_hf_refuses_non_empty_out_unless_force(tmp_path, trained_run, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("mine")
    (out / "model.safetensors").write_bytes(b"precious")
    before = tree_digest(out)
    assert main(["export-hf", "--checkpoint", str(trained_run), "--out", str(out)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "--force" in line and str(out) in line
    assert tree_digest(out) == before
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"x" * 10)
    assert main(["export-hf", "--checkpoint", str(trained_run), "--out", str(a_file)]) == 2
    assert "is a file" in one_line_error(capsys.readouterr().err) and a_file.read_bytes() == b"x" * 10
    assert main(["export-hf", "--checkpoint", str(trained_run), "--out", str(out), "--force"]) == 0
    assert (out / "model.safetensors").stat().st_size > 100_000
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]


# ---- (d) a finished run ------------------------------------------------------------------------------
def test_resume_of_a_finished_run_says_so_and_exits_0(tmp_path, char_data, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *tiny_args(out, char_data, "--train.max_steps=3")]) == 0
    before = tree_digest(out / "checkpoints")
    capsys.readouterr()
    assert main(["pretrain", *tiny_args(out, char_data, "--train.max_steps=3", "--train.resume=auto")]) == 0
    cap = capsys.readouterr()
    assert "already at step 3 of 3: finished" in cap.out and "already finished at step 3" in cap.err
    assert "Traceback" not in cap.err and tree_digest(out / "checkpoints") == before


# ---- (c) disk full -----------------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2200k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, small_tmpfs, char_data, capsys):
    out = small_tmpfs / "run"
    args = ["--train.max_steps=4", "--train.save_every=2", "--train.keep_last=1"]
    assert main(["pretrain", *tiny_args(out, char_data, *args)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"no space left in '{out / 'checkpoints'}'" in line and "step_0000004" in line and "needs about" in line
    assert "--train.resume=auto" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000002"]  # no .partial left
    assert sum(v.numel() for v in weights(out / "checkpoints/step_0000002").values()) > 50_000  # loadable
    # space freed: the resume continues from step 2 with the losses of a run that never hit the full disk
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
    assert main(["pretrain", *tiny_args(out, char_data, *args, "--train.resume=auto")]) == 0
    ref = tmp_path / "ref"
    assert main(["pretrain", *tiny_args(ref, char_data, *args)]) == 0
    assert read_losses(out)[-2:] == read_losses(ref)[-2:]
    assert_same_weights(out / "checkpoints/step_0000004", ref / "checkpoints/step_0000004")


# ---- (e) async save ----------------------------------------------------------------------------------
def test_async_save_resumes_exactly_like_sync_save(tmp_path, char_data, capsys):
    common = ["--train.max_steps=8", "--train.save_every=2", "--train.keep_last=2"]
    sync, asy = tmp_path / "sync", tmp_path / "async"
    assert main(["pretrain", *tiny_args(sync, char_data, *common)]) == 0
    capsys.readouterr()
    assert main(["pretrain", *tiny_args(asy, char_data, *common, "--train.async_save", "--train.stop_after=5")]) == 0
    assert "written in the background" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(asy)] == ["step_0000004", "step_0000005"]
    assert not list((asy / "checkpoints").glob("*.partial"))
    assert main(["pretrain", *tiny_args(asy, char_data, *common, "--train.async_save", "--train.resume=auto")]) == 0
    assert read_losses(asy) == read_losses(sync)  # bit-identical losses: the background copy was a true snapshot
    assert_same_weights(asy / "checkpoints/step_0000008", sync / "checkpoints/step_0000008")
    st = json.loads((asy / "checkpoints/step_0000008" / STATE_FILE).read_text())
    assert st["step"] == 8 and st["run_id"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_disk_full_two_ranks_agree_and_stop(tmp_path, small_tmpfs, char_data, mode):
    """torchrun, 2 gloo ranks (DDP): the ranks agree, print the same one line and exit 2; step 2 is kept, no
    .partial. (torchrun stops the slower rank once the first exits, so its line may not get out.)"""
    from distributed._harness import torchrun

    out = small_tmpfs / "run"
    extra = ["--train.async_save"] if mode == "async" else []
    job = torchrun(2, ["pretrain", *tiny_args(out, char_data, "--train.max_steps=4", "--train.save_every=2",
                                              "--train.keep_last=1", "--parallel.strategy=ddp", *extra)],
                   timeout=240, check=False)
    errors = [x for x in job.output.splitlines() if x.startswith("gptforge: error:")]
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, job
    assert "no space left" in errors[0] and "step_0000004" in errors[0]
    assert "exitcode  : 2" in job.output and job.returncode != 0, job
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000002"]


def test_kill_during_async_save_keeps_the_previous_checkpoint(tmp_path, char_data):
    """kill -9 while a background save is being written (its .partial has no trainer_state.json yet): the
    newest complete checkpoint is intact and the resume gives the losses of an uninterrupted run."""
    import os
    import signal
    import sys
    import time

    from distributed._harness import job_env, kill_group, start

    args = ["--train.max_steps=400", "--train.save_every=1", "--train.keep_last=2", "--train.log_every=1"]
    out = tmp_path / "run"
    p = start([sys.executable, "-m", "gptforge", "pretrain", *tiny_args(out, char_data, *args, "--train.async_save")],
              env=job_env())
    try:
        partial, deadline = None, time.monotonic() + 120
        while partial is None and time.monotonic() < deadline and p.poll() is None:
            done = list_checkpoints(out)
            found = [d for d in (out / "checkpoints").glob("*.partial") if not (d / STATE_FILE).exists()] \
                if len(done) >= 2 else []
            partial = found[0] if found else None
            time.sleep(0.002)
        assert partial is not None, "never saw a background save in flight"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        kill_group(p)
    newest = list_checkpoints(out)[-1]
    assert int(newest.name.split("_")[1]) < int(partial.name.split("_")[1].split(".")[0])
    weights(newest)  # complete and loadable
    n = int(newest.name.split("_")[1]) + 3
    assert main(["pretrain", *tiny_args(out, char_data, *args, f"--train.stop_after={n}", "--train.resume=auto")]) == 0
    ref = tmp_path / "ref"
    assert main(["pretrain", *tiny_args(ref, char_data, *args, f"--train.stop_after={n}")]) == 0
    assert read_losses(out)[-3:] == read_losses(ref)[n - 3:n]
