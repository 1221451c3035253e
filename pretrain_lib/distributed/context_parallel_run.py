"""Context parallelism under torchrun: ring attention against one process, work and memory per rank.

Run on every rank (``run_torchrun("pretrain_lib.distributed.context_parallel_run", ...)``). For each
split (``--splits contiguous,zigzag``) rank 0 writes to ``metrics.json``:

- ``forward_max_abs_diff`` and ``grad_max_abs_diff`` (of q, k and v): this rank's ring-attention output
  and gradients against ``scaled_dot_product_attention(is_causal=True)`` on the whole sequence, computed
  by every rank in one process and cut to its shard (the worst over ranks);
- ``pairs_per_rank`` (unmasked query-key pairs the ring computed, per batch row and head) beside
  ``pairs_formula`` (:func:`.context_parallel.causal_pairs_per_rank`);
- ``compute_s_per_rank``: seconds each rank spends computing blocks at ``--timing-seq-len`` (waits excluded,
  median of the repeats); ``timing``: per rank, every repeat's ``compute_s``, ``wait_s`` (for the next
  block), ``forward_s`` (the whole forward, wall clock), and ``full_block_s`` / ``diagonal_block_s``: one
  block of this split's chunk size timed alone right after that repeat's forward, on every rank at once (the
  cost per block kind under the same load as the ring);
- ``memory``: per ``--memory-seq-lens``, the bytes each rank keeps for the backward, the block in flight
  and the largest score block;
- ``bytes_sent_forward`` / ``bytes_sent_backward`` per rank.

``gpt`` compares the course GPT with :func:`.context_parallel.apply_context_parallel` against one process:
logits, and parameter gradients summed over the ranks.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data.synthetic import arithmetic_batch
from ..model import ModelConfig, seeded_model
from .context_parallel import (SPLITS, apply_context_parallel, block_attention, causal_pairs_per_rank,
                               chunk_layout, ring_attention, shard_sequence)
from .errors import run_main
from .metrics import write_metrics
from .process_group import DistContext, setup, teardown


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Ring attention (context parallelism) against one process.")
    p.add_argument("--splits", default=",".join(SPLITS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64, help="the exactness check's sequence length")
    p.add_argument("--timing-seq-len", type=int, default=0, help="0 skips the timing")
    p.add_argument("--timing-repeats", type=int, default=3)
    p.add_argument("--memory-seq-lens", default="", help="comma-separated sequence lengths (forward only)")
    p.add_argument("--gpt", action="store_true", help="also check the GPT with apply_context_parallel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--init-timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    args.splits = [s for s in args.splits.split(",") if s]
    args.memory_seq_lens = [int(s) for s in args.memory_seq_lens.split(",") if s]
    unknown = [s for s in args.splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; choose from {SPLITS}")
    return args


def _qkv(args, seq_len: int, device, seed_offset: int = 0) -> list[torch.Tensor]:
    """q, k, v and an output weight ``(batch, heads, seq_len, head_dim)``: the same on every rank."""
    g = torch.Generator().manual_seed(args.seed + seed_offset)
    return [torch.randn(args.batch, args.heads, seq_len, args.head_dim, generator=g).to(device) for _ in range(4)]


def _worst(value: float, device: torch.device) -> float:
    """The largest ``value`` over the ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_split(split: str, args, ctx: DistContext) -> dict:
    """Forward and gradients against full causal attention in one process; the work each rank did."""
    q, k, v, w = _qkv(args, args.seq_len, ctx.device)
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*full, is_causal=True)
    (ref * w).sum().backward()  # a fixed random weighting: every output element gets its own gradient

    def cut(t):
        return shard_sequence(t.detach(), ctx.rank, ctx.world_size, split)

    local = [cut(t).requires_grad_(True) for t in (q, k, v)]
    stats: dict = {}
    out = ring_attention(*local, split=split, stats=stats)
    (out * cut(w)).sum().backward()
    record = {"forward_max_abs_diff": _worst(float((out.detach() - cut(ref)).abs().max()), ctx.device),
              "grad_max_abs_diff": {n: _worst(float((t.grad - cut(f.grad)).abs().max()), ctx.device)
                                    for n, t, f in zip("qkv", local, full)},
              "pairs_per_rank": _gather(stats["pairs"]),
              "pairs_formula": causal_pairs_per_rank(args.seq_len, ctx.world_size, split),
              "bytes_sent_forward": _gather(stats.get("bytes_sent_forward", 0)),
              "bytes_sent_backward": _gather(stats.get("bytes_sent_backward", 0))}
    if args.timing_seq_len:
        record["timing_seq_len"] = args.timing_seq_len
        timing = _gather(_timings(split, args, ctx))
        record["timing"] = {key: [t[key] for t in timing] for key in timing[0]}
        record["compute_s_per_rank"] = [sorted(s)[len(s) // 2] for s in record["timing"]["compute_s"]]
    record["memory"] = [_held_bytes(split, n, args, ctx) for n in args.memory_seq_lens]
    return record


def _timings(split: str, args, ctx: DistContext) -> dict:
    """Per repeat, this rank's seconds computing blocks, waiting for the next block, and in the whole forward;
    then one full and one diagonal block of the split's chunk size, each timed alone."""
    q, k, v, _ = _qkv(args, args.timing_seq_len, ctx.device, seed_offset=1)
    local = [shard_sequence(t, ctx.rank, ctx.world_size, split) for t in (q, k, v)]
    chunk = args.timing_seq_len // sum(len(c) for c in chunk_layout(ctx.world_size, split))
    one_chunk = [t[..., :chunk, :] for t in local]
    seconds: dict = {"compute_s": [], "wait_s": [], "forward_s": [], "full_block_s": [], "diagonal_block_s": []}
    with torch.no_grad():
        for _ in range(args.timing_repeats):
            dist.barrier()
            stats: dict = {}
            start = time.perf_counter()
            ring_attention(*local, split=split, stats=stats)
            seconds["forward_s"].append(time.perf_counter() - start)
            seconds["compute_s"].append(stats["compute_s"])
            seconds["wait_s"].append(stats.get("wait_s", 0.0))
            for kind in ("full", "diagonal"):
                dist.barrier()
                start = time.perf_counter()
                block_attention(*one_chunk, causal=kind == "diagonal")
                seconds[f"{kind}_block_s"].append(time.perf_counter() - start)
    return seconds


def _held_bytes(split: str, seq_len: int, args, ctx: DistContext) -> dict:
    """What each rank holds for one attention layer at ``seq_len``: saved for backward, in flight, scores."""
    q, k, v, _ = _qkv(args, seq_len, ctx.device, seed_offset=2)
    local = [shard_sequence(t, ctx.rank, ctx.world_size, split).requires_grad_(True) for t in (q, k, v)]
    stats: dict = {}
    ring_attention(*local, split=split, stats=stats)
    return {"seq_len": seq_len, **{key: _gather(stats[key]) for key in
                                   ("saved_bytes", "kv_buffer_bytes", "peak_scores_bytes")}}


def check_gpt(split: str, args, ctx: DistContext) -> dict:
    """The course GPT, context-parallel, against one process: logits, and gradients summed over ranks."""
    t = args.seq_len
    config = ModelConfig(vocab_size=32, d_model=args.heads * args.head_dim, n_heads=args.heads, n_layers=2,
                         max_seq_len=t)
    ids = arithmetic_batch(0, batch=args.batch, seq_len=t, vocab=32, seed=args.seed).to(ctx.device)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)  # the last token predicts nothing
    n_targets = int((targets != -100).sum())
    ref_model = seeded_model(config, args.seed).to(ctx.device)
    ref_logits = ref_model(ids)
    F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum").div(
        n_targets).backward()
    model = apply_context_parallel(seeded_model(config, args.seed).to(ctx.device), t, split=split)
    local_ids, local_targets = (shard_sequence(x, ctx.rank, ctx.world_size, split, dim=1) for x in (ids, targets))
    logits = model(local_ids)
    # each rank's loss is its tokens' share of the global mean: the gradients add up over the ranks
    F.cross_entropy(logits.flatten(0, 1), local_targets.flatten(), ignore_index=-100, reduction="sum").div(
        n_targets).backward()
    grad_diff = 0.0
    for p, p_ref in zip(model.parameters(), ref_model.parameters()):
        dist.all_reduce(p.grad)
        grad_diff = max(grad_diff, float((p.grad - p_ref.grad).abs().max()))
    logit_diff = float((logits.detach() - shard_sequence(ref_logits.detach(), ctx.rank, ctx.world_size, split,
                                                         dim=1)).abs().max())
    return {"logits_max_abs_diff": _worst(logit_diff, ctx.device),
            "param_grad_max_abs_diff": _worst(grad_diff, ctx.device)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = setup(args.init_timeout)
    torch.manual_seed(args.seed)
    metrics = {"strategy": "context_parallel", "world_size": ctx.world_size, "backend": ctx.backend,
               "device": str(ctx.device), "dtype": "fp32", "tolerance": 1e-5, "seq_len": args.seq_len,
               "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "splits": {}}
    for split in args.splits:
        metrics["splits"][split] = check_split(split, args, ctx)
        if args.gpt:
            metrics["splits"][split]["gpt"] = check_gpt(split, args, ctx)
    diffs = [d for s in metrics["splits"].values()
             for d in (s["forward_max_abs_diff"], *s["grad_max_abs_diff"].values(), *s.get("gpt", {}).values())]
    metrics["max_abs_diff"] = max(diffs) if diffs else float("nan")
    if ctx.is_main:
        write_metrics(args.out, metrics)
    teardown()


if __name__ == "__main__":
    run_main(main)
