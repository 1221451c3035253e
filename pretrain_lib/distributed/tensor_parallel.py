"""Tensor parallelism (Megatron-LM style): split each layer's weight matrices across ranks.

In the MLP the first linear layer is split by output columns (each rank computes d_ff/p
of the hidden units, and GELU acts on them locally), the second by input rows (each rank
produces a partial sum of the output); one all-reduce per MLP joins the partial sums.
Attention splits the same way by heads: each rank owns n_heads/p heads' Q, K, V columns
and the matching rows of the output projection.

Two autograd operators carry the communication (Shoeybi et al., 2019, the f and g of
Fig. 3): :class:`CopyToTensorParallel` is the identity forward and all-reduces the
gradient backward; :class:`ReduceFromTensorParallel` all-reduces forward and is the
identity backward.

The module trains the course's GPT with every block converted, once by hand and once
with DTensor (``init_device_mesh`` + ``parallelize_module``), and compares the weights
with one process training the unsharded model.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..model import GPT
from ..objectives import clm_loss
from .common import (DistContext, base_parser, build_model, check_args, global_batch, inject_fault, make_optimizer,
                     max_abs_diff, params_of, reference_run, run_main, setup, sync, teardown, tensor_bytes,
                     write_metrics)

_COMM = {"bytes": 0}  # bytes all-reduced by the two operators below, read by the training loop


class CopyToTensorParallel(torch.autograd.Function):
    """f: identity forward; backward sums the input gradient over the ranks (each rank's
    columns contributed part of it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        _COMM["bytes"] += tensor_bytes(grad)
        return grad


class ReduceFromTensorParallel(torch.autograd.Function):
    """g: forward sums the ranks' partial outputs; backward passes the gradient through
    (every rank needs the whole output gradient)."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous().clone()
        dist.all_reduce(x)
        _COMM["bytes"] += tensor_bytes(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def shard_rows(weight: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s block of output features: ``(out / p, in)`` of an ``(out, in)`` weight."""
    if weight.size(0) % world_size:
        raise ValueError(f"{weight.size(0)} output features cannot be split over {world_size} ranks")
    return weight.chunk(world_size, dim=0)[rank]


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rank: int,
                           world_size: int) -> torch.Tensor:
    """This rank's output columns of ``x @ weight.T + bias``: ``(..., out / p)``.

    ``weight`` is the full ``(out, in)`` matrix; the rank keeps its contiguous block of rows
    (output features). Concatenating every rank's result gives the full output.
    """
    w = shard_rows(weight, rank, world_size)
    b = None if bias is None else bias.chunk(world_size)[rank]
    return F.linear(x, w, b)


