"""Composing parallelisms on one device mesh (chapter 9.1), as torchtitan's ``parallelize`` does.

A **device mesh** arranges the ranks in a grid with named dimensions, e.g. 4 ranks as
``dp × tp = 2 × 2``::

            tp=0  tp=1
    dp=0  [  0     1  ]      ranks 0 and 1 split every layer (tensor parallel),
    dp=1  [  2     3  ]      ranks 0 and 2 hold the same slice and split the batch (data parallel).

Each parallelism then runs over its own dimension's process groups. The innermost
dimension (the last) groups consecutive ranks, which on a real cluster share a node and its
fast links: tensor parallelism, whose all-reduces sit on the critical path of every layer, goes
there. Data parallelism, which overlaps its transfers with compute, comes next; pipeline stages,
which exchange one activation per micro-batch with one neighbour, go outermost (torchtitan's order;
Llama 3 put dp outermost instead).

:func:`parallelize` applies the strategies to a model in torchtitan's order: **tensor parallel
first, then FSDP**. FSDP2 shards whatever parameters it finds and gathers them before each
block runs, so it must see the layers in their final, tensor-parallel form; applied the other
way round, the tensor-parallel split would have to cut parameters FSDP already owns.
Pipeline × data parallelism is :func:`pipeline_data_parallel`: this rank's stage of the model,
its gradients averaged over the ranks that hold the same stage.

:class:`CollectiveBytes` counts the payload of every collective by mesh dimension (the full
tensor of an all-reduce, all-gather or reduce-scatter; each point-to-point message), the units
of chapter 3's formulas (``comm_model``).
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn as nn

from ..model import GPT
from .comm_model import tensor_parallel_bytes
from .metrics import tensor_bytes
from .pipeline_stages import ByHandSchedule, PipeGroup, pipeline_stage
from .pipeline_schedules import gpipe_order
from .strategies import apply_fsdp
from .tensor_parallel_layers import TensorParallelComm, apply_tensor_parallel, tensor_parallel_grad_norm

MESH_ORDER = ("pp", "dp", "tp")   # outermost to innermost


def build_mesh(device_type: str, sizes: dict[str, int]):
    """A ``DeviceMesh`` over all ranks with the named ``sizes`` (dimensions of size 1 are kept, so
    ``mesh["tp"]`` always exists), laid out in ``MESH_ORDER``; the sizes must multiply to the world size."""
    from torch.distributed.device_mesh import init_device_mesh
    unknown = set(sizes) - set(MESH_ORDER)
    if unknown:
        raise ValueError(f"unknown mesh dimensions {sorted(unknown)}; use {', '.join(MESH_ORDER)}")
    if any(not isinstance(v, int) or v < 1 for v in sizes.values()):
        raise ValueError(f"mesh sizes must be positive integers, got {sizes}")
    names = tuple(d for d in MESH_ORDER if d in sizes)
    shape = tuple(sizes[d] for d in names)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if math.prod(shape) != world:
        raise ValueError(f"mesh {dict(zip(names, shape))} needs {math.prod(shape)} ranks; "
                         f"this job has {world}")
    return init_device_mesh(device_type, shape, mesh_dim_names=names)


def parallelize(model: GPT, mesh, *, tp_comm: TensorParallelComm | None = None) -> GPT:
    """Tensor parallel over ``mesh["tp"]``, then FSDP2 over ``mesh["dp"]``; a dimension of size 1 is
    skipped. In place; returns ``model``. The split is chapter 3's by-hand layers, whose all-reduces are
    plain collectives on the tp group (``tp_comm`` counts them, and so does :class:`CollectiveBytes`).
    DTensor's ``parallelize_module`` would put the split weights on the 2-D mesh but leave the embeddings
    and norms on the dp mesh alone, and the engine's fused gradient ops refuse tensors on two meshes;
    torchtitan avoids that by splitting those layers too (sequence parallelism)."""
    names = mesh.mesh_dim_names or ()
    if "pp" in names and mesh["pp"].size() > 1:
        raise ValueError("parallelize composes tp and dp; for pipeline stages use pipeline_data_parallel")
    if "tp" in names and mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"], implementation="by_hand",
                              comm=tp_comm or TensorParallelComm(mesh["tp"].get_group()))
    if "dp" in names and mesh["dp"].size() > 1:
        apply_fsdp(model, mesh["dp"])
        if hasattr(model, "grad_norm"):   # the split's norm, now over FSDP's gradient shards too
            tp_group = mesh["tp"].get_group()
            model.grad_norm = lambda: tensor_parallel_grad_norm(model, tp_group, mesh["dp"].get_group())
    return model


# The by-hand split cuts these weights over the tp ranks; every other parameter is whole on each tp rank.
TP_SPLIT = ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "mlp.up.weight", "mlp.up.bias", "mlp.down.weight")


def params_per_tp_rank(model: GPT, tp: int) -> int:
    """Parameters one tensor-parallel rank holds before FSDP shards them: the split weights' 1/tp share,
    and everything else whole (embeddings, norms, the row-parallel layers' biases)."""
    return sum(p.numel() // tp if name.endswith(TP_SPLIT) else p.numel() for name, p in model.named_parameters())


def fsdp_tp_step_bytes(model: GPT, *, dp: int, tp: int, batch: int, seq_len: int, value_bytes: int = 4
                       ) -> dict[str, dict[str, int]]:
    """Collective payload per step of :func:`parallelize` on a dp × tp mesh, by dimension (the units
    :class:`CollectiveBytes` counts), for a global ``batch`` of sequences and one micro-batch.

    - tp: 4 all-reduces per block of one activation of this dp rank's ``batch / dp`` sequences (chapter 3);
    - dp: FSDP2 gathers every weight of this tp rank's share for the forward and again for the backward,
      except the root unit's (embeddings, final norm), which it keeps gathered in between; it
      reduce-scatters the gradients once; the engine all-reduces (loss sum, token count);
    - both: the gradient norm (``tensor_parallel_grad_norm``) sums two float64 sums of squares over dp and
      the split one over tp."""
    c = model.config
    local = params_per_tp_rank(model, tp)
    blocks = sum(p.numel() for p in model.backbone.blocks.parameters())
    root = sum(p.numel() for p in model.parameters()) - blocks
    norm_sums = 2 * 8 if tp > 1 else 0        # [split, whole] sums of squares, float64
    out = {"dp": {"all_gather_single": (2 * local - root) * value_bytes, "reduce_scatter_single": local * value_bytes,
                  "all_reduce": 2 * value_bytes + norm_sums}}
    if tp > 1:
        out["tp"] = {"all_reduce": tensor_parallel_bytes(n_layers=c.n_layers, batch=batch // dp, seq_len=seq_len,
                                                        d_model=c.d_model, forward_value_bytes=value_bytes,
                                                        backward_value_bytes=value_bytes) + 8}
    if dp == 1:
        out.pop("dp")
    return out


class DataParallelPipeline:
    """The engine's ``forward_backward`` for pipeline × data parallelism: run this replica's pipeline
    schedule, then average each stage's gradients over the data-parallel group (the ranks holding the
    same stage), as DDP would. ``train_step(..., dp_group=that group)`` then sums the losses and
    token counts over the replicas, so the step equals one process on the whole batch."""

    def __init__(self, schedule, stage: nn.Module, dp_group):
        self.schedule, self.stage, self.dp_group = schedule, stage, dp_group

    def __call__(self, model, micro_batches, objective, **kwargs):
        loss_sum, n_targets = self.schedule(model, micro_batches, objective, **kwargs)
        size = dist.get_world_size(self.dp_group)
        for p in self.stage.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.dp_group)
                p.grad.div_(size)
        return loss_sum, n_targets


def pipeline_grad_norm(stage: nn.Module, pp_group) -> torch.Tensor:
    """The whole model's gradient L2 norm on every stage: each stage's sum of squares, summed over the
    pipeline (the tied embedding counted once, on the first stage; the last stage's copy holds the same
    gradient). Each stage alone sees only its own layers, so clipping by its local norm would clip each
    stage differently from one process."""
    sq = torch.zeros((), dtype=torch.float64, device=next(stage.parameters()).device)
    for name, p in stage.named_parameters():
        if p.grad is not None and name != "head_weight":
            sq += p.grad.double().square().sum()
    dist.all_reduce(sq, group=pp_group)
    return sq.sqrt().float()


def pipeline_data_parallel(model: GPT, mesh, device: torch.device, order_fn=gpipe_order):
    """This rank's pipeline stage of ``model`` (its coordinate on ``mesh["pp"]``) and the
    ``forward_backward`` that trains it: the by-hand schedule over the pp group, then the gradient
    average over ``mesh["dp"]``. The stage's ``grad_norm()`` (which the engine clips by) sums over the
    pipeline. Returns ``(stage, forward_backward)``."""
    pp = mesh["pp"]
    pipe = PipeGroup(rank=pp.get_local_rank(), size=pp.size(), ranks=pp.mesh.flatten().tolist(),
                     group=pp.get_group(), device=device)
    stage = pipeline_stage(model, pipe.rank, pipe.size)
    stage.grad_norm = lambda: pipeline_grad_norm(stage, pipe.group)
    return stage, DataParallelPipeline(ByHandSchedule(stage, pipe, order_fn), stage, mesh["dp"].get_group())


class CollectiveBytes(contextlib.ContextDecorator):
    """Counts collective payload bytes by mesh dimension while active (``bytes[dim][op]``).

    It wraps the ``torch.distributed`` functions FSDP2, the by-hand layers and the schedules call
    (functions looked up on ``torch.distributed`` at call time; DTensor's own collectives are not
    seen). A point-to-point message without a group counts under ``"pp"``; any other call on a
    group that is not one of the mesh's dimensions under ``"other"``."""

    OPS = ("all_reduce", "all_gather_single", "reduce_scatter_single", "all_gather_into_tensor",
           "reduce_scatter_tensor", "send", "isend", "broadcast", "all_to_all_single")

    def __init__(self, mesh):
        self.names = mesh.mesh_dim_names or ()
        self.dims = {id(mesh[d].get_group()): d for d in self.names}
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._saved: dict[str, object] = {}

    def _payload(self, op: str, args, kwargs) -> int:
        if op in ("all_gather_single", "all_gather_into_tensor"):
            return tensor_bytes(kwargs.get("output_tensor", kwargs.get("output", args[0] if args else None)))
        if op in ("reduce_scatter_single", "reduce_scatter_tensor"):
            return tensor_bytes(kwargs["input"] if "input" in kwargs else args[1])
        tensor = args[0] if args else kwargs.get("tensor", kwargs.get("input"))
        return tensor_bytes(tensor)

    def __enter__(self):
        for op in self.OPS:
            original = getattr(dist, op, None)
            if original is None:
                continue
            self._saved[op] = original

            def counted(*args, _op=op, _original=original, **kwargs):
                dim = self.dims.get(id(kwargs.get("group")), "other")
                if _op in ("send", "isend") and kwargs.get("group") is None and "pp" in self.names:
                    dim = "pp"     # the schedules address stages by global rank, without a group
                self.bytes[dim][_op] += self._payload(_op, args, kwargs)
                return _original(*args, **kwargs)
            setattr(dist, op, counted)
        return self

    def __exit__(self, *exc):
        for op, original in self._saved.items():
            setattr(dist, op, original)
        self._saved.clear()
        return False

    def totals(self) -> dict[str, int]:
        return {dim: sum(ops.values()) for dim, ops in self.bytes.items()}
