"""DDP, FSDP2, TP (+ sequence parallel), dp x tp, grad accumulation and DCP resharding under real
torchrun (gloo, CPU, fp32), each compared with one process training on the same global batch; DDP, FSDP2
(also with uneven shards), TP and the resumes with train.optimizer=muon too (Muon orthogonalises whole
matrices: a shard's update must equal the one-process update)."""

from __future__ import annotations

import pytest

from distributed._harness import assert_losses_close, read_losses, torchrun
from distributed._fixtures import (LLAMA, MUON, base_gpt2, base_gpt2_muon, base_llama, baseline,  # noqa: F401
                                   run_args, train_in_process)

pytestmark = pytest.mark.timeout(300)


OPT = {"adamw": [], "muon": MUON}


@pytest.mark.parametrize("optimizer", OPT)
def test_ddp_2_ranks(tmp_path, char_data, request, optimizer):
    torchrun(2, ["pretrain", *run_args(tmp_path, char_data, "--train.micro_batch=4", "--parallel.strategy=ddp",
                                       "--train.stop_after=5", *OPT[optimizer])])
    assert_losses_close(read_losses(tmp_path), read_losses(baseline(request, optimizer))[:5])


def _fsdp_2_ranks(tmp_path_factory, char_data, optimizer: str):
    """FSDP2 on 2 ranks, 10 steps, checkpoints at steps 5 and 10."""
    out = tmp_path_factory.mktemp(f"fsdp2_{optimizer}")
    torchrun(2, ["pretrain", *run_args(out, char_data, "--train.micro_batch=4", "--parallel.strategy=fsdp",
                                       "--train.save_every=5", *OPT[optimizer])])
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, char_data):
    return _fsdp_2_ranks(tmp_path_factory, char_data, "adamw")


@pytest.fixture(scope="module")
def fsdp_muon_run(tmp_path_factory, char_data):
    return _fsdp_2_ranks(tmp_path_factory, char_data, "muon")


def fsdp_of(request, optimizer: str):
    return request.getfixturevalue("fsdp_run" if optimizer == "adamw" else "fsdp_muon_run")


@pytest.mark.parametrize("optimizer", OPT)
def test_fsdp_2_ranks(request, optimizer):
    assert_losses_close(read_losses(fsdp_of(request, optimizer)), read_losses(baseline(request, optimizer)))


def test_fsdp_muon_uneven_shards(tmp_path, char_data):
    """Muon with FSDP2 when a matrix's rows do not split evenly (d_ff 99: up_proj 50 + 49 rows)."""
    odd = [*MUON, "--model.d_ff=99", "--train.stop_after=5"]
    train_in_process(tmp_path / "one", char_data, "--train.micro_batch=8", *odd)
    torchrun(2, ["pretrain", *run_args(tmp_path / "fsdp", char_data, "--train.micro_batch=4",
                                       "--parallel.strategy=fsdp", *odd)])
    assert_losses_close(read_losses(tmp_path / "fsdp"), read_losses(tmp_path / "one"))


def _ckpt5(run_dir):
    p = run_dir / "checkpoints" / "step_0000005"
    assert (p / "trainer_state.json").is_file(), f"no step-5 checkpoint in {run_dir}"
    return p


def test_fsdp_2_ranks_chunked_loss(tmp_path, char_data, base_gpt2):
    """The chunked head reads lm_head's weight inside the root's forward, where FSDP2 has unsharded it."""
    torchrun(2, ["pretrain", *run_args(tmp_path, char_data, "--train.micro_batch=4", "--parallel.strategy=fsdp",
                                       "--train.loss_impl=chunked", "--train.stop_after=5")])
    assert_losses_close(read_losses(tmp_path), read_losses(base_gpt2)[:5])


