"""Chapter 3: every parallel strategy equals one process; the launcher reports failures and hangs.

The torchrun tests share the xdist group "torchrun" so two jobs never compete for the two
cores; each strategy is one launch that checks all its variants.
"""
from __future__ import annotations

import math

import pytest
import torch

from pretrain_lib.data.synthetic import arithmetic_batch, local_shard
from pretrain_lib.distributed.arguments import base_parser, check_args
from pretrain_lib.distributed.collectives import parse_size
from pretrain_lib.distributed.comm_model import (Layout, fit_latency_bandwidth, ring_rounds, ring_seconds,
                                                 ring_traffic_factor, step_communication, tensor_parallel_bytes,
                                                 data_parallel_schedule)
from pretrain_lib.distributed.launch import LaunchTimeoutError, RankFailedError, run_torchrun, torchrun_command
from pretrain_lib.distributed.pipeline_bubble import idle_accounting, message_delays
from pretrain_lib.distributed.pipeline_schedules import (bubble_fraction, bubble_theory, gpipe_bubble, gpipe_order,
                                                         layer_placement, one_f_one_b_order, placement_crossings,
                                                         replay_schedule, simulate_schedule, stage_layers)
from pretrain_lib.distributed.process_group import setup
from pretrain_lib.distributed.reference import global_batch
from pretrain_lib.distributed.tensor_parallel_layers import ColumnParallelLinear
from pretrain_lib.distributed.zero import zero_memory_formula
from pretrain_lib.process_tree import process_group_alive

TOL = 1e-5
SMALL = ["--steps", "2", "--batch", "4", "--seq-len", "16", "--vocab", "32", "--d-model", "32", "--n-layers", "2"]
torchrun = pytest.mark.xdist_group("torchrun")


# --- pure functions: hand-worked references ---------------------------------------------------

def test_ring_allreduce_cost_matches_formula():
    # p = 4 ranks, 1 GB, 100 GB/s: 2·3/4 · 1e9 / 1e11 = 15 ms, plus 6 rounds of 1 µs latency
    assert ring_seconds("all_reduce", 1e9, 4, 100e9, 1e-6) == pytest.approx(0.015 + 6e-6)
    assert ring_seconds("all_gather", 1e9, 4, 100e9) == pytest.approx(0.0075)
    assert ring_seconds("all_reduce", 1e9, 1, 1e9) == 0.0
    with pytest.raises(ValueError, match="unknown collective"):
        ring_seconds("broadcast", 1.0, 2, 1.0)


def test_ring_factors_and_rounds_by_hand():
    # p = 4: an all-reduce sends 2·3/4 = 1.5 bytes per buffer byte in 6 rounds; its halves 0.75 in 3
    assert ring_traffic_factor("all_reduce", 4) == 1.5 and ring_rounds("all_reduce", 4) == 6
    assert ring_traffic_factor("reduce_scatter", 4) == 0.75 and ring_rounds("all_gather", 4) == 3
    assert ring_traffic_factor("all_reduce", 2) == 1.0
    with pytest.raises(ValueError, match="unknown collective"):
        ring_traffic_factor("gather", 2)


def test_tensor_parallel_bytes_by_hand():
    # 2 blocks × (2 forward all-reduces in bf16 + 2 backward in fp32) of a 3×5×8 = 120-value activation
    assert tensor_parallel_bytes(n_layers=2, batch=3, seq_len=5, d_model=8, forward_value_bytes=2,
                                 backward_value_bytes=4) == 2 * 120 * (2 * 2 + 2 * 4) == 2880


def test_fit_recovers_latency_and_bandwidth():
    sizes = [1e3, 1e5, 1e6, 1e7, 6.4e7]
    secs = [ring_seconds("all_reduce", s, 2, 2e9, 50e-6) for s in sizes]
    latency, bw = fit_latency_bandwidth("all_reduce", 2, sizes, secs)
    assert latency == pytest.approx(50e-6, rel=1e-6) and bw == pytest.approx(2e9, rel=1e-6)


