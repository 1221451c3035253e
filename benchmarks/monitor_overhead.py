"""What watching a run costs: the engine's tokens/s with the Monitor attached vs without, same run.

Small configuration of the engine benchmark: 4 layers, 4 heads, d_model 128, context 64,
batch 12, a 65-token character vocabulary. Three contenders train copies of the same model on
the same batches, interleaved so background load hits all of them alike:

* ``bare``: ``train()`` alone (it reads the losses back once per ``log_every`` steps);
* ``monitor``: ``train()`` + ``Monitor`` writing JSONL (per-layer norms every step, one read per
  logged step, update ratios, MFU, memory);
* ``source_style``: ``train()`` + the source chapter's recorder (loss, gradient norm built with
  one ``.item()`` per parameter, learning rate; every step).

Reported: median seconds per step and the ratios ``monitor / bare`` (target: at most 3 % slower)
and ``source_style / bare``, and, measured inside each run, the share of the step spent in the
callback (robust when the machine's load changes between runs, which moves the end-to-end ratio
by more than the overhead itself). Absolute times depend on the load; the ratios are the result.

    python benchmarks/monitor_overhead.py [--steps 60] [--repeats 3] [--out benchmarks/results/monitor_overhead.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pretrain_lib.data.loader import random_windows
from pretrain_lib.model import GPT, ModelConfig
from pretrain_lib.monitor import Monitor
from pretrain_lib.monitor.reads import SourceStyleRecorder, TimedCallback
from pretrain_lib.train import clm_objective, train


class StepTimer:
    """Wall-clock time at the end of every step (a host timestamp: no tensor is read)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step(self, state) -> None:
        self.times.append(time.perf_counter())


def seconds_per_step(model, batches, steps: int, warmup: int, extra: list) -> tuple[float, float]:
    """(seconds per step, seconds per step spent inside the extra callback) after ``warmup`` steps."""
    timer = StepTimer()
    timed = [TimedCallback(cb, warmup) for cb in extra]
    train(model, batches, clm_objective, steps=warmup + steps, device="cpu", progress=False, log_every=10,
          lr=1e-3, callbacks=[*timed, timer])
    return (timer.times[-1] - timer.times[warmup - 1]) / steps, sum(t.seconds for t in timed) / steps


def measure(steps: int, repeats: int, warmup: int = 5) -> dict:
    config = ModelConfig(vocab_size=65, d_model=128, n_heads=4, n_layers=4, max_seq_len=64)
    torch.manual_seed(0)
    model = GPT(config)
    stream = torch.randint(0, 65, (200_000,), generator=torch.Generator().manual_seed(0))

    def batches():
        g = torch.Generator().manual_seed(0)
        return lambda i: {"input_ids": random_windows(stream, batch_size=12, seq_len=64, generator=g)}

    timings: dict[str, list[float]] = {"bare": [], "monitor": [], "source_style": []}
    inside: dict[str, list[float]] = {"monitor": [], "source_style": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):  # interleaved, in a rotating order
            order = ["bare", "monitor", "source_style"]
            order = order[repeat % 3:] + order[:repeat % 3]
            for name in order:
                extra = {"bare": [], "source_style": [SourceStyleRecorder()],
                         "monitor": [Monitor(Path(tmp) / f"run{repeat}.jsonl")]}[name]
                per_step, in_callback = seconds_per_step(copy.deepcopy(model), batches(), steps, warmup, extra)
                timings[name].append(per_step)
                if name in inside:  # the same run's share: robust to load that changes between runs
                    inside[name].append(in_callback / per_step)
    median = {k: statistics.median(v) for k, v in timings.items()}
    tokens = 12 * config.max_seq_len
    return {"config": config.to_dict(), "batch_size": 12, "steps": steps, "repeats": repeats,
            "ms_per_step": {k: 1e3 * v for k, v in median.items()},
            "tokens_per_s": {k: tokens / v for k, v in median.items()},
            "monitor_over_bare": median["monitor"] / median["bare"],
            "source_style_over_bare": median["source_style"] / median["bare"],
            "monitor_share_of_step": statistics.median(inside["monitor"]),
            "source_style_share_of_step": statistics.median(inside["source_style"]),
            "all_ms_per_step": {k: [1e3 * x for x in v] for k, v in timings.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "monitor_overhead.json"))
    args = parser.parse_args()
    from pretrain_lib.monitor import peak_flops
    peak_flops("cpu", "fp32")  # the measured probe is cached: no run below pays for it
    r = measure(args.steps, args.repeats)
    r.update(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.processor() or platform.machine())
    print(f"small configuration, {args.steps} steps × {args.repeats} interleaved repeats, "
          f"{torch.get_num_threads()} thread(s):")
    for name in ("bare", "monitor", "source_style"):
        print(f"  {name:<13} {r['ms_per_step'][name]:8.2f} ms/step  {r['tokens_per_s'][name]:10,.0f} tok/s")
    print(f"  monitor / bare      = {r['monitor_over_bare']:.3f} (time per step; target ≤ 1.03)")
    print(f"  source_style / bare = {r['source_style_over_bare']:.3f}")
    print(f"  time inside the callback, same run: monitor {100 * r['monitor_share_of_step']:.2f} % of a step, "
          f"source style {100 * r['source_style_share_of_step']:.2f} %")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
