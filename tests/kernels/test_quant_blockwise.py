"""Groupwise asymmetric quantization: packing, error bounds, stochastic rounding, byte counts."""

import math

import pytest
import torch

from llmpt.kernels.quant_blockwise import (
    dequantize,
    pack_4bit,
    quantize,
    quantized_nbytes,
    unpack_4bit,
)


def per_value(t: torch.Tensor, group_size: int, n: int) -> torch.Tensor:
    """A per-group tensor spread over the flat values it covers."""
    return t.float().repeat_interleave(group_size)[:n]


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 33, 256])
def test_pack_unpack_round_trip(n):
    codes = torch.arange(16, dtype=torch.uint8).repeat(17)[:n]
    codes = codes[torch.randperm(n, generator=torch.Generator().manual_seed(n))]
    packed = pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 2)
    assert torch.equal(unpack_4bit(packed, n), codes)


def test_pack_covers_every_byte():
    low, high = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    pairs = torch.stack([low.reshape(-1), high.reshape(-1)], dim=1).to(torch.uint8)
    packed = pack_4bit(pairs.reshape(-1))
    assert torch.equal(packed.long(), (low + 16 * high).reshape(-1))  # all 256 byte values
    assert torch.equal(unpack_4bit(packed, 512), pairs.reshape(-1))


def test_unpack_refuses_wrong_count():
    with pytest.raises(ValueError, match="cannot hold exactly 5"):
        unpack_4bit(torch.zeros(4, dtype=torch.uint8), 5)


