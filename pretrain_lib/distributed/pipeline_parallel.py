"""Pipeline parallelism: consecutive layers on consecutive ranks, micro-batches flowing through.

Rank s holds stage s: a *contiguous* run of blocks (the first stage also the embeddings,
the last the final LayerNorm and the output layer). Activations cross ranks only at
stage boundaries, once per micro-batch, forward; their gradients come back the same way.

With one micro-batch (the naive split) only one stage works at a time. GPipe (Huang et
al., 2019) cuts the batch into m micro-batches so the stages overlap; the idle fraction
("bubble") of p stages is (p - 1) / (m + p - 1). 1F1B runs the same work in another order
so that at most p micro-batches' activations are alive at once.

Variants: ``by_hand`` (send/recv following a schedule's order list), ``gpipe`` and
``1f1b`` (``torch.distributed.pipelining``), each checked against one process; then the
by-hand GPipe's bubble is measured for several micro-batch counts. ``round_robin`` runs
the source chapter's placement (block i on rank i mod p, one batch): it also equals one
process, but its activations cross ranks L - 1 times per forward pass instead of p - 1.

The output layer is tied to the token embedding, which lives on the first stage; the
last stage keeps a copy and the two gradients are summed after each backward pass, so
both copies take identical steps (what Megatron-LM does for its embedding group).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn

from ..model import GPT
from ..objectives import clm_loss
from .common import (DistContext, base_parser, build_model, check_args, global_batch, inject_fault, make_optimizer,
                     max_abs_diff, params_of, reference_run, run_main, setup, sync, teardown, tensor_bytes,
                     write_metrics)


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous block indices per stage, as even as possible: (4, 2) → [0..1], [2..3]."""
    if n_stages > n_layers:
        raise ValueError(f"{n_stages} stages need at least {n_stages} layers, the model has {n_layers}; "
                         "use more --n-layers or fewer ranks")
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


