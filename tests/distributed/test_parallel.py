"""DDP, FSDP2, TP (+ sequence parallel), dp x tp, grad accumulation and DCP resharding under real
torchrun (gloo, CPU, fp32), each compared with one process training on the same global batch."""

from __future__ import annotations

import pytest

from distributed._harness import assert_losses_close, read_losses, torchrun
from distributed._fixtures import LLAMA, base_gpt2, base_llama, run_args, train_in_process  # noqa: F401

pytestmark = pytest.mark.timeout(300)


def test_ddp_2_ranks(tmp_path, char_data, base_gpt2):
    torchrun(2, ["pretrain", *run_args(tmp_path, char_data, "--train.micro_batch=4", "--parallel.strategy=ddp",
                                       "--train.stop_after=5")])
    assert_losses_close(read_losses(tmp_path), read_losses(base_gpt2)[:5])


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, char_data):
    """FSDP2 on 2 ranks, 10 steps, checkpoints at steps 5 and 10."""
    out = tmp_path_factory.mktemp("fsdp2")
    torchrun(2, ["pretrain", *run_args(out, char_data, "--train.micro_batch=4", "--parallel.strategy=fsdp",
                                       "--train.save_every=5")])
    return out


def test_fsdp_2_ranks(fsdp_run, base_gpt2):
    assert_losses_close(read_losses(fsdp_run), read_losses(base_gpt2))


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


def test_dcp_resume_on_1_process(tmp_path, char_data, fsdp_run, base_gpt2):
    train_in_process(tmp_path, char_data, "--train.micro_batch=8", f"--train.resume={_ckpt5(fsdp_run)}")
    assert_losses_close(read_losses(tmp_path), read_losses(base_gpt2)[5:])


def test_exact_resume_same_world_size(tmp_path, char_data, fsdp_run):
    torchrun(2, ["pretrain", *run_args(tmp_path, char_data, "--train.micro_batch=4", "--parallel.strategy=fsdp",
                                       f"--train.resume={_ckpt5(fsdp_run)}")])
    assert read_losses(tmp_path) == read_losses(fsdp_run)[5:]  # bitwise


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sequence-parallel"])
def test_tp_2_ranks(tmp_path, char_data, base_gpt2, sp):
    torchrun(2, ["pretrain", *run_args(tmp_path, char_data, "--train.micro_batch=8", "--parallel.tp=2",
                                       f"--parallel.sequence_parallel={str(sp).lower()}", "--train.stop_after=5")])
    assert_losses_close(read_losses(tmp_path), read_losses(base_gpt2)[:5])


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
