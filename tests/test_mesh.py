"""Chapter 9.1: FSDP × tensor parallel and pipeline × data parallel on a 2 × 2 device mesh (4 ranks)
equal one process, and their bytes per step and per mesh dimension match counts worked by hand."""
from __future__ import annotations

import pytest

from pretrain_lib.distributed.comm_model import tensor_parallel_bytes
from pretrain_lib.distributed.launch import run_torchrun

TOL = 1e-5
# vocab 32, d_model 32, 2 blocks, seq 16, global batch 4: dp = 2 ranks read 2 sequences each
SMALL = ["--steps", "3", "--batch", "4", "--seq-len", "16", "--vocab", "32", "--d-model", "32", "--n-layers", "2",
         "--n-heads", "4", "--micro", "2"]
FP32 = 4
# Parameters by hand. Root (embeddings, final norm): 32·32 + 16·32 + 2·32 = 1600. A block: qkv 32·96 + 96 = 3168,
# proj 32·32 (+ bias 32), up 32·128 + 128 = 4224, down 128·32 (+ bias 32), two LayerNorms 2·64.
ROOT = 1600
SPLIT_PER_BLOCK = 3168 + 1024 + 4224 + 4096         # split over the tp ranks
REPLICATED_PER_BLOCK = 32 + 32 + 64 + 64             # the row-parallel biases and the norms: whole on every tp rank
PER_TP_RANK = 2 * (SPLIT_PER_BLOCK // 2 + REPLICATED_PER_BLOCK) + ROOT   # 14,496 parameters


@pytest.mark.xdist_group("torchrun")
@pytest.mark.distributed
def test_mesh_compositions_equal_one_process(tmp_path):
    m = run_torchrun("pretrain_lib.distributed.mesh_run", nproc_per_node=4, args=SMALL, run_dir=tmp_path,
                     stream=False, timeout_s=300).metrics
    assert m["world_size"] == 4 and m["n_params"] == 2 * (SPLIT_PER_BLOCK + REPLICATED_PER_BLOCK) + ROOT
    assert m["max_abs_diff_vs_single"] <= TOL
    for variant in ("fsdp_tp", "pp_dp"):
        v = m["variants"][variant]
        assert v["max_abs_diff_vs_single"] <= TOL, variant
        assert v["losses"] == pytest.approx(m["reference_losses"], abs=1e-5), variant
        # the norm the engine clips by is the whole model's, on every rank, not this rank's slice or stage
        assert v["grad_norms"] == pytest.approx(m["reference_grad_norms"], rel=1e-5), variant
    # the negative control (every dp rank reads the same slice) is caught by the tolerance
    assert m["variants"]["fsdp_tp_same_data"]["max_abs_diff_vs_single"] > 100 * TOL

    ft = m["variants"]["fsdp_tp"]
    by_dim = ft["bytes_per_step_by_dim"]
    # tp: 2 blocks × 4 all-reduces of one activation of this dp rank's 2 sequences
    # (+ 8: the split weights' sum of squares for the gradient norm, one float64)
    assert by_dim["tp"] == {"all_reduce": tensor_parallel_bytes(n_layers=2, batch=2, seq_len=16, d_model=32) + 8}
    # dp (FSDP2): the gradients reduce-scattered once; the weights gathered for the forward and again for the
    # backward, except the root unit's, which FSDP2 keeps gathered between the two; plus the engine's
    # all-reduce of (loss sum, token count), and the gradient norm's two float64 sums of squares
    assert by_dim["dp"]["reduce_scatter_single"] == PER_TP_RANK * FP32
    assert by_dim["dp"]["all_gather_single"] == (2 * PER_TP_RANK - ROOT) * FP32
    assert by_dim["dp"]["all_reduce"] == 2 * FP32 + 2 * 8
    assert by_dim == ft["predicted_bytes_by_dim"]                  # mesh.fsdp_tp_step_bytes, the formula
    assert ft["predicted_params_per_rank"] == PER_TP_RANK // 2
    for held in ft["memory_per_rank"]:          # each rank: its quarter of the split part, half of the rest
        assert held["params"] == held["grads"] == PER_TP_RANK // 2 * FP32
        assert held["optim"] == 2 * held["params"]

    pd = m["variants"]["pp_dp"]
    assert pd["tied_copies_max_abs_diff"] == 0.0
    by_dim = pd["bytes_per_step_by_dim"]
    # rank 0 is stage 0 of replica 0: it sends its 2 micro-batches' activations (1 sequence each) forward
    assert by_dim["pp"]["isend"] == 2 * 1 * 16 * 32 * FP32
    # the tied embedding's gradient, first ↔ last stage, and the gradient norm's sum of squares (one float64)
    assert by_dim["pp"]["all_reduce"] == 32 * 32 * FP32 + 8
    stage0 = ROOT - 64 + SPLIT_PER_BLOCK + REPLICATED_PER_BLOCK  # embeddings and block 0 (ln_f is on stage 1)
    assert pd["memory_per_rank"][0]["params"] == stage0 * FP32
    assert by_dim["dp"]["all_reduce"] == stage0 * FP32 + 2 * FP32  # its gradients averaged over the 2 replicas


@pytest.mark.parametrize("option", [{"position": "rope"}, {"qk_norm": True}, {"mlp": "swiglu"},
                                    {"moe_experts": 4}, {"tie_embeddings": False}])
def test_tensor_parallel_refuses_blocks_it_does_not_split(option):
    # its split attention has no rotary positions or qk-norm, its MLP is GELU's up/down: anything else would train
    # a different model without an error; refused before any process group is needed
    from pretrain_lib.distributed.tensor_parallel_layers import apply_tensor_parallel
    from pretrain_lib.model import GPT, ModelConfig
    model = GPT(ModelConfig(vocab_size=32, d_model=32, n_heads=4, n_layers=1, max_seq_len=8, **option))
    with pytest.raises(ValueError, match=f"default block.*{next(iter(option))}"):
        apply_tensor_parallel(model, None)


def test_build_mesh_rejects_unknown_dimensions_and_wrong_sizes():
    from pretrain_lib.distributed.mesh import build_mesh
    with pytest.raises(ValueError, match="unknown mesh dimensions"):
        build_mesh("cpu", {"dp": 1, "ep": 1})
    with pytest.raises(ValueError, match="positive integers"):
        build_mesh("cpu", {"dp": 0})
    with pytest.raises(ValueError, match=r"needs 4 ranks; this job has 1"):
        build_mesh("cpu", {"dp": 2, "tp": 2})