@pytest.mark.parametrize("n", [1, 7, 100, 255, 513])
def test_4bit_codes_take_half_a_byte_each(n):
    q = quantize(torch.randn(n), bits=4, group_size=64)
    assert q.codes.dtype == torch.uint8 and q.codes.nbytes == math.ceil(n / 2)
    assert quantize(torch.randn(n), bits=8, group_size=64).codes.nbytes == n


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,group_size", [((64, 32), 256), ((37, 11), 64), ((1000,), 7)])
def test_round_to_nearest_error_within_half_a_step(bits, shape, group_size):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3 + 1
    q = quantize(x, bits, group_size)
    x_hat = dequantize(q)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    step = per_value(q.scale, group_size, x.numel()).view(shape)
    assert ((x_hat - x).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert (x_hat - x).abs().max() > step.min() / 8  # the bound is not vacuous


def test_8bit_round_trip_to_bf16():
    x = torch.randn(300, 50, generator=torch.Generator().manual_seed(1))
    q = quantize(x, bits=8, group_size=128)
    x_hat = dequantize(q, torch.bfloat16)
    assert x_hat.dtype == torch.bfloat16 and x_hat.shape == x.shape
    step = per_value(q.scale, 128, x.numel()).view(x.shape)
    assert ((x_hat.float() - x).abs() <= step / 2 + x.abs() * 2**-8 + 1e-7).all()
    assert (dequantize(q) - x).norm() / x.norm() < 0.01


def test_bf16_scale_keeps_the_error_bound():
    """The scale is rounded up when cast to bf16, so max - min still fits the code range."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(2))
    q = quantize(x, bits=4, group_size=256, scale_dtype=torch.bfloat16)
    assert q.scale.dtype == q.zero.dtype == torch.bfloat16
    step = per_value(q.scale, 256, x.numel())
    offset = per_value(q.zero * q.scale.float(), 256, x.numel()).abs()
    assert ((dequantize(q, torch.float32) - x).abs() <= step / 2 + offset * 2**-8 + 1e-6).all()


def test_stochastic_rounding_is_unbiased():
    x = torch.randn(512, generator=torch.Generator().manual_seed(3))
    draws = 4000
    # Groups never straddle rows, so every row shares x's scales and draws its own rounding.
    q = quantize(x.repeat(draws, 1), bits=4, group_size=64, stochastic=True,
                 generator=torch.Generator().manual_seed(4))  # fmt: skip
    mean = dequantize(q).mean(dim=0)
    step = per_value(q.scale[: 512 // 64], 64, 512)
    sigma = step / 2 / math.sqrt(draws)  # SR's spread is at most half a step
    assert ((mean - x).abs() <= 5 * sigma).all()
    nearest = dequantize(quantize(x, bits=4, group_size=64))
    assert ((nearest - x).abs() > 5 * sigma).float().mean() > 0.5  # RTN is biased


def test_stochastic_rounding_is_reproducible_and_resumable():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    gen = lambda seed: torch.Generator().manual_seed(seed)
    a = quantize(x, 8, 100, stochastic=True, generator=gen(7))
    b = quantize(x, 8, 100, stochastic=True, generator=gen(7))
    c = quantize(x, 8, 100, stochastic=True, generator=gen(8))
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)
    g = gen(9)
    quantize(x, 4, 100, stochastic=True, generator=g)
    saved = g.get_state()
    after = quantize(x, 4, 100, stochastic=True, generator=g)
    resumed = torch.Generator()
    resumed.set_state(saved)
    assert torch.equal(after.codes, quantize(x, 4, 100, stochastic=True, generator=resumed).codes)


@pytest.mark.parametrize("stochastic", [False, True])
def test_constant_groups_come_back_exactly(stochastic):
    x = torch.cat(
        [torch.full((64,), 3.25), torch.randn(64), torch.zeros(64), torch.full((5,), -2.0)]
    )
    q = quantize(x, bits=4, group_size=64, stochastic=stochastic)
    assert torch.isfinite(q.scale).all() and torch.isfinite(q.zero).all()
    x_hat = dequantize(q)
    assert torch.isfinite(x_hat).all()
    for constant in (slice(0, 64), slice(128, 192), slice(192, 197)):
        assert torch.equal(x_hat[constant], x[constant])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,group_size", [((64, 32), 256), ((33, 7), 256), ((5,), 2)])
def test_nbytes_formula_matches_tensors(bits, dtype, shape, group_size):
    q = quantize(torch.randn(shape).to(dtype), bits, group_size)
    real = {
        "codes": q.codes.untyped_storage().nbytes(),
        "scale": q.scale.untyped_storage().nbytes(),
        "zero": q.zero.untyped_storage().nbytes(),
    }
    assert real == quantized_nbytes(shape, bits, group_size, dtype)


@pytest.mark.parametrize(
    "bits,group_size,match",
    [(3, 64, "bits=3: use 4 or 8"), (16, 64, "bits=16"), (4, 0, "group_size=0"),
     (8, 2.5, "group_size=2.5")],
)  # fmt: skip
def test_bad_format_refused(bits, group_size, match):
    with pytest.raises(ValueError, match=match):
        quantize(torch.randn(10), bits, group_size)
    with pytest.raises(ValueError, match=match):
        quantized_nbytes((10,), bits, group_size, torch.float32)


def test_integer_input_refused():
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.arange(10), 8, 4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [7, 256, 1000])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_the_triton_quantizer_gives_the_references_codes_bit_for_bit(
    interpret, bits, group_size, scale_dtype
):
    from llmpt.kernels.quant_blockwise import (
        dequantize_reference,
        dequantize_triton,
        quantize_reference,
        quantize_triton,
    )

    g = torch.Generator().manual_seed(group_size + bits)
    x = torch.randn(3001, generator=g) * torch.logspace(-3, 2, 3001)  # odd: a half-filled byte
    x[:group_size] = 0.25  # a constant group
    x[-5:] = torch.tensor([0.5, -0.5, 1.5, 2.5, -2.5])  # exact halves somewhere
    ref = quantize_reference(x, bits, group_size, scale_dtype=scale_dtype)
    ours = quantize_triton(x, bits, group_size, scale_dtype=scale_dtype)
    assert torch.equal(ours.codes, ref.codes)
    assert torch.equal(ours.scale, ref.scale) and torch.equal(ours.zero, ref.zero)
    fp32 = dequantize_triton(ref, torch.float32)
    assert torch.equal(fp32, dequantize_reference(ref, torch.float32))  # the same fp32 arithmetic
    bf16 = dequantize_triton(ref, torch.bfloat16)  # the interpreter's bf16 cast may truncate
    ulp = 2.0**-7 * fp32.abs()
    assert ((bf16.float() - dequantize_reference(ref, torch.bfloat16).float()).abs() <= ulp).all()


def test_the_triton_quantizer_refuses_what_it_does_not_reproduce(interpret):
    from llmpt.kernels.quant_blockwise import quantize_triton

    with pytest.raises(ValueError, match="stochastic rounding and integer zero points"):
        quantize_triton(torch.randn(10), 8, 4, stochastic=True)
