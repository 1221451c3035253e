"""``python -m pretrain_lib.generate``: a checkpoint loaded in a fresh process, sampling and fill-mask, bad input.

Also home of :func:`train_run`, the tiny runs trained through the real command line that the
evaluate, export and benchmark tests share (one per name and pytest session).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain_lib.capstone.checkpoint import decode_checkpoint
from pretrain_lib.capstone.config import config_from_dict
from pretrain_lib.capstone.data import prepare_data
from pretrain_lib.capstone.trainer import run_model
from pretrain_lib.generate import RunLoadError, generate, load_run

REPO = Path(__file__).resolve().parents[1]
SMALL = ("model.n_layers=1", "model.n_heads=2", "model.d_model=32", "train.batch_size=4", "train.warmup_steps=2",
         "train.log_every=10", "train.eval_every=20", "train.eval_batches=2", "train.sample_tokens=0",
         "train.tensorboard=false", "train.progress=\"off\"", "checkpoint.every=10", "checkpoint.keep=2")
# A few plays and a small model: seconds. "full" runs read the whole corpus (the benchmark's plays are the last ones).
RUNS = {
    "char": ("gpt-char-tiny", (*SMALL, "train.steps=20", "data.max_docs=2")),
    "char-full": ("gpt-char-tiny", (*SMALL, "train.steps=20")),
    "bpe": ("gpt-bpe-small", (*SMALL, "model.seq_len=64", "train.steps=20", "data.max_docs=2", "data.vocab_size=400")),
    "bert": ("bert-small", (*SMALL, "model.seq_len=32", "train.steps=20", "data.max_docs=1", "data.vocab_size=400")),
    "rope": ("gpt-char-tiny", (*SMALL, "model.seq_len=32", "train.steps=10", "data.max_docs=1",
                               "model.position=\"rope\"")),
    "untied": ("gpt-char-tiny", (*SMALL, "model.seq_len=32", "train.steps=10", "data.max_docs=1",
                                 "model.tie_embeddings=false")),
}


def cli(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


def train_run(tmp_path_factory, name: str) -> Path:
    """The run ``name`` of :data:`RUNS`, trained once per session with ``python -m pretrain_lib.train``.
    Small runs prepare their data in the session's temporary folder; full-corpus ones use the
    course's cache (build/data), which the notebooks share."""
    out = tmp_path_factory.getbasetemp() / "course-runs" / name
    if (out / "latest").is_file():
        return out
    config, sets = RUNS[name]
    extra = () if name.endswith("full") else (f"data.cache_dir=\"{tmp_path_factory.getbasetemp() / 'course-data'}\"",)
    args = ["--config", f"configs/{config}.toml", "--set", f"out_dir=\"{out}\""]
    for item in (*sets, *extra):
        args += ["--set", item]
    done = cli("pretrain_lib.train", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def char_run(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory, "char")


def reference_greedy(out_dir: Path, prompt: str, n: int) -> str:
    """Greedy decoding written out here: the newest checkpoint's weights, argmax of the last position."""
    latest = out_dir / (out_dir / "latest").read_text().strip()
    state = decode_checkpoint(latest.read_bytes())
    config = config_from_dict(state["config"])
    tok = prepare_data(config.data, verbose=False).tokenizer()
    model = run_model(config, tok.get_vocab_size())
    model.load_state_dict(state["model"])
    model.eval()
    ids = tok.encode(prompt, add_special_tokens=False).ids
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids[-model.config.max_seq_len:]]))[0, -1].argmax()))
    return prompt + tok.decode(ids[len(tok.encode(prompt, add_special_tokens=False).ids):], skip_special_tokens=False)


