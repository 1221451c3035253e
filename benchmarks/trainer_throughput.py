"""The capstone trainer's speed: full trainer vs the engine's bare loop vs a nanoGPT-style loop.

Three contenders train the same model (``configs/gpt-char-tiny.toml``: nanoGPT's CPU example)
on the same prepared character-level Shakespeare data, in the same process, interleaved over
``--repeats`` rounds so that background load hits each alike:

- ``trainer``: ``pretrain_lib.train.run``: the resumable loader, the metrics callback, the
  periodic atomic checkpoint (every ``--checkpoint-every`` steps, written on a background thread)
  and one final evaluation;
- ``engine``: the engine's ``train()`` on batches from the same loader, no callbacks;
- ``nanogpt_loop``: the named baseline. nanoGPT's own code cannot be downloaded here, so this
  is its ``train.py`` reduced to its step: ``get_batch`` (random windows of the memmap, the
  course's ``random_batch``), forward, cross-entropy, backward, clip, AdamW step, one
  ``.item()`` per iteration. It is a by-hand loop on purpose: it is the thing measured against.

The trainer's overhead is the median over rounds of trainer time / engine time within a round
(adjacent runs, so a shared machine's drift cancels); the ratio of the fastest rounds is kept too.
Speeds are in *target* tokens per second (predicted positions: batch × 64 per step for all
three), and ms per iteration. ``--full`` also runs the whole 2000-iteration config once with
the trainer and reports its final validation loss and wall-clock (minutes).
``--checkpoint-times`` reports the write and resume time of a ``gpt-bpe-small`` checkpoint.

    python benchmarks/trainer_throughput.py [--steps 150] [--repeats 3] [--full] [--checkpoint-times]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain_lib.capstone.config import load_config
from pretrain_lib.capstone.data import prepare_data, train_loader
from pretrain_lib.capstone.trainer import EndlessBatches, run_model, lr_schedule
from pretrain_lib.data.loader import random_batch
from pretrain_lib.data.shards import read_all_tokens
from pretrain_lib.optim import build_optimizer
from pretrain_lib.capstone import run
from pretrain_lib.train import TrainConfig, clm_objective, train

REPO = Path(__file__).resolve().parents[1]
NANOGPT_MS_PER_ITER = 53.0      # nanoGPT's own loop on this config, measured on the 2-core machine
NANOGPT_VAL_LOSS = 1.92         # after 2000 iterations, in about 2 minutes


def trainer_seconds(config_path: Path, steps: int, checkpoint_every: int, out_dir: Path) -> tuple[float, int]:
    overrides = [f"train.steps={steps}", f"train.eval_every={steps}", "train.eval_batches=2", "train.sample_tokens=0",
                 f"checkpoint.every={checkpoint_every}", f'out_dir="{out_dir}"', "train.warmup_steps=10"]
    shutil.rmtree(out_dir, ignore_errors=True)
    result = run(config_path, overrides=overrides, progress=False, verbose=False)
    return result.seconds, steps


def engine_seconds(config, data, steps: int) -> float:
    model = run_model(config, data.vocab_size)
    t = config.train
    loader = train_loader(data, config)
    schedule = lr_schedule(config)
    history = train(model, EndlessBatches(loader), clm_objective,
                    TrainConfig(steps=steps, lr=t.lr, lr_schedule=schedule, weight_decay=t.weight_decay,
                                betas=(t.beta1, t.beta2), grad_clip=t.grad_clip, log_every=t.log_every,
                                seed=config.seed, device="cpu"), progress=False)
    return history.seconds


def nanogpt_loop_seconds(config, data, steps: int) -> float:
    """nanoGPT's iteration, by hand (the baseline being measured; not how the course trains)."""
    torch.manual_seed(config.seed)
    model = run_model(config, data.vocab_size)
    t = config.train
    optimizer = build_optimizer(model, lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2))
    tokens = read_all_tokens(data.train_index).astype("uint16")
    schedule = lr_schedule(config)
    g = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    for it in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule(it)
        x, y = random_batch(tokens, batch_size=t.batch_size, seq_len=config.model.seq_len, generator=g)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        loss.item()  # nanoGPT reads the loss on the host every iteration
    return time.perf_counter() - start


