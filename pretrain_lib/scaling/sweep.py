"""A real IsoFLOP sweep on the course corpus, small enough for a laptop CPU.

The data takes the Chapter 2 road: Shakespeare's plays are cleaned
(:func:`pretrain_lib.data.clean.clean_documents`), a byte-level BPE tokenizer is trained on
the training part, both parts are tokenised (:func:`pretrain_lib.data.tokenizer.encode_texts`)
and packed into token shards with an end-of-text separator
(:func:`pretrain_lib.data.shards.write_shards`), and training reads shuffled windows through
:class:`pretrain_lib.data.loader.ShardedTokenDataset`. Every run trains through the engine
(:func:`pretrain_lib.train.train`) with warmup + cosine decay to the end of *that* run,
passed as ``lr_schedule``.
"""
from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from ..data.clean import CleaningReport, clean_documents
from ..data.corpus import iter_shakespeare
from ..data.loader import ResumableLoader, ShardedTokenDataset, clm_collate
from ..data.shards import read_all_tokens, write_shards
from ..data.tokenizer import EOT, encode_texts, special_token_ids, tokenizer_fingerprint, train_tokenizer
from ..model import GPT, ModelConfig
from ..objectives import clm_loss
from ..optim import cosine_lr
from ..train import clm_objective, train
from ..utils import resolve_device
from .approach2 import IsoFlopRun
from .law import scaling_params, training_flops


@dataclass(frozen=True)
class ModelShape:
    """The width and depth of one model in a sweep (the vocabulary and context are shared)."""
    d_model: int
    n_layers: int
    n_heads: int = 2


@dataclass
class SweepData:
    """The sweep's data: packed training shards on disk and a held-out validation stream."""
    train_index: Path          # index.json of the training shards
    train_tokens: int          # tokens in the training shards (end-of-text separators included)
    val: torch.Tensor          # 1-D int64: the validation tokens, in text order
    vocab_size: int
    fingerprint: str           # the tokenizer's, recorded in the shards and checked on reading
    cleaning: CleaningReport = field(repr=False, default_factory=CleaningReport)


def split_texts(texts: Iterable[str], *, max_chars: int, val_fraction: float) -> tuple[list[str], list[str]]:
    """The first ``max_chars`` characters of ``texts``, split by position: the last
    ``val_fraction`` of the characters is held out (the document that straddles the cut is cut
    in two). Reads ``texts`` only as far as it needs to."""
    if not isinstance(max_chars, int) or max_chars <= 0:
        raise ValueError(f"max_chars must be a positive integer, got {max_chars!r}")
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    kept, total = [], 0
    for text in texts:
        kept.append(text[:max_chars - total])
        total += len(kept[-1])
        if total >= max_chars:
            break
    split = round(total * (1.0 - val_fraction))
    train_texts, val_texts, pos = [], [], 0
    for text in kept:
        cut = min(max(split - pos, 0), len(text))
        train_texts.append(text[:cut])
        val_texts.append(text[cut:])
        pos += len(text)
    train_texts, val_texts = [t for t in train_texts if t], [t for t in val_texts if t]
    if not train_texts or not val_texts:
        raise ValueError(f"{total} characters are too few to hold out {val_fraction:.0%}: raise max_chars")
    return train_texts, val_texts


def prepare_sweep_data(max_chars: int = 1_000_000, vocab_size: int = 512, val_fraction: float = 0.1, *,
                       out_dir: str | Path | None = None, tokens_per_shard: int = 1 << 20) -> SweepData:
    """Clean the plays, keep their first ``max_chars`` characters, hold out the last
    ``val_fraction`` of them, train a BPE tokenizer of ``vocab_size`` on the rest, and write
    both parts as token shards under ``out_dir`` (default: a new temporary folder)."""
    report = CleaningReport()
    documents = clean_documents(iter_shakespeare(), report=report)
    train_texts, val_texts = split_texts((d.text for d in documents), max_chars=max_chars,
                                         val_fraction=val_fraction)
    tokenizer = train_tokenizer(train_texts, vocab_size=vocab_size)  # the held-out text stays unseen
    fingerprint = tokenizer_fingerprint(tokenizer)
    eot = special_token_ids(tokenizer)[EOT]
    root = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="isoflop_shards_"))
    indexes = {}
    for split, texts in (("train", train_texts), ("val", val_texts)):
        indexes[split] = write_shards(encode_texts(tokenizer, texts), root / split, tokens_per_shard=tokens_per_shard,
                                      vocab_size=tokenizer.get_vocab_size(), tokenizer_fingerprint=fingerprint,
                                      eot_id=eot)
    train_tokens = int(read_all_tokens(indexes["train"], expected_fingerprint=fingerprint).size)
    val = torch.from_numpy(read_all_tokens(indexes["val"], expected_fingerprint=fingerprint))
    return SweepData(train_index=indexes["train"], train_tokens=train_tokens, val=val,
                     vocab_size=tokenizer.get_vocab_size(), fingerprint=fingerprint, cleaning=report)


