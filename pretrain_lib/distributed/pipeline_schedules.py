"""Pipeline schedules as data: which stage holds which layers, in what order each stage runs its
micro-steps, and the idle fraction ("bubble") of a schedule. Pure Python, no process group:
:mod:`.pipeline_stages` executes these orders on real ranks.

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


def replay_schedule(orders: list[list[tuple[str, int]]], forward_s: list[float], backward_s: list[float],
                    message_s: float = 0.0) -> tuple[float, float]:
    """Replay every stage's order with fixed op durations; return ``(mean idle fraction, makespan)``.

    F(s, i) waits for F(s-1, i); B(s, i) waits for B(s+1, i) (the last stage's for its own
    F(s, i)); each stage runs its ops one at a time in its order. A message between two stages
    takes ``message_s`` seconds (0: instant, the schedule's own bubble).
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
            ready = 0.0 if dep is None else done[dep] + (message_s if dep[1] != s else 0.0)
            start = max(clock[s], ready)
            clock[s] = start + (forward_s[s] if op == "F" else backward_s[s])
            done[(op, s, i)] = clock[s]
            pos[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError("the schedule deadlocks: some stage waits for a micro-step that never runs")
    makespan = max(clock)
    busy = [sum(forward_s[s] if op == "F" else backward_s[s] for op, _ in orders[s]) for s in range(p)]
    return sum(1.0 - b / makespan for b in busy) / p, makespan


def simulate_schedule(orders: list[list[tuple[str, int]]], forward_s: list[float], backward_s: list[float]) -> float:
    """Replay every stage's order with fixed op durations and instant messages; return the
    mean idle fraction of the stages over the makespan.

    This isolates the schedule's own bubble from message latency and from other programs on
    the machine (:func:`replay_schedule` also takes a message time).
    """
    return replay_schedule(orders, forward_s, backward_s)[0]


def gpipe_bubble(forward_s: list[float], backward_s: list[float], n_micro: int) -> float:
    """GPipe's mean idle fraction for stages of *unequal* op times, instant messages, in closed form.

    The forward pass is a flow shop of m identical jobs: the last micro-batch leaves the last
    stage after sum(f) + (m - 1) max(f); the backward pass then flows back the same way, so a
    step lasts T = sum(f) + sum(b) + (m - 1)(max(f) + max(b)). Stage s computes m (f_s + b_s)
    of it. With equal stages this is (p - 1) / (m + p - 1); otherwise the slowest stage sets the
    pace and every other stage idles for the difference on each micro-batch, a share that more
    micro-batches do not remove.
    """
    if n_micro < 1 or not forward_s or len(forward_s) != len(backward_s):
        raise ValueError("need n_micro >= 1 and one forward and one backward time per stage")
    p = len(forward_s)
    makespan = sum(forward_s) + sum(backward_s) + (n_micro - 1) * (max(forward_s) + max(backward_s))
    return sum(1.0 - n_micro * (f + b) / makespan for f, b in zip(forward_s, backward_s)) / p


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
