"""FP8 rounding and scaling (pretrain_lib.fp8), against the formats' definitions worked by hand."""
import pytest
import torch

from pretrain_lib.fp8 import (GRANULARITIES, fake_quantize, flushed_share, format_info, quantize, relative_error,
                              rounding_bound, scaled_matmul)


def test_format_ranges_match_the_bit_layouts():
    # E4M3 (fn: no infinities): max 1.75 · 2^8, smallest normal 2^-6, smallest subnormal 2^-6 · 2^-3
    e4m3 = format_info("e4m3")
    assert (e4m3.max, e4m3.smallest_normal, e4m3.smallest_subnormal, e4m3.relative_step) == (448.0, 2.0 ** -6, 2.0 ** -9, 0.125)
    # E5M2 (IEEE-like): max 1.75 · 2^15, smallest normal 2^-14, smallest subnormal 2^-16
    e5m2 = format_info("e5m2")
    assert (e5m2.max, e5m2.smallest_normal, e5m2.smallest_subnormal, e5m2.relative_step) == (57344.0, 2.0 ** -14, 2.0 ** -16, 0.25)
    with pytest.raises(ValueError):
        format_info("e3m4")


def test_per_tensor_scale_puts_the_largest_value_on_the_format_max():
    x = torch.tensor([[0.5, -2.0], [1.0, 0.25]])
    q, scale = quantize(x, "e4m3", "tensor")
    assert scale.item() == pytest.approx(2.0 / 448.0)
    assert q.float().abs().max().item() == 448.0
    # powers of two times the scale are exact in FP8: these four values come back unchanged
    assert torch.equal(fake_quantize(x, "e4m3", "tensor"), x)


def test_rounding_error_of_normal_values_is_at_most_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g)
    for fmt in ("e4m3", "e5m2"):
        q, scale = quantize(x, fmt, "row")
        normal = q.float().abs() >= format_info(fmt).smallest_normal
        back = fake_quantize(x, fmt, "row").reshape(q.shape)
        rel = ((back - x.reshape(q.shape)).abs() / x.reshape(q.shape).abs())[normal]
        assert rel.max().item() <= rounding_bound(fmt) + 1e-7


def test_unscaled_small_values_flush_to_zero_and_scaling_saves_them():
    x = torch.full((4, 8), 1e-4)      # below half of E4M3's smallest subnormal (2^-10 ≈ 9.8e-4)
    assert flushed_share(x, "e4m3", "none") == 1.0
    assert flushed_share(x, "e4m3", "tensor") == 0.0
    assert relative_error(x, "e4m3", "tensor") == 0.0   # all equal: each is the group's max, exactly 448 · scale


def test_finer_scales_keep_small_rows_that_one_tensor_scale_flushes():
    rows = torch.ones(2, 128)
    rows[1] *= 1e-6                   # a row a million times smaller: under one scale it sits below the subnormals
    assert flushed_share(rows, "e4m3", "tensor") == pytest.approx(0.5)
    assert flushed_share(rows, "e4m3", "row") == 0.0
    assert flushed_share(rows, "e4m3", "block", block=64) == 0.0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="multiple of block"):
        quantize(torch.ones(2, 100), "e4m3", "block", block=128)
    with pytest.raises(ValueError, match="granularity"):
        quantize(torch.ones(2, 4), "e4m3", "column")
    with pytest.raises(ValueError):
        relative_error(torch.zeros(3), "e4m3")
    assert set(GRANULARITIES) == {"none", "tensor", "row", "block"}


def test_scaled_matmul_refuses_a_cpu():
    with pytest.raises(RuntimeError, match="CUDA"):
        scaled_matmul(torch.ones(16, 16), torch.ones(16, 16))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="an FP8 matrix multiply needs a CUDA GPU of compute capability 8.9+ (none here)")
def test_scaled_matmul_matches_fp32_within_fp8_rounding():
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(256, 512, device="cuda", generator=g)
    b = torch.randn(512, 128, device="cuda", generator=g)
    exact = a @ b
    got = scaled_matmul(a, b).float()
    assert ((got - exact).norm() / exact.norm()).item() < 0.1
