"""Chapter 9.5's μP option (pretrain_lib.mup): learning rates, init stds, the output multiplier and
the attention scale against values worked by hand; the default (SP) model unchanged; and a
coordinate check through the engine's train_step."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO
from pretrain_lib.model import GPT, MaskedLM, ModelConfig, TransformerBackbone, seeded_model
from pretrain_lib.optim import build_optimizer
from pretrain_lib.train import clm_objective, train_step

HIDDEN = ("qkv.weight", "proj.weight", "up.weight", "down.weight")


def mup_config(width: int, base: int = 64, **kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 64, "d_model": width, "n_heads": 4, "n_layers": 2, "max_seq_len": 32,
                          "mup_base_width": base, **kw})


def group_of(optimizer, model) -> dict[str, dict]:
    by_id = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


@pytest.mark.parametrize("width,hidden_lr", [(128, 5e-3), (256, 2.5e-3)])  # 1e-2 · 64/128, 1e-2 · 64/256
def test_learning_rates_per_group_by_hand(width, hidden_lr):
    model = seeded_model(mup_config(width), 0)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    groups = group_of(opt, model)
    for name, g in groups.items():
        hidden = name.endswith(HIDDEN)
        assert g["lr"] == pytest.approx(hidden_lr if hidden else 1e-2, rel=1e-12), name
        assert g["lr_scale"] == pytest.approx(hidden_lr / 1e-2 if hidden else 1.0, rel=1e-12), name
        assert g["weight_decay"] == (0.1 if name.endswith("weight") and "ln" not in name else 0.0), name
    assert sum(name.endswith(HIDDEN) for name in groups) == 8            # 4 matrices × 2 blocks
    assert opt.param_groups[0]["lr"] == 1e-2                              # the engine logs group 0: nominal


def test_engine_schedule_keeps_the_mup_ratio():
    from pretrain_lib.train import train
    model = seeded_model(mup_config(256), 0)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    train(model, lambda i: {"input_ids": torch.randint(0, 64, (2, 16), generator=gen)}, clm_objective,
          steps=2, lr_schedule=lambda step: 4e-3, optimizer=opt, progress=False, log_every=1)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == pytest.approx([1e-3, 4e-3], rel=1e-12)                 # 4e-3 · 64/256 and 4e-3


def test_init_stds_by_hand():
    # width 256, base 64: hidden std = SP std · sqrt(64/256) = SP std / 2; the residual projections'
    # SP std is 0.02 / sqrt(2 · n_layers) = 0.01. Embeddings keep 0.02.
    model = seeded_model(mup_config(256), 0)
    expected = {"qkv.weight": 0.01, "up.weight": 0.01, "proj.weight": 0.005, "down.weight": 0.005,
                "tok_emb.weight": 0.02, "pos_emb.weight": 0.02}
    seen = 0
    for name, p in model.named_parameters():
        for suffix, std in expected.items():
            if name.endswith(suffix):
                seen += 1
                assert p.std().item() == pytest.approx(std, rel=0.02), name   # ≥ 16k entries: ~1 % sampling noise
                assert abs(p.mean().item()) < 0.05 * std, name
    assert seen == 10


def test_output_multiplier_and_attention_scale():
    model = seeded_model(mup_config(128), 0).eval()                     # m = 2, head_dim 32, base head_dim 16
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = model.backbone(ids)
        assert torch.equal(model(ids), (h @ model.backbone.tok_emb.weight.T) * 0.5)
        # attention by hand with the μP scale sqrt(16) / 32 = 1/8 (SP would be 1/sqrt(32))
        attn = model.backbone.blocks[0].attn
        x = torch.randn(2, 10, 128, generator=torch.Generator().manual_seed(2))
        q, k, v = (z.view(2, 10, 4, 32).transpose(1, 2) for z in attn.qkv(x).split(128, dim=2))
        scores = (q @ k.transpose(-1, -2)) / 8.0
        scores = scores.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
        by_hand = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 128))
        torch.testing.assert_close(attn(x), by_hand, rtol=0, atol=1e-6)


def _old_init(model: nn.Module, n_layers: int) -> None:
    """The course model's init before μP existed, copied verbatim: the independent reference."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 0.02
            if name.endswith(("attn.proj.weight", "down.weight")):
                std = 0.02 / math.sqrt(2 * n_layers)
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


