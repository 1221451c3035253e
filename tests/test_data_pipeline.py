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
from pretrain_lib.data.corpus import (DecodeReport, Document, iter_corpus, iter_python_stdlib, load_text_folder,
                                      strip_markdown)
from pretrain_lib.data.dedup import (DedupReport, MinHasher, brute_force_near_duplicates, estimated_jaccard,
                                     exact_dedup, exact_jaccard, lsh_candidate_probability, near_dedup,
                                     near_duplicate_pairs, shingle_hashes)
from pretrain_lib.data.loader import MLMCollator, ResumableLoader, ShardedTokenDataset, clm_collate, random_batch
from pretrain_lib.data.parallel import tokenize_files
from pretrain_lib.data.packing import pack_documents, packing_waste, pad_documents, padding_waste
from pretrain_lib.data.shards import (ShardError, TokenizerMismatchError, choose_dtype, read_all_tokens, read_index,
                                      write_shards)
from pretrain_lib.data.tokenizer import (SPECIAL_TOKENS, bytes_per_token, encode_texts, load_tokenizer, round_trips,
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
    assert strip_markup("<p>Hello <b>world</b> &amp; <script>x=1</script>all</p>") == "Hello world &  all\n"
    assert strip_markup("# Title\n**bold** and [link](http://x)") == "Title\nbold and link\n"


def test_markdown_stripping_keeps_code_and_arithmetic():
    # one implementation: strip_markup is HTML removal followed by strip_markdown
    assert strip_markup("<i>_Exit_</i> **KING**") == strip_markdown("_Exit_ **KING**") == "Exit KING\n"
    assert strip_markdown("my_var_name = a * b * c") == "my_var_name = a * b * c\n"   # no emphasis here
    assert strip_markdown("#hashtag\n![a cat](cat.png)") == "#hashtag\na cat\n"      # not a heading; image alt kept


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
    # by hand: 2 bands of 2 rows at s = 0.5: a band matches with 0.25, some band with 1 - 0.75 ** 2
    assert lsh_candidate_probability(0.5, bands=2, rows=2) == pytest.approx(0.4375)


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


def test_encode_texts_is_encode_per_text_for_any_iterable(bpe, small_corpus):
    texts = ["To be, or not to be", "", "def f(x):\n    return x", CHINESE, small_corpus[0].text[:2000]]
    one_by_one = [bpe.encode(t, add_special_tokens=False).ids for t in texts]  # the tokenizers library itself
    assert encode_texts(bpe, texts) == one_by_one
    assert encode_texts(bpe, iter(texts), batch_size=2) == one_by_one   # a generator, batches cut mid-list
    assert encode_texts(bpe, texts, batch_size=1) == one_by_one
    assert one_by_one[1] == [] and all(len(ids) > 0 for i, ids in enumerate(one_by_one) if i != 1)
    with pytest.raises(TypeError, match="one string"):
        encode_texts(bpe, "To be")
    with pytest.raises(TypeError, match="expects strings"):
        encode_texts(bpe, ["ok", 3])


def test_tokenize_files_matches_encode_texts(bpe, tmp_path):
    (tmp_path / "a.txt").write_text("Hello\r\nworld  \n\n\n\nagain\n")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9\n")
    arrays = tokenize_files([tmp_path / "a.txt", tmp_path / "b.txt"], bpe, processes=1)
    normalised = ["Hello\nworld\n\nagain\n", "caf\ufffd\n"]  # what normalize_text makes of the two files
    assert [a.dtype for a in arrays] == [np.uint16, np.uint16]
    assert [a.tolist() for a in arrays] == encode_texts(bpe, normalised)


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
    assert index.num_tokens == (500, 500, 500, 500, 500, 410)
    # by definition: a window starts at a multiple of seq_len and its seq_len + 1 tokens fit in the shard
    expected = {500 * shard + start for shard, n in enumerate(index.num_tokens)
                for start in range(0, n, seq_len) if start + seq_len + 1 <= n}
    assert len(expected) == 5 * 62 + 51
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


@pytest.fixture
def tiny_shards(tmp_path):
    """Tokens 0..199 in two shards of 100: 2 x 24 windows of 5 tokens (seq_len 4), 24 for each of 2 ranks."""
    return write_shards([list(range(200))], tmp_path / "tiny", tokens_per_shard=100, vocab_size=200)


def _read(source, count: int) -> list[torch.Tensor]:
    """The next ``count`` items of ``source``, continuing into the next epochs (one iter() per epoch)."""
    items: list[torch.Tensor] = []
    while len(items) < count:
        before = len(items)
        items.extend(itertools.islice(iter(source), count - len(items)))
        assert len(items) > before, "an epoch yielded nothing"
    return items


def _json_state(state: dict) -> dict:
    assert all(type(v) is int for v in state.values()), state   # small, exact, JSON-serialisable
    return json.loads(json.dumps(state))


def _assert_same_stream(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(actual) == len(expected), what
    for i, (a, b) in enumerate(zip(actual, expected)):
        assert torch.equal(a, b), f"{what}: item {i} differs"


def test_dataset_resumes_exactly_after_every_window(tiny_shards):
    def make():
        return ShardedTokenDataset(tiny_shards, seq_len=4, rank=1, world_size=2, seed=5)
    n = len(make())
    assert n == 24
    uninterrupted = _read(make(), 2 * n)                  # two epochs, never stopped
    starts = [int(w[0]) for w in uninterrupted]
    assert len(set(starts[:n])) == len(set(starts[n:])) == n and starts[:n] != starts[n:]  # a new order each epoch
    for k in range(n + 1):
        interrupted = make()
        head = list(itertools.islice(iter(interrupted), k))
        state = _json_state(interrupted.state_dict())
        assert (state["epoch"], state["position"]) == (0, k)
        resumed = make()
        resumed.load_state_dict(state)
        _assert_same_stream(head + _read(resumed, 2 * n - k), uninterrupted, f"resumed after {k} windows")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_exactly_after_every_batch(tiny_shards, num_workers):
    def make(workers=num_workers):
        ds = ShardedTokenDataset(tiny_shards, seq_len=4, rank=1, world_size=2, seed=5)
        return ResumableLoader(ds, batch_size=5, num_workers=workers, multiprocessing_context="fork")
    n = len(make())
    assert n == 5                                        # 24 windows: 4 batches of 5 and one of 4
    uninterrupted = _read(make(), 2 * n)
    assert [b.shape[0] for b in uninterrupted] == [5, 5, 5, 5, 4] * 2
    # the batches are the dataset's own stream, whatever the number of workers
    direct = torch.stack(_read(ShardedTokenDataset(tiny_shards, seq_len=4, rank=1, world_size=2, seed=5), 48))
    assert torch.equal(torch.cat(uninterrupted), direct)
    for k in range(n + 1):
        interrupted = make()
        head = list(itertools.islice(iter(interrupted), k))
        state = _json_state(interrupted.state_dict())
        assert (state["epoch"], state["position"]) == (0, min(5 * k, 24))
        resumed = make()
        resumed.load_state_dict(state)
        _assert_same_stream(head + _read(resumed, 2 * n - k), uninterrupted, f"resumed after {k} batches")
    # a state saved with one number of workers resumes with another
    other = make(workers=2 - num_workers)
    other.load_state_dict(state := {**state, "position": 10})
    _assert_same_stream(_read(other, n - 2), uninterrupted[2:n], "resumed with another number of workers")


def test_clm_collate_gives_the_engines_batch_dicts(tiny_shards):
    def make(**kwargs):
        return ResumableLoader(ShardedTokenDataset(tiny_shards, seq_len=4, seed=3), batch_size=5, **kwargs)
    plain, dicts = list(make()), list(make(collate_fn=clm_collate))
    assert [set(d) for d in dicts] == [{"input_ids"}] * len(plain)
    _assert_same_stream([d["input_ids"] for d in dicts], plain, "clm_collate")
    loader = make(collate_fn=clm_collate)
    list(itertools.islice(iter(loader), 2))
    assert loader.state_dict()["position"] == 10        # dict batches are counted by their rows


def test_drop_last_moves_on_to_the_next_epoch(tiny_shards):
    loader = ResumableLoader(ShardedTokenDataset(tiny_shards, seq_len=4, rank=1, world_size=2, seed=3), batch_size=5,
                             drop_last=True)
    assert len(loader) == 4                               # 24 windows: the tail of 4 is dropped
    epochs = [list(loader), list(loader)]
    assert [len(e) for e in epochs] == [4, 4] and loader.state_dict()["epoch"] == 1
    assert not torch.equal(torch.cat(epochs[0]), torch.cat(epochs[1]))


def test_loader_refuses_persistent_workers_and_bad_states(tiny_shards):
    ds = ShardedTokenDataset(tiny_shards, seq_len=4)
    with pytest.raises(ValueError, match="persistent_workers"):
        ResumableLoader(ds, batch_size=4, num_workers=2, persistent_workers=True)
    state = ds.state_dict()
    with pytest.raises(ValueError, match="outside"):
        ds.load_state_dict({**state, "position": len(ds) + 1})
    with pytest.raises(ValueError, match="lacks"):
        ds.load_state_dict({"epoch": 0, "position": 0})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loader_pins_batches_on_cuda(tiny_shards):
    loader = ResumableLoader(ShardedTokenDataset(tiny_shards, seq_len=4), batch_size=4)
    batch = next(iter(loader))
    assert batch.is_pinned()
    on_gpu = batch.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), batch)