class ColumnParallelLinear(nn.Module):
    """Holds rows ``rank`` of ``W``: output ``(..., out / p)``; no communication."""

    def __init__(self, full: nn.Linear, rank: int, world_size: int):
        super().__init__()
        self.weight = nn.Parameter(shard_rows(full.weight.detach(), rank, world_size).clone())
        self.bias = nn.Parameter(full.bias.detach().chunk(world_size)[rank].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Holds input columns ``rank`` of ``W``: partial products are summed by one all-reduce;
    the bias is added once, after the sum."""

    def __init__(self, full: nn.Linear, rank: int, world_size: int):
        super().__init__()
        if full.in_features % world_size:
            raise ValueError(f"{full.in_features} input features cannot be split over {world_size} ranks")
        self.weight = nn.Parameter(full.weight.detach().chunk(world_size, dim=1)[rank].clone())
        self.bias = nn.Parameter(full.bias.detach().clone())

    def forward(self, x_local: torch.Tensor) -> torch.Tensor:
        return ReduceFromTensorParallel.apply(F.linear(x_local, self.weight)) + self.bias


class TensorParallelMLP(nn.Module):
    """``down(gelu(up(x)))`` with ``up`` column-parallel and ``down`` row-parallel: one all-reduce forward."""

    def __init__(self, mlp: nn.Module, rank: int, world_size: int):
        super().__init__()
        self.up = ColumnParallelLinear(mlp.up, rank, world_size)
        self.down = RowParallelLinear(mlp.down, rank, world_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = CopyToTensorParallel.apply(x)
        return self.down(F.gelu(self.up(x)))


def split_qkv(qkv: nn.Linear) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """The course's fused ``qkv`` layer ``(3d, d)`` as three ``(d, d)`` layers q, k, v.

    Splitting the fused matrix by rows would hand rank 0 all of Q and part of K; split
    per projection, each rank gets its heads' Q, K and V.
    """
    d = qkv.in_features
    out = []
    for i in range(3):
        lin = nn.Linear(d, d, device=qkv.weight.device)
        with torch.no_grad():
            lin.weight.copy_(qkv.weight[i * d:(i + 1) * d])
            lin.bias.copy_(qkv.bias[i * d:(i + 1) * d])
        out.append(lin)
    return tuple(out)


class HeadSplitAttention(nn.Module):
    """Causal self-attention with separate q, k, v layers; works on all heads or on a
    rank's share of them (the head count is read from the layer's output width)."""

    def __init__(self, attn: nn.Module, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.q, self.k, self.v = split_qkv(attn.qkv)
        self.proj = attn.proj

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """x ``(b, t, d)`` → concatenated head outputs ``(b, t, local_heads · head_dim)``."""
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (self.q(x), self.k(x), self.v(x)))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(b, t, -1)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if key_padding_mask is not None:
            raise NotImplementedError("the tensor-parallel lesson uses unpadded batches")
        return self.proj(self.attend(x))


class TensorParallelAttention(HeadSplitAttention):
    """Each rank computes n_heads / p heads: q, k, v column-parallel, proj row-parallel."""

    def __init__(self, attn: nn.Module, head_dim: int, n_heads: int, rank: int, world_size: int):
        if n_heads % world_size:
            raise ValueError(f"{n_heads} heads cannot be split over {world_size} ranks; pick n_heads divisible by it")
        super().__init__(attn, head_dim)
        self.q, self.k, self.v = (ColumnParallelLinear(lin, rank, world_size) for lin in (self.q, self.k, self.v))
        self.proj = RowParallelLinear(attn.proj, rank, world_size)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if key_padding_mask is not None:
            raise NotImplementedError("the tensor-parallel lesson uses unpadded batches")
        return self.proj(self.attend(CopyToTensorParallel.apply(x)))


def parallelize_by_hand(model: GPT, rank: int, world_size: int) -> GPT:
    """Replace every block's attention and MLP by their tensor-parallel versions (in place).

    Embeddings, LayerNorms and the tied output layer stay replicated: every rank computes
    them identically, and f's backward all-reduce gives them the full gradient.
    """
    c = model.config
    for block in model.backbone.blocks:
        block.attn = TensorParallelAttention(block.attn, c.head_dim, c.n_heads, rank, world_size)
        block.mlp = TensorParallelMLP(block.mlp, rank, world_size)
    return model


def parallelize_with_dtensor(model: GPT, ctx: DistContext) -> GPT:
    """The same split with ``torch.distributed.tensor.parallel`` on a 1-D device mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    plan = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.proj": RowwiseParallel(), "mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel()}
    for block in model.backbone.blocks:
        block.attn = HeadSplitAttention(block.attn, model.config.head_dim)
        parallelize_module(block, mesh, plan)
    return model


def gather_full_params(model: GPT, variant: str, ctx: DistContext) -> dict[str, torch.Tensor]:
    """Reassemble the unsharded weights under the original GPT's parameter names."""
    out: dict[str, torch.Tensor] = {}

    def full(t: torch.Tensor, dim: int) -> torch.Tensor:
        if variant == "dtensor":
            return t.full_tensor().detach() if hasattr(t, "full_tensor") else t.detach()
        parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
        dist.all_gather(parts, t.detach().contiguous())
        return torch.cat(parts, dim=dim)

    for name, p in model.named_parameters():
        if ".attn." not in name and ".mlp." not in name:
            out[name] = full(p, 0) if variant == "dtensor" else p.detach()
    for i, block in enumerate(model.backbone.blocks):
        pre = f"backbone.blocks.{i}"
        a, m = block.attn, block.mlp
        out[f"{pre}.attn.qkv.weight"] = torch.cat([full(l.weight, 0) for l in (a.q, a.k, a.v)], dim=0)
        out[f"{pre}.attn.qkv.bias"] = torch.cat([full(l.bias, 0) for l in (a.q, a.k, a.v)], dim=0)
        out[f"{pre}.attn.proj.weight"] = full(a.proj.weight, 1)
        out[f"{pre}.attn.proj.bias"] = a.proj.bias.full_tensor().detach() if variant == "dtensor" else a.proj.bias.detach()
        out[f"{pre}.mlp.up.weight"] = full(m.up.weight, 0)
        out[f"{pre}.mlp.up.bias"] = full(m.up.bias, 0)
        out[f"{pre}.mlp.down.weight"] = full(m.down.weight, 1)
        out[f"{pre}.mlp.down.bias"] = m.down.bias.full_tensor().detach() if variant == "dtensor" else m.down.bias.detach()
    return out