def test_default_model_unchanged():
    config = ModelConfig(vocab_size=64)
    assert config.mup_base_width == 0
    ref = nn.Module()
    torch.manual_seed(7)
    ref.backbone = TransformerBackbone(config)
    _old_init(ref, config.n_layers)
    new = seeded_model(config, 7)
    ref_sd, new_sd = ref.state_dict(), new.state_dict()
    assert ref_sd.keys() == new_sd.keys()
    assert all(torch.equal(ref_sd[k], new_sd[k]) for k in ref_sd)
    assert all(m.scale is None for m in new.modules() if hasattr(m, "qkv"))   # SDPA's own 1/sqrt(head_dim)
    opt = build_optimizer(new, lr=1e-3)                                         # SP: the two groups as before
    assert [(len(g["params"]), g["weight_decay"], g["lr"], "lr_scale" in g) for g in opt.param_groups] == \
        [(10, 0.1, 1e-3, False), (18, 0.0, 1e-3, False)]
    # and the logits saved from the code before chapter 8's options existed
    saved = torch.load(REPO / "tests" / "fixtures" / "model_reference_logits.pt")
    for name, cls, causal in (("gpt", GPT, True), ("mlm", MaskedLM, False)):
        torch.manual_seed(1234)
        model = cls(ModelConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=2, max_seq_len=16, causal=causal,
                                mup_base_width=0)).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(saved["ids"]), saved[name], rtol=0, atol=1e-5)


def test_mup_at_its_base_width_is_sp():
    sp, mup = seeded_model(mup_config(64, base=0), 3), seeded_model(mup_config(64, base=64), 3)
    assert all(torch.equal(a, b) for a, b in zip(sp.state_dict().values(), mup.state_dict().values()))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(mup(ids), sp(ids), rtol=0, atol=1e-6)   # the scales agree to rounding
    assert {g["lr"] for g in build_optimizer(mup, lr=1e-3).param_groups} == {1e-3}


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="mup_base_width"):
        mup_config(128, base=-64)
    with pytest.raises(ValueError, match="dense model only"):
        mup_config(128, moe_experts=4)
    with pytest.raises(ValueError, match="not implemented for 'muon'"):
        build_optimizer(seeded_model(mup_config(128), 0), "muon", lr=1e-3)
    from pretrain_lib.distributed.context_parallel import apply_context_parallel
    from pretrain_lib.distributed.tensor_parallel_layers import apply_tensor_parallel
    for apply in (lambda m: apply_context_parallel(m, 32), lambda m: apply_tensor_parallel(m, None)):
        with pytest.raises(ValueError, match="does not implement μP"):   # checked before any process group
            apply(seeded_model(mup_config(128), 0))


