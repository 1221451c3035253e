"""The capstone trainer: configs, data cache, metrics, resume refusal, and exact resume after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain_lib.capstone import checkpoint as ckpt
from pretrain_lib.capstone.config import ConfigError, config_from_dict, exactness_differences, load_config
from pretrain_lib.capstone.data import data_fingerprint, prepare_data, train_char_tokenizer
from pretrain_lib.data.tokenizer import encode_texts
from pretrain_lib.capstone import run

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.toml"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("capstone-data")


def tiny(out_dir, cache_dir, **train) -> dict:
    """A model small enough for a few dozen steps in seconds; dropout on, so the RNG matters."""
    return {"out_dir": str(out_dir), "seed": 7,
            "model": {"n_layers": 1, "n_heads": 2, "d_model": 32, "seq_len": 16, "dropout": 0.1},
            "data": {"corpus": "shakespeare", "max_docs": 1, "tokenizer": "char", "cache_dir": str(cache_dir)},
            "train": {"steps": 24, "batch_size": 4, "warmup_steps": 3, "log_every": 1, "eval_every": 8,
                      "eval_batches": 2, "sample_tokens": 0, "lr": 3e-3, "tensorboard": False, **train},
            "checkpoint": {"every": 4, "keep": 2}}


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line]


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.out_dir and cfg.train.steps > 0 and cfg.checkpoint.keep >= 1


def test_the_shipped_configs_are_the_four_of_the_issue():
    assert {p.stem for p in CONFIGS} >= {"gpt-char-tiny", "gpt-bpe-small", "bert-small", "gpt2-124m"}


def test_gpt_char_tiny_is_nanogpts_cpu_example():
    c = load_config(REPO / "configs" / "gpt-char-tiny.toml")
    assert (c.model.n_layers, c.model.n_heads, c.model.d_model, c.model.seq_len, c.model.dropout) == (4, 4, 128, 64, 0)
    t = c.train
    assert (t.batch_size, t.steps, t.lr, t.min_lr, t.warmup_steps, t.beta2, t.grad_clip) == \
        (12, 2000, 1e-3, 1e-4, 100, 0.99, 1.0)
    assert (c.data.tokenizer, c.data.val_fraction, c.data.corpus) == ("char", 0.1, "shakespeare")


def test_the_speedrun_reads_gpt_char_tinys_data_and_final_validation_windows():
    """Same text, same split, same final windows: the first eval_batches x batch_size windows of seq_len + 1."""
    tiny_cfg, speed = (load_config(REPO / "configs" / f"{n}.toml") for n in ("gpt-char-tiny", "gpt-char-speedrun"))
    assert data_fingerprint(speed.data) == data_fingerprint(tiny_cfg.data)
    assert speed.model.seq_len == tiny_cfg.model.seq_len
    assert speed.train.eval_batches * speed.train.batch_size == tiny_cfg.train.eval_batches * tiny_cfg.train.batch_size
    assert speed.train.steps % speed.train.eval_every == 0   # the last step is evaluated


def test_model_options_and_muon_lr_reach_the_model_and_optimiser(tmp_path):
    from pretrain_lib.capstone.trainer import _optimizer, run_model
    cfg = config_from_dict(tiny(tmp_path, tmp_path), [
        'model.norm="rmsnorm"', 'model.mlp="relu2"', "model.qk_norm=true", 'model.position="rope"',
        'train.optimizer="muon"', "train.muon_lr=0.05"])
    model = run_model(cfg, vocab_size=40)
    mc = model.config
    assert (mc.norm, mc.mlp, mc.qk_norm, mc.position) == ("rmsnorm", "relu2", True, "rope")
    muon_group = next(g for g in _optimizer(cfg, model, None).param_groups if g.get("optimizer") == "muon")
    assert muon_group["lr"] == 0.05 and muon_group["lr_scale"] == pytest.approx(0.05 / cfg.train.lr)
    with pytest.raises(ConfigError, match="model.mlp"):
        config_from_dict(tiny(tmp_path, tmp_path), ['model.mlp="tanh"'])
    with pytest.raises(ConfigError, match="muon_lr"):
        config_from_dict(tiny(tmp_path, tmp_path), ["train.muon_lr=0"])


def test_an_unknown_key_names_itself_and_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key train\.stpes \(did you mean 'steps'\?\).*batch_size.*steps"):
        config_from_dict({"train": {"stpes": 5}})
    with pytest.raises(ConfigError, match=r"unknown key learning_rate; valid keys are: .*out_dir"):
        config_from_dict({"learning_rate": 1})


@pytest.mark.parametrize("table, message", [
    ({"train": {"steps": "100"}}, r"train\.steps must be int, got '100' \(str\)"),
    ({"train": {"steps": 1.5}}, r"train\.steps must be int"),
    ({"train": {"steps": True}}, r"train\.steps must be int"),
    ({"train": {"steps": 0}}, r"train\.steps must be a positive integer, got 0"),
    ({"train": {"min_lr": 1.0, "lr": 0.1}}, r"train\.min_lr must lie in \[0, train\.lr=0\.1\]"),
    ({"train": {"warmup_steps": 50, "steps": 50}}, r"warmup_steps=50 must be smaller than train\.steps=50"),
    ({"model": {"d_model": 130, "n_heads": 4}}, r"d_model=130 is not divisible by model\.n_heads=4"),
    ({"model": {"kind": "t5"}}, r"model\.kind must be one of 'gpt', 'bert'; got 't5'"),
    ({"data": {"tokenizer": "bpe"}}, r"needs data\.vocab_size >= 261"),
    ({"data": {"corpus": "folder"}}, r"needs data\.folder"),
    ({"parallel": "zero9"}, r"parallel must be one of 'none', 'ddp', 'fsdp'"),
    ({"model": 3}, r"\[model\] must be a table"),
    ({"checkpoint": {"every": 15}}, r"checkpoint\.every=15 must be a multiple of train\.log_every=10"),
])
def test_wrong_types_and_impossible_values_say_which_and_why(table, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(table)


def test_set_overrides_one_key_with_toml_values():
    c = config_from_dict({}, ["train.steps=300", "parallel=ddp", "train.lr=2e-3", "allow_config_change=true",
                              'out_dir="x y"'])
    assert (c.train.steps, c.parallel, c.train.lr, c.allow_config_change, c.out_dir) == (300, "ddp", 2e-3, True, "x y")
    with pytest.raises(ConfigError, match="key=value"):
        config_from_dict({}, ["train.steps"])
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        config_from_dict({}, ["trian.steps=3"])


def test_exactness_differences_list_only_the_keys_that_break_a_resume():
    a = config_from_dict({}).to_dict()
    b = config_from_dict({"train": {"steps": 5000, "log_every": 1, "batch_size": 16},
                          "model": {"d_model": 64}}).to_dict()
    assert exactness_differences(a, b) == ["model.d_model: 128 -> 64", "train.batch_size: 12 -> 16"]


# ----------------------------------------------------------------------------- data

def test_char_tokenizer_round_trips_and_reserves_the_special_ids():
    text = "To be, or not\tto be:\nthat is the question.\n"
    tok = train_char_tokenizer([text])
    ids = encode_texts(tok, [text])[0]
    assert len(ids) == len(text) and min(ids) >= 6
    assert tok.decode(ids) == text
    assert tok.get_vocab_size() == 6 + len(set(text))
    assert tok.encode("Z", add_special_tokens=False).ids == [tok.token_to_id("[UNK]")]


def test_data_is_prepared_once_and_cached_by_fingerprint(cache_dir):
    cfg = config_from_dict(tiny("unused", cache_dir))
    first = prepare_data(cfg.data, verbose=False)
    stamp = (first.folder / "meta.json").stat().st_mtime_ns
    again = prepare_data(cfg.data, verbose=False)
    assert again.folder == first.folder and (first.folder / "meta.json").stat().st_mtime_ns == stamp
    meta = first.meta
    assert meta["train_tokens"] + meta["val_tokens"] == meta["tokens"]
    assert abs(meta["val_tokens"] / meta["tokens"] - 0.1) < 1e-3
    other = config_from_dict({**tiny("unused", cache_dir), "data": {**tiny("u", cache_dir)["data"], "max_docs": 2}})
    assert data_fingerprint(other.data) != first.fingerprint


# ----------------------------------------------------------------------------- runs in this process

def test_a_run_logs_metrics_evaluates_and_checkpoints(tmp_path, cache_dir):
    result = run(config_from_dict(tiny(tmp_path / "run", cache_dir, tensorboard=True)), verbose=False)
    lines = read_metrics(tmp_path / "run")
    assert list((tmp_path / "run" / "tensorboard").glob("events.*")), "TensorBoard events when it is installed"
    assert all(ln["tokens_per_s"] is None or ln["tokens_per_s"] > 0 for ln in lines)
    steps = [ln["step"] for ln in lines if "loss" in ln]
    assert steps == list(range(1, 25))
    assert [ln["step"] for ln in lines if "val_loss" in ln] == [8, 16, 24] == result.eval_steps
    assert result.val_losses[-1] < result.val_losses[0], "validation loss must fall over the run"
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [20, 24]
    assert len(result.losses) == 24 and result.steps == 24


def test_a_resume_that_changes_the_batch_is_refused_listing_the_keys(tmp_path, cache_dir):
    out = tmp_path / "run"
    run(config_from_dict(tiny(out, cache_dir, steps=8)), verbose=False)
    changed = tiny(out, cache_dir, steps=12, batch_size=8)
    changed["model"]["d_ff"] = 64
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)refusing to resume.*model\.d_ff: 0 -> 64.*"
                                                   r"train\.batch_size: 4 -> 8.*allow_config_change=true"):
        run(config_from_dict(changed), resume=True, verbose=False)
    # Extending the run is not an exactness change: it resumes.
    longer = run(config_from_dict(tiny(out, cache_dir, steps=12)), resume=True, verbose=False)
    assert longer.start_step == 8 and longer.steps == 12
    forced = run(config_from_dict({**tiny(out, cache_dir, steps=16, batch_size=8), "allow_config_change": True}),
                 resume=True, verbose=False)
    assert forced.start_step == 12 and forced.steps == 16


def test_a_full_disk_fails_before_any_step(tmp_path, cache_dir, monkeypatch):
    class Usage:
        free = 1000

    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: Usage())
    with pytest.raises(ckpt.CheckpointError, match="MiB free but the checkpoints need"):
        run(config_from_dict(tiny(tmp_path / "run", cache_dir)), verbose=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_bert_trains_with_dynamic_masking(tmp_path, cache_dir):
    cfg = tiny(tmp_path / "bert", cache_dir, steps=16)
    cfg["model"]["kind"] = "bert"
    result = run(config_from_dict(cfg), verbose=False)
    assert len(result.val_losses) == 2 and result.val_losses[-1] < result.val_losses[0]


# ----------------------------------------------------------------------------- exact resume after SIGKILL

def _launch(config_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COURSE_HEADLESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pretrain_lib.train", "--config", str(config_path), *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _write_toml(path: Path, table: dict) -> Path:
    lines = []
    for key, value in table.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {json.dumps(value)}")
    for section, values in table.items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _losses(out_dir) -> dict[int, float]:
    return {ln["step"]: ln["loss"] for ln in read_metrics(out_dir) if "loss" in ln}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    folder = tmp_path_factory.mktemp("reference")
    config = _write_toml(folder / "ref.toml", tiny(folder / "out", cache_dir, steps=60))
    proc = _launch(config)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return folder / "out"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_sigkill_then_resume_is_bit_identical(tmp_path, cache_dir, uninterrupted, num_workers):
    table = tiny(tmp_path / "out", cache_dir, steps=60)
    table["data"]["num_workers"] = num_workers
    config = _write_toml(tmp_path / "run.toml", table)
    proc = _launch(config)
    kill_after = 21 + 6 * num_workers   # an arbitrary step, not a checkpoint step
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and sum(1 for _ in metrics.open()) >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; make it longer"
    killed_at = max(_losses(tmp_path / "out"))
    assert killed_at < 60
    resumed = _launch(config, "--resume")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from ckpt_" in out
    reference, after = _losses(uninterrupted), _losses(tmp_path / "out")
    assert sorted(after) == list(range(1, 61)), "every step logged once, none twice"
    assert after == reference, "a killed and resumed run must give the same loss at every step, bit for bit"
    final_a = ckpt.load_checkpoint(uninterrupted / "ckpt_00000060.pt")
    final_b = ckpt.load_checkpoint(tmp_path / "out" / "ckpt_00000060.pt")
    assert all(torch.equal(final_a["model"][k], final_b["model"][k]) for k in final_a["model"])
    assert final_a["loader"] == final_b["loader"] and final_a["tokens_seen"] == final_b["tokens_seen"]


def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    run(config_from_dict(tiny(out, cache_dir, steps=8)), verbose=False)
    newest = out / ckpt.checkpoint_name(8)
    newest.write_bytes(newest.read_bytes()[:-100])          # a truncated copy
    resumed = run(config_from_dict(tiny(out, cache_dir, steps=12)), resume=True)
    printed = capsys.readouterr().out
    assert "ckpt_00000008.pt is corrupt" in printed and "falling back" in printed
    assert resumed.start_step == 4 and resumed.steps == 12


def test_the_command_line_reports_a_bad_config_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nstpes = 3\n')
    proc = subprocess.run([sys.executable, "-m", "pretrain_lib.train", "--config", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown key train.stpes") and "Traceback" not in proc.stderr


def test_a_folder_of_the_users_text_files_is_a_corpus(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly numbers".split()
    for i in range(3):
        (folder / f"doc{i}.txt").write_text(" ".join(words[(i + k) % len(words)] for k in range(120)) + "\n")
    (folder / "notes.md").write_text("not a .txt file")
    cfg = config_from_dict({"data": {"corpus": "folder", "folder": str(folder), "cache_dir": str(tmp_path / "cache"),
                                     "val_fraction": 0.2}})
    prepared = prepare_data(cfg.data, verbose=False)
    assert prepared.meta["documents"] == 3
    assert prepared.meta["tokens"] == sum(len((folder / f"doc{i}.txt").read_text()) for i in range(3)) + 3
    (folder / "doc0.txt").write_text((folder / "doc0.txt").read_text() + "more words here\n")
    assert data_fingerprint(cfg.data) != prepared.fingerprint, "an edited file must give a fresh cache"


@pytest.mark.xdist_group("torchrun")   # never two 2-rank jobs on 2 cores at once
def test_ddp_on_two_ranks_resumes_and_equals_one_process(tmp_path, cache_dir):
    base = tiny(tmp_path / "unused", cache_dir, steps=12, decay_steps=12)   # the 8-step part follows the 12-step LRs
    base["model"]["dropout"] = 0.0      # ranks draw their own dropout masks; one process draws one set
    config = REPO / "configs" / "gpt-char-tiny.toml"
    single = subprocess.run([sys.executable, "-m", "pretrain_lib.train", "--config", str(config), *_sets(base),
                             "--out", str(tmp_path / "single")], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = {**base, "parallel": "ddp", "train": {**base["train"], "batch_size": 2, "steps": 8}}
    _train_on_two_ranks(config, ddp, tmp_path / "ddp")
    ddp["train"]["steps"] = 12
    resumed = _train_on_two_ranks(config, ddp, tmp_path / "ddp", resume=True)
    assert resumed.metrics["start_step"] == 8
    one, two = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert sorted(two) == list(range(1, 13))
    assert max(abs(one[s] - two[s]) for s in one) <= 1e-5


@pytest.mark.xdist_group("torchrun")
def test_fsdp_writes_sharded_checkpoints_and_resumes_bit_identically(tmp_path, cache_dir, capsys):
    from pretrain_lib.capstone import sharded
    from pretrain_lib.capstone.trainer import run_model

    base = tiny(tmp_path / "single", cache_dir, steps=12, decay_steps=12)   # the cut run's LRs are the whole run's
    base["model"]["dropout"] = 0.0
    config = REPO / "configs" / "gpt-char-tiny.toml"   # the command line's base: its keys fill in the rest
    single = run(config, overrides=[f"{k}={json.dumps(v)}" for k, v in _flatten(base).items()], progress=False,
                 verbose=False)
    fsdp = {**base, "parallel": "fsdp", "train": {**base["train"], "batch_size": 2}}
    _train_on_two_ranks(config, fsdp, tmp_path / "whole")
    fsdp["train"]["steps"] = 8
    _train_on_two_ranks(config, fsdp, tmp_path / "cut")
    fsdp["train"]["steps"] = 12
    resumed = _train_on_two_ranks(config, fsdp, tmp_path / "cut", resume=True)
    assert resumed.metrics["start_step"] == 8
    whole, cut = _losses(tmp_path / "whole"), _losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 13)) and all(whole[s] == cut[s] for s in whole), "resume must be exact"

    final = tmp_path / "whole" / "ckpt_00000012.dcp"
    assert final.is_dir() and {"__0_0.distcp", "__1_0.distcp", ".metadata", "extra.pt", "MANIFEST"} <= \
        {p.name for p in final.iterdir()}, "one shard file per rank, DCP's index, the small state, the manifest"
    cfg = single.config
    one = single.model.state_dict()
    for folder in (final, tmp_path / "cut" / "ckpt_00000012.dcp"):
        weights = sharded.load_sharded_model(folder, run_model(cfg, single.data.vocab_size)).state_dict()
        assert max((weights[k] - one[k]).abs().max().item() for k in one) <= 1e-5, "2 sharded ranks = one process"

    with (final / "__1_0.distcp").open("r+b") as f:   # rank 1's shard damaged: fall back to step 8
        f.seek(100)
        flipped = bytes(b ^ 0xFF for b in f.read(16))
        f.seek(100)
        f.write(flipped)
    messages = []
    path, state = ckpt.load_latest(tmp_path / "whole", log=messages.append)
    assert path.name == "ckpt_00000008.dcp" and state["step"] == 8
    assert "__1_0.distcp does not match its checksum" in messages[0]


@pytest.mark.xdist_group("torchrun")
def test_mesh_2x2_trains_like_one_process_and_resumes_bit_identically(tmp_path, cache_dir):
    # [parallel] dp = 2, tp = 2 (configs/gpt-mesh-2x2.toml's mesh) on 4 ranks: the same losses as one process on the
    # whole batch, a cut-and-resumed run identical to an uninterrupted one, and the sharded checkpoint (one set of
    # slices per tp coordinate) loads into one process as that process's own weights
    from pretrain_lib.capstone import sharded
    from pretrain_lib.capstone.trainer import run_model

    base = tiny(tmp_path / "single", cache_dir, steps=8, decay_steps=8)
    base["model"]["dropout"] = 0.0
    config = REPO / "configs" / "gpt-mesh-2x2.toml"
    single = run(REPO / "configs" / "gpt-char-tiny.toml", overrides=[f"{k}={json.dumps(v)}" for k, v in _flatten(base).items()],
                 progress=False, verbose=False)
    mesh = {**base, "train": {**base["train"], "batch_size": 2}}
    _train_on_ranks(config, mesh, tmp_path / "whole", 4)
    mesh["train"]["steps"] = 4
    _train_on_ranks(config, mesh, tmp_path / "cut", 4)
    mesh["train"]["steps"] = 8
    resumed = _train_on_ranks(config, mesh, tmp_path / "cut", 4, resume=True)
    assert resumed.metrics["start_step"] == 4
    one, whole, cut = _losses(tmp_path / "single"), _losses(tmp_path / "whole"), _losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 9)) and all(whole[s] == cut[s] for s in whole), "resume must be exact"
    assert max(abs(one[s] - whole[s]) for s in one) <= 1e-5, "a 2 x 2 mesh trains like one process"
    final = tmp_path / "cut" / "ckpt_00000008.dcp"
    assert {f"__{r}_0.distcp" for r in range(4)} <= {p.name for p in final.iterdir()}
    weights = sharded.load_sharded_model(final, run_model(single.config, single.data.vocab_size)).state_dict()
    reference = single.model.state_dict()
    assert weights.keys() == reference.keys()
    assert max((weights[k] - reference[k]).abs().max().item() for k in reference) <= 1e-5


def _train_on_ranks(config, table: dict, run_dir, nproc: int, *, resume: bool = False):
    from pretrain_lib.distributed.launch import run_torchrun
    args = ["--config", str(config), *_sets(table), *(["--resume"] if resume else [])]
    return run_torchrun("pretrain_lib.train", args=args, run_dir=run_dir, stream=False, timeout_s=300,
                        nproc_per_node=nproc)


def _sets(table: dict) -> list[str]:
    return [x for k, v in _flatten(table).items() for x in ("--set", f"{k}={json.dumps(v)}")]


def _train_on_two_ranks(config, table: dict, run_dir, *, resume: bool = False):
    from pretrain_lib.distributed.launch import run_torchrun
    args = ["--config", str(config), *_sets(table), *(["--resume"] if resume else [])]
    return run_torchrun("pretrain_lib.train", args=args, run_dir=run_dir, stream=False, timeout_s=300)


def _flatten(table: dict) -> dict:
    flat = {k: v for k, v in table.items() if not isinstance(v, dict)}
    flat.update({f"{s}.{k}": v for s, vals in table.items() if isinstance(vals, dict) for k, v in vals.items()})
    return flat


# ----------------------------------------------------------------------------- defects a new user met (issue 21)

def test_a_new_run_into_an_earlier_runs_folder_is_refused_and_loses_nothing(tmp_path, cache_dir):
    out = tmp_path / "run"
    first = run(config_from_dict(tiny(out, cache_dir, steps=8)), verbose=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ckpt.CheckpointError, match=r"already holds a run.*--resume.*out_dir=.*--overwrite"):
        run(config_from_dict(tiny(out, cache_dir, steps=8, lr=1e-3)), overwrite=False, verbose=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before, "a refusal changes nothing"
    again = run(config_from_dict(tiny(out, cache_dir, steps=8, lr=1e-3)), overwrite=True, verbose=False)
    assert [ln["step"] for ln in read_metrics(out) if "loss" in ln] == list(range(1, 9)), "only the new run's lines"
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [4, 8]
    _, state = ckpt.load_latest(out)
    new = again.model.state_dict()
    assert all(torch.equal(state["model"][k], new[k]) for k in new), "latest is the new run's checkpoint"
    assert again.losses[1:] != first.losses[1:]
    with pytest.raises(ValueError, match="contradict"):
        run(config_from_dict(tiny(out, cache_dir, steps=8)), resume=True, overwrite=True, verbose=False)


def test_resume_past_a_corrupt_checkpoint_keeps_the_new_one(tmp_path, cache_dir):
    """keep = 1 after a fallback: retention used to keep the corrupt step-8 file and delete the new one."""
    out = tmp_path / "run"
    run(config_from_dict(tiny(out, cache_dir, steps=8)), verbose=False)
    (out / ckpt.checkpoint_name(8)).write_bytes(b"truncated")
    table = tiny(out, cache_dir, steps=6)
    table["checkpoint"]["keep"] = 1
    resumed = run(config_from_dict(table), resume=True, verbose=False)
    assert resumed.start_step == 4 and resumed.steps == 6
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [6]
    assert ckpt.load_latest(out, log=pytest.fail)[1]["step"] == 6


def test_resume_without_a_checkpoint_is_an_error_unless_auto(tmp_path, cache_dir):
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint in .*spelled right.*--resume=auto"):
        run(config_from_dict(tiny(tmp_path / "typo", cache_dir, steps=4)), resume=True, verbose=False)
    fresh = run(config_from_dict(tiny(tmp_path / "new", cache_dir, steps=4)), resume="auto", verbose=False)
    assert fresh.start_step == 0 and fresh.steps == 4
    again = run(config_from_dict(tiny(tmp_path / "new", cache_dir, steps=6)), resume="auto", verbose=False)
    assert again.start_step == 4 and again.steps == 6


def test_data_folder_alone_selects_the_folder_and_a_contradiction_is_an_error():
    c = load_config(REPO / "configs" / "gpt-char-tiny.toml", ["data.folder=my_texts"])
    assert (c.data.corpus, c.data.folder) == ("folder", "my_texts")
    c = load_config(REPO / "configs" / "gpt-char-tiny.toml", ["data.corpus=folder", "data.folder=t"])
    assert c.data.corpus == "folder"
    with pytest.raises(ConfigError, match=r"data\.folder = 'my_texts' is set but data\.corpus = 'shakespeare'"):
        config_from_dict({"data": {"corpus": "shakespeare", "folder": "my_texts"}})
    with pytest.raises(ConfigError, match="needs data.folder"):
        load_config(REPO / "configs" / "gpt-char-tiny.toml", ["data.corpus=folder"])


def test_a_resume_into_a_wider_model_is_a_short_error_not_a_traceback(tmp_path, cache_dir):
    out = tmp_path / "run"
    run(config_from_dict(tiny(out, cache_dir, steps=4)), verbose=False)
    wider = {**tiny(out, cache_dir, steps=8), "allow_config_change": True}
    wider["model"]["d_model"] = 64
    with pytest.raises(ckpt.CheckpointError) as err:
        run(config_from_dict(wider), resume=True, verbose=False)
    message = str(err.value)
    assert "do not fit the model" in message and "never the model's shape" in message and len(message) < 800
    assert err.value.__context__ is None, "refused before load_state_dict, not wrapped around its traceback"


def _text_folder(folder: Path, n_docs: int = 4) -> Path:
    folder.mkdir()
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly numbers".split()
    for i in range(n_docs):
        (folder / f"doc{i}.txt").write_text(" ".join(words[(i + k) % len(words)] for k in range(400)) + "\n")
    return folder


def test_a_changed_folder_is_named_as_changed_data_and_can_be_continued(tmp_path, cache_dir):
    folder = _text_folder(tmp_path / "texts")
    table = tiny(tmp_path / "run", tmp_path / "cache", steps=4)
    table["data"] = {"corpus": "folder", "folder": str(folder), "tokenizer": "char", "cache_dir": str(tmp_path / "c"),
                     "val_fraction": 0.2}
    run(config_from_dict(table), verbose=False)
    with (folder / "doc0.txt").open("a") as f:
        f.write("the lazy dog\n")                     # the folder grew by one line
    longer = {**table, "train": {**table["train"], "steps": 8}}
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)data fingerprint.*training data changed.*allow_config_change"):
        run(config_from_dict(longer), resume=True, verbose=False)
    continued = run(config_from_dict({**longer, "allow_config_change": True}), resume=True, verbose=False)
    assert continued.start_step == 4 and continued.steps == 8


def test_the_schedule_follows_a_shortened_run_and_a_cut_off_decay_is_named():
    from pretrain_lib.capstone.config import schedule_warnings
    from pretrain_lib.capstone.trainer import lr_schedule
    short = load_config(REPO / "configs" / "gpt-char-tiny.toml", ["train.steps=200"])
    schedule = lr_schedule(short)
    assert schedule(199) < 1.05 * short.train.min_lr, "the decay must end with the run"
    assert schedule_warnings(short) == []
    cut = load_config(REPO / "configs" / "gpt-char-tiny.toml", ["train.steps=200", "train.decay_steps=2000"])
    assert lr_schedule(cut)(199) > 0.9 * cut.train.lr
    (warning,) = schedule_warnings(cut)
    assert "decay_steps=2000 is beyond train.steps=200" in warning


def test_thread_choice_never_oversubscribes_and_warns_when_cores_are_busy():
    from pretrain_lib.capstone.threads import choose_threads
    # the issue's case: 2 cores, another process busy on one; torch would start 2 threads
    assert choose_threads(torch_default=2, cores=2, load_1min=1.0)[0] == 1
    threads, warning = choose_threads(torch_default=2, cores=2, load_1min=1.0)
    assert "load average is 1.0 on 2 cores" in warning and "instead of 2" in warning
    assert choose_threads(torch_default=8, cores=8, load_1min=0.1) == (8, None)
    assert choose_threads(torch_default=8, cores=8, local_world_size=2, load_1min=0.0) == (4, None)
    assert choose_threads(torch_default=4, cores=16, load_1min=None) == (4, None), "never more than torch's default"
    assert choose_threads(torch_default=2, cores=2, load_1min=7.5)[0] == 1, "at least one thread"
    requested, warning = choose_threads(torch_default=2, cores=2, load_1min=1.2, requested=2)
    assert requested == 2 and "as requested" in warning
    assert choose_threads(torch_default=2, cores=2, load_1min=1.2, requested=1) == (1, None)


def test_preparation_names_the_dropped_files_and_thresholds_come_from_the_config(tmp_path, capsys):
    folder = _text_folder(tmp_path / "texts", n_docs=2)
    (folder / "short.txt").write_text("only five words in here\n")
    settings = {"corpus": "folder", "folder": str(folder), "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.2}
    prepared = prepare_data(config_from_dict({"data": settings}).data)
    printed = capsys.readouterr().out
    assert "cleaning dropped 1 of 3 documents" in printed and "short.txt: length (50 ≤ words" in printed
    assert prepared.meta["documents"] == 2 and prepared.meta["dropped"] == {"length": ["short.txt"]}
    lenient = prepare_data(config_from_dict({"data": {**settings, "min_words": 3}}).data, verbose=False)
    assert lenient.meta["documents"] == 3 and lenient.fingerprint != prepared.fingerprint
    with pytest.raises(ConfigError, match="max_duplicate_lines must lie in"):
        config_from_dict({"data": {**settings, "max_duplicate_lines": 2.0}})


def test_the_engine_continues_a_run_from_a_start_step_exactly():
    """train(start_step=k) after k steps = one uninterrupted run: losses, LRs, step numbers and tokens."""
    from pretrain_lib.model import GPT, ModelConfig
    from pretrain_lib.optim import build_optimizer
    from pretrain_lib.train import TrainConfig, clm_objective, train

    data = torch.randint(0, 50, (40, 4, 9), generator=torch.Generator().manual_seed(0))
    config = TrainConfig(steps=10, lr=1e-2, lr_schedule=lambda s: 1e-2 * (s + 1) / 10, log_every=2, eval_every=4,
                         grad_accum_steps=2, device="cpu")
    seen = []

    class Record:
        def on_step(self, state):
            seen.append((state.step, state.tokens_seen, state.metrics.get("step")))

    def fresh():
        torch.manual_seed(3)
        model = GPT(ModelConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=1, max_seq_len=9))
        return model, build_optimizer(model, lr=1e-2)

    model, opt = fresh()
    whole = train(model, lambda i: {"input_ids": data[i]}, clm_objective, config, optimizer=opt, progress=False,
                  eval_fn=lambda m: 0.0)
    model, opt = fresh()
    first = train(model, lambda i: {"input_ids": data[i]}, clm_objective, config, steps=6, optimizer=opt,
                  progress=False)
    seen.clear()
    rest = train(model, lambda i: {"input_ids": data[i]}, clm_objective, config, optimizer=opt, progress=False,
                 start_step=6, tokens_offset=sum(first.input_tokens), callbacks=[Record()], eval_fn=lambda m: 0.0)
    assert first.losses + rest.losses == whole.losses and first.lrs + rest.lrs == whole.lrs
    assert rest.eval_steps == [8, 10] and [s for s, _, _ in seen] == [7, 8, 9, 10]
    assert [t for _, t, _ in seen] == [2 * 4 * 9 * k for k in (7, 8, 9, 10)]
    assert seen[1][2] == 8, "logged metrics carry the run's step"
    with pytest.raises(ValueError, match=r"start_step=10\) must lie in \[0, steps=10\)"):
        train(model, lambda i: {"input_ids": data[i]}, clm_objective, config, optimizer=opt, start_step=10)


def test_the_engine_does_not_import_the_trainer_above_it():
    """Layers: the engine never imports the capstone (its command line runs only as __main__), and the
    checks that train (monitor.detect) import the engine at their top, not inside a function."""
    code = ("import sys, pretrain_lib.train, pretrain_lib.monitor.detect as d; "
            "assert not [m for m in sys.modules if m.startswith('pretrain_lib.capstone')], 'engine imported capstone'; "
            "assert d.train is pretrain_lib.train.train")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    helped = subprocess.run([sys.executable, "-m", "pretrain_lib.train", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0 and "exit codes: 0 done; 2 bad input" in helped.stdout and "75 preempted" in \
        helped.stdout and "130" in helped.stdout


def test_validation_bits_per_byte_is_logged_and_equals_the_evaluators_on_the_same_windows(tmp_path, cache_dir):
    """metrics.jsonl carries val_bits_per_byte beside val_loss; at the last step it equals what
    ``pretrain_lib.evaluate`` computes for the saved checkpoint on the same windows (the first
    eval_batches x batch_size = 8), and the formula worked out from the char tokenizer's bytes."""
    import math

    from pretrain_lib.evaluate.run import evaluate_run, validation_windows
    from pretrain_lib.generate import load_run

    out = tmp_path / "run"
    result = run(config_from_dict(tiny(out, cache_dir, steps=16)), verbose=False)
    evals = [ln for ln in read_metrics(out) if "val_loss" in ln]
    assert [ln["step"] for ln in evals] == [8, 16] and len(result.val_bits_per_byte) == 2
    assert [ln["val_bits_per_byte"] for ln in evals] == pytest.approx(result.val_bits_per_byte, rel=1e-12)
    loaded = load_run(out, log=lambda m: None)
    assert loaded.step == 16
    evaluated = evaluate_run(loaded, max_windows=8, log=lambda m: None)
    assert evaluated["val_windows"] == 8
    assert evals[-1]["val_loss"] == pytest.approx(evaluated["val_loss"], rel=1e-5)
    assert evals[-1]["val_bits_per_byte"] == pytest.approx(evaluated["bits_per_byte"], rel=1e-5)
    # by hand: a char token is its character's UTF-8 bytes, the special tokens none
    targets = validation_windows(loaded, 8)[:, 1:]
    text_bytes = sum(len(loaded.tokenizer.decode([t]).encode("utf-8")) for t in targets.flatten().tolist())
    assert evals[-1]["val_bits_per_byte"] == pytest.approx(
        evals[-1]["val_loss"] * targets.numel() / (math.log(2) * text_bytes), rel=1e-12)
