"""Chapter 9.2: ring attention (context parallelism) equals full causal attention; the split's work by hand.

The torchrun test shares the xdist group "torchrun" (one 2-rank job at a time on 2 cores) and checks
both splits, the gradients, the GPT and the bytes in one launch.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain_lib.distributed.context_parallel import (block_attention, causal_blocks_per_rank, causal_pairs_per_rank,
                                                       chunk_layout,
                                                       merge_partial_attention, ring_attention, shard_positions,
                                                       shard_sequence)
from pretrain_lib.distributed.launch import run_torchrun

TOL = 1e-5
torchrun = pytest.mark.xdist_group("torchrun")


def _softmax_attention(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """By hand: out = Σ_j e^{s_j} v_j / Σ_j e^{s_j}, and lse = log Σ_j e^{s_j}."""
    e = scores.exp()
    return (e @ v) / e.sum(-1, keepdim=True), e.sum(-1).log()


def test_merge_equals_full_softmax_by_hand():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 7, generator=g, dtype=torch.float64)  # 3 queries, 7 keys
    v = torch.randn(7, 5, generator=g, dtype=torch.float64)
    full_out, full_lse = _softmax_attention(scores, v)
    out_a, lse_a = _softmax_attention(scores[:, :3], v[:3])  # keys 0-2
    out_b, lse_b = _softmax_attention(scores[:, 3:], v[3:])  # keys 3-6
    out, lse = merge_partial_attention(out_a, lse_a, out_b, lse_b)
    assert torch.allclose(out, full_out, atol=1e-12) and torch.allclose(lse, full_lse, atol=1e-12)
    out_ba, lse_ba = merge_partial_attention(out_b, lse_b, out_a, lse_a)  # the order does not matter
    assert torch.allclose(out_ba, full_out, atol=1e-12) and torch.allclose(lse_ba, lse, atol=1e-12)
    # a part whose keys are all masked (lse = -inf) contributes nothing
    empty_out, empty_lse = torch.zeros_like(out_a), torch.full_like(lse_a, float("-inf"))
    same, same_lse = merge_partial_attention(full_out, full_lse, empty_out, empty_lse)
    assert torch.equal(same, full_out) and torch.equal(same_lse, full_lse)


def test_block_attention_is_softmax_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 6, 4, generator=g) for _ in range(3))
    out, lse = block_attention(q, k, v, causal=True)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6)
    scores = q @ k.transpose(-2, -1) / 2.0  # √head_dim = 2
    assert torch.allclose(lse[..., -1], torch.logsumexp(scores[..., -1, :], -1), atol=1e-6)  # the last sees all
    assert torch.allclose(lse[..., 0], scores[..., 0, 0], atol=1e-6)  # the first sees itself only


def test_split_and_imbalance_by_hand():
    # 8 tokens, 2 ranks. Query i sees i + 1 keys.
    # contiguous: rank 0 holds 0-3 -> 1+2+3+4 = 10 pairs; rank 1 holds 4-7 -> 5+6+7+8 = 26 (2.6 times as many)
    assert chunk_layout(2, "contiguous") == [[0], [1]]
    assert causal_pairs_per_rank(8, 2, "contiguous") == [10, 26]
    # zigzag, 4 chunks of 2: rank 0 holds chunks 0 and 3 (tokens 0,1,6,7) -> 1+2+7+8 = 18;
    # rank 1 holds chunks 1 and 2 (tokens 2-5) -> 3+4+5+6 = 18; 36 = 8·9/2 in both splits
    assert chunk_layout(2, "zigzag") == [[0, 3], [1, 2]]
    assert shard_positions(8, 0, 2, "zigzag").tolist() == [0, 1, 6, 7]
    assert causal_pairs_per_rank(8, 2, "zigzag") == [18, 18]
    # 4 ranks, 16 tokens: contiguous 10, 26, 42, 58; zigzag chunks (0,7), (1,6), (2,5), (3,4) -> 34 each
    assert causal_pairs_per_rank(16, 4, "contiguous") == [10, 26, 42, 58]
    assert causal_pairs_per_rank(16, 4, "zigzag") == [34] * 4
    x = torch.arange(8).view(1, 8, 1)
    assert shard_sequence(x, 1, 2, "zigzag", dim=1).flatten().tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="divisible by the 4 chunks"):
        causal_pairs_per_rank(6, 2, "zigzag")
    with pytest.raises(ValueError, match="unknown split"):
        chunk_layout(2, "striped")


def test_ring_attention_outside_torchrun_says_how_to_launch():
    q = torch.zeros(1, 1, 4, 2)
    with pytest.raises(RuntimeError, match="torchrun"):
        ring_attention(q, q, q)


@torchrun
@pytest.mark.distributed
def test_ring_attention_equals_full_causal_attention(tmp_path):
    b, h, t, dh, p = 2, 2, 32, 16, 2
    m = run_torchrun("pretrain_lib.distributed.context_parallel_run", stream=False, run_dir=tmp_path,
                     args=["--batch", b, "--heads", h, "--head-dim", dh, "--seq-len", t, "--gpt",
                           "--memory-seq-lens", "32,64", "--timing-seq-len", 32, "--timing-repeats", 2]).metrics
    assert m["world_size"] == p and set(m["splits"]) == {"contiguous", "zigzag"}
    assert m["max_abs_diff"] <= TOL
    value = 4 * b * h * (t // p) * dh  # bytes of one rank's K or V in fp32
    for split, s in m["splits"].items():
        assert s["forward_max_abs_diff"] <= TOL and max(s["grad_max_abs_diff"].values()) <= TOL, split
        assert max(s["gpt"].values()) <= TOL, split  # the course GPT: logits and summed parameter gradients
        assert s["pairs_per_rank"] == s["pairs_formula"] == causal_pairs_per_rank(t, p, split)
        # forward: K and V go round p - 1 times; backward: again, and their gradients p times
        assert s["bytes_sent_forward"] == [(p - 1) * 2 * value] * p
        assert s["bytes_sent_backward"] == [(p - 1) * 2 * value + p * 2 * value] * p
        chunk = t // p if split == "contiguous" else t // (2 * p)
        for key in ("compute_s", "wait_s", "forward_s"):  # per rank, one value per repeat
            assert [len(r) for r in s["timing"][key]] == [2] * p, key
        for row in s["memory"]:
            n = row["seq_len"] // p  # tokens per rank; q, k, v, out and the log-sum-exp are kept for backward
            assert row["saved_bytes"] == [4 * b * h * n * (4 * dh + 1)] * p
            assert row["kv_buffer_bytes"] == [4 * 2 * b * h * n * dh] * p
            assert row["peak_scores_bytes"] == [4 * b * h * (chunk * row["seq_len"] // t) ** 2] * p
    assert m["splits"]["contiguous"]["pairs_per_rank"] == [136, 392]  # Σ 1..16 and Σ 17..32
    assert m["splits"]["zigzag"]["pairs_per_rank"] == [264, 264]


def test_causal_blocks_per_rank_by_hand():
    # contiguous, 2 ranks: rank 0 its own chunk (diagonal); rank 1 its own and chunk 0 (full)
    assert causal_blocks_per_rank(2, "contiguous") == [{"diagonal": 1, "full": 0}, {"diagonal": 1, "full": 1}]
    # zig-zag, 2 ranks: rank 0 holds chunks 0, 3: (0,0) (3,3) diagonal; (3,0) (3,1) (3,2) full
    assert causal_blocks_per_rank(2, "zigzag") == [{"diagonal": 2, "full": 3}] * 2
    for p in (3, 4, 8):  # every rank 2p + 1 blocks under zig-zag; all p(p+1)/2 of the lower triangle contiguous
        assert all(b == {"diagonal": 2, "full": 2 * p - 1} for b in causal_blocks_per_rank(p, "zigzag"))
        assert sum(sum(b.values()) for b in causal_blocks_per_rank(p, "contiguous")) == p * (p + 1) // 2
