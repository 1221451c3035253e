"""Communication time per training step, from a model size, a parallel layout and link speeds.

Cost model: a ring collective over p ranks moves, per rank, 2(p-1)/p · S bytes for an
all-reduce of S bytes and (p-1)/p · S for an all-gather or a reduce-scatter; each of its
2(p-1) (or p-1) rounds also pays the link's latency α. Time = α·rounds + moved / β with β
the bandwidth per rank in bytes/s. The layout is dp × tp × pp GPUs; tensor-parallel
groups sit inside a node (fast links), data-parallel groups cross nodes when dp·tp·pp
exceeds a node.
"""
from __future__ import annotations

from dataclasses import dataclass


RING_OPS = ("all_reduce", "all_gather", "reduce_scatter")


def _check_op(op: str) -> None:
    if op not in RING_OPS:
        raise ValueError(f"unknown collective {op!r}; choose all_reduce, all_gather or reduce_scatter")


def ring_traffic_factor(op: str, p: int) -> float:
    """Bytes a rank sends per byte of buffer in a ring ``op`` on ``p`` ranks: 2(p-1)/p or (p-1)/p.

    Also the factor that turns algorithm bandwidth (bytes / time) into bus bandwidth.
    """
    _check_op(op)
    return (2 if op == "all_reduce" else 1) * (p - 1) / p


def ring_rounds(op: str, p: int) -> int:
    """Latency-paying rounds of a ring ``op``: 2(p-1) for all-reduce, p-1 for the halves."""
    _check_op(op)
    return (2 if op == "all_reduce" else 1) * (p - 1)


def ring_seconds(op: str, nbytes: float, p: int, bandwidth_Bps: float, latency_s: float = 0.0) -> float:
    """Seconds for one ring ``op`` ('all_reduce', 'all_gather', 'reduce_scatter') of ``nbytes`` on ``p`` ranks."""
    if p < 1:
        raise ValueError(f"a collective needs at least one rank, got p={p}")
    if bandwidth_Bps <= 0:
        raise ValueError(f"bandwidth must be positive (bytes/s), got {bandwidth_Bps}")
    _check_op(op)
    if p == 1:
        return 0.0
    return ring_rounds(op, p) * latency_s + ring_traffic_factor(op, p) * nbytes / bandwidth_Bps


def fit_latency_bandwidth(op: str, p: int, nbytes: list[float], seconds: list[float]) -> tuple[float, float]:
    """Least-squares fit of ``ring_seconds`` to measurements: returns (latency s, bandwidth bytes/s)."""
    import numpy as np
    a = np.stack([np.full(len(nbytes), ring_rounds(op, p), dtype=float),
                  ring_traffic_factor(op, p) * np.asarray(nbytes, dtype=float)], axis=1)
    # weight by 1/time so small and large messages count alike (relative error)
    w = 1.0 / np.asarray(seconds, dtype=float)
    coef, *_ = np.linalg.lstsq(a * w[:, None], np.asarray(seconds) * w, rcond=None)
    latency, inv_bw = float(max(coef[0], 0.0)), float(coef[1])
    if inv_bw <= 0:
        raise ValueError("the measurements do not grow with message size; measure larger messages")
    return latency, 1.0 / inv_bw


def tensor_parallel_bytes(*, n_layers: int, batch: int, seq_len: int, d_model: int, forward_value_bytes: int = 4,
                          backward_value_bytes: int = 4) -> int:
    """Bytes all-reduced per step by Megatron tensor parallelism: 4 all-reduces per block of one
    activation ``(batch, seq_len, d_model)``: 2 forward (after attention and after the MLP, g)
    and 2 backward (the input gradients, f), each in its own dtype."""
    activation = batch * seq_len * d_model
    return n_layers * activation * (2 * forward_value_bytes + 2 * backward_value_bytes)


