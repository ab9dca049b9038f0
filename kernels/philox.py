"""Triton's counter-based Gaussian generator (``tl.randn``: Philox-4x32-10, then Box-Muller) in
PyTorch, so a random projection drawn tile by tile inside a Triton kernel and the reference's
materialised matrix are the same numbers.

Value ``i`` of stream ``seed`` depends only on (seed, i): the counter is (i mod 2^32, i >> 32,
0, 0), the key (seed mod 2^32, seed >> 32). The integer outputs equal Triton's bit for bit; the
Gaussian goes through fp32 log, sqrt, cos, which may differ from a GPU's by an ulp or so.
Unsigned 32-bit arithmetic is emulated in int64 tensors.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # Triton's: the largest with MAX_INT * scale < 1 in fp32


def philox(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four uint32 outputs (as int64) of Philox-4x32-10 for each offset.

    A uint32 x uint32 product needs 64 bits: in int64 it wraps modulo 2^64 (two's complement),
    which keeps its bit pattern, so its high and low words are still ``>> 32`` and ``& MASK32``.
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed={seed} must lie in [0, 2^64)")
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & MASK32, (offsets >> 32) & MASK32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(ROUNDS):
        prod_b, prod_a = c2 * ROUND_B, c0 * ROUND_A
        c0 = (prod_b >> 32).bitwise_and_(MASK32).bitwise_xor_(c1).bitwise_xor_(k0)
        c2 = (prod_a >> 32).bitwise_and_(MASK32).bitwise_xor_(c3).bitwise_xor_(k1)
        c1, c3 = prod_b.bitwise_and_(MASK32), prod_a.bitwise_and_(MASK32)
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def uniform(bits: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit draws: [0, 1) in fp32."""
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)  # bitcast to int32
    signed = torch.where(signed < 0, ~signed, signed)
    return signed.to(torch.float32) * UNIFORM_SCALE


def randn(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randn(seed, offsets)``: standard normal fp32 values, one per offset."""
    i1, i2, _, _ = philox(seed, offsets)
    u1 = torch.clamp(uniform(i1), min=1.0e-7)
    theta = 6.283185307179586 * uniform(i2)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)
