"""Context parallelism (chapter 9.2): causal ring attention, written by hand (picotron style).

A long sequence is split over the ranks of a group: rank r holds the queries, keys and values
of its positions only, so every activation of a layer (and the attention scores) shrinks by
the number of ranks. Attention needs every earlier key, so the key/value blocks travel round a
**ring**: at step s rank r holds the block that started on rank r - s, computes the partial
attention of its queries on it, and passes it to rank r + 1 (``isend``/``irecv``; the next
block arrives while this one is computed). After ``world_size`` steps every query has seen
every key; nothing else is ever gathered.

**Merging partial results** (:func:`merge_partial_attention`). Attention over a set of keys is
``out = Σ_j softmax(s)_j v_j``. Over two disjoint sets A and B with log-sum-exps
``lse_a = log Σ_A e^s`` and ``lse_b``, the whole has ``lse = log(e^lse_a + e^lse_b)`` and
``out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b``: the online softmax of flash attention,
exact and in any order.

**The causal mask and the split.** The sequence is cut into equal chunks. ``"contiguous"``
gives rank r chunk r (of ``world_size``): the last rank's queries see every key and the first
rank's almost none, so the ranks do unequal work (:func:`causal_pairs_per_rank`). ``"zigzag"``
cuts ``2 · world_size`` chunks and gives rank r a front chunk r and a back chunk
``2·world_size - 1 - r``: every rank then does the same work. A (query chunk, key chunk) pair
is either fully visible (key chunk earlier), causal within (same chunk), or skipped (later).

**The backward** is a ``torch.autograd.Function`` (:class:`RingAttention`) whose backward runs
the ring again, as flash attention does on one device: it recomputes each block's
probabilities from the saved log-sum-exp, and the key/value gradients travel round the ring
with their block, reaching their owner after the last step. Autograd cannot see through
``isend``/``irecv``, and gathering all keys and values for the gradient would hold the whole
sequence's K and V on every rank, which context parallelism exists to avoid.

The same code runs on gloo (CPU) and NCCL (GPUs). :func:`apply_context_parallel` puts ring
attention into the course GPT's blocks; ``context_parallel_run`` checks it all under torchrun.
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from ..model import SelfAttention
from ..mup import require_standard

SPLITS = ("contiguous", "zigzag")


# --- splitting the sequence ------------------------------------------------------------------

def chunk_layout(world_size: int, split: str) -> list[list[int]]:
    """The chunks each rank holds: contiguous ``[[0], [1], ...]``; zigzag ``[[0, 2p-1], [1, 2p-2], ...]``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if split == "contiguous":
        return [[r] for r in range(world_size)]
    return [[r, 2 * world_size - 1 - r] for r in range(world_size)]


def _chunk_len(seq_len: int, world_size: int, split: str) -> int:
    n_chunks = sum(len(c) for c in chunk_layout(world_size, split))
    if seq_len % n_chunks:
        raise ValueError(f"sequence length {seq_len} must be divisible by the {n_chunks} chunks of the {split} "
                         f"split over {world_size} ranks")
    return seq_len // n_chunks


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, split: str, dim: int = -2) -> torch.Tensor:
    """This rank's part of ``x`` along ``dim`` (the sequence): its chunks, concatenated in order."""
    c = _chunk_len(x.size(dim), world_size, split)
    return torch.cat([x.narrow(dim, i * c, c) for i in chunk_layout(world_size, split)[rank]], dim=dim)


def shard_positions(seq_len: int, rank: int, world_size: int, split: str) -> torch.Tensor:
    """The global positions of this rank's tokens, in the order :func:`shard_sequence` puts them."""
    return shard_sequence(torch.arange(seq_len), rank, world_size, split, dim=0)


def causal_pairs_per_rank(seq_len: int, world_size: int, split: str) -> list[int]:
    """Unmasked (query, key) pairs each rank computes under the causal mask: query i sees keys 0..i,
    so a rank's work is Σ (i + 1) over its query positions (per batch row and head)."""
    return [int((shard_positions(seq_len, r, world_size, split) + 1).sum()) for r in range(world_size)]


def causal_blocks_per_rank(world_size: int, split: str) -> list[dict]:
    """Score blocks each rank's ring computes: ``{"diagonal": n, "full": m}`` (a chunk on itself, causal
    within; an earlier chunk, no mask). Later chunks are skipped. Blocks are ``seq_len / n_chunks`` square."""
    layout = chunk_layout(world_size, split)
    return [{"diagonal": sum(kj == qi for src in layout for qi in mine for kj in src),
             "full": sum(kj < qi for src in layout for qi in mine for kj in src)} for mine in layout]


# --- one block and the merge -----------------------------------------------------------------

