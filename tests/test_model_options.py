"""Chapter 8.2's architecture options: each against an independent reference, and the default
model unchanged bit for bit (logits saved from the code before the options existed)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from pretrain_lib.model import GPT, MaskedLM, ModelConfig
from pretrain_lib.model_options import (RMSNorm, apply_rope, prefix_attention_mask, rope_tables,
                                        swiglu_hidden)

SMALL = dict(vocab_size=50, d_model=32, n_heads=4, n_layers=2, max_seq_len=16)


@pytest.mark.parametrize("name,cls,causal", [("gpt", GPT, True), ("mlm", MaskedLM, False)])
def test_default_model_is_bit_for_bit_unchanged(name, cls, causal):
    ref = torch.load(REPO / "tests" / "fixtures" / "model_reference_logits.pt")
    torch.manual_seed(1234)
    model = cls(ModelConfig(**SMALL, causal=causal)).eval()
    # Same code, same seed: identical on this machine; the 1e-5 allowance only absorbs another CPU's
    # summation order, while any change to the default model (init order, a norm, the mask) moves the
    # logits by orders of magnitude more.
    with torch.no_grad():
        torch.testing.assert_close(model(ref["ids"]), ref[name], rtol=0, atol=1e-5)
        torch.testing.assert_close(model(ref["ids"], ref["mask"]), ref[name + "_masked"], rtol=0, atol=1e-5)
    assert model.num_params() == ref[name + "_num_params"]
    assert model.flops_per_token() == ref[name + "_flops"]


def test_rmsnorm_matches_formula_and_torch():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    by_hand = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), by_hand)
    reference = torch.nn.RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        reference.weight.copy_(norm.weight)
    torch.testing.assert_close(norm(x), reference(x))


def test_rope_is_a_rotation_of_channel_pairs_by_position_angles():
    head_dim, seq = 4, 3
    cos, sin = rope_tables(seq, head_dim, base=100.0)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(1, 1, seq, head_dim)
    out = apply_rope(x, cos, sin)[0, 0]
    for m in range(seq):
        for i, (a, b) in enumerate([(1.0, 2.0), (3.0, 4.0)]):
            theta = m * 100.0 ** (-2 * i / head_dim)  # θ_i = base^(-2i/d), worked by hand
            rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
            expected = rot @ torch.tensor([a, b])
            torch.testing.assert_close(out[m, 2 * i:2 * i + 2], expected)
    torch.testing.assert_close(out.norm(dim=-1), x[0, 0].norm(dim=-1))  # a rotation keeps lengths


def test_rope_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)
    cos, sin = rope_tables(20, 8)
    rq = apply_rope(q.expand(1, 1, 20, 8), cos, sin)[0, 0]
    rk = apply_rope(k.expand(1, 1, 20, 8), cos, sin)[0, 0]
    score = lambda m, n: float(rq[m] @ rk[n])
    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(7, 7) == pytest.approx(float(q @ k), abs=1e-5)
    assert abs(score(5, 2) - score(5, 4)) > 1e-3  # but they do depend on the offset


def test_rope_model_has_no_position_table_and_counts_parameters_without_it():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL, position="rope")).eval()
    assert model.backbone.pos_emb is None
    learned = GPT(ModelConfig(**SMALL))
    assert learned.num_params(non_embedding=True) == learned.num_params() - 50 * 32 - 16 * 32
    assert model.num_params(non_embedding=True) == model.num_params() - 50 * 32
    assert model.num_params(non_embedding=True) == learned.num_params(non_embedding=True)
    # Without a table the rotation carries the positions: swapping two earlier tokens must
    # still change the last position's output.
    ids = torch.tensor([[3, 7, 9, 4]])
    with torch.no_grad():
        swapped = model(torch.tensor([[7, 3, 9, 4]]))[0, -1]
        assert not torch.allclose(model(ids)[0, -1], swapped, atol=1e-6)


def test_qk_norm_normalises_queries_and_keys():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL, qk_norm=True)).eval()
    attn = model.backbone.blocks[0].attn
    seen = {}
    attn.q_norm.register_forward_hook(lambda m, i, o: seen.setdefault("q", o))
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 6)))
    rms = seen["q"].pow(2).mean(-1).sqrt()  # gains start at 1, so each head's query has RMS 1
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
    extra = sum(p.numel() for n, p in model.named_parameters() if "q_norm" in n or "k_norm" in n)
    assert extra == 2 * 2 * (32 // 4)  # two norms of head_dim per layer
    assert model.num_params() == GPT(ModelConfig(**SMALL)).num_params() + extra


def test_mlp_variants_shapes_parameters_and_flops():
    d = 32
    base = GPT(ModelConfig(**SMALL))
    swiglu = GPT(ModelConfig(**SMALL, mlp="swiglu"))
    relu2 = GPT(ModelConfig(**SMALL, mlp="relu2"))
    h = swiglu.config.d_ff
    assert h == swiglu_hidden(d) == 88 and h % 8 == 0 and h >= 8 * d / 3
    per_layer = lambda m: sum(p.numel() for p in m.backbone.blocks[0].mlp.parameters())
    assert per_layer(base) == 2 * d * 4 * d + 4 * d + d
    assert per_layer(swiglu) == 3 * d * h + 2 * h + d
    assert per_layer(relu2) == per_layer(base)
    for model in (base, swiglu, relu2):
        n_matmul = model.num_params(non_embedding=True) + 50 * d
        assert model.flops_per_token(16) == 6 * n_matmul + 12 * 2 * 16 * d
        assert model(torch.randint(0, 50, (2, 5))).shape == (2, 5, 50)
    x = torch.randn(4, d)
    mlp = relu2.backbone.blocks[0].mlp
    torch.testing.assert_close(mlp(x), mlp.down(torch.relu(mlp.up(x)) ** 2))
    g = swiglu.backbone.blocks[0].mlp
    torch.testing.assert_close(g(x), g.down(F.silu(g.gate(x)) * g.up(x)))


def test_rmsnorm_option_replaces_every_layernorm():
    model = GPT(ModelConfig(**SMALL, norm="rmsnorm"))
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert sum(isinstance(m, RMSNorm) for m in model.modules()) == 2 * 2 + 1


def test_prefix_mask_by_hand_and_in_the_model():
    mask = prefix_attention_mask(4, torch.tensor([2, 0]))
    expected0 = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected0)
    assert torch.equal(mask[1, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL)).eval()
    ids = torch.randint(0, 50, (1, 8))
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1) % 50
    with torch.no_grad():
        plain, plain_changed = model(ids), model(changed)
        pre = model(ids, prefix_len=torch.tensor([4]))
        pre_changed = model(changed, prefix_len=torch.tensor([4]))
        torch.testing.assert_close(model(ids, prefix_len=torch.tensor([0])), plain)
        later = ids.clone()
        later[0, 6] = (ids[0, 6] + 1) % 50
        pre_later = model(later, prefix_len=torch.tensor([4]))
    torch.testing.assert_close(plain[0, :2], plain_changed[0, :2])  # causal: the past cannot see token 2
    assert not torch.allclose(pre[0, :2], pre_changed[0, :2])       # prefix: positions 0-1 see token 2
    # after the prefix the mask is causal again: a change at position 6 reaches positions 6-7 only,
    # so the prefix (0-3) and the targets before it (4-5) are exactly what they were
    torch.testing.assert_close(pre_later[0, :6], pre[0, :6])
    assert not torch.allclose(pre_later[0, 6:], pre[0, 6:])


@pytest.mark.parametrize("bad", [dict(norm="batchnorm"), dict(mlp="tanh"), dict(position="alibi"),
                                 dict(position="rope", d_model=12, n_heads=4)])
def test_bad_options_are_rejected(bad):
    with pytest.raises(ValueError, match="must"):
        ModelConfig(**{**SMALL, **bad})