def test_greedy_cli_prints_the_prompt_and_its_continuation_and_nothing_else(char_run):
    prompt = "First Citizen:\nWe are"
    done = cli("pretrain_lib.generate", "--checkpoint", str(char_run), "--prompt", prompt, "--max-new-tokens", "60",
               "--seed", "3", "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout == reference_greedy(char_run, prompt, 60)  # beyond the 65-token window too
    assert "Traceback" not in done.stderr


def test_sampling_repeats_with_its_seed_and_the_function_matches_the_cli(char_run):
    run = load_run(char_run)
    a = generate(run, "ROMEO:", max_new_tokens=60, seed=1, temperature=1.0, top_k=0)
    assert a == generate(run, "ROMEO:", max_new_tokens=60, seed=1, temperature=1.0, top_k=0)
    assert a != generate(run, "ROMEO:", max_new_tokens=60, seed=2, temperature=1.0, top_k=0)
    done = cli("pretrain_lib.generate", "--checkpoint", str(char_run), "--prompt", "ROMEO:", "--max-new-tokens", "60",
               "--seed", "1", "--temperature", "1.0", "--top-k", "0")
    assert done.stdout == a


def test_the_newest_good_checkpoint_is_used_past_a_corrupt_one(char_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(char_run, copy)
    newest = copy / (copy / "latest").read_text().strip()
    newest.write_bytes(newest.read_bytes()[:-100])             # truncated
    done = cli("pretrain_lib.generate", "--checkpoint", str(copy), "--prompt", "A", "--max-new-tokens", "5")
    assert done.returncode == 0 and "corrupt" in done.stderr
    assert load_run(copy).step == 10
    for p in copy.glob("ckpt_*.pt"):                          # now every checkpoint is corrupt
        p.write_bytes(b"PLCKPT1\n" + b"0" * 64 + b"\nnot a checkpoint")
    done = cli("pretrain_lib.generate", "--checkpoint", str(copy), "--prompt", "A", "--max-new-tokens", "5")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no usable checkpoint" in done.stderr and done.stdout == ""


@pytest.mark.parametrize("case", ["missing folder", "no checkpoint", "prompt outside the vocabulary",
                                  "gpt asked to fill masks"])
def test_bad_input_is_one_paragraph_and_exit_code_2(char_run, tmp_path, case):
    folder, args, expected = str(char_run), ["--prompt", "ROMEO"], ""
    if case == "missing folder":
        folder, expected = str(tmp_path / "nowhere"), "no run folder"
    elif case == "no checkpoint":
        folder, expected = str(tmp_path), "holds no checkpoint"
    elif case == "prompt outside the vocabulary":
        args, expected = ["--prompt", "naïve €"], "'€'"
    else:
        args, expected = ["--fill-mask", "a [MASK] b"], "is a GPT"
    done = cli("pretrain_lib.generate", "--checkpoint", folder, *args, "--max-new-tokens", "5")
    assert done.returncode == 2
    assert expected in done.stderr and "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def test_bert_fills_masks_and_refuses_to_generate(tmp_path_factory):
    bert = train_run(tmp_path_factory, "bert")
    done = cli("pretrain_lib.generate", "--checkpoint", str(bert), "--fill-mask", "to be or not to [MASK]",
               "--k", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("[MASK] 1: ") and done.stdout.count(",") >= 2
    done = cli("pretrain_lib.generate", "--checkpoint", str(bert), "--prompt", "to be", "--max-new-tokens", "5")
    assert done.returncode == 2 and "--fill-mask" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(RunLoadError, match="is a BERT"):
        generate(bert, "to be")


def test_a_run_folder_is_self_contained_with_its_tokenizer_and_a_foreign_one_is_refused(tmp_path):
    """The trainer copies its tokenizer into out_dir; with the data cache deleted, generate (and export)
    still work from the folder alone, without preparing the data again; a tokenizer.json that is not
    the checkpoint's (another vocabulary, or not a tokenizer) is refused in one paragraph."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["--config", "configs/gpt-bpe-small.toml", "--set", f"out_dir=\"{out}\"", "--set",
            f"data.cache_dir=\"{cache}\""]
    for item in (*SMALL, "model.seq_len=64", "train.steps=10", "data.max_docs=2", "data.vocab_size=400"):
        args += ["--set", item]
    assert cli("pretrain_lib.train", *args).returncode == 0
    (prepared,) = [p for p in cache.iterdir() if (p / "meta.json").is_file()]
    assert (out / "tokenizer.json").read_bytes() == (prepared / "tokenizer.json").read_bytes()
    greedy = ["--checkpoint", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--temperature", "0"]
    before = cli("pretrain_lib.generate", *greedy)
    assert before.returncode == 0 and before.stdout.startswith("ROMEO:")
    shutil.rmtree(cache)
    after = cli("pretrain_lib.generate", *greedy)
    assert after.returncode == 0 and after.stdout == before.stdout
    assert not cache.exists(), "loading the run prepared the data again instead of reading out_dir/tokenizer.json"
    if all(importlib.util.find_spec(m) for m in ("transformers", "safetensors")):
        exported = cli("pretrain_lib.export", "--checkpoint", str(out), "--format", "hf", "--out", str(tmp_path / "hf"))
        assert exported.returncode == 0, exported.stderr
        assert not cache.exists()

    from pretrain_lib.capstone.data import train_char_tokenizer
    train_char_tokenizer(["ROMEO: a play"]).save(str(out / "tokenizer.json"))
    for broken, expected in ((None, "is not the one the checkpoint was trained with"),
                             (b"{not json", "is not a tokenizer file")):
        if broken is not None:
            (out / "tokenizer.json").write_bytes(broken)
        done = cli("pretrain_lib.generate", *greedy)
        assert done.returncode == 2 and expected in done.stderr and done.stdout == ""
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
