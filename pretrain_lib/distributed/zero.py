"""ZeRO: shard what data parallelism replicates.

With data parallelism every rank stores all parameters (Ψ numbers), all gradients (Ψ)
and all of Adam's state (2Ψ). ZeRO (Rajbhandari et al., 2020) splits them over the p
ranks: stage 1 shards the optimiser state, stage 2 also the gradients, stage 3 also the
parameters. Variants run here, each trained with the engine's ``train_step`` and checked
against one process on the global batch:

- ``zero1``: :func:`~.strategies.apply_zero1` (``ZeroRedundancyOptimizer``) under DDP;
- ``fsdp2``: :func:`~.strategies.apply_fsdp` (``fully_shard`` on every block and the root);
- ``zero2`` and ``by_hand`` (ZeRO-3): the sharding written out. Each optimiser group's
  parameters form one flat vector, sharded; each step all-gathers it, runs forward/backward
  on the full copy, reduce-scatters the flat gradient so each rank receives the averaged
  slice it owns, and updates only that slice. Stage 2 keeps the full parameters between
  steps; stage 3 frees them after backward and keeps only its slice.

Each variant reports the bytes per rank of the parameters, gradients and optimiser state it
owns (``memory_per_rank``, what the ZeRO formulas count) and a measurement after the last
step (``measured_per_rank``): the CUDA allocator's statistics on a GPU; on the CPU, which has
no allocator statistics per tensor, the bytes of the distinct tensor storages that the
model, the gradients and the optimiser hold (communication buffers and activations freed by
then are not in it).
During the steps a :class:`StepMemoryProbe` samples the parameter and gradient storages alive
(``step_peak_bytes``, on any device) and counts the bytes handed to all-gathers and reduce-scatters
(``comm_bytes_per_step``, FSDP2's included).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..data.synthetic import local_shard
from ..train import clm_objective, default_forward_backward, train_step
from .arguments import autocast_dtype
from .errors import run_main
from .harness import StrategyRun
from .metrics import StepTimer, params_of, read_losses, tensor_bytes, variant_record
from .process_group import DistContext
from .reference import ADAM_EPS, WEIGHT_DECAY, strategy_model, global_batch, strategy_optimizer
from .strategies import apply_ddp, apply_fsdp, apply_zero1, bf16_mixed_precision

# torch >= 2.13 names these collectives *_single and deprecates the old names; use whichever exists
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def zero_memory_formula(n_params: int, world_size: int, stage: int, *, param_bytes: int = 4, grad_bytes: int = 4,
                        optim_bytes: int = 8) -> dict[str, float]:
    """Bytes per rank for parameters, gradients and optimiser state under ZeRO ``stage`` (0 = plain DDP).

    fp32 AdamW (the default) stores 4 bytes per parameter, 4 per gradient and 8 of state
    (two moments). The paper's mixed-precision accounting is ``param_bytes=2,
    grad_bytes=2, optim_bytes=12`` (fp32 master copy + two moments): 16Ψ for stage 0.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    p = world_size
    return {"params": n_params * param_bytes / (p if stage >= 3 else 1),
            "grads": n_params * grad_bytes / (p if stage >= 2 else 1),
            "optim": n_params * optim_bytes / (p if stage >= 1 else 1)}


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly DTensor) tensor this rank stores."""
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimiser's per-parameter state on this rank (the scalar step counters left out)."""
    return sum(tensor_bytes(_local(v)) for state in opt.state.values() for v in state.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


class FlatShard:
    """One optimiser group's parameters as a flat vector, padded to ``p`` equal slices; this rank owns one."""

    def __init__(self, params: list[nn.Parameter], ctx: DistContext):
        self.params, self.ctx = params, ctx
        self.shapes = [p.shape for p in params]
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        self.numel = flat.numel()
        self.padded = -(-self.numel // ctx.world_size) * ctx.world_size  # pad so the slices are equal
        self.size = self.padded // ctx.world_size
        full = torch.zeros(self.padded, dtype=flat.dtype, device=flat.device)
        full[:self.numel] = flat
        self.slice = full[ctx.rank * self.size:(ctx.rank + 1) * self.size].clone()

    def gather_params(self, owned: torch.Tensor, *, share_slice: bool = False) -> int:
        """All-gather every rank's slice; the model's parameters become views of the full vector. Returns bytes.

        ``share_slice`` (ZeRO-2, full weights kept): the owned slice becomes a view of the same
        buffer, so this rank stores its slice once, not twice.
        """
        full = torch.empty(self.padded, dtype=owned.dtype, device=owned.device)
        _all_gather(full, owned.detach().reshape(-1).contiguous())
        offset = 0
        for p, shape in zip(self.params, self.shapes):
            n = shape.numel()
            p.data = full[offset:offset + n].view(shape)  # one allocation for the whole group
            offset += n
        if share_slice:
            owned.data = full[self.ctx.rank * self.size:(self.ctx.rank + 1) * self.size].view_as(owned)
        return tensor_bytes(full)

    def free_params(self) -> None:
        """ZeRO-3: drop the gathered full parameters until the next all-gather (the slice is kept)."""
        for p in self.params:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def reduce_scatter_grads(self, owned: nn.Parameter) -> int:
        """Reduce-scatter the flat gradient: ``owned.grad`` becomes the sum over ranks of this rank's slice."""
        flat = torch.zeros(self.padded, dtype=owned.dtype, device=owned.device)
        flat[:self.numel] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                       for p in self.params])
        mine = torch.empty(self.size, dtype=owned.dtype, device=owned.device)
        _reduce_scatter(mine, flat, op=dist.ReduceOp.SUM)
        # averaged like DDP's gradients; the engine then rescales by world / global token count
        owned.grad = (mine / self.ctx.world_size).view_as(owned)
        for p in self.params:
            p.grad = None  # the full gradient is not kept: only the owned slice is
        return tensor_bytes(flat)


