"""Triton's own Philox streams for a list of offsets: the oracle of kernels/philox.py's tests."""

import triton
import triton.language as tl


@triton.jit
def draws(ints_ptr, normal_ptr, offs_ptr, seed, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    offs = tl.load(offs_ptr + i, mask=mask)
    a, b, c, d = tl.randint4x(seed, offs)
    tl.store(ints_ptr + 4 * i, a.to(tl.int64), mask=mask)
    tl.store(ints_ptr + 4 * i + 1, b.to(tl.int64), mask=mask)
    tl.store(ints_ptr + 4 * i + 2, c.to(tl.int64), mask=mask)
    tl.store(ints_ptr + 4 * i + 3, d.to(tl.int64), mask=mask)
    tl.store(normal_ptr + i, tl.randn(seed, offs), mask=mask)
