"""torchrun worker: tensor parallel with the block options (qk_norm, relu2, untied head, logit soft-cap)
equals one process: the loss and every parameter's gradient, for tp over all ranks.

Prints one line from rank 0: TPOPTS {case: [|loss difference|, max |gradient difference|, q_norm is a DTensor]}.
Each rank also holds the unparallelized model (same seed), so the reference needs no second job."""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from gptforge.config.schema import Config
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.parallel.exit import run_main
from gptforge.parallel.mesh import init_distributed, shutdown
from gptforge.parallel.tp import apply_tp


def case(arch: str, sp: bool, mesh) -> list:
    cfg = GPTConfig(arch=arch, vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2 if arch == "llama" else 4,
                    d_model=32, d_ff=64, qk_norm=True, mlp_act="relu2", logit_softcap=5.0, tie_embeddings=False)
    ref = build_model(cfg, seed=0)
    with torch.no_grad():  # gains away from 1, so each head's share of their gradient differs
        for n, p in ref.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.3)
    tp = apply_tp(copy.deepcopy(ref), mesh, sequence_parallel=sp)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    losses = []
    for m in (ref, tp):
        loss = F.cross_entropy(m(x).flatten(0, 1), y.flatten())
        loss.backward()
        losses.append(loss.item())
    worst = 0.0
    for (n, pr), (_, pt) in zip(ref.named_parameters(), tp.named_parameters()):
        g = pt.grad.full_tensor() if isinstance(pt.grad, DTensor) else pt.grad
        worst = max(worst, (g - pr.grad).abs().max().item())
    return [abs(losses[0] - losses[1]), worst, isinstance(tp.layers["0"].attn.q_norm.weight, DTensor)]


def main() -> int:
    env = init_distributed(Config().parallel, "cpu")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (env.world_size,))
    out = {f"{arch}-sp{int(sp)}": case(arch, sp, mesh) for arch, sp in (("llama", False), ("llama", True),
                                                                       ("gpt2", False))}
    if env.rank == 0:
        print("TPOPTS " + json.dumps(out), flush=True)
    shutdown(env)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
