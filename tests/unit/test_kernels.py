"""Model kernels: the chunked linear + cross-entropy against the plain (full logits) path, its memory,
and packed documents through FlexAttention against the dense document mask (gptforge.objectives.head,
gptforge.model.doc_mask)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import read_losses, tiny_args
from gptforge.errors import UserError
from gptforge.model.doc_mask import resolve_attention
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.objectives.dpo import sequence_logps
from gptforge.objectives.head import chunked_linear_ce, resolve_loss_impl
from gptforge.objectives.lm import LMObjective

V = 300  # > 4 x d_model: several chunks of a wide head


def _model(arch: str, tie: bool, dtype=torch.float64):
    cfg = GPTConfig(arch=arch, vocab_size=V, block_size=64, n_layer=2, n_head=4, n_kv_head=2 if arch == "llama" else 4,
                    d_model=32, d_ff=64, bias=arch == "gpt2", tie_embeddings=tie)
    return build_model(cfg, seed=1).to(dtype)


def _batch(B=3, T=32):
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    labels[0, :10] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    return {"input_ids": ids, "labels": labels}


def _loss_and_grads(model, impl, batch, chunk_rows=16):
    model.zero_grad(set_to_none=True)
    loss, _ = LMObjective(impl, chunk_rows=chunk_rows)(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch,tie", [("gpt2", True), ("llama", False)], ids=["gpt2-tied", "llama-untied"])
@pytest.mark.parametrize("denom", [None, 7.0], ids=["mean", "loss_denom"])
def test_chunked_loss_and_grads_equal_plain_in_float64(arch, tie, denom):
    model, batch = _model(arch, tie), _batch()
    if denom is not None:  # the SFT path: sum over label tokens / the step's label count
        batch["loss_denom"] = torch.tensor(denom, dtype=torch.float64)
    lp, gp = _loss_and_grads(model, "plain", batch)
    lc, gc = _loss_and_grads(model, "chunked", batch)  # 96 rows in chunks of 16
    assert lp.dtype == lc.dtype == torch.float64
    assert abs(lp.item() - lc.item()) < 1e-12 * max(1.0, abs(lp.item()))
    assert gp.keys() == gc.keys() and ("lm_head.weight" in gp) != tie  # tied: one parameter, both uses
    for n in gp:
        assert torch.allclose(gp[n], gc[n], rtol=1e-10, atol=1e-13), n
    # DPO's per-row log-probs (reduction none): the same through the chunked head
    lpp, lpc = sequence_logps(model, batch, "plain"), sequence_logps(model, batch, "chunked")
    assert torch.allclose(lpp, lpc, rtol=1e-12) and lpp[2].item() < 0


def test_chunked_under_bf16_autocast_keeps_an_fp32_loss_equal_to_plain():
    model, batch = _model("llama", False, torch.float32), _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, gp = _loss_and_grads(model, "plain", batch)
        lc, gc = _loss_and_grads(model, "chunked", batch)
        dp = sequence_logps(model, batch, "plain") - sequence_logps(model, batch, "chunked")
    assert lc.dtype == torch.float32  # not rounded to bf16 (torch's linear_cross_entropy would return 6.25)
    assert abs(lp.item() - lc.item()) < 1e-5, (lp.item(), lc.item())
    assert dp.abs().max().item() < 1e-3
    for n in gp:  # the same bf16 math per chunk, rounded in other places (the 1/tokens scale is applied after
        # the bf16 matmuls, the head's weight gradient summed over chunks in fp32): bf16's epsilon is 4e-3
        assert (gp[n] - gc[n]).norm() <= 1e-2 * gp[n].norm() + 1e-8, n


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_function_equals_cross_entropy_in_float64(reduction):
    """The autograd.Function used under autocast (gradients computed in forward), run in float64."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(100, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.randn(V, 16, dtype=torch.float64, generator=g) * 0.3).requires_grad_()
    y = torch.randint(0, V, (100,), generator=g)
    y[:17] = -100
    ref = F.cross_entropy(h @ w.T, y, reduction=reduction)
    out = chunked_linear_ce(h, w, y, torch.float64, reduction, chunk_rows=16)  # 7 chunks, the last one short
    assert out.dtype == torch.float64 and abs(out.item() - ref.item()) < 1e-12
    for a, b in zip(torch.autograd.grad(1.7 * ref, (h, w)), torch.autograd.grad(1.7 * out, (h, w))):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)  # grad_output (1.7) scales the forward's gradients
    with torch.no_grad():  # evaluation: no gradient buffers
        assert abs(chunked_linear_ce(h, w, y, torch.float64, reduction).item() - ref.item()) < 1e-12


