"""Which data-parallel layout a run uses: the mesh shape (dp_replicate x dp_shard x tp) and ddp | fsdp.

Inside one node the ranks talk over PCIe/NVLink or shared memory; between nodes over a network that is
often 1 Gbit Ethernet. FSDP gathers every parameter and reduce-scatters every gradient each step, so over
all ranks it sends ~3x the model per step over the slow link; replication (DDP) sends the gradients once.
``parallel.strategy=auto`` with dp_replicate / dp_shard left at their defaults therefore chooses, on
several nodes:

  - DDP (every rank replicates) when the model fits replicated on one device: the memory estimate of
    gptforge.model.cost for the configured micro-batch (micro-batch 1 with activation checkpointing under
    --train.auto, the least --train.auto can pick) within FIT_FRACTION of the device memory;
  - else HSDP: shard inside a node, replicate across nodes (dp_replicate = nodes, dp_shard = ranks per
    node / tp), when that fits;
  - else plain FSDP over every rank (the model only fits sharded over all of them).

With tensor parallelism "replicate" is HSDP with dp_shard=1 (DDP cannot reduce DTensor gradients). On one
node, or when the user names a strategy or the dp sizes, the configured layout is used as before
(``auto``: FSDP over the ranks). Rank 0 prints one line: the layout and why.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptforge.errors import UserError
from gptforge.hardware import FIT_FRACTION, GiB, DeviceInfo, detect, resolve_precision
from gptforge.model import cost
from gptforge.model.gpt import GPTConfig
from gptforge.parallel.mesh import DistEnv, build_mesh, layout_pending, mesh_shape

_CROSS = "FSDP would send parameters over the inter-node link every step"


@dataclass
class Layout:
    strategy: str  # none | ddp | fsdp
    dp_replicate: int
    dp_shard: int
    tp: int
    reason: str


def replicated_need(cfg, mcfg: GPTConfig, world: int, dev: DeviceInfo, shard: int = 1) -> tuple[int, int]:
    """(estimated bytes per rank, budget bytes) for this model with its state divided over ``shard`` ranks."""
    t = cfg.train
    prec = resolve_precision(t.precision, dev.vendor if dev.is_gpu else "cpu", dev.bf16)
    mb, ckpt = (1, True) if t.auto else (t.micro_batch, t.activation_checkpointing)
    need = cost.estimate_memory(mcfg, mb, mcfg.block_size, prec, activation_checkpointing=ckpt, world_size=world,
                                shard=shard, device=dev.vendor if dev.is_gpu else "cpu")
    return need, int(dev.memory * FIT_FRACTION)


def strategy_for(strategy: str, rep: int, shard: int, tp: int, has_mesh: bool = True) -> str:
    """none | ddp | fsdp for a mesh of this shape: auto shards when dp_shard > 1, else replicates."""
    if rep * shard == 1:
        explicit = has_mesh and tp == 1 and strategy in ("ddp", "fsdp")
        return strategy if explicit else "none"
    if strategy == "none":
        raise UserError("parallel.strategy=none but there are several data-parallel ranks; use ddp or fsdp")
    if strategy == "auto":
        # DDP cannot reduce DTensor gradients: with TP, pure replication runs as HSDP with dp_shard=1
        return "fsdp" if shard > 1 or tp > 1 else "ddp"
    if strategy == "ddp" and tp > 1:
        raise UserError(f"parallel.strategy=ddp cannot be combined with tensor parallel (parallel.tp={tp}): "
                        "DDP does not reduce DTensor gradients; use parallel.strategy=fsdp or auto "
                        "(with parallel.dp_shard=1 and parallel.dp_replicate=N it replicates like DDP)")
    return strategy


def resolve_strategy(env: DistEnv, parallel_cfg) -> str:
    """The strategy of this run: the settled layout's, else from the mesh init_distributed built."""
    if env.layout is not None:
        return env.layout.strategy
    if env.mesh is None:
        if env.dp_size > 1:
            raise RuntimeError("the parallel layout is not settled yet: call settle_layout(env, cfg, model.cfg)")
        return "none"
    return strategy_for(parallel_cfg.strategy, env.mesh["dp_replicate"].size(), env.mesh["dp_shard"].size(),
                        env.tp_size)


