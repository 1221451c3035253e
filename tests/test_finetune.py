"""pretrain_lib.finetune (chapter 7.4) against hand-worked values, torch.nn.functional and the engine."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers

import pretrain_lib.train as engine
from pretrain_lib.finetune import (EncodedSplit, SequenceClassifier, classification_objective, classifier_from,
                                   encode_split, example_batches, fine_tune, heldout_documents, hidden_word_examples,
                                   hidden_word_task, linear_decay, mean_pool, pool_at_token, predict,
                                   sparse_mlm_objective, tail_documents)
from pretrain_lib.model import ModelConfig, seeded_model
from pretrain_lib.optim import build_optimizer
from pretrain_lib.train import mlm_objective

VOCAB, PAD, MASK = 50, 0, 1
CONFIG = ModelConfig(vocab_size=VOCAB, d_model=16, n_heads=2, n_layers=1, max_seq_len=12, causal=False, position="rope")


# ----------------------------------------------------------------------------- the objective

class FixedLogits(torch.nn.Module):
    """A 'model' that returns the logits it was given, whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, attention_mask=None):
        return self.logits


def test_classification_loss_is_the_cross_entropy_worked_by_hand_and_by_torch():
    # one example, scores (0, ln 3): p(label 1) = 3/4, so the loss is ln(4/3)
    loss, n = classification_objective(FixedLogits(torch.tensor([[0.0, math.log(3.0)]])),
                                       {"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.tensor([1])})
    assert n == 1 and loss.item() == pytest.approx(math.log(4 / 3), rel=1e-6)
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-3.0, 4.0, 1.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 2, 1, 1])
    loss, n = classification_objective(FixedLogits(logits), {"input_ids": torch.zeros(4, 2, dtype=torch.long),
                                                             "labels": labels})
    assert n == 4
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    by_hand = sum(-(row[y] - torch.logsumexp(row, 0)).item() for row, y in zip(logits, labels)) / 4
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)


