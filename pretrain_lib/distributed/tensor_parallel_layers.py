"""Tensor parallelism's layers (Megatron-LM style): each layer's weight matrices split across ranks.

In the MLP the first linear layer is split by output columns (each rank computes d_ff/p
of the hidden units, and GELU acts on them locally), the second by input rows (each rank
produces a partial sum of the output); one all-reduce per MLP joins the partial sums.
Attention splits the same way by heads: each rank owns n_heads/p heads' Q, K, V columns
and the matching rows of the output projection. (``nn.Linear`` stores its weight as the
transpose, out x in: a column-parallel layer chunks dim 0 of ``weight``, a row-parallel one dim 1.)

Two autograd operators carry the communication (Shoeybi et al., 2019, the f and g of
Fig. 3): :class:`CopyToTensorParallel` is the identity forward and all-reduces the
gradient backward; :class:`ReduceFromTensorParallel` all-reduces forward and is the
identity backward.

:func:`apply_tensor_parallel` converts every block of the course's GPT, by hand or with
DTensor (``parallelize_module``). :mod:`.tensor_parallel` is the chapter's runner.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..model import GPT
from ..mup import require_standard
from .metrics import tensor_bytes


class TensorParallelComm:
    """The tensor-parallel group and a count of the bytes its all-reduces carried."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group, self.bytes = group, 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        self.bytes += tensor_bytes(t)
        return t


class CopyToTensorParallel(torch.autograd.Function):
    """f: identity forward; backward sums the input gradient over the ranks (each rank's
    columns contributed part of it)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_reduce(grad.contiguous()), None


class ReduceFromTensorParallel(torch.autograd.Function):
    """g: forward sums the ranks' partial outputs; backward passes the gradient through
    (every rank needs the whole output gradient)."""

    @staticmethod
    def forward(ctx, x, comm):
        return comm.all_reduce(x.contiguous().clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def column_shard(weight: torch.Tensor, bias: torch.Tensor | None, rank: int, world_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rank ``rank``'s block of output features of an ``(out, in)`` weight: ``(out / p, in)`` and ``(out / p,)``."""
    if weight.size(0) % world_size:
        raise ValueError(f"{weight.size(0)} output features cannot be split over {world_size} ranks")
    return weight.chunk(world_size, dim=0)[rank], None if bias is None else bias.chunk(world_size)[rank]


class ColumnParallelLinear(nn.Module):
    """Holds :func:`column_shard` of a linear layer: output ``(..., out / p)``; no communication."""

    def __init__(self, full: nn.Linear, rank: int, world_size: int):
        super().__init__()
        weight, bias = column_shard(full.weight.detach(), full.bias.detach(), rank, world_size)
        self.weight, self.bias = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Holds input columns ``rank`` of ``W``: partial products are summed by one all-reduce;
    the bias is added once, after the sum."""

    def __init__(self, full: nn.Linear, rank: int, world_size: int, comm: TensorParallelComm):
        super().__init__()
        if full.in_features % world_size:
            raise ValueError(f"{full.in_features} input features cannot be split over {world_size} ranks")
        self.comm = comm
        self.weight = nn.Parameter(full.weight.detach().chunk(world_size, dim=1)[rank].clone())
        self.bias = nn.Parameter(full.bias.detach().clone())

    def forward(self, x_local: torch.Tensor) -> torch.Tensor:
        return ReduceFromTensorParallel.apply(F.linear(x_local, self.weight), self.comm) + self.bias


class TensorParallelMLP(nn.Module):
    """``down(gelu(up(x)))`` with ``up`` column-parallel and ``down`` row-parallel: one all-reduce forward."""

    def __init__(self, mlp: nn.Module, rank: int, world_size: int, comm: TensorParallelComm):
        super().__init__()
        self.comm = comm
        self.up = ColumnParallelLinear(mlp.up, rank, world_size)
        self.down = RowParallelLinear(mlp.down, rank, world_size, comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = CopyToTensorParallel.apply(x, self.comm)
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


def _only_causal(*masks) -> None:
    """The block passes its optional masks (padding, prefix) on; the lesson's batches use none."""
    if any(m is not None for m in masks):
        raise NotImplementedError("the tensor-parallel lesson uses unpadded, purely causal batches")


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

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, *masks) -> torch.Tensor:
        _only_causal(key_padding_mask, *masks)
        return self.proj(self.attend(x))


def tensor_parallel_grad_norm(model: nn.Module, tp_group, dp_group=None) -> torch.Tensor:
    """The whole model's gradient L2 norm on every rank of a by-hand split: a split weight's slices are summed
    over the tp ranks, a whole one (embeddings, norms, row-parallel biases) counted once; under FSDP
    (``dp_group``) each gradient is a shard, summed over the dp ranks as well. The engine clips with it
    (``train_step`` calls a model's ``grad_norm()``): each rank alone sees only its slices."""
    split = set()
    for m in model.modules():
        if isinstance(m, ColumnParallelLinear):
            split |= {id(m.weight), id(m.bias)}
        elif isinstance(m, RowParallelLinear):
            split.add(id(m.weight))
    grads = [(id(p) in split, p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad)
             for p in model.parameters() if p.grad is not None]
    sums = torch.zeros(2, dtype=torch.float64, device=grads[0][1].device)   # [split, whole] sums of squares
    for is_split, g in grads:
        sums[0 if is_split else 1] += g.double().square().sum()
    if dp_group is not None:
        dist.all_reduce(sums, group=dp_group)
    dist.all_reduce(sums[:1], group=tp_group)
    return sums.sum().sqrt().float()