def merge_partial_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over keys A ∪ B from the results over A and over B (online softmax).

    ``out_*``: ``(..., t, head_dim)``; ``lse_*``: ``(..., t)``, the log-sum-exp of each query's scores."""
    lse = torch.logaddexp(lse_a, lse_b)
    out = torch.exp(lse_a - lse).unsqueeze(-1) * out_a + torch.exp(lse_b - lse).unsqueeze(-1) * out_b
    return out, lse


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if causal:  # the same chunk on both sides: query i sees keys 0..i of it
        t = s.size(-1)
        s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return s


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` on one key/value block: the output and each query's log-sum-exp."""
    s = _scores(q, k, causal)
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse.unsqueeze(-1)) @ v, lse


def _block_grads(q, k, v, lse, dout, delta, causal):
    """Gradients of one block's share, probabilities recomputed from the final log-sum-exp.

    With P = exp(S - lse): dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP - δ) where δ = rowsum(dO ⊙ O),
    dQ = dS K / √d, dK = dSᵀ Q / √d (the softmax backward, a block at a time)."""
    p = torch.exp(_scores(q, k, causal) - lse.unsqueeze(-1))
    ds = p * (dout @ v.transpose(-2, -1) - delta.unsqueeze(-1)) / math.sqrt(q.size(-1))
    return ds @ k, ds.transpose(-2, -1) @ q, p.transpose(-2, -1) @ dout


# --- the ring ----------------------------------------------------------------------------------

class _Ring:
    """Send a tensor to the next rank while receiving the previous rank's (non-blocking)."""

    def __init__(self, group):
        self.group = group or dist.group.WORLD
        self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.size)

    def start(self, t: torch.Tensor, stats: dict | None = None, key: str = "bytes_sent_forward"):
        """Post the send of ``t`` and the receive of its successor; call the result to wait for it."""
        t, recv = t.contiguous(), torch.empty_like(t)
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, t, self.next, self.group),
                                       dist.P2POp(dist.irecv, recv, self.prev, self.group)])
        if stats is not None:  # bytes this rank hands to the network
            stats[key] = stats.get(key, 0) + t.numel() * t.element_size()

        def wait() -> torch.Tensor:
            for r in reqs:
                r.wait()
            return recv
        return wait


class RingAttention(torch.autograd.Function):
    """Causal attention of this rank's ``q, k, v`` ``(batch, heads, local_len, head_dim)`` over the whole sequence."""

    @staticmethod
    def forward(ctx, q, k, v, split: str, group, stats: dict | None):
        ring = _Ring(group)
        layout = chunk_layout(ring.size, split)
        c = q.size(-2) // len(layout[ring.rank])
        if c * len(layout[ring.rank]) != q.size(-2) or k.shape != q.shape or v.shape != q.shape:
            raise ValueError(f"q, k, v must share one shape with a length divisible by {len(layout[ring.rank])} "
                             f"chunks; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        qs = q.split(c, dim=-2)
        out: list = [None] * len(qs)
        lse: list = [None] * len(qs)
        kv = torch.stack((k, v))
        for step in range(ring.size):
            src = (ring.rank - step) % ring.size  # the rank this key/value block started on
            arriving = ring.start(kv, stats) if step < ring.size - 1 else None  # overlaps the compute below
            t0 = time.perf_counter()
            ks, vs = kv[0].split(c, dim=-2), kv[1].split(c, dim=-2)
            for i, qi in enumerate(layout[ring.rank]):
                for j, kj in enumerate(layout[src]):
                    if kj > qi:
                        continue  # a later chunk: fully masked, skipped
                    o, l = block_attention(qs[i], ks[j], vs[j], causal=kj == qi)
                    out[i], lse[i] = (o, l) if out[i] is None else merge_partial_attention(out[i], lse[i], o, l)
                    if stats is not None:
                        stats["pairs"] = stats.get("pairs", 0) + (c * (c + 1) // 2 if kj == qi else c * c)
                        stats["peak_scores_bytes"] = max(stats.get("peak_scores_bytes", 0), l.numel() * c * q.element_size())
            if stats is not None:
                stats["compute_s"] = stats.get("compute_s", 0.0) + time.perf_counter() - t0
            if arriving is not None:
                t1 = time.perf_counter()
                kv = arriving()
                if stats is not None:  # idle: the next block had not arrived when this one was done
                    stats["wait_s"] = stats.get("wait_s", 0.0) + time.perf_counter() - t1
        out_all, lse_all = torch.cat(out, dim=-2), torch.cat(lse, dim=-1)
        ctx.save_for_backward(q, k, v, out_all, lse_all)
        ctx.split, ctx.group, ctx.stats = split, group, stats
        if stats is not None:  # what this rank keeps for the backward, and the block in flight
            stats["saved_bytes"] = sum(t.numel() * t.element_size() for t in (q, k, v, out_all, lse_all))
            stats["kv_buffer_bytes"] = kv.numel() * kv.element_size()
        return out_all

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        layout = chunk_layout(ring.size, ctx.split)
        c = q.size(-2) // len(layout[ring.rank])
        dout = dout.contiguous()
        delta = (dout * out).sum(-1)
        dq = torch.zeros_like(q)
        kv, dkv = torch.stack((k, v)), torch.zeros(2, *k.shape, dtype=k.dtype, device=k.device)
        chunks = [t.split(c, dim=-2) for t in (q, dout, dq)] + [lse.split(c, dim=-1), delta.split(c, dim=-1)]
        for step in range(ring.size):
            src = (ring.rank - step) % ring.size
            arriving = ring.start(kv, ctx.stats, "bytes_sent_backward") if step < ring.size - 1 else None
            ks, vs, dks, dvs = kv[0].split(c, -2), kv[1].split(c, -2), dkv[0].split(c, -2), dkv[1].split(c, -2)
            for i, qi in enumerate(layout[ring.rank]):
                qc, doc, dqc, lc, dc = (t[i] for t in chunks)
                for j, kj in enumerate(layout[src]):
                    if kj > qi:
                        continue
                    gq, gk, gv = _block_grads(qc, ks[j], vs[j], lc, doc, dc, causal=kj == qi)
                    dqc += gq
                    dks[j].add_(gk)
                    dvs[j].add_(gv)
            # the block's gradients follow it; after the last step they reach the rank that owns it
            dkv = ring.start(dkv, ctx.stats, "bytes_sent_backward")()
            if arriving is not None:
                kv = arriving()
        return dq, dkv[0], dkv[1], None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, split: str = "zigzag", group=None,
                   stats: dict | None = None) -> torch.Tensor:
    """Drop-in for ``scaled_dot_product_attention(q, k, v, is_causal=True)`` on this rank's shard.

    ``q, k, v``: ``(batch, heads, local_len, head_dim)``, the positions :func:`shard_sequence`
    gives this rank with the same ``split``. ``stats`` (a dict) collects the unmasked pairs
    computed, the seconds spent computing and waiting, bytes sent and bytes held."""
    if not dist.is_initialized():
        raise RuntimeError("ring_attention needs a process group: run under torchrun "
                           "(pretrain_lib.distributed.launch.run_torchrun)")
    return RingAttention.apply(q, k, v, split, group, stats)


# --- applied to the course GPT -----------------------------------------------------------------

class ContextParallelAttention(SelfAttention):
    """The course's attention with ``scaled_dot_product_attention`` replaced by ring attention
    (same parameters; :func:`apply_context_parallel` sets ``cp_split`` and ``cp_group``)."""

    cp_split: str = "zigzag"
    cp_group = None

    def forward(self, x, key_padding_mask=None, prefix_len=None):
        if key_padding_mask is not None or prefix_len is not None:
            raise ValueError("context-parallel attention supports the plain causal mask only (no padding or prefix)")
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        y = ring_attention(q, k, v, split=self.cp_split, group=self.cp_group)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


def apply_context_parallel(model: nn.Module, seq_len: int, *, split: str = "zigzag", group=None) -> nn.Module:
    """Make the course GPT run on this rank's shard of ``seq_len``-token sequences (in place).

    Every block's attention becomes ring attention, and the learned position table is read at the
    shard's global positions. Feed it ``shard_sequence(input_ids, rank, p, split, dim=1)``; each rank's
    loss covers its own tokens, so parameter gradients are summed over the group (as data parallelism does)."""
    config = model.backbone.config
    require_standard(config, "apply_context_parallel (ring attention's softmax scale)")
    if not config.causal or config.position != "learned" or config.dropout:
        raise ValueError("apply_context_parallel supports the causal GPT with learned positions and no dropout; "
                         f"got causal={config.causal}, position={config.position!r}, dropout={config.dropout}")
    g = group or dist.group.WORLD
    positions = shard_positions(seq_len, dist.get_rank(g), dist.get_world_size(g), split)
    pos_emb = model.backbone.pos_emb
    pos_emb.register_buffer("cp_positions", positions.to(pos_emb.weight.device), persistent=False)
    # the backbone asks for rows 0..local_len-1; the hook turns them into this shard's global positions
    pos_emb.register_forward_pre_hook(lambda module, args: (module.cp_positions[args[0]],))
    for block in model.backbone.blocks:
        block.attn.__class__ = ContextParallelAttention
        block.attn.cp_split, block.attn.cp_group = split, group
    return model
