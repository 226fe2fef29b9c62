"""GPU checks of the model kernels (CUDA or ROCm; skipped elsewhere): packed documents through compiled
FlexAttention against the dense mask, and the chunked / Liger loss against the plain one, with its memory."""

import pytest
import torch

from gptforge.model.gpt import GPTConfig, build_model
from gptforge.objectives.head import _liger_loss_cls
from gptforge.objectives.lm import LMObjective

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")]


def _step(model, impl, batch):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = LMObjective(impl)(model, batch)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_flex_packed_training_step_equals_dense_mask(arch):
    cfg = GPTConfig(arch=arch, vocab_size=512, block_size=512, n_layer=2, n_head=8,
                    n_kv_head=2 if arch == "llama" else None, d_model=256, d_ff=512, bias=arch == "gpt2")
    model = build_model(cfg, "cuda", seed=0)
    g = torch.Generator().manual_seed(0)
    B, T = 4, 512
    ids = torch.randint(0, 512, (B, T), generator=g)
    lens = [[100, 250, 162], [512], [300, 200, 12], [64] * 8]
    doc = torch.cat([torch.cat([torch.full((n,), d) for d, n in enumerate(row)])[None] for row in lens])
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lens])
    batch = {"input_ids": ids.cuda(), "labels": ids.roll(-1, 1).cuda(), "positions": pos.cuda(),
             "doc_ids": doc.cuda()}
    out = {}
    for att in ("sdpa", "flex"):
        model.attention = att
        out[att] = _step(model, "plain", batch)
    (ls, gs), (lf, gf) = out["sdpa"], out["flex"]
    assert abs(ls.item() - lf.item()) < 2e-2, (ls.item(), lf.item())
    for n in gs:
        assert (gs[n] - gf[n]).norm() <= 5e-2 * gs[n].norm() + 1e-6, n


@pytest.mark.parametrize("impl", ["chunked", "liger"])
def test_fused_loss_matches_plain_with_less_memory(impl):
    if impl == "liger" and _liger_loss_cls() is None:
        pytest.skip("liger-kernel is not installed")
    V, B, T = 50304, 8, 1024
    cfg = GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=6, d_model=384, d_ff=1536)
    model = build_model(cfg, "cuda", seed=0)
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.randint(0, V, (B, T), generator=g).cuda() for k in ("input_ids", "labels")}
    batch["labels"][:, :100] = -100
    peak = {}
    res = {}
    for name in ("plain", impl):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res[name] = _step(model, name, batch)
        torch.cuda.synchronize()
        peak[name] = torch.cuda.max_memory_allocated() - base
    (lp, gp), (lc, gc) = res["plain"], res[impl]
    assert abs(lp.item() - lc.item()) < 1e-2, (lp.item(), lc.item())
    for n in gp:
        assert (gp[n] - gc[n]).norm() <= 3e-2 * gp[n].norm() + 1e-6, n
    # plain: (8192, 50304) bf16 logits + their fp32 copy and gradient, ~3 GiB; chunked: a few chunks of it
    assert peak[impl] < 0.5 * peak["plain"], peak
