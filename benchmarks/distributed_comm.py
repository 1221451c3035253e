"""Gradient communication of data parallelism on this machine: one all-reduce per tensor vs DDP's buckets.

Baseline: the by-hand average (one ``all_reduce`` per parameter tensor after backward), the way
the source chapter and most tutorials write it. Ours: ``DistributedDataParallel`` (gradients
packed into buckets, all-reduced while backward runs). Both send the same bytes; the step time
differs by the number of messages. Also records the all-reduce bandwidth from 1 KB to 64 MB
and the ring model fitted to it. Runs 2 ranks through the course's launcher.

    python benchmarks/distributed_comm.py [--steps 30] [--out benchmarks/results/distributed_comm.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from pretrain_lib.distributed.comm_model import fit_latency_bandwidth
from pretrain_lib.distributed.launch import run_torchrun


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--sizes", default="1KB,16KB,256KB,1MB,4MB,16MB,64MB")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "distributed_comm.json"))
    args = parser.parse_args(argv)

    dp = run_torchrun("pretrain_lib.distributed.data_parallel", nproc_per_node=args.nproc, stream=False,
                      args=["--steps", args.steps, "--batch", 16, "--seq-len", 64, "--d-model", 64,
                            "--n-layers", 4, "--vocab", 128, "--variants", "by_hand,ddp"]).metrics
    coll = run_torchrun("pretrain_lib.distributed.collectives", nproc_per_node=args.nproc, stream=False,
                        args=["--sizes", args.sizes, "--ops", "all_reduce", "--iters", 5]).metrics
    rows = coll["results"]
    latency, bandwidth = fit_latency_bandwidth("all_reduce", coll["world_size"], [r["bytes"] for r in rows],
                                               [r["seconds"] for r in rows])
    base, ours = dp["variants"]["by_hand"]["seconds_per_step"], dp["variants"]["ddp"]["seconds_per_step"]
    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "backend": dp["backend"],
              "world_size": dp["world_size"], "n_params": dp["n_params"],
              "baseline_per_tensor_allreduce_s_per_step": base, "ours_ddp_buckets_s_per_step": ours,
              "speedup": base / ours, "max_abs_diff_vs_single": dp["max_abs_diff_vs_single"],
              "allreduce_fit": {"latency_s": latency, "bandwidth_Bps": bandwidth}, "allreduce": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"baseline (one all-reduce per tensor): {1e3 * base:7.2f} ms/step")
    print(f"ours (DDP buckets):                   {1e3 * ours:7.2f} ms/step   ratio {base / ours:.1f}x")
    print(f"all-reduce on {dp['backend']}: latency {1e6 * latency:.0f} us, bandwidth {bandwidth / 1e9:.2f} GB/s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
