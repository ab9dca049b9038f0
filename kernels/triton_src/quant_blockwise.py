"""Triton kernels of kernels/quant_blockwise.py (loaded by kernels.dispatch.triton_kernels)."""

import triton
import triton.language as tl


@triton.jit
def group_min_max(x_ptr, lo_ptr, hi_ptr, n, group_size, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    start = g.to(tl.int64) * group_size
    lo = tl.full((BLOCK,), float("inf"), tl.float32)
    hi = tl.full((BLOCK,), float("-inf"), tl.float32)
    for k in range(0, group_size, BLOCK):
        i = start + k + tl.arange(0, BLOCK)
        mask = (k + tl.arange(0, BLOCK) < group_size) & (i < n)
        x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.where(mask, x, float("inf")))
        hi = tl.maximum(hi, tl.where(mask, x, float("-inf")))
    tl.store(lo_ptr + g, tl.min(lo, axis=0))
    tl.store(hi_ptr + g, tl.max(hi, axis=0))


@triton.jit
def _code(x_ptr, scale_ptr, zero_ptr, i, n, group_size, levels):
    """Round-half-to-even of x / scale + zero, clamped to [0, levels], for flat index i."""
    mask = i < n
    g = i // group_size
    x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + g, mask=mask, other=1.0).to(tl.float32)
    z = tl.load(zero_ptr + g, mask=mask, other=0.0).to(tl.float32)
    v = tl.math.div_rn(x, s) + z
    f = tl.floor(v)
    d = v - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    r = tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))
    r = tl.minimum(tl.maximum(r, 0.0), levels)
    return tl.where(mask, r, 0.0).to(tl.uint8)


@triton.jit
def encode(
    x_ptr, scale_ptr, zero_ptr, out_ptr, n, n_out, group_size, levels,
    PACK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if PACK:  # byte j holds codes 2j (low nibble) and 2j + 1 (high nibble)
        low = _code(x_ptr, scale_ptr, zero_ptr, 2 * j, n, group_size, levels)
        high = _code(x_ptr, scale_ptr, zero_ptr, 2 * j + 1, n, group_size, levels)
        tl.store(out_ptr + j, low | (high << 4), mask=j < n_out)
    else:
        tl.store(
            out_ptr + j, _code(x_ptr, scale_ptr, zero_ptr, j, n, group_size, levels), mask=j < n
        )


@triton.jit
def decode(
    codes_ptr, scale_ptr, zero_ptr, out_ptr, n, group_size,
    PACK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    if PACK:
        byte = tl.load(codes_ptr + i // 2, mask=mask, other=0)
        code = tl.where(i % 2 == 0, byte & 0x0F, byte >> 4)
    else:
        code = tl.load(codes_ptr + i, mask=mask, other=0)
    g = i // group_size
    s = tl.load(scale_ptr + g, mask=mask, other=1.0).to(tl.float32)
    z = tl.load(zero_ptr + g, mask=mask, other=0.0).to(tl.float32)
    x = (code.to(tl.float32) - z) * s
    tl.store(out_ptr + i, x.to(out_ptr.dtype.element_ty), mask=mask)
