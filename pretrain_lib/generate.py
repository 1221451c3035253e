"""Load a trained run in a fresh process and use it: sample from a GPT, fill masks with a BERT.

    python -m pretrain_lib.generate --checkpoint build/runs/gpt-char-tiny --prompt "ROMEO:" \
        --max-new-tokens 200 --seed 0 [--temperature 0.8] [--top-k 40]
    python -m pretrain_lib.generate --checkpoint build/runs/bert-small --fill-mask "To be, or not to be, that is the [MASK]"

``--checkpoint`` is a run's ``out_dir``: its newest checkpoint whose checksum holds is used (a
corrupt newer one is reported on standard error and skipped). Standard output carries the
prompt followed by its continuation and nothing else, so the command can be piped;
``--temperature 0`` is greedy decoding (the same text every time, whatever the seed).

:func:`load_run` is the one way this package turns an ``out_dir`` into a model and its tokenizer
(the run's own ``tokenizer.json``, so the data cache may be gone); :mod:`pretrain_lib.evaluate`
and :mod:`pretrain_lib.export` use it too.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .capstone import checkpoint as ckpt
from .capstone.config import ConfigError, RunConfig, config_from_dict
from .capstone.data import PreparedData, prepare_data
from .capstone.evaluate import fill_mask, gpt_sample
from .capstone.trainer import RUN_TOKENIZER, run_model
from .data.tokenizer import UNK, load_tokenizer, tokenizer_fingerprint


class RunLoadError(ValueError):
    """A run folder that cannot be used: missing, without a checkpoint, corrupt, or the wrong kind."""


@dataclass
class LoadedRun:
    model: torch.nn.Module          # in eval mode, on the CPU
    tokenizer: Tokenizer
    config: RunConfig
    checkpoint: Path
    step: int
    tokenizer_fingerprint: str      # the fingerprint the checkpoint was trained with
    _data: PreparedData | None = field(default=None, repr=False)

    @property
    def is_gpt(self) -> bool:
        return self.config.model.kind == "gpt"

    @property
    def data(self) -> PreparedData:
        """The run's prepared shards (validation split, training counts), read from the data cache, or
        prepared again when it was deleted; its tokenizer must be the one the run was trained with."""
        if self._data is None:
            data = prepare_data(self.config.data, verbose=False)
            if data.meta["tokenizer_fingerprint"] != self.tokenizer_fingerprint:
                raise RunLoadError(f"the data that {self.checkpoint.name}'s config prepares now has another tokenizer "
                                   f"(fingerprint {data.meta['tokenizer_fingerprint']}) than the run was trained with "
                                   f"({self.tokenizer_fingerprint}): the corpus changed since training, so its "
                                   "validation split is not the run's. Generating and exporting still work")
            self._data = data
        return self._data


def run_tokenizer(folder: Path, state: dict, config: RunConfig) -> tuple[Tokenizer, str, PreparedData | None]:
    """The tokenizer a run was trained with: ``out_dir/tokenizer.json`` when the trainer saved one
    (checked against the fingerprint the checkpoint records), else the prepared data's (whose cache
    is prepared again if it was deleted). Returns it, its fingerprint, and the data if it was read."""
    path = folder / RUN_TOKENIZER
    expected = state.get("tokenizer_fingerprint")
    data = None
    if not path.is_file() or expected is None:      # a run from before tokenizer.json, or without it
        data = prepare_data(config.data, verbose=False)
        expected = expected or data.meta["tokenizer_fingerprint"]
    if not path.is_file():
        tokenizer, found = data.tokenizer(), data.meta["tokenizer_fingerprint"]
        where = f"the data cache ({data.tokenizer_path})"
    else:
        try:
            tokenizer = load_tokenizer(path)
        except Exception as exc:   # tokenizers raises its own exception types for a bad file
            raise RunLoadError(f"{path} is not a tokenizer file ({str(exc).splitlines()[0]}); copy the run's own "
                               "back, or delete it to use the data cache's") from None
        found, where = tokenizer_fingerprint(tokenizer), str(path)
    if found != expected:
        raise RunLoadError(f"the tokenizer in {where} (fingerprint {found}) is not the one the checkpoint was trained "
                           f"with ({expected}); the model's token ids would mean other text. Restore the run's own "
                           f"{RUN_TOKENIZER}, or prepare the data exactly as the run's config did")
    return tokenizer, found, data


def load_run(out_dir: str | Path, *, log=None) -> LoadedRun:
    """The model of ``out_dir``'s newest good checkpoint, with the tokenizer it was trained with.

    The tokenizer is the run folder's own ``tokenizer.json`` (the trainer writes it; its
    fingerprint must be the checkpoint's), so a run folder alone is enough to generate and
    export; the prepared data (``data.cache_dir``) is read only when asked for (``run.data``,
    which evaluation needs) and prepared again if the cache was deleted. Raises
    :class:`RunLoadError` with one readable paragraph.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    folder = Path(out_dir)
    if not folder.is_dir():
        raise RunLoadError(f"no run folder at {folder}: --checkpoint takes a run's out_dir (the folder that holds "
                           "ckpt_*.pt and metrics.jsonl), e.g. build/runs/gpt-char-tiny")
    try:
        found = ckpt.load_latest(folder, log=log)
    except ckpt.CheckpointError as exc:
        raise RunLoadError(f"{exc}. Every checkpoint in the folder failed its checksum; train again, or resume from "
                           "a copy of the folder that is intact") from exc
    if found is None:
        raise RunLoadError(f"{folder} holds no checkpoint (ckpt_<step>.pt): was the run started with this out_dir, "
                           "and did it reach its first checkpoint (checkpoint.every)?")
    path, state = found
    try:
        config = config_from_dict(state["config"])
    except (KeyError, ConfigError) as exc:
        raise RunLoadError(f"the run config saved in {path} does not validate here ({exc}); the checkpoint was "
                           "written by another version of the course or not by pretrain_lib.train") from exc
    tokenizer, fingerprint, data = run_tokenizer(folder, state, config)
    vocab_size = tokenizer.get_vocab_size()
    model = run_model(config, vocab_size)
    if "sharded" in state:
        from .capstone.sharded import load_sharded_model
        load_sharded_model(state["sharded"], model)
    else:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise RunLoadError(f"the weights in {path} do not fit the model its config describes (vocabulary "
                               f"{vocab_size} from the run's tokenizer): {str(exc).splitlines()[0]}") from exc
    model.eval()
    return LoadedRun(model, tokenizer, config, path, int(state["step"]), fingerprint, data)


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """``prompt``'s ids; a character the vocabulary lacks (a char tokenizer's ``[UNK]``) is an error
    that names it, since the model would otherwise continue from a token it never saw."""
    encoding = tokenizer.encode(prompt, add_special_tokens=False)
    unk = tokenizer.token_to_id(UNK)
    if unk is not None and unk in encoding.ids:
        bad = sorted({prompt[s:e] for i, (s, e) in zip(encoding.ids, encoding.offsets) if i == unk})
        raise RunLoadError(f"the prompt holds {len(bad)} character(s) outside the model's vocabulary: "
                           f"{', '.join(map(repr, bad))}. A character-level model knows only the characters of its "
                           "training corpus; remove or replace them")
    return encoding.ids