def test_sparse_mlm_objective_gives_mlm_objectives_loss_and_gradients():
    ids = torch.randint(5, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    specials = [PAD, MASK, 2, 3, 4]
    results = []
    for make in (mlm_objective, sparse_mlm_objective):
        model = seeded_model(CONFIG, 3)
        objective = make(mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=specials, mlm_probability=0.3,
                         generator=torch.Generator().manual_seed(7))
        loss, n = objective(model, {"input_ids": ids})
        loss.backward()
        results.append((loss.detach(), int(n), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (full, n_full, g_full), (sparse, n_sparse, g_sparse) = results
    assert n_full == n_sparse > 0
    assert sparse.item() == pytest.approx(full.item(), rel=1e-5)
    for name in g_full:
        torch.testing.assert_close(g_sparse[name], g_full[name], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- the task

PLAY = """\
Why, thou art a villain, and a rogue.
How do you, my lord? I hope you are well.
Look you, here comes my mistress' page today.
Thou shalt not go, for thy father bids.
Where art thou going with that sword in hand?
Short line here.
Farewell, you'll come again tomorrow, my good lord.
What do you mean by this, good sir?
What do you mean by this, good sir?
"""


def test_hidden_word_examples_mask_the_one_pronoun_and_drop_lines_that_give_it_away():
    ex = hidden_word_examples([PLAY], {"you": ["you"], "thou": "thou"}, give_away=["thy"])
    assert ex == {0: ["Look [MASK], here comes my mistress' page today.", "What do [MASK] mean by this, good sir?"],
                  1: ["Why, [MASK] art a villain, and a rogue.", "Where art [MASK] going with that sword in hand?"]}
    # "you" twice, "thy" beside "Thou", "you'll" (a contraction), too short, and the repeated line are left out;
    # without the give-away list the "Thou ... thy" line stays
    assert hidden_word_examples([PLAY], {"you": "you", "thou": "thou"})[1][1] == "[MASK] shalt not go, for thy father bids."
    # a word count outside [min_words, max_words] drops the line
    assert hidden_word_examples([PLAY], {"you": "you", "thou": "thou"}, min_words=9, max_words=9) == {
        0: [], 1: ["Where art [MASK] going with that sword in hand?"]}
    with pytest.raises(ValueError, match="disjoint"):
        hidden_word_examples([PLAY], {"a": "you", "b": "you"})


def test_a_masked_line_two_labels_share_is_left_out():
    text = "I tell thee, thou art here and well.\nI tell thee, you art here and well.\nSo you say.\n"
    assert hidden_word_examples([text], {"you": "you", "thou": "thou"}) == {0: [], 1: []}   # the 3rd: too short
    assert hidden_word_examples([text], {"you": "you", "thou": "thou"}, min_words=3) == {0: ["So [MASK] say."], 1: []}


def _lines(n: int, word: str, place: str) -> str:
    return "\n".join(f"Line {i} says {word} art in {place}, good friend number {i}." for i in range(n))


def test_hidden_word_task_is_balanced_disjoint_and_deterministic():
    texts = [_lines(40, "thou", "Rome"), _lines(50, "you", "Venice")]
    task = hidden_word_task(texts, {"you": "you", "thou": "thou"}, n_train=20, seed=3)
    assert task.label_names == ("you", "thou")
    assert sorted(task.train_labels) == [0] * 10 + [1] * 10
    assert sorted(task.test_labels) == [0] * 30 + [1] * 30          # n_test=None: the rest of the rarer label
    assert not set(task.train_texts) & set(task.test_texts)
    assert all(t.count("[MASK]") == 1 for t in task.train_texts + task.test_texts)
    assert task == hidden_word_task(texts, {"you": "you", "thou": "thou"}, n_train=20, seed=3)
    assert task.train_texts != hidden_word_task(texts, {"you": "you", "thou": "thou"}, n_train=20, seed=4).train_texts
    with pytest.raises(ValueError, match="multiple"):
        hidden_word_task(texts, {"you": "you", "thou": "thou"}, n_train=21)
    with pytest.raises(ValueError, match="rarest"):
        hidden_word_task(texts, {"you": "you", "thou": "thou"}, n_train=60, n_test=30)


def test_tail_documents_by_hand():
    # sizes 5, 3, 4 with the last 7 tokens in validation: the 4 fits, the 3 would make 7 (fits), the 5 not
    assert tail_documents([5, 3, 4], 7) == [False, True, True]
    assert tail_documents([5, 3, 4], 6) == [False, False, True]
    assert tail_documents([5, 3, 4], 3) == [False, False, False]
    assert tail_documents([5, 3, 4], 12) == [True, True, True]


@pytest.mark.parametrize("split, fraction", [("tail", 0.2), ("tail", 0.3), ("documents", 0.2)])
def test_heldout_documents_are_the_ones_no_training_token_comes_from(tmp_path, split, fraction):
    from pretrain_lib.capstone.config import config_from_dict
    from pretrain_lib.capstone.data import prepare_data

    letters = "abcdefghij"
    texts = {f"doc{i}.txt": " ".join(letters[(i + k) % 10] * 5 for k in range(60)) + "\n" for i in range(5)}
    folder = tmp_path / "text"
    folder.mkdir()
    for name, text in texts.items():
        (folder / name).write_text(text)
    config = config_from_dict({"data": {"corpus": "folder", "folder": str(folder), "cache_dir": str(tmp_path / "cache"),
                                        "tokenizer": "char", "val_fraction": fraction, "split": split}})
    prepared = prepare_data(config.data, verbose=False)
    held = heldout_documents(config.data, prepared)
    if split == "tail":   # five equal documents, the last 20 % or 30 % of the stream: only the last one is whole
        assert list(held) == ["doc4.txt"]
    else:
        assert sorted(held) == sorted(prepared.meta["val_documents"]) and held
    for name, text in held.items():
        assert text.strip() == texts[name].strip()


# ----------------------------------------------------------------------------- encoding and the model

def _word_tokenizer() -> Tokenizer:
    vocab = {"[PAD]": 0, "[MASK]": 1, "[UNK]": 2, "a": 3, "b": 4, "c": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def test_encode_split_pads_to_the_longest_and_cuts_at_max_len():
    split = encode_split(_word_tokenizer(), ["a b", "c", "a [MASK] c b a"], [1, 0, 1], max_len=4, pad_id=0)
    assert split.input_ids.tolist() == [[3, 4, 0, 0], [5, 0, 0, 0], [3, 1, 5, 4]]
    assert split.attention_mask.tolist() == [[True, True, False, False], [True, False, False, False],
                                             [True, True, True, True]]
    assert split.labels.tolist() == [1, 0, 1] and len(split) == 3


def test_pooling_by_hand():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)   # rows [[0,1],[2,3],[4,5]], [[6,7],...]
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert mean_pool(hidden, mask).tolist() == [[1.0, 2.0], [8.0, 9.0]]
    assert mean_pool(hidden, None).tolist() == [[2.0, 3.0], [8.0, 9.0]]
    ids = torch.tensor([[7, 1, 1], [1, 7, 7]])
    assert pool_at_token(hidden, ids, 1).tolist() == [[2.0, 3.0], [6.0, 7.0]]   # the first [MASK] of each row
    with pytest.raises(ValueError, match="pooling token"):
        pool_at_token(hidden, torch.tensor([[7, 1, 1], [7, 7, 7]]), 1)


def test_the_head_gives_one_score_per_class_and_reads_the_pooled_position():
    model = SequenceClassifier(seeded_model(CONFIG, 0).backbone, 3, dropout=0.0, pool_token_id=MASK).eval()
    ids = torch.tensor([[5, MASK, 6, 7], [MASK, 8, 9, PAD]])
    mask = ids != PAD
    logits = model(ids, mask)
    assert logits.shape == (2, 3)
    hidden = model.backbone(ids, mask)
    torch.testing.assert_close(logits, model.head(hidden[[0, 1], [1, 0]]))
    mean_model = SequenceClassifier(model.backbone, 3, dropout=0.0).eval()
    assert mean_model(ids, mask).shape == (2, 3)


def test_the_two_arms_share_shape_and_head_and_differ_only_in_the_encoder():
    encoder = seeded_model(CONFIG, 11)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    pretrained = classifier_from(encoder, CONFIG, seed=5)
    scratch = classifier_from(None, CONFIG, seed=5)
    for name, p in pretrained.backbone.state_dict().items():
        torch.testing.assert_close(p, encoder.backbone.state_dict()[name], rtol=0, atol=0)
        assert p.data_ptr() != encoder.backbone.state_dict()[name].data_ptr()       # a copy, not the same tensor
    for name, p in scratch.backbone.state_dict().items():
        torch.testing.assert_close(p, seeded_model(CONFIG, 5).backbone.state_dict()[name], rtol=0, atol=0)
    torch.testing.assert_close(pretrained.head.weight, scratch.head.weight, rtol=0, atol=0)
    assert not torch.equal(pretrained.backbone.tok_emb.weight, scratch.backbone.tok_emb.weight)
    with torch.no_grad():
        pretrained.backbone.tok_emb.weight.add_(1.0)
    for name, value in encoder.state_dict().items():                                # the encoder is untouched
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="another config"):
        classifier_from(encoder, ModelConfig(vocab_size=VOCAB, d_model=16, n_heads=2, n_layers=2, causal=False), seed=0)


# ----------------------------------------------------------------------------- fine-tuning through the engine

def _toy_split(n: int, seed: int) -> EncodedSplit:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(12, VOCAB, (n, 8), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[:, 2], ids[:, 3] = 10 + labels, MASK        # the word before the blank (10 or 11) decides the label
    return EncodedSplit(ids, torch.ones_like(ids, dtype=torch.bool), labels)


def test_example_batches_cover_each_example_once_per_pass_in_a_new_order():
    split = _toy_split(12, 0)
    split.input_ids[:, 0] = torch.arange(12) + 12           # each example's first token names it
    next_batch = example_batches(split, batch_size=4, seed=1)
    passes = [torch.cat([next_batch(p * 3 + k)["input_ids"][:, 0] - 12 for k in range(3)]) for p in range(2)]
    assert sorted(passes[0].tolist()) == list(range(12)) == sorted(passes[1].tolist())
    assert passes[0].tolist() != passes[1].tolist()
    assert torch.equal(next_batch(5)["input_ids"], example_batches(split, batch_size=4, seed=1)(5)["input_ids"])


def test_linear_decay_by_hand():
    assert [linear_decay(s, lr=1.0, warmup_steps=2, steps=6) for s in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert linear_decay(0, lr=2.0, warmup_steps=0, steps=4) == 2.0


def test_fine_tuning_trains_through_the_engine_one_step_as_adamw_by_hand(monkeypatch):
    split, test = _toy_split(16, 0), _toy_split(8, 1)
    calls = []
    real_step = engine.train_step
    monkeypatch.setattr(engine, "train_step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    model = SequenceClassifier(seeded_model(CONFIG, 0).backbone, 2, dropout=0.0, pool_token_id=MASK)
    reference = SequenceClassifier(seeded_model(CONFIG, 0).backbone, 2, dropout=0.0, pool_token_id=MASK)
    reference.load_state_dict(model.state_dict())
    result = fine_tune(model, split, test, steps=1, lr=1e-2, batch_size=8, eval_every=1, seed=4, device="cpu")
    assert len(calls) == 1
    # by hand: the engine's first batch, F.cross_entropy, clipping at 1, one AdamW step at the full rate
    batch = example_batches(split, batch_size=8, seed=4)(0)
    optimizer = build_optimizer(reference, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    F.cross_entropy(reference(batch["input_ids"], batch["attention_mask"]), batch["labels"]).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    optimizer.step()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-7)
    assert result.eval_steps == [0, 1]
    hits = predict(model, test).argmax(-1) == test.labels
    assert result.accuracies[-1] == pytest.approx(hits.float().mean().item())
    assert torch.equal(result.correct, hits)


def test_fine_tuning_learns_a_task_the_context_decides():
    split, test = _toy_split(256, 0), _toy_split(128, 1)
    model = classifier_from(None, CONFIG, seed=0, pool_token_id=MASK)
    result = fine_tune(model, split, test, steps=150, lr=3e-3, batch_size=32, warmup_steps=10, eval_every=50,
                       seed=0, device="cpu")
    assert result.eval_steps == [0, 50, 100, 150] and len(result.history.losses) == 150
    assert result.final_accuracy > 0.9 > result.accuracies[0]