class FlatShardedModel(nn.Module):
    """ZeRO-2 or ZeRO-3 by hand: each rank owns 1/p of each optimiser group's flat parameter vector.

    ``model`` is the compute copy; its parameters are replaced by the all-gathered vectors
    before every forward pass; ``stage=3`` frees them after backward (FSDP frees them after
    each layer, and gathers again for the backward pass), ``stage=2`` keeps them. The
    owned slices are this module's parameters, so ``build_optimizer(self)`` gives them
    Adam's state; the decayed group's slice is stored as a ``(1, n)`` row so that the
    builder's rule (decay matrices, not vectors) sees it as the slice of matrices it is.
    """

    def __init__(self, model: nn.Module, ctx: DistContext, *, stage: int = 3):
        super().__init__()
        if stage not in (2, 3):
            raise ValueError(f"FlatShardedModel implements ZeRO stage 2 or 3, got {stage}")
        self.stage = stage
        self.compute_model = [model]  # a list: not registered, so its parameters are not this module's
        named = dict(model.named_parameters())
        groups = {"matrices": [p for p in named.values() if p.dim() >= 2],
                  "vectors": [p for p in named.values() if p.dim() < 2]}
        self.shards = {name: FlatShard(params, ctx) for name, params in groups.items() if params}
        if "matrices" in self.shards:
            self.matrices = nn.Parameter(self.shards["matrices"].slice.view(1, -1))
        if "vectors" in self.shards:
            self.vectors = nn.Parameter(self.shards["vectors"].slice)
        self.bytes_sent = 0

    def gather_params(self) -> None:
        for name, shard in self.shards.items():
            self.bytes_sent += shard.gather_params(getattr(self, name), share_slice=self.stage == 2)

    def reduce_scatter_grads(self) -> None:
        for name, shard in self.shards.items():
            self.bytes_sent += shard.reduce_scatter_grads(getattr(self, name))

    def forward_backward(self, model, micro_batches, objective, **kwargs):
        """The engine's ``forward_backward``: gather, forward/backward on the full copy, reduce-scatter."""
        self.gather_params()
        result = default_forward_backward(model, micro_batches, objective, **kwargs)
        self.reduce_scatter_grads()
        if self.stage == 3:
            for shard in self.shards.values():
                shard.free_params()
        return result

    def memory(self, opt: torch.optim.Optimizer) -> dict[str, int]:
        owned = sum(tensor_bytes(p) for p in self.parameters())
        full = sum(s.numel * s.slice.element_size() for s in self.shards.values())
        return {"params": owned if self.stage == 3 else full, "grads": owned, "optim": _state_bytes(opt)}


