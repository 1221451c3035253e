"""A course GPT built on the meta device, sharded with FSDP2 and only then given storage (chapter 9.4).

Every rank builds the whole model on the meta device (shapes, no storage), applies
:func:`.strategies.apply_fsdp` over all ranks, and calls :func:`pretrain_lib.model.materialise`:
each rank allocates and initialises only its shard of every parameter. It then takes
``--steps`` training steps through the engine's ``train`` (FSDP2 gathers each block when it
runs). Rank 0 writes ``metrics.json``: the parameters and bytes each rank holds against the
whole model, the standard deviation of one initialised hidden matrix (gathered whole) against
the init's 0.02, and the losses.

    torchrun --standalone --nproc_per_node 2 -m pretrain_lib.distributed.meta_init_run --out runs/meta
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from ..model import GPT, ModelConfig, materialise
from ..train import clm_objective, train
from .errors import run_main
from .metrics import write_metrics
from .process_group import setup, teardown
from .strategies import apply_fsdp


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Build a GPT on the meta device, shard it with FSDP2, then materialise.")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-timeout", type=float, default=120.0)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = setup(args.init_timeout)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    config = ModelConfig(vocab_size=args.vocab_size, d_model=args.d_model, n_heads=4, n_layers=args.n_layers,
                         max_seq_len=args.seq_len)
    with torch.device("meta"):
        model = GPT(config)
    apply_fsdp(model, mesh)
    torch.manual_seed(args.seed + ctx.rank)
    materialise(model, ctx.device)
    local = [p.to_local() for p in model.parameters()]
    held = {"params": sum(t.numel() for t in local), "bytes": sum(t.numel() * t.element_size() for t in local)}
    per_rank = [None] * ctx.world_size
    dist.all_gather_object(per_rank, held)
    up = model.backbone.blocks[0].mlp.up.weight.full_tensor()   # gathered whole, to check the init
    g = torch.Generator().manual_seed(args.seed * 1000 + ctx.rank)
    history = train(model, lambda step: {"input_ids": torch.randint(0, args.vocab_size, (args.batch, args.seq_len),
                                                                    generator=g)},
                    clm_objective, steps=args.steps, lr=1e-3, device=ctx.device, progress=False, log_every=1)
    if ctx.is_main:
        write_metrics(args.out, {"world_size": ctx.world_size, "backend": ctx.backend,
                                 "full_params": sum(p.numel() for p in model.parameters()),
                                 "per_rank": per_rank, "up_weight_std": up.std().item(), "init_std": 0.02,
                                 "losses": [float(x) for x in history.losses]})
    teardown()


if __name__ == "__main__":
    run_main(main)