def test_resume_with_other_settings_is_refused(numbered_shards):
    a = ShardedTokenDataset(numbered_shards, seq_len=8, seed=1)
    b = ShardedTokenDataset(numbered_shards, seq_len=8, seed=2)
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict(a.state_dict())
    unshuffled = ShardedTokenDataset(numbered_shards, seq_len=8, seed=1, shuffle=False)
    with pytest.raises(ValueError, match="shuffle"):
        unshuffled.load_state_dict(a.state_dict())


def test_mlm_collator_masks_dynamically_and_spares_specials():
    windows = [torch.tensor([2] + list(range(10, 60)) + [3]) for _ in range(8)]
    collate = MLMCollator(mask_token_id=1, vocab_size=100, special_token_ids=[0, 2, 3, 4], seed=0)
    first, second = collate(windows), collate(windows)
    assert not torch.equal(first["labels"], second["labels"])  # a new mask every batch
    for out in (first, second):
        assert (out["labels"][:, [0, -1]] == -100).all()
        chosen = out["labels"] != -100
        assert torch.equal(out["labels"][chosen], torch.stack(windows)[chosen])


def _within_binomial(count: int, n: int, p: float, sds: float = 5.0) -> bool:
    """``count`` of ``n`` Bernoulli(p) draws lies within ``sds`` standard deviations sqrt(n p (1 - p))
    of n p (5 sds: a false alarm about once in 1.7 million seeds; each test fixes its seed)."""
    return abs(count - n * p) <= sds * (n * p * (1 - p)) ** 0.5


