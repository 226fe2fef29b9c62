"""Local SGD / DiLoCo (`--parallel.sync_every=H`, issue 10) on real torchrun + gloo, 2 replicas.

- H = 1 is DDP: the same losses as one process on the same global batch.
- H = 4: step 1 equals DDP (same start, same data), later steps differ (no gradient all-reduce between
  synchronisations: the replicas really train on their own), and the loss still falls.
- Exact resume: stop at a checkpoint, resume, and the losses equal an uninterrupted run (1e-5), with plain
  averaging and with a DiLoCo outer optimizer (Nesterov momentum, saved in the checkpoint); also when the
  replicas are two machines that share no disk (tests/distributed/test_own_disks.py runs the same settings);
  with train.optimizer=muon too (each replica's own Muon and AdamW state, saved per rank)."""

from __future__ import annotations

import pytest

from distributed._fixtures import MUON, base_gpt2, base_gpt2_muon, baseline, run_args  # noqa: F401  (fixtures)
from distributed._harness import assert_losses_close, read_losses, torchrun

LOCAL = ["--train.micro_batch=4", "--parallel.strategy=ddp", "--train.log_every=1"]
DILOCO = ["--parallel.outer_lr=0.7", "--parallel.outer_momentum=0.9"]
EXTRA = {"average": [], "diloco": DILOCO, "muon": MUON}


def test_sync_every_1_is_ddp(tmp_path, char_data, base_gpt2):
    torchrun(2, ["pretrain", *run_args(tmp_path, char_data, *LOCAL, "--parallel.sync_every=1")])
    assert_losses_close(read_losses(tmp_path), read_losses(base_gpt2))


@pytest.fixture(scope="module", params=list(EXTRA))
def uninterrupted(request, tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp(f"localsgd_{request.param}")
    extra = EXTRA[request.param]
    job = torchrun(2, ["pretrain", *run_args(out, char_data, *LOCAL, "--parallel.sync_every=4",
                                             "--train.save_every=5", *extra)])
    assert "parallel: local SGD: 2 replicas" in job.output, job.output[-3000:]
    return out, extra


def test_replicas_train_on_their_own(uninterrupted, request):
    out, extra = uninterrupted
    got, ddp = read_losses(out), read_losses(baseline(request, "muon" if extra == MUON else "adamw"))
    assert len(got) == 10 and abs(got[0] - ddp[0]) < 1e-5  # same start, same data
    assert max(abs(a - b) for a, b in zip(got[1:], ddp[1:])) > 1e-4  # no gradient all-reduce in between
    assert sum(got[-3:]) / 3 < got[0] - 0.3  # and it learns


def test_stop_and_resume_equals_uninterrupted(uninterrupted, tmp_path, char_data):
    out, extra = uninterrupted
    args = run_args(tmp_path, char_data, *LOCAL, "--parallel.sync_every=4", "--train.save_every=5", *extra)
    torchrun(2, ["pretrain", *args, "--train.stop_after=5"])
    job = torchrun(2, ["pretrain", *args, "--train.resume=auto"])
    assert "resumed from" in job.output and "at step 5" in job.output, job.output[-3000:]
    assert_losses_close(read_losses(tmp_path), read_losses(out))


def test_local_sgd_refuses_what_it_cannot_do(tmp_path, char_data):
    job = torchrun(2, ["pretrain", *run_args(tmp_path, char_data, "--train.micro_batch=4", "--parallel.strategy=fsdp",
                                             "--parallel.sync_every=4")], check=False)
    assert job.returncode != 0 and "parallel.sync_every=4 trains whole replicas" in job.output, job.output[-2000:]
