"""The multiple-choice benchmark: the item file's provenance and shape, the scoring rule, and lm-eval's agreement."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain_lib.benchmark import items as mc
from pretrain_lib.benchmark import scoring
from pretrain_lib.capstone.data import train_char_tokenizer
from pretrain_lib.data.clean import clean_documents
from pretrain_lib.data.corpus import Document, iter_shakespeare
from pretrain_lib.model import GPT, ModelConfig
from test_generate import cli, train_run

TASK_DIR = Path(mc.__file__).parent / "lm_eval_task"


@pytest.fixture(scope="module")
def plays():
    return list(clean_documents(iter_shakespeare()))


def test_the_committed_script_rebuilds_the_item_file_byte_for_byte(tmp_path):
    written = mc.write_items(mc.shakespeare_items(), tmp_path / "items.jsonl")
    assert written.read_bytes() == mc.ITEM_FILE.read_bytes()


def test_items_come_from_plays_after_the_validation_boundary_and_are_well_formed(plays):
    items = mc.read_items()
    assert len(items) == mc.N_ITEMS == 600
    assert {it.version for it in items} == {mc.VERSION} == {2}
    total = sum(len(d.text) + 1 for d in plays)
    start = {}
    offset = 0
    for d in plays:
        start[d.name] = offset / total
        offset += len(d.text) + 1
    texts = {d.name: d.text for d in plays}
    held_out_text = "\n".join(texts[name] for name in {it.source for it in items})
    for it in items:
        assert start[it.source] >= 0.92          # every held-out play starts inside the last 10 % (+2 points margin)
        assert it.context + it.endings[it.label] in texts[it.source]   # the true word follows its context
        line_head = it.context.rsplit("\n", 1)[-1]
        assert len(line_head) >= mc.MIN_HEAD and not line_head[-1].isspace()   # cut after a word, inside a line
        true = it.endings[it.label]
        for e in it.endings:                     # one word, its leading space, exactly the true one's length
            assert e[0] == " " and len(e.split()) == 1 and len(e) == len(true)
            assert mc.MIN_ENDING <= len(e) <= mc.MAX_ENDING
            assert e in held_out_text
    labels = np.bincount([it.label for it in items], minlength=4)
    assert labels.min() > 120                    # the true ending is not in one favoured place (150 expected)


def test_a_cut_ends_after_a_word_of_a_spoken_line_and_distractors_follow_the_texts_frequencies():
    text = "ROMEO\nBut soft, what light through yonder window breaks?\n_Enter JULIET above_\nExeunt all the rest"
    cuts = mc.next_word_cuts([Document(name="r", text=text, domain="t")])
    # cuts at least MIN_HEAD (10) characters into the line; speaker names and stage directions have none
    assert [c[3] for c in cuts] == [" light", " through", " yonder", " window", " breaks?"]
    assert all(text[c[2]:c[2] + len(c[3])] == c[3] and c[1] == 1 for c in cuts)
    # by occurrence: a word the held-out text has 20 times is drawn ~20 times as often as one it has once
    line = "Hark you, sir, {}\n"        # one cut per line: the last word
    rare = ["mock", "aid!", "give", "rest", "hold", "bear", "lose", "keep", "pray", "stay", "fear", "hope",
            "mark", "call", "seek", "tell", "weep", "burn", "rise", "fall"]
    docs = [Document(name=f"d{i}", text="".join(line.format(w) for w in ["take"] * 40 + rare), domain="t")
            for i in range(2)]
    items = mc.build_items(docs, n_items=100, seed=1)
    assert all(it.context.endswith("Hark you, sir,") for it in items)
    rare_items = [it for it in items if it.endings[it.label] != " take"]
    drawn = [e for it in rare_items for j, e in enumerate(it.endings) if j != it.label]
    # "take" is 40 of the 59 other endings' occurrences: in about 90 % of these items (one distinct string of 20
    # would give 15 %); each rare word in about 10 %
    assert drawn.count(" take") > 0.75 * len(rare_items)
    assert max(drawn.count(f" {w}") for w in rare) < 0.3 * len(rare_items)


def test_held_out_documents_start_after_the_fraction():
    docs = [Document(name=str(i), text="x" * 9, domain="t") for i in range(10)]   # 10 chars each with its EOT
    assert [d.name for d in mc.held_out_documents(docs, start_fraction=0.75)] == ["8", "9"]
    with pytest.raises(ValueError):
        mc.held_out_documents(docs[:1], start_fraction=0.5)


def test_choice_scoring_equals_a_token_by_token_reference_with_a_short_window():
    torch.manual_seed(0)
    items = mc.read_items()[:6]
    tok = train_char_tokenizer([it.context + "".join(it.endings) for it in items])
    model = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), d_model=16, n_heads=2, n_layers=1, max_seq_len=70)).eval()
    got = scoring.choice_loglikelihoods(model, tok, items, window=70, batch_size=5)
    for i, it in enumerate(items):
        for j, ending in enumerate(it.endings):
            ids = tok.encode(it.context + ending).ids[-71:]   # lm-eval's cut: the last window + 1 tokens
            n = len(tok.encode(ending).ids)
            total = 0.0
            for pos in range(len(ids) - n, len(ids)):        # each ending token from the tokens before it, unpadded
                prefix = torch.tensor([ids[:pos]])
                with torch.no_grad():
                    total += float(F.log_softmax(model(prefix)[0, -1].double(), -1)[ids[pos]])
            assert got[i, j] == pytest.approx(total, abs=1e-6)


def test_the_rule_is_log_likelihood_per_byte_and_the_unigram_counts_are_smoothed():
    item = mc.Item("x", "s", "ctx", ["\nab", "\nabcdefg", "\nabcd", "\nabcde"], 1)
    lls = np.array([[-6.0, -10.0, -12.0, -13.0]])   # per byte: -2, -1.25, -2.4, -2.17; per token the first wins
    assert scoring.predictions(lls, [item]).tolist() == [1]
    assert scoring.accuracy(np.vstack([lls, lls]), [item, dataclasses.replace(item, label=0)]).mean == 0.5
    # the gain over a baseline pairs the items: right/right, right/wrong, wrong/wrong, wrong/right -> 0, 1, 0, -1
    lab = [dataclasses.replace(item, label=k) for k in (1, 1, 0, 0)]
    model, base = np.vstack([lls, lls, lls, lls]), np.array([[-6.0, -10.0, -12.0, -13.0], [-1.0, -10.0, -12, -13],
                                                             [-6.0, -10.0, -12.0, -13.0], [-1.0, -10.0, -12, -13]])
    gain = scoring.accuracy_gain(model, base, lab)
    assert gain.mean == 0.0 and gain.n == 4 and gain.spread > 0
    assert scoring.correct(model, lab).tolist() == [1, 1, 0, 0] and scoring.correct(base, lab).tolist() == [1, 0, 0, 1]
    log_p = scoring.unigram_log_probs(np.array([0, 0, 1]), vocab_size=3)   # counts 3, 2, 1 after add-one
    assert np.allclose(np.exp(log_p), [3 / 6, 2 / 6, 1 / 6])


@pytest.mark.parametrize("name", ["char", "bpe"])
def test_lm_eval_on_the_exported_model_gives_the_course_evaluators_accuracy(tmp_path_factory, name):
    pytest.importorskip("transformers", reason="the hf extra is not installed: pip install -e '.[hf]'")
    lm_eval = pytest.importorskip("lm_eval", reason="the hf extra is not installed: pip install -e '.[hf]'")
    from lm_eval.tasks import TaskManager

    from pretrain_lib.generate import load_run
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    run_dir = train_run(tmp_path_factory, name)
    out = tmp_path_factory.mktemp(f"lm-eval-{name}")
    assert cli("pretrain_lib.export", "--checkpoint", str(run_dir), "--format", "hf", "--out", str(out)).returncode == 0
    run = load_run(run_dir)
    items = mc.read_items()
    ours = scoring.choice_loglikelihoods(run.model, run.tokenizer, items, window=run.model.config.max_seq_len)
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},dtype=float32", tasks=["shakespeare_mc"],
                                      device="cpu", batch_size=16, log_samples=True,
                                      task_manager=TaskManager(include_path=str(TASK_DIR)))
    theirs = np.zeros_like(ours)
    for sample in results["samples"]["shakespeare_mc"]:
        theirs[sample["doc_id"]] = [float(r[0][0]) for r in sample["resps"]]
    assert np.abs(theirs - ours).max() < 1e-3
    assert results["results"]["shakespeare_mc"]["acc_bytes,none"] == pytest.approx(scoring.accuracy(ours, items).mean)


def test_an_ending_longer_than_the_window_is_refused_by_name():
    items = mc.read_items()[:2]
    tok = train_char_tokenizer([it.context + "".join(it.endings) for it in items])
    model = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), d_model=16, n_heads=2, n_layers=1, max_seq_len=4))
    with pytest.raises(scoring.WindowTooShort, match="longer model.seq_len"):
        scoring.choice_loglikelihoods(model, tok, items, window=4)