def test_step_communication_layouts():
    base = dict(d_model=1024, n_layers=24, seq_len=1024, micro_batch=4)
    dp_only = step_communication(1e9, Layout(dp=8), **base, latency_s=0.0, intra_node_Bps=100e9)
    assert dp_only["data_parallel_s"] == pytest.approx(2 * 7 / 8 * 2e9 / 100e9)
    assert dp_only["tensor_parallel_s"] == 0.0 and dp_only["pipeline_s"] == 0.0
    zero3 = step_communication(1e9, Layout(dp=8, zero_stage=3), **base, latency_s=0.0, intra_node_Bps=100e9)
    assert zero3["data_parallel_s"] == pytest.approx(1.5 * dp_only["data_parallel_s"])
    # 4 micro-batches, worked by hand: each half-op of the 2e9-byte shard is 7/8 x 2e9 B / 100e9 B/s = 0.0175 s.
    # ZeRO-3: a reduce-scatter per micro-batch plus 2 all-gathers per micro-batch -> 12 x 0.0175 = 0.21 s
    kw = dict(**base, n_micro=4, latency_s=0.0, intra_node_Bps=100e9)
    zero3_m4 = step_communication(1e9, Layout(dp=8, zero_stage=3), **kw)
    assert zero3_m4["data_parallel_s"] == pytest.approx(0.21)
    # ZeRO-2 holds only a gradient shard: a reduce-scatter per micro-batch, one all-gather -> 5 x 0.0175 = 0.0875 s
    zero2_m4 = step_communication(1e9, Layout(dp=8, zero_stage=2), **kw)
    assert zero2_m4["data_parallel_s"] == pytest.approx(0.0875)
    # ZeRO-1 and plain DP keep full gradients, accumulate them and reduce once: 2 x 0.0175 = 0.035 s
    zero1_m4 = step_communication(1e9, Layout(dp=8, zero_stage=1), **kw)
    assert zero1_m4["data_parallel_s"] == pytest.approx(0.035)
    dp_m4 = step_communication(1e9, Layout(dp=8), **kw)
    assert dp_m4["data_parallel_s"] == pytest.approx(0.035) == pytest.approx(dp_only["data_parallel_s"])
    assert data_parallel_schedule(2, 4) == {"reduce_scatter": 4, "all_gather": 1}
    assert data_parallel_schedule(3, 4) == {"reduce_scatter": 4, "all_gather": 8}
    # with latency: a 2-rank ring half-op pays 1 round, so ZeRO-2 at 4 micro-batches pays 5 latencies
    lat = step_communication(1e9, Layout(dp=2, zero_stage=2), **base, n_micro=4, latency_s=1e-3, intra_node_Bps=100e9)
    assert lat["data_parallel_s"] == pytest.approx(5 * (1e-3 + 0.5 * 2e9 / 100e9))
    with pytest.raises(ValueError, match="inside a node"):
        Layout(tp=16, gpus_per_node=8)


def test_zero_memory_formulas():
    n, p = 1000, 4
    assert zero_memory_formula(n, p, 0) == {"params": 4000, "grads": 4000, "optim": 8000}
    assert zero_memory_formula(n, p, 1) == {"params": 4000, "grads": 4000, "optim": 2000}
    assert zero_memory_formula(n, p, 2) == {"params": 4000, "grads": 1000, "optim": 2000}
    assert zero_memory_formula(n, p, 3) == {"params": 1000, "grads": 1000, "optim": 2000}
    mixed = zero_memory_formula(n, 1, 0, param_bytes=2, grad_bytes=2, optim_bytes=12)
    assert sum(mixed.values()) == 16 * n  # the paper's 16Ψ for mixed-precision Adam


