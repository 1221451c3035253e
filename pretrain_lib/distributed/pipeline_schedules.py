"""Pipeline schedules as data: which stage holds which layers, in what order each stage runs its
micro-steps, and the idle fraction ("bubble") of a schedule. Pure Python, no process group:
:mod:`.pipeline_parallel` executes these orders on real ranks.

GPipe (Huang et al., 2019) runs every micro-batch forward, then every micro-batch backward;
with p equal stages and m micro-batches each stage idles (p - 1) / (m + p - 1) of the step.
1F1B runs the same work in another order so that at most p micro-batches' activations are
alive at once; its bubble is the same.
"""
from __future__ import annotations


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


def bubble_fraction(busy_s: float, window_s: float) -> float:
    """Share of a step's window that a stage spent not computing.

    ``window_s`` must be the *whole* step, the same for every stage (from a barrier before
    the first micro-step to a barrier after the last): measured on a stage's own first and
    last op instead, a stage that finishes early would look busier than it was, and at
    m = 1 the mean over stages would read below the (p - 1) / p that a serial pass implies.
    """
    if window_s <= 0:
        raise ValueError(f"the step window must be positive, got {window_s}")
    return max(0.0, 1.0 - busy_s / window_s)
