"""mask_tokens, mlm_loss and clm_loss against hand-worked references and F.cross_entropy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain_lib.objectives import IGNORE_INDEX, clm_loss, mask_tokens, mlm_loss

VOCAB, MASK, PAD, CLS, SEP = 1000, 1, 0, 2, 3
SPECIALS = (PAD, MASK, CLS, SEP, 4)


def _big_batch(n_rows=400, seq=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n_rows, seq), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[::3, -40:] = PAD  # padded rows
    return ids


def test_masking_statistics_on_100k_tokens():
    ids = _big_batch()
    assert ids.numel() >= 100_000
    inputs, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIALS,
                                 generator=torch.Generator().manual_seed(1))
    eligible = ~torch.isin(ids, torch.tensor(SPECIALS))
    selected = labels != IGNORE_INDEX
    rate = selected.sum().item() / eligible.sum().item()
    assert abs(rate - 0.15) < 0.005
    n = selected.sum().item()
    to_mask = (inputs == MASK) & selected
    kept = (inputs == ids) & selected
    replaced = selected & ~to_mask & ~kept
    # A random replacement can draw the original id by chance (p = 1/995): it then counts as kept.
    assert abs(to_mask.sum().item() / n - 0.80) < 0.015
    assert abs(replaced.sum().item() / n - 0.10) < 0.015
    assert abs(kept.sum().item() / n - 0.10) < 0.015
    assert torch.equal(labels[selected], ids[selected])


def test_specials_never_selected_nor_drawn_as_replacements():
    ids = _big_batch()
    inputs, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIALS,
                                 mlm_probability=0.5, generator=torch.Generator().manual_seed(2))
    special = torch.isin(ids, torch.tensor(SPECIALS))
    assert (labels[special] == IGNORE_INDEX).all()
    assert torch.equal(inputs[special], ids[special])
    # replaced positions hold ordinary ids only
    changed = (inputs != ids) & (inputs != MASK)
    assert not torch.isin(inputs[changed], torch.tensor(SPECIALS)).any()


def test_input_untouched_and_reproducible():
    ids = _big_batch(10, 64)
    before = ids.clone()
    a = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIALS,
                    generator=torch.Generator().manual_seed(7))
    b = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIALS,
                    generator=torch.Generator().manual_seed(7))
    assert torch.equal(ids, before)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_probability_edges():
    ids = _big_batch(4, 32)
    inputs, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, mlm_probability=0.0)
    assert torch.equal(inputs, ids) and (labels == IGNORE_INDEX).all()
    _, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIALS,
                            mlm_probability=1.0)
    assert ((labels != IGNORE_INDEX) == ~torch.isin(ids, torch.tensor(SPECIALS))).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(mlm_probability=1.5), "mlm_probability"),
    (dict(mask_token_id=5000), "outside the vocabulary"),
])
def test_masking_bad_arguments(kwargs, message):
    args = dict(mask_token_id=MASK, vocab_size=VOCAB) | kwargs
    with pytest.raises(ValueError, match=message):
        mask_tokens(torch.zeros(2, 4, dtype=torch.long), **args)


def test_masking_rejects_float_ids():
    with pytest.raises(TypeError, match="integer"):
        mask_tokens(torch.zeros(2, 4), mask_token_id=MASK, vocab_size=VOCAB)


def test_mlm_loss_matches_cross_entropy_on_selected_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.full((3, 7), IGNORE_INDEX)
    labels[0, 1], labels[1, 4], labels[2, 6] = 3, 10, 0
    picked = torch.stack([logits[0, 1], logits[1, 4], logits[2, 6]])
    expected = F.cross_entropy(picked, torch.tensor([3, 10, 0]))
    torch.testing.assert_close(mlm_loss(logits, labels), expected)


def test_mlm_loss_hand_worked_uniform_logits():
    # Uniform logits over V classes give -log(1/V) = log V at every position.
    logits = torch.zeros(1, 4, 8)
    labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX, 5]])
    torch.testing.assert_close(mlm_loss(logits, labels), torch.log(torch.tensor(8.0)))


def test_mlm_loss_with_no_labels_is_zero_not_nan():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = mlm_loss(logits, torch.full((2, 3), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph


def test_clm_loss_matches_cross_entropy_shifted_by_hand():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 9, generator=g)
    ids = torch.randint(0, 9, (2, 6), generator=g)
    expected = F.cross_entropy(torch.cat([logits[0, :5], logits[1, :5]]), torch.cat([ids[0, 1:], ids[1, 1:]]))
    torch.testing.assert_close(clm_loss(logits, ids), expected)


def test_clm_loss_ignores_padding_targets():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 5, 9, generator=g)
    ids = torch.tensor([[4, 7, 1, 0, 0]])
    loss = clm_loss(logits, ids, ignore_index=0)
    expected = F.cross_entropy(logits[0, :2], ids[0, 1:3])  # targets 7 and 1 only
    torch.testing.assert_close(loss, expected)


def test_loss_shape_errors():
    with pytest.raises(ValueError, match="disagree"):
        clm_loss(torch.randn(2, 5, 9), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2"):
        clm_loss(torch.randn(2, 1, 9), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="disagree"):
        mlm_loss(torch.randn(2, 5, 9), torch.zeros(3, 5, dtype=torch.long))


class _FixedLogits(torch.nn.Module):
    """A 'model' that returns the same logits whatever the input (shape (batch, seq, vocab))."""
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, ids, attention_mask=None):
        return self.logits[: ids.size(0), : ids.size(1)]


def test_masked_position_scores_match_cross_entropy_and_a_hand_rank():
    from pretrain_lib.objectives import masked_position_scores
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 2.0]]])   # (1, 2, 4)
    labels = torch.tensor([[2, 3]])
    scored = torch.tensor([[True, True]])
    out = masked_position_scores(_FixedLogits(logits), [(torch.zeros(1, 2, dtype=torch.long), labels, scored)])
    reference = F.cross_entropy(logits[0], labels[0], reduction="none")
    assert torch.allclose(out["loss"], reference)
    assert out["rank"].tolist() == [2, 1]        # label 2 is beaten by tokens 0 and 1; label 3 by token 1
    assert out["top"].tolist() == [0, 1]
    unscored = masked_position_scores(_FixedLogits(logits), [(torch.zeros(1, 2, dtype=torch.long), labels,
                                                              torch.tensor([[False, True]]))])
    assert unscored["rank"].tolist() == [1]
    # window: the row each scored position lies in, counted across batches
    two = masked_position_scores(_FixedLogits(logits.expand(2, 2, 4)), [
        (torch.zeros(2, 2, dtype=torch.long), labels.expand(2, 2), torch.tensor([[True, False], [True, True]]))] * 2)
    assert two["window"].tolist() == [0, 1, 1, 2, 3, 3]


def test_per_window_clm_loss_averages_to_clm_loss():
    from pretrain_lib.objectives import per_window_clm_loss
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    windows = torch.randint(0, 11, (3, 6), generator=g)
    per_row = per_window_clm_loss(_FixedLogits(logits), [windows])
    assert per_row.shape == (3,)
    assert per_row.mean().item() == pytest.approx(clm_loss(logits, windows).item(), rel=1e-6)
    by_hand = F.cross_entropy(logits[1, :-1], windows[1, 1:]).item()
    assert per_row[1].item() == pytest.approx(by_hand, rel=1e-6)
