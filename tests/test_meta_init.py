"""A model built on the meta device and materialised (pretrain_lib.model.materialise), alone and
sharded by FSDP2 on 2 ranks (pretrain_lib.distributed.meta_init_run)."""
import math

import pytest
import torch

from pretrain_lib.distributed.launch import run_torchrun
from pretrain_lib.model import GPT, MaskedLM, ModelConfig, materialise, seeded_model

torchrun = pytest.mark.xdist_group("torchrun")


@pytest.mark.parametrize("options", [{}, {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "qk_norm": True},
                                     {"causal": False}, {"moe_experts": 4}], ids=["gpt", "speedrun", "mlm", "moe"])
def test_materialised_model_is_initialised_like_the_constructor(options):
    config = ModelConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=2, **options)
    with torch.device("meta"):
        model = (GPT if config.causal else MaskedLM)(config)
    assert all(p.is_meta for p in model.parameters())
    materialise(model)
    reference = seeded_model(config, 0)
    for (name, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.isfinite(p).all(), name
        if r.dim() == 1:      # norm gains, biases: constants, so equal exactly
            assert torch.equal(p, r), name
        else:                 # drawn: the same distribution (std 0.02, or 0.02 / sqrt(2 n_layers)), other values
            assert p.std().item() == pytest.approx(r.std().item(), rel=0.25), name
    assert all(torch.count_nonzero(b) == 0 for b in model.buffers())
    ids = torch.randint(0, 64, (2, 8))
    assert torch.isfinite(model(ids)).all()


def test_materialise_reinitialises_a_model_that_has_storage():
    # a model that already has storage is simply re-initialised in place (to_empty, then the same init)
    model = materialise(seeded_model(ModelConfig(vocab_size=16, d_model=8, n_heads=2, n_layers=1), 0))
    assert model.backbone.ln_f.weight.eq(1).all()


@torchrun
def test_fsdp2_shards_a_meta_model_before_it_has_storage(tmp_path):
    m = run_torchrun("pretrain_lib.distributed.meta_init_run", nproc_per_node=2, stream=False, run_dir=tmp_path,
                     args=["--d-model", "64", "--n-layers", "2", "--steps", "2"], timeout_s=240).metrics
    held = [r["params"] for r in m["per_rank"]]
    assert sum(held) == m["full_params"]                       # every value is on exactly one rank
    assert max(held) <= math.ceil(m["full_params"] / 2) + 64 * 4   # about half each (a row of padding at most per tensor)
    assert m["up_weight_std"] == pytest.approx(m["init_std"], rel=0.1)
    assert all(math.isfinite(x) for x in m["losses"])
