"""Span corruption, prefix LM and the UL2 mixture (pretrain_lib.objectives), checked by hand."""
from __future__ import annotations

import pytest
import torch

from pretrain_lib.model import GPT, ModelConfig
from pretrain_lib.objectives import (IGNORE_INDEX, clm_loss, corrupt_spans, prefix_lm_example,
                                     prefix_lm_objective, random_span_mask, span_corruption_example,
                                     span_corruption_objective, span_corruption_source_length, span_counts,
                                     ul2_objective)
from pretrain_lib.train import train_step
from pretrain_lib.optim import build_optimizer


def test_corrupt_spans_worked_by_hand():
    ids = torch.tensor([[10, 11, 12, 13, 14, 15]])
    noise = torch.tensor([[0, 0, 1, 1, 0, 1]], dtype=torch.bool)
    inputs, targets = corrupt_spans(ids, noise, sentinel_ids=[1, 2], n_noise=3, n_spans=2)
    assert inputs.tolist() == [[10, 11, 1, 14, 2]]
    assert targets.tolist() == [[1, 12, 13, 2, 15]]


def test_span_counts_follow_t5():
    assert span_counts(512, noise_density=0.15, mean_span_length=3.0) == (77, 26)  # round(76.8), round(25.67)
    assert span_counts(10, noise_density=0.5, mean_span_length=100) == (5, 1)
    with pytest.raises(ValueError, match="noise_density"):
        span_counts(10, noise_density=1.5, mean_span_length=3)


def test_random_span_mask_has_fixed_counts_and_starts_clean():
    g = torch.Generator().manual_seed(0)
    mask = random_span_mask(64, 40, noise_density=0.3, mean_span_length=3.0, generator=g)
    n_noise, n_spans = span_counts(40, noise_density=0.3, mean_span_length=3.0)
    assert (mask.sum(1) == n_noise).all()
    starts = mask[:, 1:] & ~mask[:, :-1]
    assert (starts.sum(1) == n_spans).all() and not mask[:, 0].any()
    assert len({tuple(r) for r in mask.int().tolist()}) > 50  # rows are drawn independently
    # every position is noise with about the same frequency (no position bias beyond the clean start)
    assert mask[:, 5:].float().mean().item() == pytest.approx(0.3, abs=0.05)


def test_span_corruption_example_reconstructs_the_source():
    g = torch.Generator().manual_seed(1)
    src = torch.arange(100, 130).expand(3, 30)
    ex = span_corruption_example(src, sentinel_ids=[1], sep_id=3, noise_density=0.2, mean_span_length=2,
                                 generator=g)
    n_noise, n_spans = span_counts(30, noise_density=0.2, mean_span_length=2)
    p = int(ex["prefix_len"][0])
    assert ex["input_ids"].shape == (3, 30 + 2 * n_spans + 1)
    assert p == 30 - n_noise + n_spans + 1 and (ex["input_ids"][:, p - 1] == 3).all()
    assert (ex["labels"][:, :p] == IGNORE_INDEX).all()
    for row in ex["input_ids"].tolist():   # fill each sentinel with its span: the source comes back
        inp, tgt = row[:p - 1], row[p:]
        spans, current = [], None
        for tok in tgt:
            if tok == 1:
                current = []
                spans.append(current)
            else:
                current.append(tok)
        rebuilt = [t for tok in inp for t in (spans.pop(0) if tok == 1 else [tok])]
        assert rebuilt == list(range(100, 130))
    assert span_corruption_source_length(128, noise_density=0.15, mean_span_length=3.0) + \
        2 * span_counts(115, noise_density=0.15, mean_span_length=3.0)[1] + 1 <= 128


def test_prefix_lm_example_splits_inside_bounds():
    g = torch.Generator().manual_seed(0)
    ex = prefix_lm_example(torch.arange(5, 25).expand(200, 20), min_prefix=0.25, max_prefix=0.5, generator=g)
    p = ex["prefix_len"]
    assert p.min().item() == 5 and p.max().item() == 10
    for row, n in zip(ex["labels"].tolist(), p.tolist()):
        assert row[:n] == [IGNORE_INDEX] * n and row[n:] == list(range(5 + n, 25))


