"""``python -m pretrain_lib.export --format hf``: the folder transformers loads offline computes the course model.

The references are the course model itself (logits on random ids) and ``pretrain_lib.generate``
(greedy text), for a character and a BPE tokenizer; refusals for what GPT-2 cannot represent.
"""
from __future__ import annotations

import os

import pytest
import torch

from test_generate import cli, train_run

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed: pip install -e '.[hf]'")
pytest.importorskip("safetensors", reason="the hf extra is not installed: pip install -e '.[hf]'")

from pretrain_lib.generate import load_run  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"   # nothing may come from the hub


@pytest.fixture(scope="module", params=["char", "bpe"])
def exported(request, tmp_path_factory):
    run_dir = train_run(tmp_path_factory, request.param)
    out = tmp_path_factory.mktemp(f"hf-{request.param}")
    done = cli("pretrain_lib.export", "--checkpoint", str(run_dir), "--format", "hf", "--out", str(out))
    assert done.returncode == 0, done.stderr
    return run_dir, out


def test_the_folder_loads_offline_as_gpt2_with_a_fast_tokenizer(exported):
    run_dir, out = exported
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    course = load_run(run_dir).tokenizer
    text = "KING. Wherefore, my lord?\nThou art 'tis so"
    assert tok(text, add_special_tokens=False).input_ids == course.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok(text).input_ids) == course.decode(course.encode(text).ids)


def test_logits_equal_the_course_model_on_random_ids(exported):
    run_dir, out = exported
    course = load_run(run_dir).model
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, course.config.vocab_size, (3, course.config.max_seq_len),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, ours = model(ids).logits, course(ids)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() < 1e-4


def test_greedy_generate_in_transformers_gives_the_course_text(exported):
    run_dir, out = exported
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = "ROMEO:\nWhat"
    n = 40     # prompt + continuation stay inside GPT-2's n_positions (65 here)
    done = cli("pretrain_lib.generate", "--checkpoint", str(run_dir), "--prompt", prompt, "--max-new-tokens", str(n),
               "--seed", "0", "--temperature", "0")
    assert done.returncode == 0, done.stderr
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    assert prompt + tok.decode(ids[0, enc.input_ids.size(1):]) == done.stdout


@pytest.mark.parametrize("name, message", [("rope", "position='rope'"), ("bert", "post-LayerNorm"),
                                           ("untied", "tie_embeddings=False")])
def test_what_gpt2_cannot_represent_is_refused_with_the_reason(tmp_path_factory, tmp_path, name, message):
    done = cli("pretrain_lib.export", "--checkpoint", str(train_run(tmp_path_factory, name)), "--format", "hf",
               "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_an_export_is_not_overwritten(tmp_path_factory, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    done = cli("pretrain_lib.export", "--checkpoint", str(train_run(tmp_path_factory, "char")), "--format", "hf",
               "--out", str(tmp_path))
    assert done.returncode == 2 and "not an earlier export" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