def test_mlm_collator_selects_15_percent_and_splits_80_10_10():
    """The collator's own defaults, over 20 batches (64,000 maskable positions), against BERT's rates.

    Each count is binomial. A random replacement is drawn from the 95 ordinary ids (never 0-4,
    the specials and [MASK]) and equals the original with probability 1/95, so then it reads as
    kept: P(kept) = 0.1 + 0.1/95, P(visibly replaced) = 0.1 * 94/95."""
    windows = [torch.tensor([2] + list(range(10, 60)) + [3]) for _ in range(64)]
    originals = torch.stack(windows)
    collate = MLMCollator(mask_token_id=1, vocab_size=100, special_token_ids=[0, 2, 3, 4], seed=0)
    eligible = selected = masked = replaced = kept = 0
    for _ in range(20):
        out = collate(windows)
        chosen = out["labels"] != -100
        inputs = out["input_ids"]
        eligible += originals[:, 1:-1].numel()
        selected += int(chosen.sum())
        masked += int((chosen & (inputs == 1)).sum())
        kept += int((chosen & (inputs == originals)).sum())
        swapped = chosen & (inputs != 1) & (inputs != originals)
        replaced += int(swapped.sum())
        assert (inputs[swapped] > 4).all() and (inputs[swapped] < 100).all()   # only ordinary ids are drawn
        assert torch.equal(inputs[~chosen], originals[~chosen])                # unselected positions untouched
    assert eligible == 64_000 and masked + replaced + kept == selected
    assert _within_binomial(selected, eligible, 0.15), selected / eligible
    assert _within_binomial(masked, selected, 0.8), masked / selected
    assert _within_binomial(replaced, selected, 0.1 * 94 / 95), replaced / selected
    assert _within_binomial(kept, selected, 0.1 + 0.1 / 95), kept / selected


def test_random_batch_reads_a_memmap(numbered_shards):
    shard = read_index(numbered_shards).shard(0)
    x, y = random_batch(shard, batch_size=4, seq_len=16, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and torch.equal(y, x + 1)