def test_pipeline_orders_and_bubble():
    assert gpipe_order(3, 0, 2) == [("F", 0), ("F", 1), ("F", 2), ("B", 2), ("B", 1), ("B", 0)]
    assert one_f_one_b_order(4, 0, 2) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2),
                                          ("B", 3)]
    assert one_f_one_b_order(4, 1, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2), ("F", 3),
                                          ("B", 3)]
    for p, m in [(2, 1), (2, 4), (4, 8)]:
        orders = [gpipe_order(m, s, p) for s in range(p)]
        assert simulate_schedule(orders, [1.0] * p, [2.0] * p) == pytest.approx(bubble_theory(p, m))
    assert [list(r) for r in stage_layers(5, 2)] == [[0, 1, 2], [3, 4]]
    # the bubble is measured over the common step window: 3 s busy in a 4 s step idles 1/4
    assert bubble_fraction(3.0, 4.0) == 0.25 and bubble_fraction(5.0, 4.0) == 0.0
    with pytest.raises(ValueError, match="window"):
        bubble_fraction(1.0, 0.0)
    assert layer_placement(8, 2, "round_robin") == [0, 1] * 4 and layer_placement(8, 2, "contiguous") == [0] * 4 + [1] * 4
    assert placement_crossings([0, 1] * 4) == 7 and placement_crossings([0] * 4 + [1] * 4) == 1
    with pytest.raises(ValueError, match="unknown placement"):
        layer_placement(4, 2, "random")
    with pytest.raises(ValueError, match="at least 3 layers"):
        stage_layers(2, 3)


def test_unequal_stages_and_message_delays_by_hand():
    # p = 2, m = 2, stage 1 twice as slow. Stage 0: F0 [0,1] F1 [1,2]; stage 1: F0 [1,3] F1 [3,5] B1 [5,7] B0 [7,9];
    # stage 0: B1 [7,8] B0 [9,10]. Step 10, busy 4 and 8: idle 0.6 and 0.2, mean 0.4
    orders = [gpipe_order(2, s, 2) for s in range(2)]
    assert replay_schedule(orders, [1.0, 2.0], [1.0, 2.0]) == pytest.approx((0.4, 10.0))
    assert gpipe_bubble([1.0, 2.0], [1.0, 2.0], 2) == pytest.approx(0.4)
    # one micro-batch, f = b = 1, each message 0.5 s: F [0,1], F [1.5,2.5], B [2.5,3.5], B [4,5]: idle 3/5 each
    one = [gpipe_order(1, s, 2) for s in range(2)]
    assert replay_schedule(one, [1.0, 1.0], [1.0, 1.0], message_s=0.5) == pytest.approx((0.6, 5.0))
    for p, m in [(2, 1), (3, 4), (4, 8)]:  # equal stages: the closed form is the textbook formula
        assert gpipe_bubble([1.0] * p, [2.0] * p, m) == pytest.approx(bubble_theory(p, m))


def test_idle_accounting_adds_up_to_the_window():
    # a hand-made trace, p = 2, m = 1, window [0, 10] on both stages: stage 0 F [0,1] B [6,7];
    # stage 1 F [2,3] (its input ended at 1: 1 s waiting for compute, 1 s hand-off) B [3,5]
    spans = [[("F", 0, 0.0, 1.0), ("B", 0, 6.0, 7.0)], [("F", 0, 2.0, 3.0), ("B", 0, 3.0, 5.0)]]
    acc = idle_accounting(spans, 2, [10.0, 10.0], [0.0, 0.0])
    assert acc[1] == pytest.approx({"compute": 3.0, "schedule": 1.0 + 5.0, "hand_off": 1.0})
    # stage 0: B waits from 1 to 5 for stage 1's backward (schedule), 1 s hand-off, then 3 s after its last op
    assert acc[0] == pytest.approx({"compute": 2.0, "schedule": 4.0 + 3.0, "hand_off": 1.0})
    assert all(sum(a.values()) == pytest.approx(10.0) for a in acc)
    assert message_delays(spans, 2) == pytest.approx([1.0, 1.0])


def test_column_parallel_pieces_concatenate_to_full_output():
    torch.manual_seed(0)
    full = torch.nn.Linear(8, 6)
    x = torch.randn(3, 8)
    parts = [ColumnParallelLinear(full, r, 2)(x) for r in range(2)]
    assert [tuple(p.shape) for p in parts] == [(3, 3), (3, 3)]
    torch.testing.assert_close(torch.cat(parts, dim=-1), torch.nn.functional.linear(x, full.weight, full.bias))