_PEAK = r"""
import json, resource, sys, torch
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.hardware import peak_rss_bytes as hwm
from gptforge.objectives.lm import LMObjective
torch.manual_seed(0)
V, B, T = 32768, 4, 256
m = build_model(GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=2, d_model=64, d_ff=128), seed=0)
b = {"input_ids": torch.randint(0, V, (B, T)), "labels": torch.randint(0, V, (B, T))}
import torch._dynamo  # imported lazily by the first checkpointed chunk: ~80 MB of modules, not of the loss
base = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
out = {}
for impl in sys.argv[1:]:  # the peak RSS only grows: the lower one first
    loss, _ = LMObjective(impl)(m, b)
    loss.backward()
    m.zero_grad(set_to_none=True)
    out[impl] = {"loss": loss.item(), "extra": hwm() - base}
print(json.dumps(out))
"""


def test_chunked_loss_lowers_peak_memory():
    """A fresh process (peak RSS): chunked, then plain; a (4 x 256, 32768) fp32 logits tensor is 128 MiB."""
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(1 << 17)}  # freed tensors leave the RSS at once
    r = subprocess.run([sys.executable, "-c", _PEAK, "chunked", "plain"], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert abs(out["plain"]["loss"] - out["chunked"]["loss"]) < 1e-4
    assert out["plain"]["extra"] > 256 * 2**20  # logits and their gradient at least
    assert out["chunked"]["extra"] < 0.25 * out["plain"]["extra"], out


def test_loss_impl_resolution_and_errors():
    cpu = torch.device("cpu")
    assert resolve_loss_impl("auto", cpu, 50304, 384)[0] == "chunked"
    assert resolve_loss_impl("auto", cpu, 128, 384)[0] == "plain"  # a char vocab: nothing to gain
    impl, why = resolve_loss_impl("chunked", cpu, 50304, 384, tp_size=2)
    assert impl == "plain" and "tensor parallel" in why
    with pytest.raises(UserError, match=r"train\.loss_impl=liger needs .*train\.loss_impl=auto"):
        resolve_loss_impl("liger", cpu, 50304, 384)
    with pytest.raises(UserError, match=r"train\.attention=flex needs a CUDA/ROCm device"):
        resolve_attention("flex", cpu)
    assert resolve_attention("auto", cpu) == "sdpa" and resolve_attention("auto", "cuda", dropout=0.1) == "sdpa"


def test_cli_flex_on_cpu_is_one_line_exit_2(tmp_path, char_data, capsys):
    from gptforge.cli import main

    assert main(["pretrain", *tiny_args(tmp_path, char_data, "--train.max_steps=1", "--train.attention=flex")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.attention=flex" in err[0] and "train.attention=auto" in err[0]


def test_pretrain_with_chunked_loss_follows_plain(tmp_path, char_data):
    """The setting reaches the trainer: 4 steps chunked == 4 steps plain (fp32; loss read per step)."""
    from gptforge.cli import main

    runs = {}
    for impl in ("plain", "chunked"):
        out = tmp_path / impl
        assert main(["pretrain", *tiny_args(out, char_data, "--train.max_steps=4", "--train.log_every=1",
                                            f"--train.loss_impl={impl}")]) == 0
        runs[impl] = read_losses(out)
    assert len(runs["plain"]) == 4 and runs["plain"] == pytest.approx(runs["chunked"], abs=2e-5)


# ---- packed documents -------------------------------------------------------------------------------
def _packed(T=64):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (2, T), generator=g)
    doc = torch.tensor([[0] * 20 + [1] * 30 + [-1] * (T - 50), [0] * 40 + [1] * (T - 40)])
    pos = torch.stack([torch.cat([torch.arange(20), torch.arange(30), torch.arange(T - 50)]),
                       torch.cat([torch.arange(40), torch.arange(T - 40)])])
    return ids, doc, pos


def _attention_ops(model, *args, **kw) -> tuple[torch.Tensor, set[str]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = model(*args, **kw)
    return out, {e.name for e in prof.events()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # CPU: unfused, forward only
@torch.no_grad()
def test_flex_document_mask_equals_dense_and_isolates_documents(arch):
    model = _model(arch, True, torch.float32).eval()
    ids, doc, pos = _packed()
    out = {}
    for att in ("sdpa", "flex"):
        model.attention = att
        out[att], ops = _attention_ops(model, ids, positions=pos, doc_ids=doc)
        # which kernel ran: sdpa calls aten's scaled_dot_product_attention, FlexAttention never does
        assert ("aten::scaled_dot_product_attention" in ops) == (att == "sdpa"), att
    assert (out["sdpa"] - out["flex"]).abs().max().item() < 1e-4
    # the dense-mask path equals each document run on its own
    alone = model.__class__.forward(model, ids[:1, 20:50])
    model.attention = "sdpa"
    assert (out["sdpa"][0, 20:50] - alone[0]).abs().max().item() < 1e-4
    # perturb document 0 of row 0: document 1 and the padding tail do not move, on both paths
    ids2 = ids.clone()
    ids2[0, :20] = (ids2[0, :20] + 7) % V
    for att in ("sdpa", "flex"):
        model.attention = att
        o2 = model(ids2, positions=pos, doc_ids=doc)
        assert torch.equal(o2[0, 20:], out[att][0, 20:]) and not torch.allclose(o2[0, :20], out[att][0, :20])
        assert torch.equal(o2[1], out[att][1])