def _endless(loader: ResumableLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Batches across epochs: each ``iter(loader)`` is the rest of the current epoch."""
    while True:
        yield from loader


def sweep_batches(data: SweepData, *, seq_len: int, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """The engine's batch dicts ``{"input_ids": (batch_size, seq_len)}``: shuffled windows of
    the training shards (a new order every epoch, fixed by ``seed``), full batches only."""
    # a window of seq_len - 1 targets is seq_len tokens: exactly the model's context
    dataset = ShardedTokenDataset(data.train_index, seq_len=seq_len - 1, seed=seed,
                                  expected_fingerprint=data.fingerprint)
    if len(dataset) < batch_size:
        raise ValueError(f"the training shards hold {len(dataset)} windows of {seq_len} tokens, fewer than one "
                         f"batch of {batch_size}: raise max_chars or lower seq_len / batch_size")
    return _endless(ResumableLoader(dataset, batch_size=batch_size, collate_fn=clm_collate, drop_last=True))


def run_isoflop_sweep(budgets: Sequence[float], shapes: Sequence[ModelShape], data: SweepData, *,
                      seq_len: int = 64, batch_size: int = 16, lr: float = 3e-3, min_lr_ratio: float = 0.1,
                      seed: int = 0, min_steps: int = 20, max_steps: int | None = None, eval_windows: int = 32,
                      device: str = "auto", compile: bool = False,
                      log: Callable[[str], None] | None = print) -> list[IsoFlopRun]:
    """Train every shape at every compute budget with the engine and return the runs.

    For budget C and a model of ``flops_per_token`` F, the run takes
    ``steps = round(C / (F · batch_size · seq_len))`` steps (:func:`sweep_batches`), with the
    learning rate warming up over the first 10 % of the steps and decaying by a cosine to
    ``min_lr_ratio · lr`` at the last step (:func:`pretrain_lib.optim.cosine_lr`); its loss is
    the mean CLM loss on ``eval_windows`` fixed validation windows. Runs with fewer than
    ``min_steps`` steps are skipped (too short to mean anything), and so are runs with more
    than ``max_steps`` (tiny models at large budgets: slow, far from optimal).
    ``run.extra`` holds the shape, the steps, the FLOPs actually spent, the seconds, the final
    training loss and the learning rate of every step. ``compile`` is off by default even on a
    GPU: each run is a new model, and compiling a model this small costs more than it saves.
    """
    if not budgets or not shapes:
        raise ValueError("run_isoflop_sweep needs at least one budget and one model shape")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (a window needs a target), got {seq_len!r}")
    n_val = data.val.numel() // seq_len
    if n_val < 1:
        raise ValueError(f"the validation stream has {data.val.numel()} tokens, fewer than seq_len={seq_len}")
    val_batch = data.val[: min(n_val, eval_windows) * seq_len].view(-1, seq_len)
    dev = resolve_device(device)

    def eval_fn(model: torch.nn.Module) -> float:
        ids = val_batch.to(dev)
        return float(clm_loss(model(ids), ids))

    runs: list[IsoFlopRun] = []
    for budget in budgets:
        for shape in shapes:
            config = ModelConfig(vocab_size=data.vocab_size, d_model=shape.d_model, n_heads=shape.n_heads,
                                 n_layers=shape.n_layers, max_seq_len=seq_len)
            tokens_per_step = batch_size * seq_len
            steps = round(budget / training_flops(config, tokens_per_step))
            if steps < min_steps or (max_steps is not None and steps > max_steps):
                if log:
                    log(f"C={budget:.2e}  d={shape.d_model:4d} L={shape.n_layers}: {steps} steps is outside "
                        f"[{min_steps}, {max_steps}], skipped")
                continue
            warmup = max(1, steps // 10)
            # the decay ends at the run's last step: a longer cosine would overstate short runs' loss
            schedule = functools.partial(cosine_lr, max_lr=lr, min_lr=min_lr_ratio * lr, warmup_steps=warmup,
                                         cosine_steps=max(warmup, steps - 1))
            torch.manual_seed(seed)  # train() seeds too, but only after the weights exist
            model = GPT(config)
            history = train(model, sweep_batches(data, seq_len=seq_len, batch_size=batch_size, seed=seed),
                            clm_objective, steps=steps, lr=lr, lr_schedule=schedule, device=dev, seed=seed,
                            eval_every=steps, eval_fn=eval_fn, compile=compile, progress=False)
            n_params = scaling_params(model)
            tokens = steps * tokens_per_step
            run = IsoFlopRun(compute=float(budget), params=float(n_params), tokens=float(tokens),
                             loss=history.eval_losses[-1],
                             extra={"d_model": shape.d_model, "n_layers": shape.n_layers, "steps": steps,
                                    "flops": training_flops(config, tokens), "seconds": history.seconds,
                                    "train_loss": history.final_loss(10), "lrs": history.lrs})
            runs.append(run)
            if log:
                log(f"C={budget:.2e}  d={shape.d_model:4d} L={shape.n_layers}  N={n_params:>8,d}  "
                    f"D={tokens:>9,d}  steps={steps:5d}  val loss={run.loss:.3f}  ({history.seconds:.1f} s)")
    return runs
