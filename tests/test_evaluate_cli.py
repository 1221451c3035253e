"""``python -m pretrain_lib.evaluate``: bits per byte worked by hand, one axis for char and BPE, the JSON contract."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from tokenizers import Tokenizer

from pretrain_lib.benchmark.items import N_ITEMS
from pretrain_lib.capstone.data import train_char_tokenizer
from pretrain_lib.capstone.evaluate import validation_loss
from pretrain_lib.data.loader import clm_collate
from pretrain_lib.data.tokenizer import train_tokenizer
from pretrain_lib.evaluate import bits_per_byte, token_byte_lengths, window_nats
from pretrain_lib.evaluate.run import evaluate_run, validation_windows
from pretrain_lib.generate import load_run
from test_generate import cli, train_run

TEXT = "Naïve Œdipus — 'tis 3€, sirrah!\nWherefore?\n" * 3


def test_bits_per_byte_worked_by_hand():
    # 8 tokens, each given probability 1/4: 8 * ln 4 nats = 16 bits, over 4 bytes of text = 4 bits per byte
    assert bits_per_byte(8 * math.log(4), 4) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def test_token_byte_lengths_count_utf8_bytes_for_char_and_byte_level_bpe():
    char = train_char_tokenizer([TEXT])
    bpe = train_tokenizer([TEXT] * 5, vocab_size=300, kind="bpe")
    lengths = token_byte_lengths(char)
    assert lengths[char.token_to_id("a")] == 1 and lengths[char.token_to_id("ï")] == 2
    assert lengths[char.token_to_id("€")] == 3 and lengths[char.token_to_id("<|endoftext|>")] == 0
    # One axis: both tokenizers count exactly the bytes of the same text, however they cut it.
    for tok in (char, bpe):
        ids = tok.encode(TEXT, add_special_tokens=False).ids
        assert token_byte_lengths(tok)[ids].sum() == len(TEXT.encode("utf-8"))
    assert len(bpe.encode(TEXT).ids) < len(char.encode(TEXT).ids)


class Uniform(nn.Module):
    """Every next token equally likely: ln V nats per token, whatever the tokenizer."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size, self.w = vocab_size, nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab_size) + self.w


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_uniform_model_costs_log2_v_bits_per_token_spread_over_the_bytes(kind):
    tok: Tokenizer = train_char_tokenizer([TEXT]) if kind == "char" else train_tokenizer([TEXT] * 5, vocab_size=300)
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    n = (len(ids) - 1) // 8
    windows = torch.tensor([ids[i * 8:i * 8 + 9] for i in range(n)])
    v = tok.get_vocab_size()
    nats = window_nats(Uniform(v), windows)
    n_bytes = int(token_byte_lengths(tok)[windows[:, 1:].numpy()].sum())
    assert nats.shape == (n, 8) and torch.allclose(nats, torch.full_like(nats, math.log(v)))
    assert bits_per_byte(float(nats.sum()), n_bytes) == pytest.approx(n * 8 * math.log2(v) / n_bytes)


@pytest.fixture(scope="module")
def full_char_run(tmp_path_factory):
    return train_run(tmp_path_factory, "char-full")


def test_val_loss_is_the_trainers_token_weighted_loss_on_the_same_windows(full_char_run):
    run = load_run(full_char_run)
    windows = validation_windows(run, 24)
    batches = [clm_collate(list(w)) for w in windows.numpy().reshape(6, 4, -1)]
    expected = validation_loss(run.model, batches)
    result = evaluate_run(run, max_windows=24)
    assert result["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert result["val_tokens"] == 24 * run.config.model.seq_len


def test_cli_writes_the_contracts_json(full_char_run, tmp_path):
    out = tmp_path / "eval" / "r.json"
    done = cli("pretrain_lib.evaluate", "--checkpoint", str(full_char_run), "--json", str(out), "--max-windows", "40")
    assert done.returncode == 0, done.stderr
    r = json.loads(out.read_text())
    for key in ("val_loss", "bits_per_byte", "mc_accuracy", "mc_chance", "mc_accuracy_ci95", "mc_unigram_accuracy",
                "n_items"):
        assert key in r
    n = N_ITEMS
    assert r["mc_chance"] == 0.25 and r["n_items"] == n
    assert r["mc_held_out"] == {"items": n, "in_validation": n, "in_training": 0}
    assert r["bits_per_byte"] == pytest.approx(r["val_loss"] * r["val_tokens"] / (math.log(2) * r["val_bytes"]))
    lo, hi = r["mc_accuracy_ci95"]
    assert lo < r["mc_accuracy"] < hi and 0 <= lo and hi <= 1
    assert r["mc_gain_over_unigram"] == pytest.approx(r["mc_accuracy"] - r["mc_unigram_accuracy"])
    g_lo, g_hi = r["mc_gain_over_unigram_ci95"]
    assert g_lo <= r["mc_gain_over_unigram"] <= g_hi
    assert np.isclose(r["mc_accuracy"] * n, round(r["mc_accuracy"] * n))


def test_cli_bad_input_exits_2_with_one_paragraph(tmp_path):
    done = cli("pretrain_lib.evaluate", "--checkpoint", str(tmp_path / "none"), "--json", str(tmp_path / "r.json"))
    assert done.returncode == 2 and "no run folder" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r.json").exists()