def measure_throughput(config_path: Path, steps: int, repeats: int, checkpoint_every: int) -> dict:
    config = load_config(config_path)
    data = prepare_data(config.data, verbose=False)
    targets_per_step = config.train.batch_size * config.model.seq_len
    runs: dict[str, list[float]] = {"nanogpt_loop": [], "engine": [], "trainer": []}
    with tempfile.TemporaryDirectory(prefix="trainer-bench-") as tmp:
        for r in range(repeats):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                if name == "trainer":
                    seconds, _ = trainer_seconds(config_path, steps, checkpoint_every, Path(tmp) / "run")
                elif name == "engine":
                    seconds = engine_seconds(config, data, steps)
                else:
                    seconds = nanogpt_loop_seconds(config, data, steps)
                runs[name].append(seconds / steps)
                print(f"  round {r + 1}: {name:<13} {1000 * seconds / steps:7.1f} ms/iter", flush=True)
    out = {}
    for name, per_step in runs.items():
        best = min(per_step)  # the least-disturbed round: background load only ever adds time
        out[name] = {"ms_per_iter_min": 1000 * best, "ms_per_iter_median": 1000 * statistics.median(per_step),
                     "target_tokens_per_s": targets_per_step / best, "rounds_ms": [1000 * s for s in per_step]}
    # Each round runs the engine right next to the trainer (the order alternates), so the per-round ratio
    # cancels the slow drift of a shared machine's speed; the median of those ratios is the figure.
    paired = [t / e for t, e in zip(runs["trainer"], runs["engine"])]
    out["trainer_overhead_vs_engine_pct"] = 100 * (statistics.median(paired) - 1)
    out["trainer_overhead_per_round_pct"] = [100 * (r - 1) for r in paired]
    out["trainer_overhead_of_minima_pct"] = 100 * (out["trainer"]["ms_per_iter_min"] /
                                                   out["engine"]["ms_per_iter_min"] - 1)
    out["trainer_speed_vs_nanogpt_loop"] = out["trainer"]["target_tokens_per_s"] / \
        out["nanogpt_loop"]["target_tokens_per_s"]
    out["steps_per_round"], out["checkpoint_every"] = steps, checkpoint_every
    return out


def full_run(config_path: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="trainer-full-") as tmp:
        start = time.perf_counter()
        result = run(config_path, overrides=[f'out_dir="{tmp}/run"'], progress=False, verbose=False)
        wall = time.perf_counter() - start
    return {"steps": result.steps, "final_val_loss": result.val_losses[-1], "val_losses": result.val_losses,
            "eval_steps": result.eval_steps, "train_seconds": result.seconds, "wall_seconds_incl_setup": wall,
            "nanogpt_val_loss": NANOGPT_VAL_LOSS, "nanogpt_seconds": 120.0}


def checkpoint_times(config_path: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="trainer-ckpt-") as tmp:
        common = [f'out_dir="{tmp}/run"', "train.warmup_steps=1", "train.log_every=1", "train.eval_batches=1", "train.sample_tokens=0",
                  "checkpoint.every=1", "checkpoint.keep=3"]
        first = run(config_path, overrides=["train.steps=3", *common], progress=False, verbose=False)
        size = max(p.stat().st_size for p in Path(tmp, "run").glob("ckpt_*.pt"))
        resumed = run(config_path, resume=True, overrides=["train.steps=4", *common], progress=False, verbose=False)
    return {"write_seconds": first.checkpoint_write_seconds, "blocking_seconds": first.checkpoint_seconds,
            "resume_seconds": resumed.resume_seconds, "checkpoint_bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "gpt-char-tiny.toml"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--full", action="store_true", help="also train the whole config once (minutes)")
    parser.add_argument("--checkpoint-times", action="store_true", help="time a gpt-bpe-small checkpoint")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "trainer_throughput.json"))
    args = parser.parse_args()
    report = {"machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
              "nanogpt_reference": {"ms_per_iter": NANOGPT_MS_PER_ITER, "val_loss_2000": NANOGPT_VAL_LOSS,
                                    "target_tokens_per_s": 12 * 64 / (NANOGPT_MS_PER_ITER / 1000)}}
    if args.steps > 0:  # --steps 0: only the other measurements
        report["throughput"] = measure_throughput(Path(args.config), args.steps, args.repeats, args.checkpoint_every)
        tp = report["throughput"]
        print(f"trainer {tp['trainer']['target_tokens_per_s']:,.0f} target tokens/s, engine "
              f"{tp['engine']['target_tokens_per_s']:,.0f}, nanoGPT-style loop "
              f"{tp['nanogpt_loop']['target_tokens_per_s']:,.0f} "
              f"(nanoGPT measured: {report['nanogpt_reference']['target_tokens_per_s']:,.0f}); trainer overhead vs "
              f"engine {tp['trainer_overhead_vs_engine_pct']:+.1f} % (median of the rounds' paired ratios; per round "
              + ", ".join(f"{x:+.1f}" for x in tp["trainer_overhead_per_round_pct"]) + " %)")
    if args.checkpoint_times:
        report["checkpoint_gpt_bpe_small"] = checkpoint_times(REPO / "configs" / "gpt-bpe-small.toml")
        c = report["checkpoint_gpt_bpe_small"]
        print(f"gpt-bpe-small checkpoint: {c['checkpoint_bytes'] / 2**20:.1f} MiB, write "
              f"{1000 * statistics.median(c['write_seconds']):.0f} ms (on the background thread; training waits "
              f"{1000 * statistics.median(c['blocking_seconds']):.0f} ms for the copy), resume "
              f"{1000 * c['resume_seconds']:.0f} ms")
    if args.full:
        report["full_run"] = full_run(Path(args.config))
        f = report["full_run"]
        print(f"full run: val loss {f['final_val_loss']:.4f} after {f['steps']} steps in {f['train_seconds']:.0f} s "
              f"(nanoGPT: {NANOGPT_VAL_LOSS} in about 120 s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