def test_dcp_resume_on_4_ranks(tmp_path, char_data, fsdp_run, base_gpt2):
    """Saved by 2 FSDP ranks, resharded onto 4 (micro-batch 2 keeps the global batch at 8)."""
    torchrun(4, ["pretrain", *run_args(tmp_path, char_data, "--train.micro_batch=2", "--parallel.strategy=fsdp",
                                       f"--train.resume={_ckpt5(fsdp_run)}")])
    assert_losses_close(read_losses(tmp_path), read_losses(base_gpt2)[5:])


@pytest.mark.parametrize("optimizer", OPT)
def test_dcp_resume_on_1_process(tmp_path, char_data, request, optimizer):
    """A sharded (FSDP2) checkpoint, its optimizer state (Muon's momentum too) gathered into one process."""
    train_in_process(tmp_path, char_data, "--train.micro_batch=8", *OPT[optimizer],
                     f"--train.resume={_ckpt5(fsdp_of(request, optimizer))}")
    assert_losses_close(read_losses(tmp_path), read_losses(baseline(request, optimizer))[5:])


@pytest.mark.parametrize("optimizer", OPT)
def test_exact_resume_same_world_size(tmp_path, char_data, request, optimizer):
    run = fsdp_of(request, optimizer)
    torchrun(2, ["pretrain", *run_args(tmp_path, char_data, "--train.micro_batch=4", "--parallel.strategy=fsdp",
                                       *OPT[optimizer], f"--train.resume={_ckpt5(run)}")])
    assert read_losses(tmp_path) == read_losses(run)[5:]  # bitwise


@pytest.mark.parametrize("sp,optimizer", [(False, "adamw"), (True, "adamw"), (False, "muon")],
                         ids=["tp2", "tp2-sequence-parallel", "tp2-muon"])
def test_tp_2_ranks(tmp_path, char_data, request, sp, optimizer):
    torchrun(2, ["pretrain", *run_args(tmp_path, char_data, "--train.micro_batch=8", "--parallel.tp=2",
                                       f"--parallel.sequence_parallel={str(sp).lower()}", "--train.stop_after=5",
                                       *OPT[optimizer])])
    assert_losses_close(read_losses(tmp_path), read_losses(baseline(request, optimizer))[:5])


def test_dp2_x_tp2_llama_gqa_sequence_parallel(tmp_path, char_data, base_llama):
    """4 ranks: FSDP2 over dp=2 of TP=2 groups; Llama style, GQA (2 kv heads -> 1 per TP rank), SP."""
    torchrun(4, ["pretrain", *run_args(tmp_path, char_data, *LLAMA, "--train.micro_batch=4", "--parallel.tp=2",
                                       "--parallel.sequence_parallel=true", "--train.stop_after=5")])
    assert_losses_close(read_losses(tmp_path), read_losses(base_llama))


def test_grad_accum_single_process(tmp_path, char_data, base_gpt2):
    train_in_process(tmp_path, char_data, "--train.micro_batch=2", "--train.grad_accum=4", "--train.stop_after=5")
    assert_losses_close(read_losses(tmp_path), read_losses(base_gpt2)[:5])


def test_grad_accum_ddp(tmp_path, char_data, base_gpt2):
    """2 ranks x micro-batch 1 x 4 accumulation steps = 8."""
    torchrun(2, ["pretrain", *run_args(tmp_path, char_data, "--train.micro_batch=1", "--train.grad_accum=4",
                                       "--parallel.strategy=ddp", "--train.stop_after=5")])
    assert_losses_close(read_losses(tmp_path), read_losses(base_gpt2)[:5])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_rank_under_torchrun_wraps_and_matches(tmp_path, char_data, base_gpt2, strategy):
    """torchrun with one process and an explicit strategy still builds the process group and wraps the
    model (the one-GPU smoke test of the collective path); it trains like plain single-process."""
    job = torchrun(1, ["pretrain", *run_args(tmp_path, char_data, "--train.micro_batch=8",
                                             f"--parallel.strategy={strategy}", "--train.stop_after=3")])
    assert_losses_close(read_losses(tmp_path), read_losses(base_gpt2)[:3])
    assert "x 1 dp ranks" in job.output and f"parallel: {strategy} on 1 rank(s)" in job.output