def check_forward_backward(args, ctx: DistContext) -> dict[str, float]:
    """One block: output and input gradient of the by-hand split against the unsharded block."""
    model = build_model(args, ctx.device)
    block = model.backbone.blocks[0]
    g = torch.Generator().manual_seed(args.seed + 17)
    x = torch.randn(2, args.seq_len, args.d_model, generator=g).to(ctx.device)
    w = torch.randn(2, args.seq_len, args.d_model, generator=g).to(ctx.device)  # a fixed random projection as the "loss"
    x_ref = x.clone().requires_grad_(True)
    y_ref = block(x_ref)
    (y_ref * w).sum().backward()
    up_grad_ref = block.mlp.up.weight.grad.detach().clone()
    parallelize_by_hand(model, ctx.rank, ctx.world_size)
    x_tp = x.clone().requires_grad_(True)
    y_tp = block(x_tp)
    (y_tp * w).sum().backward()
    up_grad_tp = block.mlp.up.weight.grad
    y_tp, y_ref = y_tp.detach(), y_ref.detach()
    return {"output_max_abs_diff": float((y_tp - y_ref).abs().max()),
            "input_grad_max_abs_diff": float((x_tp.grad - x_ref.grad).abs().max()),
            "mlp_up_grad_shard_max_abs_diff": float((up_grad_tp - shard_rows(up_grad_ref, ctx.rank,
                                                                              ctx.world_size)).abs().max())}


def train_variant(variant: str, args, ctx: DistContext) -> dict:
    model = build_model(args, ctx.device)
    if variant == "by_hand":
        parallelize_by_hand(model, ctx.rank, ctx.world_size)
    elif variant == "dtensor":
        parallelize_with_dtensor(model, ctx)
    else:
        raise ValueError(f"unknown variant {variant!r}; choose by_hand or dtensor")
    opt = make_optimizer(model.parameters(), args)
    losses, step_seconds = [], []
    _COMM["bytes"] = 0
    for step in range(args.steps):
        ids = global_batch(step, args).to(ctx.device)  # every rank sees the whole batch: it holds part of each layer
        sync(ctx.device)
        t0 = time.perf_counter()
        loss = clm_loss(model(ids), ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(ctx.device)
        step_seconds.append(time.perf_counter() - t0)
        losses.append(loss.item())
    local_param_bytes = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in model.parameters())
    return {"params": gather_full_params(model, variant, ctx), "losses": losses,
            "seconds_per_step": sorted(step_seconds)[len(step_seconds) // 2],
            "bytes_all_reduced_per_step": _COMM["bytes"] / args.steps if variant == "by_hand" else None,
            "local_param_bytes": local_param_bytes}


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Megatron-style tensor parallelism by hand and with DTensor.")
    parser.add_argument("--variants", default="by_hand,dtensor")
    args = parser.parse_args(argv)
    ctx = setup(args.init_timeout)
    check_args(args, ctx.world_size)
    if args.n_heads % ctx.world_size:
        raise ValueError(f"--n-heads {args.n_heads} must be divisible by the {ctx.world_size} ranks")
    inject_fault(args, ctx)
    ref_model, ref_losses = reference_run(args, ctx.device)
    ref = params_of(ref_model)
    c = ref_model.config
    metrics: dict = {"strategy": "tensor_parallel", "world_size": ctx.world_size, "backend": ctx.backend,
                     "device": str(ctx.device), "reference_losses": ref_losses,
                     "full_param_bytes": sum(tensor_bytes(p) for p in ref_model.parameters()),
                     # 2 all-reduces forward + 2 backward per block, each of one activation (batch, seq, d_model)
                     "predicted_bytes_per_step": 4 * c.n_layers * args.batch * args.seq_len * c.d_model * 4,
                     "block_check": check_forward_backward(args, ctx), "variants": {}}
    for variant in args.variants.split(","):
        dist.barrier()
        out = train_variant(variant, args, ctx)
        params = out.pop("params")
        out["max_abs_diff_vs_single"] = max_abs_diff(params, ref)
        out["worst_param"] = max(ref, key=lambda k: float((params[k].cpu() - ref[k].cpu()).abs().max()))
        metrics["variants"][variant] = out
    metrics["max_abs_diff_vs_single"] = max([v["max_abs_diff_vs_single"] for v in metrics["variants"].values()]
                                            + list(metrics["block_check"].values()))
    if ctx.is_main:
        write_metrics(args.out, metrics)
    teardown()


if __name__ == "__main__":
    run_main(main)
