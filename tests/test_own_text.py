"""Your own text: the validation split by document, one rule for relative paths (the working directory), and
the config editing notebook 7.0 does."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pretrain_lib.capstone import run
from pretrain_lib.capstone.cli import build_parser
from pretrain_lib.capstone.config import COURSE_DATA_CACHE, config_from_dict, edit_toml, load_config, resolve_path
from pretrain_lib.capstone.data import (choose_validation_documents, data_fingerprint, prepare_data,
                                        validation_batches)
from pretrain_lib.data.clean import clean_documents
from pretrain_lib.data.corpus import iter_shakespeare
from pretrain_lib.data.shards import read_all_tokens
from pretrain_lib.data.tokenizer import EOT

REPO = Path(__file__).resolve().parents[1]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def words_text(seed: int, n_words: int = 60, letters: str = LETTERS) -> str:
    """``n_words`` five-letter words, different for each seed, one line: passes the prose cleaning rules
    unchanged, and every text of the same ``n_words`` has the same number of characters."""
    first = "".join(letters[seed // len(letters) ** k % len(letters)] for k in range(5))   # unique to the seed
    words = ["".join(letters[(seed * 7 + i * 3 + k * 5) % len(letters)] for k in range(5)) for i in range(n_words - 1)]
    return " ".join([first, *words]) + "\n"


def write_folder(folder: Path, texts: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / name).write_text(text)
    return folder


def folder_config(folder, cache, **data) -> dict:
    return {"data": {"corpus": "folder", "folder": str(folder), "cache_dir": str(cache), "tokenizer": "char",
                     "val_fraction": 0.2, **data}}


def decoded(prepared, which: str) -> str:
    tok = prepared.tokenizer()
    return "".join(tok.id_to_token(int(i)) for i in read_all_tokens(getattr(prepared, f"{which}_index")))


def sha_order(names) -> list[str]:
    return sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())


# ----------------------------------------------------------------------------- the split by document

def test_ten_equal_documents_put_the_two_first_by_hash_in_validation(tmp_path):
    """Worked by hand: 10 documents of equal size, val_fraction 0.2. In hash order the first document brings
    the validation share from 0 to 0.1 (closer to 0.2), the second to 0.2 (exact), a third would overshoot to
    0.3 (no closer), so validation = the two names with the smallest SHA-256, in folder order."""
    texts = {f"doc{i:02d}.txt": words_text(i) for i in range(10)}
    assert len({len(t) for t in texts.values()}) == 1
    folder = write_folder(tmp_path / "texts", texts)
    prepared = prepare_data(config_from_dict(folder_config(folder, tmp_path / "cache")).data, verbose=False)
    expected_val = sorted(sha_order(texts)[:2])
    assert prepared.meta["split"] == "documents" and prepared.meta["val_documents"] == expected_val
    assert decoded(prepared, "val") == "".join(texts[n] + EOT for n in expected_val)
    assert decoded(prepared, "train") == "".join(texts[n] + EOT for n in sorted(texts) if n not in expected_val)
    assert prepared.meta["val_tokens"] / prepared.meta["tokens"] == pytest.approx(0.2)


def test_the_rule_never_overshoots_twice_the_target_and_depends_only_on_names_and_sizes():
    names = [f"f{i}" for i in range(6)]
    # hash order of these names, then sizes chosen so the walk is worked by hand below
    order = sha_order(names)
    sizes = {order[0]: 50, order[1]: 30, order[2]: 8, order[3]: 2, order[4]: 5, order[5]: 5}   # total 100, target 20
    taken = choose_validation_documents(names, [sizes[n] for n in names], 0.2)
    chosen = {n for n, t in zip(names, taken) if t}
    # 50: |50-20| = 30 > 20, skip; 30: |30-20| = 10 < 20, take (30); 8: |38-20| > 10, skip; 2, 5, 5: each moves away
    assert chosen == {order[1]}
    shuffled = names[::-1]
    again = choose_validation_documents(shuffled, [sizes[n] for n in shuffled], 0.2)
    assert {n for n, t in zip(shuffled, again) if t} == chosen, "the choice must not depend on the listing order"


def test_a_folder_sorted_by_kind_gets_both_kinds_in_validation_and_the_tail_split_does_not(tmp_path):
    """20 prose-like files then 20 of another kind (digit-like letters), named so that sorting groups them:
    the last 20 % of one stream is all of the second kind; the split by document draws from both."""
    texts = {f"a_prose_{i:02d}.txt": words_text(i) for i in range(20)}
    texts |= {f"b_other_{i:02d}.txt": words_text(i, letters="qrstuvwxyz") for i in range(20)}
    folder = write_folder(tmp_path / "texts", texts)
    by_doc = prepare_data(config_from_dict(folder_config(folder, tmp_path / "cache")).data, verbose=False)
    kinds = {name.split("_")[1] for name in by_doc.meta["val_documents"]}
    assert kinds == {"prose", "other"}, by_doc.meta["val_documents"]
    share, one_doc = by_doc.meta["val_tokens"] / by_doc.meta["tokens"], 1 / len(texts)
    assert abs(share - 0.2) <= one_doc
    tail = prepare_data(config_from_dict(folder_config(folder, tmp_path / "cache", split="tail")).data, verbose=False)
    assert tail.fingerprint != by_doc.fingerprint
    val_text = decoded(tail, "val")
    assert not any(t in val_text for n, t in texts.items() if n.startswith("a_")), "the tail split holds one kind"


def test_one_document_is_split_at_its_tail_exactly_as_before(tmp_path):
    text = words_text(3, n_words=400)
    folder = write_folder(tmp_path / "texts", {"book.txt": text})
    prepared = prepare_data(config_from_dict(folder_config(folder, tmp_path / "cache")).data, verbose=False)
    stream = list(text) + [EOT]
    n_train = round(len(stream) * 0.8)
    assert prepared.meta["split"] == "tail" and prepared.meta["why"] == "one document"
    assert decoded(prepared, "train") == "".join(stream[:n_train]) and decoded(prepared, "val") == "".join(stream[n_train:])
    with pytest.raises(ValueError, match="at least two documents"):
        prepare_data(config_from_dict(folder_config(folder, tmp_path / "c2", split="documents")).data, verbose=False)


def test_documents_too_large_for_the_target_fall_back_to_the_tail_or_are_refused_when_asked(tmp_path, capsys):
    folder = write_folder(tmp_path / "texts", {"one.txt": words_text(1, 200), "two.txt": words_text(2, 200)})
    prepared = prepare_data(config_from_dict(folder_config(folder, tmp_path / "cache", val_fraction=0.1)).data)
    assert prepared.meta["split"] == "tail" and "no document is small enough" in prepared.meta["why"]
    assert "no document is small enough" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no document is small enough.*data.split = 'tail'"):
        prepare_data(config_from_dict(folder_config(folder, tmp_path / "c2", val_fraction=0.1,
                                                    split="documents")).data, verbose=False)


def test_too_little_validation_text_for_one_batch_is_a_clear_error(tmp_path):
    folder = write_folder(tmp_path / "texts", {f"d{i}.txt": words_text(i) for i in range(5)})
    cfg = config_from_dict({**folder_config(folder, tmp_path / "cache"), "model": {"seq_len": 64},
                            "train": {"batch_size": 16}})
    prepared = prepare_data(cfg.data, verbose=False)
    with pytest.raises(ValueError, match=r"fewer than one batch of 16.*add text"):
        validation_batches(prepared, cfg)


def test_the_shakespeare_configs_keep_the_tail_split_and_their_fingerprints(tmp_path):
    """The plays' last 10 % (the benchmark's held-out plays) stays the validation split: the split names no
    new setting for them, so their fingerprints (and caches) are those of every earlier run."""
    cfg = load_config(REPO / "configs" / "gpt-char-tiny.toml", ["data.max_docs=3", f'data.cache_dir="{tmp_path}"'])
    tail = load_config(REPO / "configs" / "gpt-char-tiny.toml", ["data.max_docs=3", "data.split=tail"])
    assert data_fingerprint(cfg.data) == data_fingerprint(tail.data)
    prepared = prepare_data(cfg.data, verbose=False)
    stream = [c for d in clean_documents(iter_shakespeare(max_plays=3)) for c in [*d.text, EOT]]
    n_train = round(len(stream) * 0.9)
    assert prepared.meta["split"] == "tail"
    assert decoded(prepared, "val") == "".join(stream[n_train:])


# ----------------------------------------------------------------------------- one path rule

def test_resolve_path_takes_relative_paths_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("runs/../out") == tmp_path / "out"
    assert resolve_path(REPO / "configs") == REPO / "configs"
    assert resolve_path("~/x") == Path.home() / "x"
    empty = config_from_dict({})
    assert empty.data.cache_dir == "" and COURSE_DATA_CACHE == REPO / "build" / "data"


def test_help_states_the_path_rule():
    text = " ".join(build_parser().format_help().split())
    assert "a relative path is relative to the working directory" in text
    assert all(key in text for key in ("--config", "out_dir", "data.folder", "data.cache_dir"))


def test_relative_out_dir_and_folder_from_a_temporary_working_directory_land_there(tmp_path, monkeypatch):
    write_folder(tmp_path / "texts", {f"d{i}.txt": words_text(i, 300) for i in range(6)})
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({
        "out_dir": "runs/mine", "seed": 3,
        "model": {"n_layers": 1, "n_heads": 2, "d_model": 16, "seq_len": 16},
        "data": {"corpus": "folder", "folder": "texts", "tokenizer": "char", "val_fraction": 0.2, "cache_dir": "cache"},
        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "eval_every": 2, "eval_batches": 1,
                  "sample_tokens": 0, "tensorboard": False},
        "checkpoint": {"every": 2}})
    result = run(cfg, verbose=False)
    assert result.out_dir == tmp_path / "runs" / "mine" and (tmp_path / "runs" / "mine" / "latest").is_file()
    assert any((tmp_path / "cache").iterdir()) and not (REPO / "runs" / "mine").exists()
    saved = json.loads((tmp_path / "runs" / "mine" / "metrics.jsonl").read_text().splitlines()[0])
    assert "loss" in saved
    # the checkpoint records absolute paths, so a run folder is usable from anywhere
    assert (result.config.out_dir, result.config.data.folder, result.config.data.cache_dir) == \
        (str(tmp_path / "runs" / "mine"), str(tmp_path / "texts"), str(tmp_path / "cache"))
    assert cfg.out_dir == "runs/mine", "the caller's config is left as written"


def test_the_command_line_reads_every_relative_path_from_where_it_runs(tmp_path):
    work = tmp_path / "work"
    write_folder(work / "texts", {f"d{i}.txt": words_text(i, 300) for i in range(6)})
    (work / "my.toml").write_text(
        'out_dir = "runs/cli"\nseed = 1\n[model]\nn_layers = 1\nn_heads = 2\nd_model = 16\nseq_len = 16\n'
        '[data]\ncorpus = "folder"\nfolder = "texts"\ntokenizer = "char"\nval_fraction = 0.2\ncache_dir = "cache"\n'
        '[train]\nsteps = 2\nbatch_size = 2\nwarmup_steps = 1\nlog_every = 1\neval_every = 2\neval_batches = 1\n'
        'sample_tokens = 0\ntensorboard = false\n[checkpoint]\nevery = 2\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pretrain_lib.train", "--config", "my.toml", "--set",
                           'out_dir="elsewhere/cli"'], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (work / "elsewhere" / "cli" / "latest").is_file() and (work / "cache").is_dir()
    missing = subprocess.run([sys.executable, "-m", "pretrain_lib.train", "--config", "configs/gpt-char-tiny.toml"],
                             cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "relative paths are read from the working directory" in missing.stderr


# ----------------------------------------------------------------------------- editing a copy of a config (7.0)

def test_edit_toml_changes_the_named_lines_keeps_the_rest_and_parses_to_the_updated_table():
    original = (REPO / "configs" / "gpt-bpe-small.toml").read_text()
    changes = {"out_dir": "runs/mine", "data.corpus": "folder", "data.folder": 'my "texts"', "train.steps": 300,
               "train.lr": 2e-3, "train.tensorboard": False, "checkpoint.every": 300, "extra.names": ["a", 1]}
    edited = edit_toml(original, changes, note="changed")
    expected = tomllib.loads(original)          # the reference: the parsed file, updated as a dict
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition(".")
        (expected.setdefault(section, {}) if section else expected)[key] = value
    assert tomllib.loads(edited) == expected
    kept = [ln for ln in original.splitlines() if ln.startswith("#") or not ln.strip()]
    assert all(ln in edited.splitlines() for ln in kept), "comments and blank lines stay"
    assert edited.count("# changed") == len(changes)
    table = {k: v for k, v in tomllib.loads(edited).items() if k != "extra"}   # [extra] is not a config section
    assert config_from_dict(table).train.steps == 300