def data_parallel_schedule(zero_stage: int, n_micro: int = 1) -> dict[str, int]:
    """Data-parallel collectives per optimiser step, each over the whole (shard of the) model.

    Stages 0 and 1 hold full gradients and reduce once per step after ``n_micro`` accumulated
    micro-batches; stages 2 and 3 hold a gradient shard, so every micro-batch's backward ends in a
    reduce-scatter (DeepSpeed's behaviour; accumulating full gradients instead would need the 2Ψ
    buffer that stage 2 saves). Stage 3 also all-gathers the parameters for each micro-batch's
    forward and backward; stages 1 and 2 all-gather the updated parameters once, after the step.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    if n_micro < 1:
        raise ValueError(f"n_micro must be at least 1, got {n_micro}")
    if zero_stage == 0:
        return {"all_reduce": 1}
    if zero_stage == 1:
        return {"reduce_scatter": 1, "all_gather": 1}
    if zero_stage == 2:
        return {"reduce_scatter": n_micro, "all_gather": 1}
    return {"reduce_scatter": n_micro, "all_gather": 2 * n_micro}


@dataclass
class Layout:
    dp: int = 1          # data-parallel replicas
    tp: int = 1          # tensor-parallel ranks per layer (inside a node)
    pp: int = 1          # pipeline stages
    zero_stage: int = 0  # 0 (plain DP), 1, 2 or 3
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        for k in ("dp", "tp", "pp", "gpus_per_node"):
            if getattr(self, k) < 1:
                raise ValueError(f"Layout.{k} must be at least 1, got {getattr(self, k)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0..3, got {self.zero_stage}")
        if self.tp > self.gpus_per_node:
            raise ValueError(f"tp={self.tp} exceeds gpus_per_node={self.gpus_per_node}: keep tensor parallelism "
                             "inside a node, where links are fast")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp


def step_communication(n_params: float, layout: Layout, *, d_model: int, n_layers: int, seq_len: int,
                       micro_batch: int, n_micro: int = 1, grad_bytes: int = 2, act_bytes: int = 2,
                       intra_node_Bps: float = 300e9, inter_node_Bps: float = 25e9,
                       latency_s: float = 10e-6) -> dict[str, float]:
    """Seconds of communication per optimiser step by kind (not overlapped with compute).

    - data parallel: the collectives of ``data_parallel_schedule`` on each rank's share of the
      model, Ψ/(tp·pp) numbers (Ψ = n_params). Plain DP and ZeRO-1 keep full gradients, so they
      accumulate them locally over the micro-batches (``no_sync``) and reduce once per step: an
      all-reduce, or (ZeRO-1) a reduce-scatter plus an all-gather of the updated parameters, the
      same volume. ZeRO-2 and ZeRO-3 keep only a shard of the gradients, so (as DeepSpeed does)
      they reduce-scatter after every micro-batch's backward; ZeRO-3 keeps only a shard of the
      parameters too and all-gathers them for every micro-batch's forward and backward;
    - tensor parallel: 4 all-reduces per layer per micro-batch (2 forward, 2 backward) of
      one activation (micro_batch, seq_len, d_model);
    - pipeline: each micro-batch's activation forward and its gradient backward across
      each of the pp-1 stage boundaries, point to point.
    DP crosses nodes when a node cannot hold all replicas of a shard.
    """
    if n_params <= 0:
        raise ValueError(f"n_params must be positive, got {n_params}")
    L = layout
    shard_bytes = n_params / (L.tp * L.pp) * grad_bytes
    dp_bw = intra_node_Bps if L.world_size <= L.gpus_per_node else inter_node_Bps
    dp = sum(count * ring_seconds(op, shard_bytes, L.dp, dp_bw, latency_s)
             for op, count in data_parallel_schedule(L.zero_stage, n_micro).items())
    act = micro_batch * seq_len * d_model * act_bytes
    layers_per_stage = n_layers / L.pp
    # every block's 4 all-reduces are separate messages: each pays the ring's latency
    tp_bytes = tensor_parallel_bytes(n_layers=1, batch=micro_batch, seq_len=seq_len, d_model=d_model,
                                     forward_value_bytes=act_bytes, backward_value_bytes=act_bytes)
    tp = layers_per_stage * n_micro * 4 * ring_seconds("all_reduce", tp_bytes / 4, L.tp, intra_node_Bps, latency_s)
    pp_bw = intra_node_Bps if L.tp * L.pp <= L.gpus_per_node else inter_node_Bps
    pp = 0.0 if L.pp == 1 else 2 * n_micro * (latency_s + act / L.tp / pp_bw)
    return {"data_parallel_s": dp, "tensor_parallel_s": tp, "pipeline_s": pp, "total_s": dp + tp + pp}
