"""Chapter 9.1's runner: two compositions on a 2-D device mesh of 4 ranks, each against one process.

- ``fsdp_tp``: ``dp × tp``. Tensor parallel inside each pair of ranks, FSDP2 across the pairs
  (:func:`.mesh.parallelize`); a data-parallel rank's two tensor-parallel ranks read the same
  slice of the batch.
- ``pp_dp``: ``pp × dp``. Two pipeline stages, each held by two data-parallel replicas
  (:func:`.mesh.pipeline_data_parallel`); each replica's pipeline reads its own slice of the batch.
- ``fsdp_tp_same_data``: a negative control, ``fsdp_tp`` with the classic mistake of every dp rank
  reading the same slice; its weights must differ from one process by far more than the tolerance.

Each variant trains with the engine's ``train_step`` and records its weights' largest difference
from one process, its gradient norm per step (the norm the engine clips by) beside one process's, the bytes its collectives carried per step on each mesh dimension
(:class:`.mesh.CollectiveBytes`) and the bytes of weights, gradients and AdamW state each rank holds.
Launch: ``torchrun --standalone --nproc_per_node 4 -m pretrain_lib.distributed.mesh_run --out DIR``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..data.synthetic import local_shard
from ..train import clm_objective, train_step
from .errors import run_main
from .harness import StrategyRun
from .mesh import (CollectiveBytes, build_mesh, fsdp_tp_step_bytes, parallelize, params_per_tp_rank,
                   pipeline_data_parallel)
from .metrics import StepTimer, read_losses, tensor_bytes, variant_record
from .pipeline_stages import gather_params, last_stage_losses
from .reference import global_batch, strategy_model, strategy_optimizer
from .tensor_parallel import gather_full_params
from .tensor_parallel_layers import TensorParallelComm
from .zero import _local, _state_bytes

VARIANTS = ("fsdp_tp", "pp_dp", "fsdp_tp_same_data")


def held_bytes(params, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of weights, gradients and optimiser state this rank stores (its shards only)."""
    params = list(params)
    return {"params": sum(tensor_bytes(_local(p)) for p in params),
            "grads": sum(tensor_bytes(_local(p.grad)) for p in params if p.grad is not None),
            "optim": _state_bytes(opt)}


def _per_step(counter: CollectiveBytes, steps: int) -> dict[str, dict[str, float]]:
    return {dim: {op: n / steps for op, n in ops.items()} for dim, ops in counter.bytes.items()}


