"""Chapter 2 data pipeline: cleaning, dedup, tokenizers, packing, shards, loaders, bad input."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pretrain_lib.data.clean import (CleaningReport, EmptyCorpusError, clean_documents, duplicate_line_fraction,
                                     gopher_rules, mean_word_length, normalize_text, strip_markup,
                                     symbol_to_word_ratio)
from pretrain_lib.data.corpus import DecodeReport, Document, iter_corpus, iter_python_stdlib, load_text_folder
from pretrain_lib.data.dedup import (DedupReport, MinHasher, brute_force_near_duplicates, estimated_jaccard,
                                     exact_dedup, exact_jaccard, lsh_candidate_probability, near_dedup,
                                     near_duplicate_pairs, shingle_hashes)
from pretrain_lib.data.loader import MLMCollator, ResumableLoader, ShardedTokenDataset, random_batch
from pretrain_lib.data.packing import pack_documents, packing_waste, pad_documents, padding_waste
from pretrain_lib.data.shards import (ShardError, TokenizerMismatchError, choose_dtype, read_all_tokens, read_index,
                                      write_shards)
from pretrain_lib.data.tokenizer import (SPECIAL_TOKENS, bytes_per_token, load_tokenizer, round_trips,
                                         save_tokenizer, special_token_ids, tokenizer_fingerprint, train_tokenizer)

CHINESE = "这是一个示例文本，另一个训练样本。"  # the source chapter's own example sentences


@pytest.fixture(scope="module")
def small_corpus():
    return list(iter_corpus(max_plays=2, max_code_files=8))


@pytest.fixture(scope="module")
def bpe(small_corpus):
    return train_tokenizer((d.text for d in small_corpus), vocab_size=600)


# ---------------------------------------------------------------- corpus and cleaning

def test_code_corpus_is_lazy_and_real():
    docs = iter_python_stdlib(max_files=3)
    first = next(docs)
    assert first.domain == "code" and first.name.endswith(".py")
    assert ("import" in first.text) or ("def " in first.text)


def test_non_utf8_bytes_are_reported_not_fatal(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 ok \xff\xfe end")
    (tmp_path / "empty.txt").write_bytes(b"")
    report = DecodeReport()
    docs = list(load_text_folder(tmp_path, report=report))
    assert [d.name for d in docs] == ["a.txt"]
    assert report.bad_files == {"a.txt": [3, 8, 9]} and report.bad_byte_count == 3
    assert report.empty_files == ["empty.txt"]
    assert docs[0].text == "caf\ufffd ok \ufffd\ufffd end"


def test_normalize_and_markup():
    assert normalize_text("ﬁne\u00a0day  \r\n\r\n\r\n\r\nx\x00") == "fine day\n\nx\n"
    assert normalize_text("def f():\n    return 1   \n") == "def f():\n    return 1\n"  # indentation kept
    assert strip_markup("<p>Hello <b>world</b> &amp; <script>x=1</script>all</p>") == "Hello world &  all"
    assert strip_markup("# Title\n**bold** and [link](http://x)") == "Title\nbold and link"


def test_gopher_statistics_hand_worked():
    assert mean_word_length("ab abcd") == 3.0
    assert symbol_to_word_ratio("a # b ... c d") == pytest.approx(2 / 6)
    assert duplicate_line_fraction("x\ny\nx\n\nx") == pytest.approx(2 / 4)


def test_cleaning_report_counts_every_rule():
    prose = " ".join(["word"] * 60)
    docs = [Document("good", prose, "web"), Document("short", "too short", "web"),
            Document("hashes", " ".join(["#tag"] * 60), "web"),
            Document("dups", "\n".join(["same line here ok"] * 20), "web"),
            Document("longwords", " ".join(["x" * 15] * 60), "web")]
    report = CleaningReport()
    kept = list(clean_documents(docs, rules=gopher_rules(), report=report))
    assert [d.name for d in kept] == ["good"]
    removed = {k: v.docs_removed for k, v in report.removed.items()}
    assert removed == {"length": 1, "mean_word_length": 1, "symbol_ratio": 1, "duplicate_lines": 1}
    assert report.removed["length"].chars_removed == len("too short\n")
    assert report.docs_in == 5 and report.docs_out == 1


def test_empty_corpus_after_filtering_is_a_clear_error():
    with pytest.raises(EmptyCorpusError, match="no document survived"):
        list(clean_documents([Document("a", "tiny", "web")], rules=gopher_rules()))


# ---------------------------------------------------------------- dedup

def test_exact_dedup_ignores_case_and_spacing():
    docs = [Document("a", "Hello  World\n", "x"), Document("b", "hello world", "x"), Document("c", "other", "x")]
    report = DedupReport()
    assert [d.name for d in exact_dedup(docs, report)] == ["a", "c"]
    assert report.duplicates == [("b", "a")]


def test_minhash_estimates_jaccard_of_known_overlap():
    hasher = MinHasher(num_perm=256, seed=0)
    for shared, only in [(900, 50), (500, 250), (200, 400)]:
        a = np.arange(0, shared + only, dtype=np.uint64)
        b = np.concatenate([np.arange(shared, dtype=np.uint64), np.arange(10_000, 10_000 + only, dtype=np.uint64)])
        truth = exact_jaccard(a.tolist(), b.tolist())
        assert truth == pytest.approx(shared / (shared + 2 * only))
        estimate = estimated_jaccard(hasher.signature(a), hasher.signature(b))
        sigma = np.sqrt(truth * (1 - truth) / 256)
        assert abs(estimate - truth) < 4 * sigma + 1e-9


def test_lsh_finds_what_brute_force_finds():
    rng = np.random.default_rng(0)
    base = [rng.integers(0, 2**31, 300).astype(np.uint64) for _ in range(6)]
    sets = list(base)
    for i in range(4):  # near copies: replace 5% of the elements
        s = base[i].copy()
        s[:15] = rng.integers(0, 2**31, 15)
        sets.append(s)
    truth = brute_force_near_duplicates(sets, threshold=0.8)
    assert truth == {(0, 6), (1, 7), (2, 8), (3, 9)}
    sigs = np.stack([MinHasher(128, seed=1).signature(np.unique(s)) for s in sets])
    assert near_duplicate_pairs(sigs, bands=32, rows=4, threshold=0.8) == truth
    assert lsh_candidate_probability(0.9, bands=32, rows=4) > 0.999
    assert lsh_candidate_probability(0.1, bands=32, rows=4) < 0.01


def test_near_dedup_on_documents():
    text = " ".join(f"w{i}" for i in range(400))
    near = text.replace("w17 ", "changed ")
    docs = [Document("a", text, "x"), Document("b", "something else entirely " * 20, "x"), Document("c", near, "x")]
    assert [d.name for d in near_dedup(docs, threshold=0.8)] == ["a", "b"]
    assert shingle_hashes("one two", ngram=5).size == 1


# ---------------------------------------------------------------- tokenizers

@pytest.mark.parametrize("text", ["To be, or not to be: that is the question.\n",
                                  "def area(r):\n\treturn 3.14159 * r ** 2  # circle\n", CHINESE])
def test_bpe_round_trips_english_code_chinese(bpe, text):
    assert round_trips(bpe, text)


def test_tokenizer_specials_save_load_fingerprint(bpe, small_corpus, tmp_path):
    assert list(special_token_ids(bpe).values()) == [0, 1, 2, 3, 4]
    loaded = load_tokenizer(save_tokenizer(bpe, tmp_path / "tok.json"))
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(bpe)
    other = train_tokenizer((d.text for d in small_corpus), vocab_size=700)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(bpe)
    assert 1.0 < bytes_per_token(bpe, [small_corpus[0].text]) < 8.0


def test_wordpiece_has_specials_and_unk(small_corpus):
    wp = train_tokenizer((d.text for d in small_corpus), vocab_size=600, kind="wordpiece")
    assert [wp.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert wp.token_to_id("[UNK]") == 5
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer(["x"], vocab_size=600, kind="unigram")


# ---------------------------------------------------------------- packing

def test_pack_documents_hand_worked():
    blocks = pack_documents([[5, 6, 7], [8], [9, 10, 11, 12]], block_size=4, eot_id=0)
    assert blocks.dtype == torch.int64
    assert blocks.tolist() == [[5, 6, 7, 0], [8, 0, 9, 10]]  # tail [11, 12, 0] dropped
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_documents([[1]], block_size=4, eot_id=0)
    with pytest.raises(ValueError, match="no documents"):
        pack_documents([], block_size=4, eot_id=0)


def test_padding_versus_packing_waste():
    ids, mask = pad_documents([[1, 2], [3, 4, 5, 6, 7]], max_length=4, pad_id=0)
    assert ids.tolist() == [[1, 2, 0, 0], [3, 4, 5, 6]] and mask.sum().item() == 6
    pad = padding_waste([2, 5], max_length=4)
    assert pad.padding_fraction == pytest.approx(2 / 8) and pad.dropped_fraction == pytest.approx(1 / 7)
    pack = packing_waste([2, 5], block_size=4)
    assert pack.padding_fraction == 0.0 and pack.dropped_fraction == pytest.approx(1 / 9)


# ---------------------------------------------------------------- shards

def test_dtype_is_chosen_from_the_vocabulary():
    assert choose_dtype(65_536) == np.uint16 and choose_dtype(65_537) == np.uint32
    with pytest.raises(ValueError, match="does not fit in uint16"):
        choose_dtype(70_000, "uint16")


def test_shard_round_trip_and_index(tmp_path):
    docs = [list(range(i, i + 7)) for i in range(0, 70_000, 7000)]
    index_path = write_shards(docs, tmp_path, tokens_per_shard=16, vocab_size=70_000, tokenizer_fingerprint="abc",
                              eot_id=3)
    meta = json.loads(index_path.read_text())
    assert meta["dtype"] == "uint32" and meta["total_tokens"] == 80 and len(meta["shards"]) == 5
    expected = list(itertools.chain.from_iterable(d + [3] for d in docs))
    assert read_all_tokens(index_path, expected_fingerprint="abc").tolist() == expected
    with pytest.raises(ValueError, match="outside"):
        write_shards([[1, 70_000]], tmp_path / "bad", tokens_per_shard=4, vocab_size=70_000)


def test_reader_refuses_other_tokenizer_and_truncated_shards(tmp_path):
    index_path = write_shards([list(range(100))], tmp_path, tokens_per_shard=40, vocab_size=100,
                              tokenizer_fingerprint="aaaa")
    with pytest.raises(TokenizerMismatchError, match="written by tokenizer aaaa"):
        read_index(index_path, expected_fingerprint="bbbb")
    shard = tmp_path / "shard_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(ShardError, match="truncated"):
        read_index(index_path)
    with pytest.raises(ValueError, match="no tokens"):
        write_shards([], tmp_path / "empty", tokens_per_shard=4, vocab_size=10)


# ---------------------------------------------------------------- loaders

@pytest.fixture
def numbered_shards(tmp_path):
    """Token i at global position i: a window's first token says where it came from."""
    docs = [list(range(s, s + 97)) for s in range(0, 2910, 97)]
    return write_shards(docs, tmp_path, tokens_per_shard=500, vocab_size=3000)