class Stage(nn.Module):
    """One pipeline stage cut from the course's GPT; parameter names follow the GPT's."""

    def __init__(self, model: GPT, stage: int, n_stages: int):
        super().__init__()
        bb = model.backbone
        self.first, self.last = stage == 0, stage == n_stages - 1
        if self.first:
            self.tok_emb, self.pos_emb = bb.tok_emb, bb.pos_emb
        self.blocks = nn.ModuleDict({str(i): bb.blocks[i] for i in stage_layers(len(bb.blocks), n_stages)[stage]})
        if self.last:
            self.ln_f = bb.ln_f
            # the tied output layer's copy on the last stage
            self.head_weight = nn.Parameter(bb.tok_emb.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """First stage: ids ``(b, t)`` → hidden ``(b, t, d)``; last: hidden → logits ``(b, t, vocab)``."""
        if self.first:
            x = self.tok_emb(x) + self.pos_emb(torch.arange(x.size(1), device=x.device))
        for block in self.blocks.values():
            x = block(x)
        if self.last:
            x = self.ln_f(x) @ self.head_weight.T
        return x

    def tied_weight(self) -> nn.Parameter | None:
        return self.tok_emb.weight if self.first else (self.head_weight if self.last else None)


def sync_tied_gradients(stage: Stage, vocab: int, d_model: int, device: torch.device) -> None:
    """Sum the tied embedding's gradient over its two copies (first and last stage)."""
    w = stage.tied_weight()
    grad = w.grad if (w is not None and w.grad is not None) else torch.zeros(vocab, d_model, device=device)
    grad = grad.contiguous()
    dist.all_reduce(grad)  # middle stages contribute zeros
    if w is not None:
        w.grad = grad


def gpipe_order(n_micro: int, stage: int, n_stages: int) -> list[tuple[str, int]]:
    """GPipe: every micro-batch forward, then every micro-batch backward (last one first)."""
    return [("F", i) for i in range(n_micro)] + [("B", i) for i in reversed(range(n_micro))]


def one_f_one_b_order(n_micro: int, stage: int, n_stages: int) -> list[tuple[str, int]]:
    """1F1B: after (p - 1 - s) warm-up forwards, alternate one forward and one backward."""
    warmup = min(n_stages - 1 - stage, n_micro)
    order = [("F", i) for i in range(warmup)]
    f, b = warmup, 0
    while b < n_micro:
        if f < n_micro:
            order.append(("F", f))
            f += 1
        order.append(("B", b))
        b += 1
    return order


def run_schedule_by_hand(stage: Stage, ids: torch.Tensor, order: list[tuple[str, int]], ctx: DistContext,
                         d_model: int) -> tuple[float, list[tuple[str, int, float, float]], int]:
    """Execute this stage's ``order`` of forward/backward micro-steps with point-to-point messages.

    ``ids`` ``(batch, seq)`` is the global batch (the first stage embeds it, the last scores
    it). Sends are asynchronous so two neighbours that both send first cannot deadlock.
    Returns (sum of micro-batch losses / m on the last stage, timeline of compute spans
    (op, micro, start, end), bytes sent).
    """
    n_micro = len({i for _, i in order})
    micro = ids.chunk(n_micro)
    prev, nxt = ctx.rank - 1, ctx.rank + 1
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    pending, timeline, sent, total_loss = [], [], 0, 0.0
    for op, i in order:
        if op == "F":
            if stage.first:
                x = micro[i]
            else:
                x = torch.empty(micro[i].size(0), micro[i].size(1), d_model, device=ids.device)
                dist.recv(x, src=prev)
                x.requires_grad_(True)
            t0 = time.perf_counter()
            y = stage(x)
            if stage.last:
                y = clm_loss(y, micro[i]) / n_micro  # the mean over the batch = mean of equal-size micro-means
                total_loss += y.item()
            timeline.append(("F", i, t0, time.perf_counter()))
            if not stage.last:
                pending.append(dist.isend(y.detach().contiguous(), dst=nxt))
                sent += tensor_bytes(y)
            inputs[i], outputs[i] = x, y
        else:
            if stage.last:
                grad = None
            else:
                grad = torch.empty_like(outputs[i])
                dist.recv(grad, src=nxt)
            t0 = time.perf_counter()
            outputs[i].backward(grad)
            timeline.append(("B", i, t0, time.perf_counter()))
            if not stage.first:
                pending.append(dist.isend(inputs[i].grad.contiguous(), dst=prev))
                sent += tensor_bytes(inputs[i].grad)
            del inputs[i], outputs[i]  # free the micro-batch's activations as soon as possible
    for work in pending:
        work.wait()
    return total_loss, timeline, sent


def layer_placement(n_layers: int, n_ranks: int, kind: str) -> list[int]:
    """The rank of each block: 'contiguous' stages, or the source chapter's 'round_robin' (block i on i mod p)."""
    if kind == "contiguous":
        return [s for s, layers in enumerate(stage_layers(n_layers, n_ranks)) for _ in layers]
    if kind == "round_robin":
        return [i % n_ranks for i in range(n_layers)]
    raise ValueError(f"unknown placement {kind!r}; choose 'contiguous' or 'round_robin'")


def placement_crossings(placement: list[int]) -> int:
    """How many times the activations change rank in one forward pass."""
    return sum(a != b for a, b in zip(placement, placement[1:]))


def run_placement_by_hand(model: GPT, placement: list[int], ids: torch.Tensor, ctx: DistContext,
                          d_model: int) -> tuple[float, int]:
    """One forward and backward pass of the whole batch ``ids`` ``(b, t)`` with block i on rank
    ``placement[i]`` (embeddings with block 0, final LayerNorm and output layer with the last block).

    Consecutive blocks on the same rank form a segment; the activation ``(b, t, d)`` is sent
    at every segment boundary forward and its gradient comes back the same way. Only one rank
    computes at a time. Returns (loss on the rank that computes it, else 0; bytes this rank sent).
    """
    bb = model.backbone
    segments: list[tuple[int, list[int]]] = []  # (rank, consecutive block indices)
    for i, r in enumerate(placement):
        if segments and segments[-1][0] == r:
            segments[-1][1].append(i)
        else:
            segments.append((r, [i]))
    b, t = ids.shape
    saved: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
    pending, sent, loss_value = [], 0, 0.0
    for k, (owner, layers) in enumerate(segments):
        if owner != ctx.rank:
            continue
        if k == 0:
            x_in = None
            h = bb.tok_emb(ids) + bb.pos_emb(torch.arange(t, device=ids.device))
        else:
            x_in = torch.empty(b, t, d_model, device=ids.device)
            dist.recv(x_in, src=segments[k - 1][0])
            x_in.requires_grad_(True)
            h = x_in
        for i in layers:
            h = bb.blocks[i](h)
        if k == len(segments) - 1:
            h = clm_loss(bb.ln_f(h) @ bb.tok_emb.weight.T, ids)
            loss_value = h.item()
        else:
            pending.append(dist.isend(h.detach().contiguous(), dst=segments[k + 1][0]))
            sent += tensor_bytes(h)
        saved[k] = (x_in, h)
    for k in reversed(range(len(segments))):
        if segments[k][0] != ctx.rank:
            continue
        x_in, out = saved.pop(k)
        if k == len(segments) - 1:
            out.backward()
        else:
            grad = torch.empty_like(out)
            dist.recv(grad, src=segments[k + 1][0])
            out.backward(grad)
        if x_in is not None:
            pending.append(dist.isend(x_in.grad.contiguous(), dst=segments[k - 1][0]))
            sent += tensor_bytes(x_in.grad)
    for work in pending:
        work.wait()
    return loss_value, sent


def train_placement(args, ctx: DistContext, placement: list[int]) -> dict:
    """Train with ``run_placement_by_hand``: each rank updates only the blocks it holds."""
    model = build_model(args, ctx.device)
    bb = model.backbone
    owned: dict[str, nn.Parameter] = {}
    for name, prm in model.named_parameters():
        if name.startswith("backbone.blocks."):
            mine = placement[int(name.split(".")[2])] == ctx.rank
        elif name.startswith("backbone.ln_f"):
            mine = placement[-1] == ctx.rank
        elif name == "backbone.tok_emb.weight":  # the embedding and the tied output layer
            mine = ctx.rank in (placement[0], placement[-1])
        else:
            mine = placement[0] == ctx.rank
        if mine:
            owned[name] = prm
    opt = make_optimizer(owned.values(), args)
    losses, step_seconds, sent = [], [], 0
    for step in range(args.steps):
        ids = global_batch(step, args).to(ctx.device)
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        sync(ctx.device)
        t0 = time.perf_counter()
        loss, nbytes = run_placement_by_hand(model, placement, ids, ctx, args.d_model)
        # the tied weight's two uses may sit on two ranks: sum their gradients (zeros elsewhere)
        w = bb.tok_emb.weight
        grad = (w.grad if w.grad is not None else torch.zeros_like(w)).contiguous()
        dist.all_reduce(grad)
        if "backbone.tok_emb.weight" in owned:
            w.grad = grad
        opt.step()
        sync(ctx.device)
        step_seconds.append(time.perf_counter() - t0)
        sent += nbytes
        t = torch.tensor([loss], device=ctx.device)
        dist.all_reduce(t)
        losses.append(float(t))
    parts = [None] * ctx.world_size
    dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in owned.items()})
    params: dict[str, torch.Tensor] = {}
    copies = []
    for part in parts:
        if "backbone.tok_emb.weight" in part:
            copies.append(part["backbone.tok_emb.weight"])
        params.update(part)
    total_sent = torch.tensor([float(sent)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(total_sent)
    return {"params": params, "losses": losses, "n_micro": 1,
            "tied_copies_max_abs_diff": max(float((c - copies[0]).abs().max()) for c in copies),
            "seconds_per_step": sorted(step_seconds)[len(step_seconds) // 2],
            "bubble_measured": None, "bubble_simulated": None,
            "crossings_per_forward": placement_crossings(placement),
            "bytes_sent_per_step_all_ranks": float(total_sent) / args.steps}


def bubble_fraction(timeline: list[tuple[str, int, float, float]], start: float, end: float) -> float:
    """Share of [start, end] this stage spent not computing."""
    busy = sum(e - s for _, _, s, e in timeline)
    return max(0.0, 1.0 - busy / (end - start))


def bubble_theory(n_stages: int, n_micro: int) -> float:
    """GPipe's idle fraction (p - 1) / (m + p - 1) for equal stage times."""
    if n_stages < 1 or n_micro < 1:
        raise ValueError(f"need at least one stage and one micro-batch, got p={n_stages}, m={n_micro}")
    return (n_stages - 1) / (n_micro + n_stages - 1)


def simulate_schedule(orders: list[list[tuple[str, int]]], forward_s: list[float], backward_s: list[float]) -> float:
    """Replay every stage's order with fixed op durations and instant messages; return the
    mean idle fraction of the stages over the makespan.

    F(s, i) waits for F(s-1, i); B(s, i) waits for B(s+1, i) (the last stage's for its own
    F(s, i)); each stage runs its ops one at a time in its order. This isolates the
    schedule's own bubble from message latency and from other programs on the machine.
    """
    p = len(orders)
    done: dict[tuple[str, int, int], float] = {}
    clock = [0.0] * p
    pos = [0] * p
    while any(pos[s] < len(orders[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if pos[s] >= len(orders[s]):
                continue
            op, i = orders[s][pos[s]]
            dep = (("F", s - 1, i) if s > 0 else None) if op == "F" else \
                  (("B", s + 1, i) if s < p - 1 else ("F", s, i))
            if dep is not None and dep not in done:
                continue
            start = max(clock[s], done[dep] if dep is not None else 0.0)
            clock[s] = start + (forward_s[s] if op == "F" else backward_s[s])
            done[(op, s, i)] = clock[s]
            pos[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError("the schedule deadlocks: some stage waits for a micro-step that never runs")
    makespan = max(clock)
    busy = [sum(forward_s[s] if op == "F" else backward_s[s] for op, _ in orders[s]) for s in range(p)]
    return sum(1.0 - b / makespan for b in busy) / p


def gather_params(stage: Stage, ctx: DistContext) -> dict[str, torch.Tensor]:
    """Every stage's weights on every rank, under the GPT's names."""
    mine = {}
    for name, p in stage.named_parameters():
        if name == "head_weight":
            mine["_head_copy"] = p.detach().cpu()
        elif name.startswith(("tok_emb", "pos_emb", "ln_f")):
            mine[f"backbone.{name}"] = p.detach().cpu()
        else:
            mine[f"backbone.{name}"] = p.detach().cpu()
    parts = [None] * ctx.world_size
    dist.all_gather_object(parts, mine)
    out = {}
    for part in parts:
        out.update(part)
    return out


def train_variant(variant: str, args, ctx: DistContext, n_micro: int) -> dict:
    if variant == "round_robin":  # the source chapter's placement, one batch, no micro-batches
        return train_placement(args, ctx, layer_placement(args.n_layers, ctx.world_size, "round_robin"))
    if variant not in ("naive", "by_hand", "by_hand_1f1b", "gpipe", "1f1b"):
        raise ValueError(f"unknown variant {variant!r}; choose among naive, by_hand, by_hand_1f1b, gpipe, 1f1b, "
                         "round_robin")
    model = build_model(args, ctx.device)
    stage = Stage(model, ctx.rank, ctx.world_size)
    opt = make_optimizer(stage.parameters(), args)
    schedule = None
    if variant in ("gpipe", "1f1b"):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
        pipe_stage = PipelineStage(stage, ctx.rank, ctx.world_size, ctx.device)
        kind = ScheduleGPipe if variant == "gpipe" else Schedule1F1B
        schedule = kind(pipe_stage, n_micro, loss_fn=lambda logits, ids: clm_loss(logits, ids))
    losses, step_seconds, bubbles, sent, op_times = [], [], [], 0, []
    for step in range(args.steps):
        ids = global_batch(step, args).to(ctx.device)
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        sync(ctx.device)
        t0 = time.perf_counter()
        if schedule is not None:
            micro_losses: list[torch.Tensor] = []
            if stage.first:
                schedule.step(ids)
            elif stage.last:
                schedule.step(target=ids, losses=micro_losses)
            else:
                schedule.step()
            loss = float(sum(l.item() for l in micro_losses) / n_micro) if stage.last else 0.0
            timeline = []
        else:
            order_fn = gpipe_order if variant in ("by_hand", "naive") else one_f_one_b_order
            order = order_fn(1 if variant == "naive" else n_micro, ctx.rank, ctx.world_size)
            loss, timeline, nbytes = run_schedule_by_hand(stage, ids, order, ctx, args.d_model)
            sent += nbytes
        sync(ctx.device)
        t_end = time.perf_counter()
        dist.barrier()
        step_seconds.append(t_end - t0)
        if timeline:
            local = torch.tensor([bubble_fraction(timeline, t0, t_end)], device=ctx.device)
            dist.all_reduce(local)
            bubbles.append(float(local) / ctx.world_size)
            f = [e - s for op, _, s, e in timeline if op == "F"]
            b = [e - s for op, _, s, e in timeline if op == "B"]
            op_times.append((sum(f) / len(f), sum(b) / len(b)))
        sync_tied_gradients(stage, args.vocab, args.d_model, ctx.device)
        opt.step()
        # only the last stage knows the loss; share it for reporting
        t = torch.tensor([loss if stage.last else 0.0], device=ctx.device)
        dist.all_reduce(t)
        losses.append(float(t))
    params = gather_params(stage, ctx)
    head = params.pop("_head_copy")
    simulated = None
    if op_times:
        # median op durations per stage, then replay the schedule without the machine's noise
        mine = (sorted(t[0] for t in op_times)[len(op_times) // 2], sorted(t[1] for t in op_times)[len(op_times) // 2])
        per_stage = [None] * ctx.world_size
        dist.all_gather_object(per_stage, mine)
        order_fn = one_f_one_b_order if variant == "by_hand_1f1b" else gpipe_order
        m = 1 if variant == "naive" else n_micro
        simulated = simulate_schedule([order_fn(m, s, ctx.world_size) for s in range(ctx.world_size)],
                                      [t[0] for t in per_stage], [t[1] for t in per_stage])
    return {"params": params, "losses": losses, "n_micro": 1 if variant == "naive" else n_micro,
            "tied_copies_max_abs_diff": float((head - params["backbone.tok_emb.weight"]).abs().max()),
            "seconds_per_step": sorted(step_seconds)[len(step_seconds) // 2],
            "bubble_measured": (sum(bubbles[1:]) / len(bubbles[1:]) if len(bubbles) > 1 else
                                (bubbles[0] if bubbles else None)),
            "bubble_simulated": simulated,
            "bytes_sent_per_step_per_rank": sent / args.steps if sent else None}


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Pipeline parallelism: naive split, GPipe and 1F1B, by hand and with torch pipelining.")
    parser.add_argument("--micro", type=int, default=4, help="micro-batches per step for the equivalence runs")
    parser.add_argument("--variants", default="naive,by_hand,by_hand_1f1b,gpipe,1f1b,round_robin")
    parser.add_argument("--bubble-micro", default="1,2,4,8",
                        help="micro-batch counts for the bubble measurement ('' to skip)")
    parser.add_argument("--bubble-steps", type=int, default=3)
    # the bubble is visible only when a micro-step's compute outweighs a message's latency
    parser.add_argument("--bubble-d-model", type=int, default=128)
    parser.add_argument("--bubble-seq-len", type=int, default=64)
    parser.add_argument("--bubble-batch", type=int, default=32)
    args = parser.parse_args(argv)
    ctx = setup(args.init_timeout)
    check_args(args, ctx.world_size)
    if ctx.world_size < 2:
        raise ValueError("a pipeline needs at least 2 ranks: launch with --nproc_per_node=2 or more")
    if args.batch % args.micro:
        raise ValueError(f"--batch {args.batch} is not divisible by --micro {args.micro}")
    stage_layers(args.n_layers, ctx.world_size)  # fails early with a clear message
    inject_fault(args, ctx)
    ref_model, ref_losses = reference_run(args, ctx.device)
    ref = params_of(ref_model)
    metrics: dict = {"strategy": "pipeline_parallel", "world_size": ctx.world_size, "backend": ctx.backend,
                     "device": str(ctx.device), "reference_losses": ref_losses, "variants": {}, "bubble": []}
    for variant in [v for v in args.variants.split(",") if v]:
        out = train_variant(variant, args, ctx, args.micro)
        out["max_abs_diff_vs_single"] = max(max_abs_diff(out.pop("params"), ref), out["tied_copies_max_abs_diff"])
        metrics["variants"][variant] = out
    for m in [int(v) for v in args.bubble_micro.split(",") if v]:
        if args.bubble_batch % m:
            raise ValueError(f"--bubble-batch {args.bubble_batch} is not divisible by {m} micro-batches")
        bubble_args = base_parser("").parse_args([])
        vars(bubble_args).update(vars(args))
        bubble_args.steps = args.bubble_steps
        bubble_args.d_model, bubble_args.seq_len = args.bubble_d_model, args.bubble_seq_len
        bubble_args.batch = args.bubble_batch
        out = train_variant("by_hand", bubble_args, ctx, m)
        metrics["bubble"].append({"n_micro": m, "measured": out["bubble_measured"],
                                  "simulated": out["bubble_simulated"],
                                  "theory": bubble_theory(ctx.world_size, m),
                                  "seconds_per_step": out["seconds_per_step"]})
    metrics["max_abs_diff_vs_single"] = max((v["max_abs_diff_vs_single"] for v in metrics["variants"].values()),
                                            default=None)
    if ctx.is_main:
        write_metrics(args.out, metrics)
    teardown()


if __name__ == "__main__":
    run_main(main)