def train_fsdp_tp(args, ctx, *, same_data: bool = False) -> dict:
    mesh = build_mesh(ctx.device.type, {"dp": ctx.world_size // args.tp, "tp": args.tp})
    model = strategy_model(args, ctx.device)
    parallelize(model, mesh, tp_comm=TensorParallelComm(mesh["tp"].get_group()))
    opt = strategy_optimizer(model, args)
    dp_rank, dp_size, dp_group = mesh["dp"].get_local_rank(), mesh["dp"].size(), mesh["dp"].get_group()
    counter, timer, losses, norms = CollectiveBytes(mesh), StepTimer(ctx.device), [], []
    for step in range(args.steps):
        ids = local_shard(global_batch(step, args), 0 if same_data else dp_rank, dp_size).to(ctx.device)
        with timer.measure(), counter:
            result = train_step(model, [{"input_ids": ids}], clm_objective, opt, dp_group=dp_group)
        losses.append(result.loss)
        norms.append(float(result.grad_norm))
    held = held_bytes(model.parameters(), opt)
    per_rank = [None] * ctx.world_size
    dist.all_gather_object(per_rank, held)
    whole = strategy_model(args)   # unsharded, to count what the formulas predict
    return {"params": gather_full_params(model, "by_hand", ctx, group=mesh["tp"].get_group()),
            **variant_record(losses=read_losses(losses), bytes_per_step=None, seconds_per_step=timer.median,
                             mesh={"dp": dp_size, "tp": args.tp}, bytes_per_step_by_dim=_per_step(counter, args.steps),
                             grad_norms=norms,
                             predicted_bytes_by_dim=fsdp_tp_step_bytes(whole, dp=dp_size, tp=args.tp,
                                                                       batch=args.batch, seq_len=args.seq_len),
                             predicted_params_per_rank=params_per_tp_rank(whole, args.tp) // dp_size,
                             memory_per_rank=per_rank)}


def train_pp_dp(args, ctx) -> dict:
    mesh = build_mesh(ctx.device.type, {"pp": args.pp, "dp": ctx.world_size // args.pp})
    stage, forward_backward = pipeline_data_parallel(strategy_model(args, ctx.device), mesh, ctx.device)
    opt = strategy_optimizer(stage, args)
    dp_rank, dp_size, dp_group = mesh["dp"].get_local_rank(), mesh["dp"].size(), mesh["dp"].get_group()
    counter, timer, losses, norms = CollectiveBytes(mesh), StepTimer(ctx.device), [], []
    for step in range(args.steps):
        mine = local_shard(global_batch(step, args), dp_rank, dp_size).to(ctx.device)
        micro = [{"input_ids": chunk} for chunk in mine.chunk(args.micro)]
        with timer.measure(), counter:
            result = train_step(stage, micro, None, opt, forward_backward=forward_backward, dp_group=dp_group)
        losses.append(result.loss)
        norms.append(float(result.grad_norm))
    held = held_bytes(stage.parameters(), opt)
    per_rank = [None] * ctx.world_size
    dist.all_gather_object(per_rank, held)
    params = gather_params(stage, ctx)
    head = params.pop("_head_copy")
    # the whole batch's loss (train_step sums it over the replicas) is known to every last stage;
    # one of them, replica 0's, sends it to all ranks
    stage_losses = last_stage_losses(losses, int(mesh.mesh[-1, 0]), ctx.device)
    return {"params": params,
            **variant_record(losses=stage_losses, bytes_per_step=None, seconds_per_step=timer.median,
                             mesh={"pp": args.pp, "dp": dp_size}, n_micro=args.micro, grad_norms=norms,
                             bytes_per_step_by_dim=_per_step(counter, args.steps), memory_per_rank=per_rank,
                             tied_copies_max_abs_diff=float((head - params["backbone.tok_emb.weight"]).abs().max()))}


def _arguments(parser) -> None:
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (fsdp_tp); dp = world / tp")
    parser.add_argument("--pp", type=int, default=2, help="pipeline stages (pp_dp); dp = world / pp")
    parser.add_argument("--micro", type=int, default=2, help="micro-batches per replica's pipeline step (pp_dp)")


def _fits(args, ctx) -> None:
    for name in ("tp", "pp"):
        size = getattr(args, name)
        if size < 1 or ctx.world_size % size:
            raise ValueError(f"--{name} {size} must divide the {ctx.world_size} ranks")
    if args.n_heads % args.tp:
        raise ValueError(f"--n-heads {args.n_heads} must be divisible by --tp {args.tp}")
    if args.batch % (ctx.world_size // args.pp * args.micro):
        raise ValueError(f"--batch {args.batch} must split into {ctx.world_size // args.pp} replicas of "
                         f"--micro {args.micro} micro-batches")


def main(argv: list[str] | None = None) -> None:
    run = StrategyRun("mesh", "FSDP x tensor parallel and pipeline x data parallel on a 2-D device mesh.",
                      VARIANTS, argv, add_arguments=_arguments, check=_fits)
    run.metrics["reference_grad_norms"] = run.reference_grad_norms
    for variant in run.variants():
        if variant == "pp_dp":
            out = train_pp_dp(run.args, run.ctx)
        else:
            out = train_fsdp_tp(run.args, run.ctx, same_data=variant == "fsdp_tp_same_data")
        run.record(variant, out)
        if variant == "pp_dp":
            out["max_abs_diff_vs_single"] = max(out["max_abs_diff_vs_single"], out["tied_copies_max_abs_diff"])
    run.finish(exact=("fsdp_tp", "pp_dp"))   # the negative control is meant to differ


if __name__ == "__main__":
    run_main(main)
