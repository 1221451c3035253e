"""utils, corpus, chapter-1 tokenizer, random windows and the training loop."""
from __future__ import annotations

import pytest
import torch

from pretrain_lib.data.corpus import (DecodeReport, iter_shakespeare, load_text_folder, shakespeare_text,
                                      strip_markdown)
from pretrain_lib.data.loader import random_windows
from pretrain_lib.data.tokenizer import SPECIAL_TOKENS, special_token_ids, train_tokenizer
from pretrain_lib.model import GPT, MaskedLM, ModelConfig
from pretrain_lib.train import clm_objective, mlm_objective, train
from pretrain_lib.utils import resolve_device, seed_everything


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"   # auto's order (CUDA, MPS, CPU) is tested in test_devices.py
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)


def test_shakespeare_corpus_is_real_and_stripped():
    docs = list(iter_shakespeare())
    assert len(docs) == 38
    assert sum(len(d.text) for d in docs) > 4_000_000
    hamlet = next(d for d in docs if d.name == "hamlet")
    assert "To be, or not to be" in hamlet.text
    assert "**" not in hamlet.text and "\n#" not in hamlet.text
    assert len(shakespeare_text(1000)) == 1000


def test_strip_markdown_by_hand():
    assert strip_markdown("## ACT I\n\n**HAMLET**  \nTo be.\n_Exit_") == "ACT I\n\nHAMLET\nTo be.\nExit\n"


def test_load_text_folder_reports_bad_bytes_and_empty_files(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"good text\n")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 ok \xff\xfe end")
    (tmp_path / "empty.txt").write_bytes(b"")
    report = DecodeReport()
    docs = list(load_text_folder(tmp_path, report=report))
    assert [d.name for d in docs] == ["a.txt", "b.txt"]
    assert docs[1].text == "caf\ufffd ok \ufffd\ufffd end"
    assert report.bad_files == {"b.txt": [3, 8, 9]}
    assert report.bad_byte_count == 3 and report.empty_files == ["empty.txt"]
    with pytest.raises(FileNotFoundError, match="not a folder"):
        list(load_text_folder(tmp_path / "missing"))


def test_tokenizer_specials_and_round_trip():
    tok = train_tokenizer([shakespeare_text(50_000)], vocab_size=400)
    ids = special_token_ids(tok)
    assert [ids[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    for text in ["To be, or not to be", "def f(x):\n    return x**2\n", "掩码语言模型", "tab\tand  spaces"]:
        assert tok.decode(tok.encode(text).ids) == text
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer(["", ""], vocab_size=400)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=10)


def test_random_windows_are_contiguous_slices():
    stream = torch.arange(100)
    w = random_windows(stream, batch_size=5, seq_len=8, generator=torch.Generator().manual_seed(0))
    assert w.shape == (5, 8)
    assert ((w[:, 1:] - w[:, :-1]) == 1).all() and w.max() < 100
    with pytest.raises(ValueError, match="fewer than one window"):
        random_windows(torch.arange(5), batch_size=1, seq_len=8)


def _tiny_run(seed):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=32, d_model=32, n_heads=2, n_layers=1, max_seq_len=16))
    stream = torch.arange(2000) % 32  # a perfectly predictable sequence
    g = torch.Generator().manual_seed(seed)
    return train(model, lambda s: {"input_ids": random_windows(stream, batch_size=8, seq_len=16, generator=g)},
                 clm_objective, steps=60, lr=3e-3, seed=seed, progress=False, device="cpu")


def test_training_learns_and_is_deterministic():
    a, b = _tiny_run(0), _tiny_run(0)
    assert a.losses == b.losses
    assert a.losses[0] > 3.0 and a.final_loss() < 0.5  # ln 32 ≈ 3.47 → counting is learnt
    assert sum(a.target_tokens) == 60 * 8 * 15


def test_mlm_objective_counts_only_masked_targets():
    torch.manual_seed(0)
    model = MaskedLM(ModelConfig(vocab_size=40, d_model=32, n_heads=2, n_layers=1, max_seq_len=16, causal=False))
    batch = {"input_ids": torch.randint(5, 40, (4, 16))}
    objective = mlm_objective(mask_token_id=1, vocab_size=40, special_token_ids=range(5),
                              generator=torch.Generator().manual_seed(0))
    history = train(model, lambda s: batch, objective, steps=3, progress=False, device="cpu")
    assert all(0 < n < 64 for n in history.target_tokens)


def test_train_rejects_bad_arguments():
    model = GPT(ModelConfig(vocab_size=32, d_model=32, n_heads=2, n_layers=1, max_seq_len=16))
    with pytest.raises(ValueError, match="steps"):
        train(model, lambda s: {}, clm_objective, steps=0)