def test_prefix_lm_loss_equals_clm_loss_on_the_suffix_with_the_prefix_mask():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, d_model=16, n_heads=2, n_layers=1, max_seq_len=12))
    ids = torch.randint(5, 40, (2, 12))
    objective = prefix_lm_objective(min_prefix=0.5, max_prefix=0.5, generator=torch.Generator().manual_seed(0))
    loss, n = objective(model, {"input_ids": ids})
    assert int(n) == 2 * 6
    logits = model(ids, prefix_len=torch.tensor([6, 6]))
    by_hand = torch.nn.functional.cross_entropy(logits[:, 5:-1].reshape(-1, 40), ids[:, 6:].reshape(-1))
    torch.testing.assert_close(loss, by_hand)
    assert not torch.allclose(loss, clm_loss(model(ids), ids))


def test_objectives_train_through_the_engine_and_ul2_mixes():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, d_model=16, n_heads=2, n_layers=1, max_seq_len=32))
    g = torch.Generator().manual_seed(0)
    span = span_corruption_objective(sentinel_ids=[1], sep_id=3, generator=g)
    ul2 = ul2_objective({"R": (1.0, span), "S": (1.0, prefix_lm_objective(generator=g))}, seed=0)
    opt = build_optimizer(model, lr=1e-2)
    batch = {"input_ids": torch.randint(5, 40, (4, 32))}
    for _ in range(20):
        result = train_step(model, [batch], ul2, opt)
    assert ul2.counts["R"] > 0 and ul2.counts["S"] > 0 and sum(ul2.counts.values()) == 20
    loss, n = span(model, batch)
    n_noise, n_spans = span_counts(span_corruption_source_length(32, noise_density=0.15, mean_span_length=3.0),
                                   noise_density=0.15, mean_span_length=3.0)
    assert int(n) == 4 * (n_noise + n_spans) and torch.isfinite(result.loss)
    with pytest.raises(ValueError, match="weights"):
        ul2_objective({"R": (0.0, span)})


def test_prefix_lm_row_scores_match_prefix_lm_loss_row_by_row():
    from pretrain_lib.model import GPT, ModelConfig
    from pretrain_lib.objectives import prefix_lm_example, prefix_lm_loss, prefix_lm_row_scores
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=1, max_seq_len=12)).eval()
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    example = prefix_lm_example(ids, generator=torch.Generator().manual_seed(2))
    rows = prefix_lm_row_scores(model, example)
    for r in range(3):
        one = {k: v[r:r + 1] for k, v in example.items()}
        assert rows["loss"][r].item() == pytest.approx(prefix_lm_loss(model, one)[0].item(), rel=1e-5)
    # scored positions are exactly the labelled targets; correct only where scored
    assert torch.equal(rows["scored"], example["labels"][:, 1:] != -100)
    assert not (rows["correct"] & ~rows["scored"]).any()
    with torch.no_grad():
        top = model(example["input_ids"], prefix_len=example["prefix_len"])[:, :-1].argmax(-1)
    assert torch.equal(rows["correct"], (top == example["labels"][:, 1:]) & rows["scored"])


def test_sparse_clm_loss_gives_the_full_heads_loss_and_gradients():
    """prefix_lm_loss runs the output projection only where a target is labelled: same loss, same gradients."""
    from pretrain_lib.objectives import sparse_clm_loss
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    example = prefix_lm_example(ids, generator=torch.Generator().manual_seed(2))
    results = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=1, max_seq_len=12))
        if sparse:
            loss, n = sparse_clm_loss(model, example["input_ids"], example["labels"], prefix_len=example["prefix_len"])
        else:
            logits = model(example["input_ids"], prefix_len=example["prefix_len"])
            loss, n = clm_loss(logits, example["labels"]), (example["labels"][:, 1:] != IGNORE_INDEX).sum()
        loss.backward()
        results.append((loss.detach(), int(n), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (full, n_full, g_full), (sparse, n_sparse, g_sparse) = results
    assert n_full == n_sparse > 0
    assert sparse.item() == pytest.approx(full.item(), rel=1e-5)
    for name in g_full:
        torch.testing.assert_close(g_sparse[name], g_full[name], rtol=1e-4, atol=1e-6)
