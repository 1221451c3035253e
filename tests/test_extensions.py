"""Chapter 8's setup (pretrain_lib.extensions), each piece against a value worked out by hand or
computed independently with torch.nn.functional."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain_lib.extensions.bias import (descriptor_shares, female_share, pronoun_predictions, redact,
                                          swap_gender)
from pretrain_lib.extensions.common import fixed_windows, unigram_window_losses, window_losses
from pretrain_lib.extensions.continual import mixed_batches
from pretrain_lib.extensions.speedrun import SpeedrunData, batch_fn, muon_flops_per_step
from pretrain_lib.model import GPT, ModelConfig
from pretrain_lib.objectives import IGNORE_INDEX


def test_fixed_windows_are_evenly_spaced_slices():
    tokens = torch.arange(100)
    w = fixed_windows(tokens, seq_len=10, n_windows=4)
    assert w.shape == (4, 10)
    assert w[:, 0].tolist() == [0, 30, 60, 90]  # linspace(0, 90, 4)
    assert torch.equal(w[1], torch.arange(30, 40))


def test_window_losses_match_cross_entropy_window_by_window():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=1, max_seq_len=12))
    windows = torch.randint(50, (5, 12))
    got = window_losses(model, windows, batch_size=2)
    with torch.no_grad():
        expected = [F.cross_entropy(model(w[None])[0, :-1], w[1:]).item() for w in windows]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


def test_unigram_loss_by_hand():
    # train counts: token 0 three times, token 1 once, token 2 never; add-one: p = 4/7, 2/7, 1/7
    train = torch.tensor([0, 0, 0, 1])
    windows = torch.tensor([[2, 0, 1], [1, 2, 2]])  # targets: (0, 1) and (2, 2)
    got = unigram_window_losses(train, windows, vocab_size=3)
    expected = [-(math.log(4 / 7) + math.log(2 / 7)) / 2, -math.log(1 / 7)]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)


def test_mixed_batches_take_the_replay_share_from_the_old_domain():
    old, new = torch.zeros(1000, dtype=torch.long), torch.ones(1000, dtype=torch.long)
    batch = mixed_batches(old, new, 0.25, batch_size=8, seq_len=16, generator=torch.Generator().manual_seed(0))(0)
    rows_from_old = (batch["input_ids"] == 0).all(dim=1).sum().item()
    assert batch["input_ids"].shape == (8, 16) and rows_from_old == 2
    only_new = mixed_batches(old, new, 0.0, batch_size=8, seq_len=16, generator=torch.Generator())(0)
    assert (only_new["input_ids"] == 1).all()
    with pytest.raises(ValueError):
        mixed_batches(old, new, 1.5, batch_size=8, seq_len=16, generator=torch.Generator())


def test_padded_batches_ignore_the_padding_in_their_labels():
    ids = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    data = SpeedrunData(vocab_size=10, seq_len=4, n_speeches=2, packed=ids, padded_ids=ids, padded_mask=mask,
                        valid=ids)
    batch = batch_fn(data, "padded", 4, torch.Generator().manual_seed(0))(0)
    assert ((batch["labels"] == IGNORE_INDEX) == (batch["attention_mask"] == 0)).all()
    packed = batch_fn(data, "packed", 4, torch.Generator().manual_seed(0))(0)
    assert torch.equal(packed["labels"], packed["input_ids"])


def test_muon_flops_count_by_hand():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8, bias=False)   # 8 x 4: m=4, n=8 -> 4*16*8 + 2*64 = 640 per iteration
            self.b = nn.Linear(3, 3, bias=False)   # 3 x 3: 4*9*3 + 2*27 = 162 per iteration
    assert muon_flops_per_step(Two(), ns_steps=5) == 5 * (640 + 162)


def test_female_share_and_descriptor_windows():
    assert female_share(["she", "he", "him", "tree"]) == (pytest.approx(1 / 3), 3)
    share, n = female_share(["tree"])
    assert math.isnan(share) and n == 0
    overall, by_word = descriptor_shares("Fair she is. Fair, he said to him. Noble men.", ["fair", "noble"], 2)
    assert overall == pytest.approx(1 / 3)
    assert by_word["fair"] == (pytest.approx(1 / 2), 2)   # "she is", "he said"
    assert by_word["noble"][1] == 0


def test_swap_gender_keeps_case_and_is_its_own_inverse_on_unambiguous_words():
    assert swap_gender("He gave his crown to the Queen, and she thanked him.") == \
        "She gave her crown to the King, and he thanked her."
    assert swap_gender("KING and lady") == "QUEEN and lord"
    assert swap_gender(swap_gender("the king and his brother")) == "the king and his brother"


def test_pronoun_predictions_read_the_probabilities_at_pronoun_targets():
    class Fixed(nn.Module):
        """Logits that give token 1 (female) probability 3x that of token 2 (male), everywhere."""
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            logits = torch.zeros(*ids.shape, 4)
            logits[..., 1] = math.log(3.0)
            return logits
    windows = torch.tensor([[0, 1, 3, 2], [3, 3, 3, 3]])  # pronoun targets at two places in row 0
    female, male = torch.tensor([1]), torch.tensor([2])
    shares, losses = pronoun_predictions(Fixed(), windows, female, male)
    assert shares.tolist() == pytest.approx([0.75, 0.75])
    p = torch.tensor([1.0, 3.0, 1.0, 1.0]) / 6.0
    assert losses[1].item() == pytest.approx(-math.log(p[3].item()))


def test_redact_replaces_each_kind_once():
    text, counts = redact("mail a@b.org, call +45 33 12 34 56, host 10.0.0.1. To be.")
    assert counts == {"EMAIL": 1, "PHONE": 1, "IP": 1}
    assert "<EMAIL>" in text and "<PHONE>" in text and "<IP>" in text and text.endswith("To be.")


def test_train_clm_is_a_function_of_its_seed():
    from pretrain_lib.extensions.common import train_clm
    tokens = torch.arange(400) % 7   # a periodic stream: easy to learn
    config = ModelConfig(vocab_size=7, d_model=16, n_heads=2, n_layers=1, max_seq_len=8)
    a, history = train_clm(tokens, config, steps=30, batch_size=4, lr=1e-2, seed=3, device="cpu")
    b, _ = train_clm(tokens, config, steps=30, batch_size=4, lr=1e-2, seed=3, device="cpu")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert history.losses[-1] < history.losses[0] - 0.5


def test_pronoun_positions_keep_whole_words_only():
    # ids: 1 " he" (male), 2 " she" (female), 5 "aven" (continues a word), 6 " the", 7 "," (punctuation)
    windows = torch.tensor([[6, 1, 5, 6, 2, 7, 1, 6, 1]])
    from pretrain_lib.extensions.bias import pronoun_positions, pronoun_token_share
    female, male, cont = torch.tensor([2]), torch.tensor([1]), torch.tensor([5])
    # targets are windows[0, 1:] = [1, 5, 6, 2, 7, 1, 6, 1]: pronouns at 0, 3, 5, 7
    assert pronoun_positions(windows, torch.tensor([1, 2])).nonzero()[:, 1].tolist() == [0, 3, 5, 7]
    # " he" + "aven" is "heaven", not a pronoun; the last target has no next token in the window
    assert pronoun_positions(windows, torch.tensor([1, 2]), cont).nonzero()[:, 1].tolist() == [3, 5]
    assert pronoun_token_share(windows, female, male) == pytest.approx(1 / 4)
    assert pronoun_token_share(windows, female, male, cont) == pytest.approx(1 / 2)


def test_word_continuation_ids_are_the_pieces_inside_words():
    from pretrain_lib.data.tokenizer import train_tokenizer
    from pretrain_lib.extensions.bias import word_continuation_ids
    text = "he went to heaven and she said he was here, hence his hat. " * 50
    tok = train_tokenizer([text], vocab_size=300)
    cont = set(word_continuation_ids(tok).tolist())
    for word in (" heathen", " hermit", " shewn"):   # unseen words: split into pieces
        ids = tok.encode(word).ids
        assert len(ids) > 1, word
        # the first piece starts the word (leading space); every later piece continues it
        assert ids[0] not in cont and all(i in cont for i in ids[1:]), (word, [tok.decode([i]) for i in ids])
    assert tok.encode(",").ids[0] not in cont and tok.encode(" he").ids[0] not in cont


def test_pronoun_place_losses_are_the_cross_entropy_at_those_places():
    from pretrain_lib.extensions.bias import pronoun_place_losses
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=12, d_model=16, n_heads=2, n_layers=1, max_seq_len=8))
    windows = torch.tensor([[3, 1, 4, 2, 7, 1, 9, 5], [2, 8, 8, 1, 3, 3, 2, 6]])
    got = pronoun_place_losses(model, windows, torch.tensor([1, 2]), torch.tensor([4]))
    with torch.no_grad():
        logits = model(windows)
    # targets windows[:, 1:]; pronouns (1, 2) followed by a non-continuation (not 4), last target excluded
    places = [(0, 2), (0, 4), (1, 2), (1, 5)]   # (row, target index): 2 then 7; 1 then 9; 1 then 3; 2 then 6
    expected = [F.cross_entropy(logits[r, t][None], windows[r, t + 1][None]).item() for r, t in places]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
