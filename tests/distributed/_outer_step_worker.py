"""torchrun worker: the local-SGD outer step (gptforge.parallel.localsgd.LocalSGD.sync) on 2 gloo ranks.

For each setting (outer_lr, outer_momentum) a small model (two matrices and two vectors, float32, the same start on
every rank) goes through 3 rounds: the rank moves its parameters on its own (a rank-dependent change, as H local
steps would), then LocalSGD.sync() runs the outer step. Each rank saves to OUT/rank{r}.pt, per setting: the start,
per round the parameters before sync (its local result) and after, and the outer momentum after the last round.
test_local_sgd.py computes the outer step from these in float64 and compares."""

from __future__ import annotations

import torch

from gptforge.parallel.localsgd import LocalSGD

from _cases_worker import run_cases

SETTINGS = {"average": (1.0, 0.0), "outer_lr": (0.7, 0.0), "diloco": (0.7, 0.9)}
ROUNDS = 3


def rounds(env, outer_lr: float, momentum: float) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    sgd = LocalSGD(model, every=4, outer_lr=outer_lr, outer_momentum=momentum)
    params = list(model.parameters())
    out = {"start": [p.detach().clone() for p in params], "before": [], "after": []}
    for k in range(ROUNDS):
        gen = torch.Generator().manual_seed(100 * k + env.rank)
        with torch.no_grad():  # this replica's own progress: rank-dependent, a mean offset per rank too
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3 + (0.2 if env.rank else -0.1))
        out["before"].append([p.detach().clone() for p in params])
        sgd.sync()
        out["after"].append([p.detach().clone() for p in params])
    out["momentum"] = [v.clone() for v in sgd.state_dict().values()]
    out["syncs"] = sgd.syncs
    return out


if __name__ == "__main__":
    run_cases(SETTINGS, rounds)