def _configured(par, world: int, nnodes: int, ranks_per_node: int) -> Layout:
    rep, shard, tp = mesh_shape(world, par.dp_replicate, par.dp_shard, par.tp)
    strategy = strategy_for(par.strategy, rep, shard, tp)
    asked = par.strategy != "auto" or par.dp_replicate != 1 or par.dp_shard != -1
    if nnodes > 1 and strategy == "fsdp" and shard * tp > ranks_per_node:
        why = f"FSDP across nodes as asked (parallel.strategy / dp_shard); {_CROSS}"
    elif asked or nnodes > 1:
        why = "as configured"
    else:
        why = {"fsdp": "one node: auto shards over its ranks", "ddp": "one node: auto replicates"}.get(strategy, "")
    return Layout(strategy, rep, shard, tp, why or "one rank")


def choose_layout(cfg, mcfg: GPTConfig, world: int, nnodes: int, ranks_per_node: int,
                  dev: DeviceInfo | None = None) -> Layout:
    """The layout for ``world`` ranks on ``nnodes`` nodes of ``ranks_per_node`` (see the module docstring)."""
    par = cfg.parallel
    if not layout_pending(par, nnodes):
        return _configured(par, world, nnodes, ranks_per_node)
    tp = par.tp
    mesh_shape(world, 1, -1, tp)  # tp divides the world
    if ranks_per_node % tp:
        lay = _configured(par, world, nnodes, ranks_per_node)
        lay.reason = f"parallel.tp={tp} does not divide the {ranks_per_node} ranks of a node; {_CROSS}"
        return lay
    dev = dev or detect()
    need, budget = replicated_need(cfg, mcfg, world, dev)
    gib = f"est {need / GiB:.1f} GiB/rank of a {budget / GiB:.1f} GiB budget"
    if need <= budget:
        strategy = "ddp" if tp == 1 else "fsdp"
        return Layout(strategy, world // tp, 1, tp, f"the model ({gib}) fits replicated; {_CROSS}")
    shard = ranks_per_node // tp
    if shard > 1:
        hs_need, _ = replicated_need(cfg, mcfg, world, dev, shard=shard)
        if hs_need <= budget:
            return Layout("fsdp", nnodes, shard, tp,
                          f"the model does not fit replicated ({gib}): HSDP shards it over the {shard} ranks of "
                          f"a node (est {hs_need / GiB:.1f} GiB/rank) and replicates across nodes")
    return Layout("fsdp", 1, world // tp, tp,
                  f"the model does not fit replicated ({gib}) nor sharded inside one node: FSDP over all "
                  f"{world // tp} data-parallel ranks, across the inter-node link")


def describe(lay: Layout, env: DistEnv) -> str:
    per = env.ranks_per_node
    where = (f"across {env.nnodes} nodes x {per} rank{'s' if per > 1 else ''}" if env.nnodes > 1
             else f"on {env.world_size} rank(s)")
    shape = f"mesh dp_replicate {lay.dp_replicate} x dp_shard {lay.dp_shard} x tp {lay.tp}"
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    return (f"parallel: {lay.strategy}{' + tp' if lay.tp > 1 else ''} {where}, {shape}, backend {backend}: "
            f"{lay.reason}")


def settle_layout(env: DistEnv, cfg, mcfg: GPTConfig, dev: DeviceInfo | None = None) -> Layout | None:
    """Choose the layout once (idempotent), build the mesh if init_distributed left it to the model, and print
    the layout line on rank 0. None for one process without a process group."""
    if env.layout is not None or (env.mesh is None and not env.distributed):
        return env.layout
    lay = choose_layout(cfg, mcfg, env.world_size, env.nnodes, env.ranks_per_node, dev)
    if env.mesh is None:
        build_mesh(env, lay.dp_replicate, lay.dp_shard, lay.tp)
    env.layout = lay
    if env.is_main:
        print(describe(lay, env), flush=True)
    return lay
