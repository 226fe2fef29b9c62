"""Local SGD / DiLoCo (`--parallel.sync_every=H`) on real torchrun + gloo, 2 replicas.

- The outer step itself (LocalSGD.sync on 2 gloo ranks): the mean change over replicas, outer_lr and Nesterov
  momentum equal the formula computed here in float64, round after round.
- H = 1 is not local SGD at all (no LocalSGD is built): plain DDP, the same losses as one process on the same
  global batch.
- H = 4: step 1 equals DDP (same start, same data), later steps differ (no gradient all-reduce between
  synchronisations: the replicas really train on their own), and the loss still falls.
- Exact resume: stop at a checkpoint, resume, and the losses equal an uninterrupted run (1e-5), with plain
  averaging and with a DiLoCo outer optimizer (Nesterov momentum, saved in the checkpoint); also when the
  replicas are two machines that share no disk (tests/distributed/test_own_disks.py runs the same settings);
  with train.optimizer=muon too (each replica's own Muon and AdamW state, saved per rank)."""

from __future__ import annotations

import pytest
import torch

from distributed._fixtures import MUON, base_gpt2, base_gpt2_muon, baseline, run_args  # noqa: F401  (fixtures)
from distributed._harness import ROOT, assert_losses_close, check_clean, read_losses, run, torchrun, torchrun_argv

LOCAL = ["--train.micro_batch=4", "--parallel.strategy=ddp", "--train.log_every=1"]
DILOCO = ["--parallel.outer_lr=0.7", "--parallel.outer_momentum=0.9"]
EXTRA = {"average": [], "diloco": DILOCO, "muon": MUON}


def test_outer_step_is_the_mean_change_with_outer_lr_and_nesterov_momentum(tmp_path):
    """LocalSGD.sync() on 2 real gloo ranks, 3 rounds, against this formula in float64 (anchor: the parameters
    after the last sync, the same on both ranks; p_r: rank r's parameters before this sync):
        delta = mean_r (anchor - p_r);  m = mu m + delta;  u = delta + mu m (Nesterov; u = delta when mu = 0)
        anchor <- anchor - outer_lr u, and every rank's parameters become it.
    Plain averaging (1, 0), an outer lr alone (0.7, 0) and DiLoCo (0.7, Nesterov 0.9)."""
    from distributed._outer_step_worker import ROUNDS, SETTINGS

    job = run(torchrun_argv(2, [str(ROOT / "tests" / "distributed" / "_outer_step_worker.py"), str(tmp_path)]),
              timeout=120)
    check_clean(job)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, (lr, mu) in SETTINGS.items():
        a, b = ranks[0][name], ranks[1][name]
        assert a["syncs"] == b["syncs"] == ROUNDS
        anchor = [p.double() for p in a["start"]]
        assert all(torch.equal(x, y) for x, y in zip(a["start"], b["start"]))
        m = [torch.zeros_like(p) for p in anchor]
        for k in range(ROUNDS):
            local = [[p.double() for p in r[name]["before"][k]] for r in ranks]
            assert max((x - y).abs().max().item() for x, y in zip(*local)) > 0.1  # the replicas really differ
            for i in range(len(anchor)):
                delta = (anchor[i] - local[0][i] + anchor[i] - local[1][i]) / 2
                if mu:
                    m[i] = mu * m[i] + delta
                    delta = delta + mu * m[i]
                anchor[i] = anchor[i] - lr * delta
            for r in ranks:
                err = max((p.double() - want).abs().max().item() for p, want in zip(r[name]["after"][k], anchor))
                assert err < 1e-6, f"{name} round {k}: parameters off by {err:.2e} from the outer step"
        if mu:
            for r in ranks:
                assert max((v.double() - w).abs().max().item() for v, w in zip(r[name]["momentum"], m)) < 1e-6
        else:
            assert a["momentum"] == b["momentum"] == []


def test_sync_every_1_is_plain_ddp_not_local_sgd(tmp_path, char_data, base_gpt2):
    """sync_every=1 builds no LocalSGD (local SGD is off at 1), so this checks only that the setting leaves plain
    DDP: no local-SGD line, and the losses of one process on the same global batch. The outer step is tested
    above."""
    job = torchrun(2, ["pretrain", *run_args(tmp_path, char_data, *LOCAL, "--parallel.sync_every=1")])
    assert "local SGD" not in job.output
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
