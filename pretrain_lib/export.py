"""Export a trained run to a Hugging Face ``transformers`` folder (safetensors weights + fast tokenizer).

    python -m pretrain_lib.export --checkpoint build/runs/gpt-char-tiny --format hf --out build/hf/gpt-char-tiny

and then, offline, ``AutoModelForCausalLM.from_pretrained(DIR)`` / ``AutoTokenizer.from_pretrained(DIR)``,
a ``pipeline("text-generation", model=DIR)``, or ``lm-eval --model hf --model_args pretrained=DIR``.

The course GPT (default architecture) *is* GPT-2's layout, so it becomes a ``GPT2LMHeadModel``
with no approximation:

=====================  =====================================  =====================================
                       course ``GPT``                          ``GPT2LMHeadModel``
=====================  =====================================  =====================================
blocks                 pre-LayerNorm, ``x + attn(ln1(x))``     the same (``ln_1``, ``ln_2``)
LayerNorm              ``nn.LayerNorm``, eps 1e-5, with bias   ``layer_norm_epsilon = 1e-5``
attention              fused ``qkv`` Linear with bias, q|k|v   ``c_attn`` Conv1D (weight transposed)
scale                  ``1/sqrt(head_dim)`` (SDPA default)     ``scale_attn_weights = True``
MLP                    ``down(gelu(up(x)))``, exact erf GELU   ``activation_function = "gelu"`` (not
                                                               GPT-2's tanh ``gelu_new``)
positions              learned table of ``seq_len + 1``        ``wpe``, ``n_positions = seq_len + 1``
output                 tied to the token embedding, no bias    ``tie_word_embeddings = True``
=====================  =====================================  =====================================

Not exported, with the reason in the error: rotary positions (``model.position = "rope"``: GPT-2 has a
position table; the Llama layout that has rotary positions also has RMSNorm, bias-free layers and a
gated MLP, which the course model with rotary positions does not, so no standard class computes
the same function), and BERT runs: the course ``MaskedLM`` is *pre*-LayerNorm with a final
LayerNorm and no LayerNorm on the embeddings, while ``BertForMaskedLM`` is *post*-LayerNorm
(``LN(x + sublayer(x))``) with a LayerNorm on the embeddings and token-type embeddings; the two
compute different functions from the same weights.

A difference to know: the course ``generate`` slides its window past ``seq_len + 1`` tokens, while
GPT-2 refuses positions beyond ``n_positions``; below that the two generate the same tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .data.tokenizer import CLS, EOT, MASK, PAD, SEP, UNK
from .generate import LoadedRun, RunLoadError, load_run

MARKER = "course_export.json"   # written last: names the run the folder came from


class ExportError(ValueError):
    """A run that cannot be exported, or a destination that must not be overwritten."""


def _require_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ExportError("export needs the optional packages transformers and safetensors: pip install -e '.[hf]' "
                          "(make setup installs them)") from exc
    return transformers


def check_exportable(run: LoadedRun) -> None:
    """Refuse, with the reason, a model no standard ``transformers`` class reproduces."""
    m = run.model.config
    if not run.is_gpt:
        raise ExportError(
            "a BERT run is not exported: the course MaskedLM is pre-LayerNorm (LayerNorm before attention and MLP, "
            "a final LayerNorm, none on the embeddings, no token-type embeddings), while transformers' "
            "BertForMaskedLM is post-LayerNorm (LayerNorm after each residual sum, one on the embeddings); no "
            "mapping of the weights makes the two compute the same logits")
    if (m.position, m.norm, m.mlp, m.qk_norm) != ("learned", "layernorm", "gelu", False):
        raise ExportError(
            f"this GPT uses position={m.position!r}, norm={m.norm!r}, mlp={m.mlp!r}, qk_norm={m.qk_norm}; only the "
            "default architecture (learned positions, LayerNorm, GELU MLP) maps exactly onto GPT2LMHeadModel. The "
            "Llama layout has rotary positions but also RMSNorm, bias-free layers and a gated MLP, all of which must "
            "be set together; train with the defaults to export")
    if not m.tie_embeddings:
        raise ExportError("this GPT's output layer is untied (tie_embeddings=False); the export writes GPT-2's "
                          "layout, whose output layer is the token embedding: train with tie_embeddings=True")


def gpt2_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The course GPT's weights under GPT-2's names (Conv1D layers store ``weight.T``)."""
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {"transformer.wte.weight": sd["backbone.tok_emb.weight"],
           "transformer.wpe.weight": sd["backbone.pos_emb.weight"],
           "transformer.ln_f.weight": sd["backbone.ln_f.weight"], "transformer.ln_f.bias": sd["backbone.ln_f.bias"]}
    names = {"ln1": "ln_1", "ln2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
             "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}
    for i in range(model.config.n_layers):
        for ours, theirs in names.items():
            w, b = sd[f"backbone.blocks.{i}.{ours}.weight"], sd[f"backbone.blocks.{i}.{ours}.bias"]
            out[f"transformer.h.{i}.{theirs}.weight"] = w if ours.startswith("ln") else w.t().contiguous()
            out[f"transformer.h.{i}.{theirs}.bias"] = b
    return out


def hf_model(run: LoadedRun):
    """A ``GPT2LMHeadModel`` holding the run's weights (float32, eval mode)."""
    transformers = _require_transformers()
    check_exportable(run)
    m = run.model.config
    eot = run.tokenizer.token_to_id(EOT)
    config = transformers.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.max_seq_len, n_embd=m.d_model, n_layer=m.n_layers, n_head=m.n_heads,
        n_inner=m.d_ff, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, scale_attn_weights=True, tie_word_embeddings=True, bos_token_id=eot,
        eos_token_id=eot, pad_token_id=run.tokenizer.token_to_id(PAD))
    model = transformers.GPT2LMHeadModel(config)
    missing, unexpected = model.load_state_dict(gpt2_state_dict(run.model), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(".attn.bias")]
    if missing or unexpected:
        raise ExportError(f"the GPT-2 layout did not take the weights: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def hf_tokenizer(run: LoadedRun):
    """The run's tokenizer as a ``PreTrainedTokenizerFast`` (the same ``tokenizers`` object inside)."""
    transformers = _require_transformers()
    specials = {"bos_token": EOT, "eos_token": EOT, "pad_token": PAD, "mask_token": MASK, "cls_token": CLS,
                "sep_token": SEP, "unk_token": UNK}
    specials = {k: v for k, v in specials.items() if run.tokenizer.token_to_id(v) is not None}
    # clean_up_tokenization_spaces off: it would turn " ." into "." and decode a different text
    return transformers.PreTrainedTokenizerFast(tokenizer_object=run.tokenizer, model_max_length=run.model.config.max_seq_len,
                                                clean_up_tokenization_spaces=False, **specials)


def export_hf(run: LoadedRun | str | Path, out: str | Path) -> Path:
    """Write ``out`` (config.json, model.safetensors, tokenizer files, ``course_export.json``)."""
    run = run if isinstance(run, LoadedRun) else load_run(run)
    model, tokenizer = hf_model(run), hf_tokenizer(run)
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise ExportError(f"{out} exists and is not an earlier export (no {MARKER}); choose an empty or new folder, "
                          "so nothing in it is overwritten")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / MARKER).write_text(json.dumps({"checkpoint": str(run.checkpoint), "step": run.step,
                                          "architecture": type(model).__name__,
                                          "config": run.config.to_dict()}, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain_lib.export",
                                     description="Export a trained GPT run to a Hugging Face transformers folder.")
    parser.add_argument("--checkpoint", required=True, metavar="OUT_DIR", help="a run's out_dir")
    parser.add_argument("--format", default="hf", choices=["hf"], help="hf: transformers + safetensors")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new or empty)")
    args = parser.parse_args(argv)
    try:
        out = export_hf(args.checkpoint, args.out)
    except (RunLoadError, ExportError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported to {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