def generate(run: LoadedRun | str | Path, prompt: str, *, max_new_tokens: int = 200, seed: int = 0,
             temperature: float = 0.8, top_k: int | None = 40) -> str:
    """``prompt`` followed by ``max_new_tokens`` sampled tokens (``temperature=0``: greedy; ``top_k``
    None or 0: no cut). ``run`` is a :class:`LoadedRun` or a run's ``out_dir``."""
    run = run if isinstance(run, LoadedRun) else load_run(run)
    if not run.is_gpt:
        raise RunLoadError(f"{run.checkpoint} is a BERT (a bidirectional encoder trained to fill masks): it cannot "
                           "continue a prompt left to right. Use --fill-mask 'text with [MASK]' instead")
    if max_new_tokens < 0:
        raise RunLoadError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise RunLoadError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    encode_prompt(run.tokenizer, prompt)
    continuation = gpt_sample(run.model, run.tokenizer, prompt=prompt, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_k=top_k or None, seed=seed)
    return prompt + continuation


def fill_masks(run: LoadedRun | str | Path, text: str, *, k: int = 5) -> list[list[tuple[str, float]]]:
    """For each ``[MASK]`` in ``text``, the BERT's ``k`` most probable tokens and their probabilities."""
    run = run if isinstance(run, LoadedRun) else load_run(run)
    if run.is_gpt:
        raise RunLoadError(f"{run.checkpoint} is a GPT (a causal decoder): it continues a prompt and has no [MASK] "
                           "token to fill. Use --prompt instead of --fill-mask")
    try:
        return fill_mask(run.model, run.tokenizer, text, k=k)
    except ValueError as exc:
        raise RunLoadError(str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain_lib.generate",
                                     description="Sample from a trained GPT run, or fill masks with a BERT run.")
    parser.add_argument("--checkpoint", required=True, metavar="OUT_DIR",
                        help="a run's out_dir; its newest good checkpoint is used")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="GPT: the text to continue")
    what.add_argument("--fill-mask", metavar="TEXT", help="BERT: text with one or more [MASK] to fill")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy decoding")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k most probable tokens (0: all)")
    parser.add_argument("--k", type=int, default=5, help="--fill-mask: candidates shown per mask")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        run = load_run(args.checkpoint)
        if args.fill_mask is not None:
            for i, top in enumerate(fill_masks(run, args.fill_mask, k=args.k)):
                print(f"[MASK] {i + 1}: " + ", ".join(f"{tok!r} {p:.3f}" for tok, p in top))
        else:
            text = generate(run, args.prompt, max_new_tokens=args.max_new_tokens, seed=args.seed,
                            temperature=args.temperature, top_k=args.top_k)
            # exactly the text (a pipe gets nothing else); a terminal also gets a final line break
            sys.stdout.write(text + ("\n" if sys.stdout.isatty() and not text.endswith("\n") else ""))
    except (RunLoadError, FileNotFoundError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