def logit_change(width: int, base: int, *, lr: float = 1e-2, steps: int = 5) -> float:
    """RMS change of the output logits on a held-out random batch after ``steps`` AdamW steps."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=256, d_model=width, n_heads=4, n_layers=2, max_seq_len=32,
                            mup_base_width=base))
    gen = torch.Generator().manual_seed(1234)
    batches = [torch.randint(0, 256, (8, 32), generator=gen) for _ in range(steps)]
    probe = torch.randint(0, 256, (8, 32), generator=gen)
    opt = build_optimizer(model, lr=lr, weight_decay=0.0)
    with torch.no_grad():
        before = model(probe)
    for ids in batches:
        train_step(model, [{"input_ids": ids}], clm_objective, opt)
    with torch.no_grad():
        return F.mse_loss(model(probe), before).sqrt().item()


def test_coordinate_check():
    # Measured (lr 1e-2, widths 64/128/256, seeds 0-5 of the model): widest/narrowest is 2.14-2.54 under SP
    # (a fixed Adam LR moves each logit about in proportion to the width; 4 in the linear limit) and
    # 0.67-0.98 under μP (flat; the part of the change that does not align with the weights shrinks with
    # width). The bounds leave a margin on both sides of those ranges; this test runs seed 0.
    sp = [logit_change(w, 0) for w in (64, 128, 256)]
    mup = [logit_change(w, 64) for w in (64, 128, 256)]
    assert sp[0] == mup[0]                                     # at the base width μP is SP
    assert sp[0] < sp[1] < sp[2] and sp[2] / sp[0] > 1.8, sp
    assert 0.5 < mup[2] / mup[0] < 1.25, mup


def test_best_log2_lr_is_the_vertex_of_the_parabola_through_the_best_three_points():
    from pretrain_lib.mup_runs import best_log2_lr
    lrs = [2.0 ** k for k in range(-10, -4)]                       # log2: -10 .. -5
    exact = [(k + 7.3) ** 2 + 4.0 for k in range(-10, -4)]          # a parabola with its vertex at log2 lr = -7.3
    assert best_log2_lr(lrs, exact) == pytest.approx(-7.3, abs=1e-9)
    # not a parabola: the best point -7 with its left neighbour 2 above and its right one 1 above; the vertex of
    # the parabola through the three lies toward the lower one: -7 + (2 - 1) / (2 (2 + 1)) = -7 + 1/6
    assert best_log2_lr(lrs, [9, 8, 7, 5, 6, 8]) == pytest.approx(-7 + 1 / 6, abs=1e-9)
    assert best_log2_lr(lrs, [1, 2, 3, 4, 5, 6]) == -10.0            # best at the edge: the edge, not an extrapolation
    assert best_log2_lr(lrs, [9, 8, 7, 5, math.inf, math.inf]) == -7.0   # a diverged neighbour: no fit, the grid point
    with pytest.raises(ValueError, match="increasing"):
        best_log2_lr(lrs[::-1], exact)


def test_char_tokens_and_the_coordinate_check_through_the_engine():
    from pretrain_lib.mup_runs import char_tokens, coordinate_check, width_config
    data = char_tokens(50_000)
    assert data.train.numel() == 45_000 and data.val.numel() == 5_000            # the last 10 % held out
    assert data.vocab_size == int(torch.cat([data.train, data.val]).max()) + 1 == 65   # the plays' 65 characters
    growth = {}
    for base in (0, 32):
        change = {w: coordinate_check(data.train, width_config(data.vocab_size, w, mup_base_width=base, n_layers=1,
                                                               seq_len=16), lr=1e-2, steps=3, batch_size=8, seed=0)
                  for w in (32, 128)}
        assert all(len(v) == 3 for v in change[32].values())
        growth[base] = {k: change[128][k][-1] / change[32][k][-1] for k in change[32]}
    # Measured (seed 0): SP 6.2 (attention), 13.1 (MLP), 3.3 (logits); μP 0.85, 1.16, 1.10. A fixed Adam LR moves
    # SP's outputs about in proportion to the width (4x here); μP keeps them flat. Bounds with a margin either side.
    assert all(g > 2.0 for g in growth[0].values()), growth
    assert all(0.6 < g < 1.4 for g in growth[32].values()), growth


def test_an_untied_output_layer_gets_the_embedding_rules_and_its_own_table():
    # width 256, base 64 (m = 4): the untied head is vector-like (one dimension is the vocabulary), so it keeps
    # SP's init std 0.02 and the nominal learning rate, and the logits are (h @ head.T) / m, worked by hand
    model = seeded_model(mup_config(256, tie_embeddings=False), 0).eval()
    head = model.head.weight
    assert head.shape == (64, 256) and head.data_ptr() != model.backbone.tok_emb.weight.data_ptr()
    assert head.std().item() == pytest.approx(0.02, rel=0.02)
    groups = group_of(build_optimizer(model, lr=1e-2, weight_decay=0.1), model)
    assert groups["head.weight"]["lr"] == 1e-2 and groups["head.weight"]["weight_decay"] == 0.1
    assert groups["backbone.blocks.0.mlp.up.weight"]["lr"] == pytest.approx(2.5e-3, rel=1e-12)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        by_hand = model.backbone(ids) @ head.T / 4
        assert torch.allclose(model(ids), by_hand, atol=1e-6)
        model.head.weight.add_(1.0)                        # the head is not the embedding: only the readout moves
        assert torch.allclose(model(ids), by_hand + model.backbone(ids).sum(-1, keepdim=True) / 4, atol=1e-5)
    tied = seeded_model(mup_config(256), 0)
    assert model.num_params() == tied.num_params() + 64 * 256          # one more (vocab, d) table
    assert model.matmul_params() == tied.matmul_params()               # the readout multiplies either way


def test_untied_output_layer_is_refused_where_the_tie_is_assumed():
    from pretrain_lib.distributed.pipeline_stages import Stage
    from pretrain_lib.optim.builder import muon_matrices
    untied = dict(vocab_size=64, d_model=32, n_heads=4, n_layers=2, max_seq_len=16, tie_embeddings=False)
    model = GPT(ModelConfig(**untied))
    assert id(model.head.weight) not in {id(p) for p in muon_matrices(model)}   # Muon leaves the readout to AdamW
    with pytest.raises(ValueError, match="tie_embeddings=True"):
        Stage(model, 0, 2)
    with pytest.raises(ValueError, match="tie_embeddings=True"):
        MaskedLM(ModelConfig(**{**untied, "causal": False}))
    with pytest.raises(ValueError, match="tie_embeddings must be True or False"):
        ModelConfig(**{**untied, "tie_embeddings": "no"})