def measured_memory(tensors: list[torch.Tensor], device: torch.device, baseline: int) -> dict:
    """What this rank holds after the last step: allocator statistics on CUDA, storage bytes on the CPU."""
    if device.type == "cuda":
        return {"bytes": torch.cuda.memory_allocated(device) - baseline,
                "peak_bytes": torch.cuda.max_memory_allocated(device) - baseline,
                "method": "CUDA allocator: memory_allocated after the last step (peak: max_memory_allocated)"}
    storages: dict[int, int] = {}
    for t in tensors:
        storage = _local(t).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()  # views of one buffer count once
    return {"bytes": sum(storages.values()), "peak_bytes": None,
            "method": "CPU: bytes of the distinct storages of parameters, gradients and optimiser state"}


def _held_tensors(*modules: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = []
    for module in modules:
        for p in module.parameters():
            out.append(p)
            if p.grad is not None:
                out.append(p.grad)
    inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer keeps its shard's AdamW in .optim
    out += [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return out


class StepMemoryProbe:
    """Peak bytes of the parameter and gradient storages alive *during* forward and backward.

    The CPU has no allocator statistics, so this samples: before and after each block's forward,
    when the gradient reaches each block's output and its input in backward, and inside every
    all-gather and reduce-scatter (whose buffers count too, as ``buffers``). At each sample it adds
    up the distinct storages of every parameter and gradient (FSDP2's sharded and unsharded copies
    included); a freed storage counts 0. Samples can miss a transient inside one operation, so the
    peak is a lower bound of the true one; activations and Adam's state are not in it.
    It also counts the bytes handed to the collectives (all-gather output, reduce-scatter input).
    """

    def __init__(self, model: nn.Module, *extra_modules: nn.Module):
        self.modules = (model, *extra_modules)
        self.peak, self.parts, self.comm_bytes, self.handles = 0, {}, 0, []
        self.fsdp_params = [fp for m in model.modules() if hasattr(m, "_get_fsdp_state")
                            for group in [m._get_fsdp_state()._fsdp_param_group] if group is not None
                            for fp in group.fsdp_params]

    def _after_forward(self, module, inputs, output):
        self.sample()
        for t in (output, inputs[0] if inputs else None):  # backward reaches the output first, the input last
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda grad: self.sample())

    def wrap(self, forward_backward):
        """The engine's ``forward_backward`` with one more sample when it returns (all gradients made)."""
        run = forward_backward or default_forward_backward

        def probed(*args, **kwargs):
            result = run(*args, **kwargs)
            self.sample()
            return result
        return probed

    def sample(self, *buffers: torch.Tensor) -> None:
        params = [p for m in self.modules for p in m.parameters()]
        for fp in self.fsdp_params:
            params += [fp.sharded_param] + ([fp._unsharded_param] if hasattr(fp, "_unsharded_param") else [])
        seen, parts = set(), {}
        for kind, tensors in (("params", params), ("grads", [p.grad for p in params if p.grad is not None]),
                              ("buffers", list(buffers))):
            parts[kind] = 0
            for t in tensors:
                storage = _local(t).untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    parts[kind] += storage.nbytes()
        if sum(parts.values()) > self.peak:
            self.peak, self.parts = sum(parts.values()), parts

    def __enter__(self):
        """Count and sample inside the collectives that the by-hand code and FSDP2 call."""
        import sys
        module, self._saved = sys.modules[__name__], {}
        for block in self.modules[0].backbone.blocks:
            self.handles.append(block.register_forward_pre_hook(lambda *_: self.sample()))
            self.handles.append(block.register_forward_hook(self._after_forward))

        def counting(fn, buffer_arg):
            def wrapped(*args, **kwargs):
                out, inp = (kwargs.get("output", args[0] if args else None), kwargs.get("input", args[1] if len(args) > 1 else None))
                self.comm_bytes += tensor_bytes([out, inp][buffer_arg])
                self.sample(out, inp)
                return fn(*args, **kwargs)
            return wrapped
        for owner, name, which in ((dist, "all_gather_single", 0), (dist, "reduce_scatter_single", 1),
                                   (module, "_all_gather", 0), (module, "_reduce_scatter", 1)):
            if hasattr(owner, name):
                self._saved[(owner, name)] = getattr(owner, name)
                setattr(owner, name, counting(getattr(owner, name), which))
        return self

    def __exit__(self, *exc):
        for (owner, name), fn in self._saved.items():
            setattr(owner, name, fn)
        for h in self.handles:
            h.remove()
        self.handles = []


VARIANTS = ("zero1", "zero2", "fsdp2", "by_hand")


def train_variant(variant: str, args, ctx: DistContext) -> dict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose among {', '.join(VARIANTS)}")
    autocast = autocast_dtype(args, ctx.device)
    baseline = 0
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
        baseline = torch.cuda.memory_allocated(ctx.device)
    model = strategy_model(args, ctx.device)
    sharded: FlatShardedModel | None = None
    forward_backward = None
    if variant == "zero1":
        net: nn.Module = apply_ddp(model, ctx)
        opt = apply_zero1(model, lr=args.lr, weight_decay=WEIGHT_DECAY, eps=ADAM_EPS)
    elif variant == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        net = apply_fsdp(model, mesh, mixed_precision=bf16_mixed_precision() if autocast is not None else None)
        opt = strategy_optimizer(model, args)
    else:
        sharded = FlatShardedModel(model, ctx, stage=2 if variant == "zero2" else 3)
        net, opt, forward_backward = model, strategy_optimizer(sharded, args), sharded.forward_backward
    timer, losses, grad_bytes = StepTimer(ctx.device), [], 0
    probe = StepMemoryProbe(model, *([sharded] if sharded else []))
    for step in range(args.steps):
        ids = local_shard(global_batch(step, args), ctx.rank, ctx.world_size).to(ctx.device)
        with timer.measure(), probe:
            result = train_step(net, [{"input_ids": ids}], clm_objective, opt, autocast=autocast, dp_group=True,
                                forward_backward=probe.wrap(forward_backward))
        losses.append(result.loss)
        grad_bytes = sum(tensor_bytes(_local(p.grad)) for group in opt.param_groups for p in group["params"]
                         if p.grad is not None)

    measured = measured_memory(_held_tensors(model, *([sharded] if sharded else []), opt=opt), ctx.device, baseline)
    measured.update(step_peak_bytes=probe.peak, step_peak_parts=probe.parts, comm_bytes_per_step=probe.comm_bytes / args.steps)
    if sharded is not None:
        bytes_per_step = sharded.bytes_sent / args.steps
        sharded.gather_params()  # assemble the final weights to compare them
        memory = sharded.memory(opt)
        full = params_of(model)
    else:
        bytes_per_step = None  # DDP's and FSDP's own collectives are not counted here
        memory = {"params": sum(tensor_bytes(_local(p)) for p in model.parameters()),
                  "grads": grad_bytes, "optim": _state_bytes(opt.optim if variant == "zero1" else opt)}
        full = {k: _full(v).detach() for k, v in model.named_parameters()}
    # ZeroRedundancyOptimizer assigns whole tensors to ranks, so shards are uneven: report every rank
    per_rank, measured_per_rank = [None] * ctx.world_size, [None] * ctx.world_size
    dist.all_gather_object(per_rank, memory)
    dist.all_gather_object(measured_per_rank, measured)
    return {"params": full, **variant_record(losses=read_losses(losses), bytes_per_step=bytes_per_step,
                                             seconds_per_step=timer.median, memory_per_rank=per_rank,
                                             measured_per_rank=measured_per_rank)}


def main(argv: list[str] | None = None) -> None:
    run = StrategyRun("zero", "ZeRO-1 (ZeroRedundancyOptimizer), ZeRO-2 by hand, FSDP2 and ZeRO-3 by hand, with "
                      "per-rank memory.", VARIANTS, argv)
    run.metrics["formula_bytes"] = {f"stage{s}": zero_memory_formula(run.metrics["n_params"], run.ctx.world_size, s)
                                    for s in range(4)}
    for variant in run.variants():
        run.record(variant, train_variant(variant, run.args, run.ctx))
    run.finish()


if __name__ == "__main__":
    run_main(main)