def test_windows_cover_every_full_window_for_2_ranks_x_2_workers(numbered_shards):
    seq_len = 8
    index = read_index(numbered_shards)
    expected = {start + offset for offset, n in zip(np.cumsum((0,) + index.num_tokens[:-1]), index.num_tokens)
                for start in range(0, (n - 1) // seq_len * seq_len, seq_len)}
    seen: dict[int, tuple[int, int]] = {}
    for rank in range(2):
        ds = ShardedTokenDataset(numbered_shards, seq_len=seq_len, rank=rank, world_size=2, seed=0)
        loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork",
                            worker_init_fn=None)
        for window in loader:
            assert window.shape == (seq_len + 1,)
            assert torch.equal(window, window[0] + torch.arange(seq_len + 1))  # contiguous, inside one shard
            first = int(window[0])
            assert first not in seen, f"window {first} read twice"
            seen[first] = rank
    assert set(seen) == expected
    assert abs(sum(r == 0 for r in seen.values()) - sum(r == 1 for r in seen.values())) <= 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_loader_yields_the_same_batches(numbered_shards, num_workers):
    def make():
        ds = ShardedTokenDataset(numbered_shards, seq_len=8, rank=1, world_size=2, seed=5)
        return ResumableLoader(ds, batch_size=6, num_workers=num_workers, multiprocessing_context="fork")
    reference = make()
    uninterrupted = list(reference) + list(reference)  # two epochs
    interrupted = make()
    it = iter(interrupted)
    head = [next(it) for _ in range(len(interrupted) - 3)]  # stop 3 batches before the epoch ends
    state = interrupted.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    tail = list(resumed) + list(resumed)
    assert len(head) + len(tail) == len(uninterrupted)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, head + tail))
    # the stream does not depend on the number of workers
    single = ShardedTokenDataset(numbered_shards, seq_len=8, rank=1, world_size=2, seed=5)
    assert torch.equal(torch.cat(uninterrupted[:len(uninterrupted) // 2]), torch.stack(list(single)))


def test_resume_with_other_settings_is_refused(numbered_shards):
    a = ShardedTokenDataset(numbered_shards, seq_len=8, seed=1)
    b = ShardedTokenDataset(numbered_shards, seq_len=8, seed=2)
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict(a.state_dict())


def test_mlm_collator_masks_dynamically_and_spares_specials():
    windows = [torch.tensor([2] + list(range(10, 60)) + [3]) for _ in range(8)]
    collate = MLMCollator(mask_token_id=1, vocab_size=100, special_token_ids=[0, 2, 3, 4], seed=0)
    first, second = collate(windows), collate(windows)
    assert not torch.equal(first["labels"], second["labels"])  # a new mask every batch
    for out in (first, second):
        assert (out["labels"][:, [0, -1]] == -100).all()
        chosen = out["labels"] != -100
        assert torch.equal(out["labels"][chosen], torch.stack(windows)[chosen])


def test_random_batch_reads_a_memmap(numbered_shards):
    shard = read_index(numbered_shards).shard(0)
    x, y = random_batch(shard, batch_size=4, seq_len=16, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and torch.equal(y, x + 1)
