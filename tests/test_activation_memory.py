"""Saved-activation counting and activation checkpointing (pretrain_lib.activation_memory)."""
import pytest
import torch

from pretrain_lib.activation_memory import apply_activation_checkpointing, layer_activation_values, saved_activation_bytes
from pretrain_lib.model import GPT, ModelConfig


def test_saved_bytes_of_a_hand_built_graph():
    w = torch.nn.Parameter(torch.randn(8, 16))
    holder = torch.nn.Module()
    holder.w = w
    x = torch.randn(4, 8)
    # mm saves its input x (4·8 fp32 = 128 bytes; w is a parameter, left out); relu saves its output (4·16 = 256)
    assert saved_activation_bytes(holder, lambda: (x @ w).relu().sum()) == 128 + 256


def _config(layers):
    return ModelConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=layers, max_seq_len=32)


def _saved(model, ids):
    return saved_activation_bytes(model, lambda: model(ids).logsumexp(-1).mean())


def test_one_more_block_saves_what_the_formula_counts():
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    per_layer = _saved(GPT(_config(3)), ids) - _saved(GPT(_config(2)), ids)
    formula = 4 * layer_activation_values(_config(2), batch=4, seq=16)   # fp32: 4 bytes a value
    # beyond the formula's 16 values: two LayerNorms' mean and 1/std and attention's log-sum-exp,
    # one number per token (per head), a few per cent at width 32
    assert formula <= per_layer <= 1.05 * formula


def test_checkpointed_blocks_keep_only_their_input_and_give_the_same_gradients():
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    grads, saved = {}, {}
    for mode in ("none", "block", "mlp"):
        torch.manual_seed(0)
        model = apply_activation_checkpointing(GPT(_config(2)), mode)
        saved[mode] = _saved(model, ids)
        model(ids).logsumexp(-1).mean().backward()
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    for mode in ("block", "mlp"):
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads["none"], grads[mode]))
    values = 4 * 16 * 32 * 4                               # one (batch, seq, d_model) fp32 tensor
    per_layer = 4 * layer_activation_values(_config(2), batch=4, seq=16)
    assert saved["none"] - saved["block"] == pytest.approx(2 * (per_layer - values), rel=0.05)
    assert saved["none"] - saved["mlp"] == 2 * 2 * 4 * values   # the MLP's expansion before and after GELU, 2 layers


def test_bad_modes_and_double_wrapping_are_refused():
    model = GPT(_config(1))
    with pytest.raises(ValueError, match="mode"):
        apply_activation_checkpointing(model, "everything")
    apply_activation_checkpointing(model, "block")
    with pytest.raises(ValueError, match="already"):
        apply_activation_checkpointing(model, "block")
    with pytest.raises(TypeError):
        apply_activation_checkpointing(torch.nn.Linear(2, 2))