def merge_tensor_parallel_state(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The unsharded GPT's state dict from the by-hand split's per-rank state dicts (rank order): q, k and
    v joined by output rows into ``qkv``, ``proj`` and ``down`` by input columns, ``up`` by output rows;
    everything else is whole on every rank and taken from rank 0. Works offline, e.g. on a checkpoint."""
    out: dict[str, torch.Tensor] = {}
    cat = lambda name, dim: torch.cat([p[name] for p in parts], dim=dim)   # noqa: E731
    for name in parts[0]:
        head, _, leaf = name.rpartition(".")          # e.g. backbone.blocks.0.attn.q, weight
        if head.endswith(".attn.q"):
            block = head[: -len(".q")]
            out[f"{block}.qkv.{leaf}"] = torch.cat([cat(f"{block}.{x}.{leaf}", 0) for x in "qkv"], dim=0)
        elif head.endswith((".attn.k", ".attn.v")):
            continue
        elif head.endswith((".attn.proj", ".mlp.down")) and leaf == "weight":
            out[name] = cat(name, 1)
        elif head.endswith(".mlp.up"):
            out[name] = cat(name, 0)
        else:
            out[name] = parts[0][name]
    return out


class TensorParallelAttention(HeadSplitAttention):
    """Each rank computes n_heads / p heads: q, k, v column-parallel, proj row-parallel."""

    def __init__(self, attn: nn.Module, head_dim: int, n_heads: int, rank: int, world_size: int,
                 comm: TensorParallelComm):
        if n_heads % world_size:
            raise ValueError(f"{n_heads} heads cannot be split over {world_size} ranks; pick n_heads divisible by it")
        super().__init__(attn, head_dim)
        self.comm = comm
        self.q, self.k, self.v = (ColumnParallelLinear(lin, rank, world_size) for lin in (self.q, self.k, self.v))
        self.proj = RowParallelLinear(attn.proj, rank, world_size, comm)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, *masks) -> torch.Tensor:
        _only_causal(key_padding_mask, *masks)
        return self.proj(self.attend(CopyToTensorParallel.apply(x, self.comm)))


DTENSOR_PLAN = ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.up", "mlp.down")


def dtensor_plan() -> dict:
    """The DTensor tensor-parallel plan of one block: q, k, v and up split by output features
    (``ColwiseParallel``), proj and down by input features with their partial outputs summed
    (``RowwiseParallel``): the Megatron split, written for ``parallelize_module``."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    return {name: RowwiseParallel() if name.endswith(("proj", "down")) else ColwiseParallel() for name in DTENSOR_PLAN}


def apply_tensor_parallel(model: GPT, mesh, *, implementation: str = "dtensor",
                          comm: TensorParallelComm | None = None) -> GPT:
    """Split every block's attention (by heads) and MLP over the 1-D ``mesh`` (in place).

    ``implementation="by_hand"`` uses this module's layers and the f/g operators (``comm``
    counts their bytes); ``"dtensor"`` the same split with ``parallelize_module``
    (``ColwiseParallel`` for q, k, v and up; ``RowwiseParallel`` for proj and down).
    Embeddings, LayerNorms and the tied output layer stay replicated: every rank computes
    them identically, and f's backward all-reduce gives them the full gradient.
    """
    c = model.config
    require_standard(c, "apply_tensor_parallel (its attention's softmax scale)")
    default = {"position": "learned", "qk_norm": False, "mlp": "gelu", "moe_experts": 0, "causal": True,
               "tie_embeddings": True}
    unsupported = {k: getattr(c, k) for k in default if getattr(c, k) != default[k]}
    if unsupported:   # the split layers below implement the default block only; anything else would train wrong
        raise ValueError(f"apply_tensor_parallel splits the course GPT's default block (learned positions, GELU MLP, "
                         f"no qk-norm, dense, causal, tied output layer); this model has {unsupported}")
    if c.n_heads % mesh.size():
        raise ValueError(f"{c.n_heads} heads cannot be split over {mesh.size()} ranks; pick n_heads divisible by it")
    if implementation == "by_hand":
        rank, world = mesh.get_local_rank(), mesh.size()
        comm = comm if comm is not None else TensorParallelComm(mesh.get_group())
        for block in model.backbone.blocks:
            block.attn = TensorParallelAttention(block.attn, c.head_dim, c.n_heads, rank, world, comm)
            block.mlp = TensorParallelMLP(block.mlp, rank, world, comm)
        model.grad_norm = lambda: tensor_parallel_grad_norm(model, comm.group)   # the engine clips with it
    elif implementation == "dtensor":
        from torch.distributed.tensor.parallel import parallelize_module
        plan = dtensor_plan()
        for block in model.backbone.blocks:
            block.attn = HeadSplitAttention(block.attn, c.head_dim)
            parallelize_module(block, mesh, plan)
    else:
        raise ValueError(f"unknown implementation {implementation!r}; choose 'by_hand' or 'dtensor'")
    return model
