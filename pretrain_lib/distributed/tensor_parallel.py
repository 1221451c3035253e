"""Tensor parallelism (Megatron-LM style), the chapter's runner: the course's GPT trained with its
layers split across ranks, by hand and with DTensor, against one process.

The layers (column- and row-parallel linear, the MLP and attention split by heads, the two
communication operators f and g) are in :mod:`.tensor_parallel_layers`. This module trains both
implementations with the engine's ``train_step``, checks one block's forward and backward against
the unsharded block, and compares the weights with one process training the unsharded model.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ..model import GPT
from ..train import clm_objective, train_step
from .arguments import autocast_dtype
from .comm_model import tensor_parallel_bytes
from .errors import run_main
from .harness import StrategyRun
from .metrics import StepTimer, read_losses, tensor_bytes, variant_record
from .process_group import DistContext
from .reference import strategy_model, global_batch, strategy_optimizer
from .tensor_parallel_layers import TensorParallelComm, apply_tensor_parallel, column_shard


def _mixed_tensor_kinds(variant: str):
    """DTensor's split leaves the embeddings and LayerNorms plain tensors; the engine's fused
    gradient ops (one call over all gradients) then see both kinds, which DTensor allows only
    when plain tensors are declared replicated, as they are here (every rank holds all of them)."""
    if variant != "dtensor":
        return contextlib.nullcontext()
    from torch.distributed.tensor.experimental import implicit_replication
    return implicit_replication()


def _tp_mesh(ctx: DistContext):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(ctx.device.type, (ctx.world_size,))


def gather_full_params(model: GPT, variant: str, ctx: DistContext, group: dist.ProcessGroup | None = None
                       ) -> dict[str, torch.Tensor]:
    """Reassemble the unsharded weights under the original GPT's parameter names. ``group`` is the
    tensor-parallel group of the by-hand split (default: every rank); a parameter that is also a
    DTensor (FSDP2 over a data-parallel dimension, chapter 9.1) is gathered whole first."""
    out: dict[str, torch.Tensor] = {}
    world = dist.get_world_size(group)

    def whole(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor().detach() if hasattr(t, "full_tensor") else t.detach()

    def full(t: torch.Tensor, dim: int) -> torch.Tensor:
        if variant == "dtensor":
            return whole(t)
        parts = [torch.empty_like(whole(t)) for _ in range(world)]
        dist.all_gather(parts, whole(t).contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    for name, p in model.named_parameters():
        if ".attn." not in name and ".mlp." not in name:
            out[name] = whole(p)
    for i, block in enumerate(model.backbone.blocks):
        pre = f"backbone.blocks.{i}"
        a, m = block.attn, block.mlp
        out[f"{pre}.attn.qkv.weight"] = torch.cat([full(l.weight, 0) for l in (a.q, a.k, a.v)], dim=0)
        out[f"{pre}.attn.qkv.bias"] = torch.cat([full(l.bias, 0) for l in (a.q, a.k, a.v)], dim=0)
        out[f"{pre}.attn.proj.weight"] = full(a.proj.weight, 1)
        out[f"{pre}.attn.proj.bias"] = whole(a.proj.bias)
        out[f"{pre}.mlp.up.weight"] = full(m.up.weight, 0)
        out[f"{pre}.mlp.up.bias"] = full(m.up.bias, 0)
        out[f"{pre}.mlp.down.weight"] = full(m.down.weight, 1)
        out[f"{pre}.mlp.down.bias"] = whole(m.down.bias)
    return out


def check_forward_backward(args, ctx: DistContext) -> dict[str, float]:
    """One block: output and input gradient of the by-hand split against the unsharded block."""
    model = strategy_model(args, ctx.device)
    block = model.backbone.blocks[0]
    g = torch.Generator().manual_seed(args.seed + 17)
    x = torch.randn(2, args.seq_len, args.d_model, generator=g).to(ctx.device)
    w = torch.randn(2, args.seq_len, args.d_model, generator=g).to(ctx.device)  # a fixed random projection as the "loss"
    x_ref = x.clone().requires_grad_(True)
    y_ref = block(x_ref)
    (y_ref * w).sum().backward()
    up_grad_ref = block.mlp.up.weight.grad.detach().clone()
    apply_tensor_parallel(model, _tp_mesh(ctx), implementation="by_hand")
    x_tp = x.clone().requires_grad_(True)
    y_tp = block(x_tp)
    (y_tp * w).sum().backward()
    up_grad_tp = block.mlp.up.weight.grad
    y_tp, y_ref = y_tp.detach(), y_ref.detach()
    return {"output_max_abs_diff": float((y_tp - y_ref).abs().max()),
            "input_grad_max_abs_diff": float((x_tp.grad - x_ref.grad).abs().max()),
            "mlp_up_grad_shard_max_abs_diff": float((up_grad_tp - column_shard(up_grad_ref, None, ctx.rank,
                                                                                ctx.world_size)[0]).abs().max())}


def train_variant(variant: str, args, ctx: DistContext) -> dict:
    if variant not in ("by_hand", "dtensor"):
        raise ValueError(f"unknown variant {variant!r}; choose by_hand or dtensor")
    autocast = autocast_dtype(args, ctx.device)
    model = strategy_model(args, ctx.device)
    comm = TensorParallelComm()
    apply_tensor_parallel(model, _tp_mesh(ctx), implementation=variant, comm=comm)
    opt = strategy_optimizer(model, args)
    timer, losses = StepTimer(ctx.device), []
    for step in range(args.steps):
        ids = global_batch(step, args).to(ctx.device)  # every rank sees the whole batch: it holds part of each layer
        with timer.measure(), _mixed_tensor_kinds(variant):
            losses.append(train_step(model, [{"input_ids": ids}], clm_objective, opt, autocast=autocast).loss)
    local_param_bytes = sum(tensor_bytes(p.to_local() if hasattr(p, "to_local") else p) for p in model.parameters())
    return {"params": gather_full_params(model, variant, ctx),
            **variant_record(losses=read_losses(losses), seconds_per_step=timer.median,
                             # DTensor's collectives are its own: only the by-hand operators are counted
                             bytes_per_step=comm.bytes / args.steps if variant == "by_hand" else None,
                             local_param_bytes=local_param_bytes)}


def _heads_divide(args, ctx: DistContext) -> None:
    if args.n_heads % ctx.world_size:
        raise ValueError(f"--n-heads {args.n_heads} must be divisible by the {ctx.world_size} ranks")


def main(argv: list[str] | None = None) -> None:
    run = StrategyRun("tensor_parallel", "Megatron-style tensor parallelism by hand and with DTensor.",
                      ("by_hand", "dtensor"), argv, check=_heads_divide)
    args, ctx, ref = run.args, run.ctx, run.reference
    c = run.reference_model.config
    param_dtype = next(run.reference_model.parameters()).dtype
    # forward all-reduces carry a linear layer's output (the autocast dtype); backward ones the
    # gradient of a LayerNorm's output, which stays in the parameters' dtype
    forward_dtype = run.autocast if run.autocast is not None else param_dtype
    run.metrics["full_param_bytes"] = run.metrics["param_bytes"]
    run.metrics["predicted_bytes_per_step"] = tensor_parallel_bytes(
        n_layers=c.n_layers, batch=args.batch, seq_len=args.seq_len, d_model=c.d_model,
        forward_value_bytes=torch.finfo(forward_dtype).bits // 8, backward_value_bytes=torch.finfo(param_dtype).bits // 8)
    run.metrics["block_check"] = check_forward_backward(args, ctx)
    for variant in run.variants():
        out = train_variant(variant, args, ctx)
        params = run.record(variant, out)
        out["worst_param"] = max(ref, key=lambda k: float((params[k].cpu() - ref[k].cpu()).abs().max()))
    run.finish(also=run.metrics["block_check"].values())


if __name__ == "__main__":
    run_main(main)