def test_arithmetic_batch_follows_its_recurrence():
    ids = arithmetic_batch(3, batch=4, seq_len=6, vocab=11, seed=2)
    assert ids.shape == (4, 6) and torch.equal(ids[:, 1:], (ids[:, :-1] + 7) % 11)
    assert torch.equal(ids, arithmetic_batch(3, batch=4, seq_len=6, vocab=11, seed=2))  # every rank rebuilds it
    assert not torch.equal(ids, arithmetic_batch(4, batch=4, seq_len=6, vocab=11, seed=2))
    args = base_parser("t").parse_args(["--batch", "4", "--seq-len", "6", "--vocab", "11", "--seed", "2"])
    assert torch.equal(global_batch(3, args), ids)
    with pytest.raises(ValueError, match="vocab must be positive"):
        arithmetic_batch(0, batch=1, seq_len=1, vocab=0)


def test_shards_cover_the_global_batch_once():
    args = base_parser("t").parse_args(["--batch", "6"])
    batch = global_batch(0, args)
    shards = [local_shard(batch, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(shards), batch) and not torch.equal(shards[0], shards[1])
    with pytest.raises(ValueError, match="cannot be split"):
        local_shard(batch, 0, 4)


def test_parse_size_and_launcher_input_checks():
    assert parse_size("64MB") == 64 * 2**20 and parse_size("1KB") == 1024 and parse_size("10") == 10
    with pytest.raises(ValueError, match="message size"):
        parse_size("lots")
    with pytest.raises(ValueError, match="dotted module name"):
        run_torchrun("pretrain_lib/distributed/zero.py")
    with pytest.raises(ValueError, match="nproc_per_node"):
        run_torchrun("pretrain_lib.distributed.zero", nproc_per_node=0)
    cmd = torchrun_command("m", nproc_per_node=2, args=["--steps", "1"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in cmd and cmd[-3:] == ["m", "--steps", "1"]


def test_setup_outside_torchrun_says_how_to_launch(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torch.distributed.run"):
        setup()


def test_batch_must_split_evenly_over_ranks():
    with pytest.raises(ValueError, match="not divisible by the 3 ranks"):
        check_args(base_parser("t").parse_args(["--batch", "8"]), 3)


# --- torchrun: one launch per strategy --------------------------------------------------------

@torchrun
@pytest.mark.distributed
def test_data_parallel_equals_single_process(tmp_path):
    m = run_torchrun("pretrain_lib.distributed.data_parallel", args=SMALL, run_dir=tmp_path, stream=False).metrics
    assert m["max_abs_diff_vs_single"] <= TOL
    v = m["variants"]
    assert set(v) == {"by_hand", "ddp", "ddp_plus_manual", "ddp_same_data"}
    assert v["ddp"]["bytes_per_step"] == m["param_bytes"]  # DDP sends every gradient once
    assert v["ddp_plus_manual"]["bytes_per_step"] == 2 * m["param_bytes"]  # the pitfall: twice
    assert v["ddp"]["losses"] == pytest.approx(m["reference_losses"], abs=1e-5)
    # the other pitfall: every rank reads the same rows = one process on batch / p sequences
    same = v["ddp_same_data"]
    assert same["max_abs_diff_vs_one_shard"] <= TOL and same["max_abs_diff_vs_single"] > 100 * TOL
    assert same["losses"] == pytest.approx(m["one_shard_losses"], abs=1e-5)
    assert m["one_shard_rows"] == 4 // m["world_size"]
    assert m["dtype"] == "fp32" and m["tolerance"] == TOL and m["data"].startswith("synthetic")


@torchrun
@pytest.mark.distributed
def test_zero_and_fsdp_equal_single_process_and_shard_memory(tmp_path):
    m = run_torchrun("pretrain_lib.distributed.zero", args=SMALL, run_dir=tmp_path, stream=False).metrics
    assert m["max_abs_diff_vs_single"] <= TOL
    n, p = m["n_params"], m["world_size"]
    for variant in ("fsdp2", "by_hand"):  # ZeRO-3: everything is 1/p (up to padding)
        for rank_mem in m["variants"][variant]["memory_per_rank"]:
            assert rank_mem["params"] == pytest.approx(4 * n / p, rel=0.02)
            assert rank_mem["optim"] == pytest.approx(8 * n / p, rel=0.02)
    zero2 = m["variants"]["zero2"]["memory_per_rank"]  # ZeRO-2: every parameter, 1/p of gradients and state
    assert all(r["params"] == 4 * n and r["grads"] + r["optim"] == pytest.approx(12 * n / p, rel=0.02) for r in zero2)
    # measured after the last step (storages on the CPU): 16Ψ/p for ZeRO-3, 4Ψ + 12Ψ/p for ZeRO-2
    measured = {v: [r["bytes"] for r in m["variants"][v]["measured_per_rank"]] for v in ("zero1", "zero2", "by_hand")}
    for variant, expected in (("by_hand", 16 * n / p), ("zero2", 4 * n + 12 * n / p)):
        assert measured[variant] == pytest.approx([expected] * p, rel=0.05), variant
    # ZeRO-1 holds every parameter and gradient (its state shards are whole tensors, not exactly 1/p)
    assert all(z1 > z2 for z1, z2 in zip(measured["zero1"], measured["zero2"]))
    zero1 = m["variants"]["zero1"]["memory_per_rank"]
    assert sum(r["optim"] for r in zero1) == 8 * n  # optimiser state split over ranks, whole tensors each
    assert all(r["params"] == 4 * n for r in zero1)
    # by hand: one all-gather and one reduce-scatter per step of each group's (padded) flat vector
    assert 2 * 4 * n <= m["variants"]["by_hand"]["bytes_per_step"] <= 2 * 4 * (n + 2 * (p - 1))
    for v in m["variants"].values():
        assert v["losses"] == pytest.approx(m["reference_losses"], abs=1e-5)
    # during the step (sampled): by hand holds the full weights and the full gradient (>= 8Ψ),
    # FSDP2 one block at a time; FSDP2 re-gathers every block but not the root in backward
    peak = {v: m["variants"][v]["measured_per_rank"][0]["step_peak_bytes"] for v in ("fsdp2", "by_hand", "zero1")}
    assert peak["by_hand"] >= 8 * n and peak["fsdp2"] < peak["by_hand"]
    assert peak["zero1"] == 8 * n  # DDP: every parameter and every gradient
    fsdp_sent = m["variants"]["fsdp2"]["measured_per_rank"][0]["comm_bytes_per_step"]
    assert 2 * 4 * n < fsdp_sent < 3 * 4 * n * 1.01


@torchrun
@pytest.mark.distributed
def test_tensor_parallel_equals_unsharded(tmp_path):
    m = run_torchrun("pretrain_lib.distributed.tensor_parallel", args=SMALL, run_dir=tmp_path, stream=False).metrics
    assert m["max_abs_diff_vs_single"] <= TOL
    assert max(m["block_check"].values()) <= TOL
    assert m["variants"]["by_hand"]["bytes_per_step"] == m["predicted_bytes_per_step"]
    # 2 blocks × 4 all-reduces of one fp32 activation (batch 4, seq 16, d_model 32)
    assert m["predicted_bytes_per_step"] == 2 * 4 * 4 * 16 * 32 * 4


@torchrun
@pytest.mark.distributed
def test_pipeline_parallel_equals_single_process(tmp_path):
    # 4 layers (the last --n-layers wins) so round-robin [0, 1, 0, 1] differs from contiguous [0, 0, 1, 1]
    args = SMALL + ["--n-layers", "4", "--micro", "2", "--bubble-micro", "1,4", "--bubble-steps", "2",
                    "--bubble-d-model", "32", "--bubble-seq-len", "16", "--bubble-batch", "8"]
    m = run_torchrun("pretrain_lib.distributed.pipeline_parallel", args=args, run_dir=tmp_path, stream=False).metrics
    assert m["max_abs_diff_vs_single"] <= TOL
    assert set(m["variants"]) == {"naive", "by_hand", "by_hand_1f1b", "gpipe", "1f1b", "round_robin"}
    rr = m["variants"]["round_robin"]
    assert rr["max_abs_diff_vs_single"] <= TOL and rr["crossings_per_forward"] == 3
    # 3 crossings, forward and backward, of one (batch, seq, d_model) fp32 activation
    assert rr["bytes_per_step_all_ranks"] == 2 * 3 * 4 * 16 * 32 * 4
    assert rr["bytes_per_step"] == 3 * 4 * 16 * 32 * 4  # each rank sends 3 of the 6 messages
    for v in m["variants"].values():
        assert v["losses"] == pytest.approx(m["reference_losses"], abs=1e-5)
    b = {row["n_micro"]: row for row in m["bubble"]}
    assert b[1]["simulated"] == pytest.approx(0.5, abs=1e-9)  # p = 2, one micro-batch: each stage idles half
    assert b[4]["simulated"] < b[1]["simulated"]
    # measured over the common step window, a serial pass (m = 1) idles at least (p - 1) / p
    assert b[1]["measured"] >= 0.5 - 0.02
    for row in b.values():  # the window splits exactly into compute, waiting for the other stage, and hand-off
        assert sum(row["window_shares"].values()) == pytest.approx(1.0, abs=1e-6)
        assert row["closed_form"] == pytest.approx(row["simulated"], abs=1e-9)
        assert len(row["step_seconds"]) == 2


@torchrun
@pytest.mark.distributed
def test_collectives_results_and_rank_failure(tmp_path):
    m = run_torchrun("pretrain_lib.distributed.collectives", args=["--sizes", "1KB,64KB", "--iters", "2"],
                     run_dir=tmp_path / "ok", stream=False).metrics
    assert m["max_abs_diff_vs_single"] == 0.0
    assert {r["op"] for r in m["results"]} == {"all_reduce", "all_gather", "reduce_scatter"}
    assert all(r["seconds"] > 0 and math.isfinite(r["busbw_GBps"]) for r in m["results"])
    assert all(r["seconds_min"] <= r["seconds"] <= r["seconds_max"] and r["iters"] == 2 for r in m["results"])
    # bytes counted on the sockets: a ring all-reduce sends 2(p-1)/p = 1x the buffer per rank on 2 ranks (+ headers)
    ar = next(r for r in m["results"] if r["op"] == "all_reduce" and r["bytes"] == 65536)
    if ar["bytes_sent_per_rank"] is not None:  # Linux's /proc/self/io
        assert all(65536 <= b <= 1.02 * 65536 for b in ar["bytes_sent_per_rank"])
    with pytest.raises(RankFailedError, match="rank 1") as info:
        run_torchrun("pretrain_lib.distributed.collectives", args=["--sizes", "1KB", "--fault", "raise"],
                     run_dir=tmp_path / "fail", stream=False, timeout_s=120)
    assert info.value.rank == 1 and "injected failure on rank 1" in info.value.rank_traceback


@torchrun
@pytest.mark.distributed
def test_hanging_rank_is_killed_with_everything_it_started(tmp_path):
    with pytest.raises(LaunchTimeoutError, match="killed its process group") as info:
        run_torchrun("pretrain_lib.distributed.collectives", args=["--sizes", "1KB", "--fault", "hang"],
                     run_dir=tmp_path, stream=False, timeout_s=10)
    assert not process_group_alive(info.value.pgid)


@torchrun
@pytest.mark.distributed
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_ddp_with_nccl_on_one_gpu(tmp_path):
    """DDP with NCCL on one GPU (bf16 autocast by default on CUDA) still equals one process."""
    m = run_torchrun("pretrain_lib.distributed.data_parallel", nproc_per_node=1, run_dir=tmp_path, stream=False,
                     args=SMALL + ["--variants", "by_hand,ddp"]).metrics
    assert m["backend"] == "nccl" and m["device"] == "cuda:0" and m["dtype"] == "bf16"
    assert m["max_abs_diff_vs_single"] <= m["tolerance"]
    assert m["variants"]["ddp"]["losses"] == pytest.approx(m["reference_losses"], abs=1e-2)
