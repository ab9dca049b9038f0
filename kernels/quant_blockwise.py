"""Groupwise asymmetric integer quantization, Q-GaLore's scheme (Zhang et al. 2024, Sec. 3.1),
shared by Q-GaLore's projector and weights and MicroAdam's error feedback.

The flattened tensor is cut into groups of ``group_size`` consecutive values. Each group keeps a
``scale = (max - min) / (2^bits - 1)`` and a zero point ``zero = -min / scale``; a value becomes
the code ``q = clamp(round(x / scale) + zero, 0, 2^bits - 1)`` and comes back as
``scale * (q - zero)``. The zero point is not rounded to an integer: the group's min and max then
land exactly on codes 0 and 2^bits - 1, so no value is clipped and stochastic rounding stays
unbiased at the group's ends. Round-to-nearest is off by at most scale / 2 per value; with a
bf16 ``scale_dtype`` the stored zero point adds bf16's relative precision of the group's offset.

4-bit codes are packed two per byte (the reference stores one per byte, which makes its
"4-bit" projector cost as much as an 8-bit one). When ``numel`` is not a multiple of
``group_size`` the last group is padded with copies of the last value, which leaves its min and
max unchanged; the padding exists only while quantizing and is never stored.

``quantize`` and ``dequantize`` dispatch (``kernels.dispatch``): on CUDA with triton installed,
round-to-nearest quantization with the exact zero point and every dequantization run as Triton
kernels (group min/max, then codes packed in the same pass); stochastic rounding and the
reference's integer zero points stay on the PyTorch reference, whose random stream
(``torch.Generator``) a kernel would not reproduce. The kernels give the reference's codes bit
for bit: the scale and zero point come from the same PyTorch arithmetic on the group statistics,
and each code is the same fp32 division, addition and round-half-to-even.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from llmpt.kernels.dispatch import check_triton, triton_kernels, use_triton

BITS = (4, 8)


class QuantizedTensor(NamedTuple):
    """Plain tensors and ints, so each field can sit in a ``weights_only`` checkpoint."""

    codes: torch.Tensor  # uint8, flat: numel bytes (8 bits) or ceil(numel / 2) bytes (4 bits)
    scale: torch.Tensor  # (groups,)
    zero: torch.Tensor  # (groups,), same dtype as scale
    shape: tuple[int, ...]
    bits: int
    group_size: int


def check_format(bits: int, group_size: int) -> None:
    """Refuse formats the packing and the code range do not cover."""
    if bits not in BITS:
        raise ValueError(f"bits={bits}: use 4 or 8")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive integer")


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two codes in [0, 15] per byte, the earlier one in the low nibble; an odd count leaves
    the last high nibble zero. Returns ceil(numel / 2) bytes."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"pack_4bit takes uint8 codes, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_4bit``: the first ``numel`` codes, flat uint8."""
    if not 0 <= 2 * packed.numel() - numel <= 1:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {numel} 4-bit codes")
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:numel]


def _scale(spread: torch.Tensor, levels: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-group step in ``dtype``, rounded up when the cast rounded it down (so max - min still
    fits in the code range) and 1 for constant groups (their values come back as exactly
    ``-zero``, with no 0/0)."""
    exact = spread / levels
    scale = exact.to(dtype)
    scale = torch.where(
        scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale
    )
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _scale_zero(
    lo: torch.Tensor, hi: torch.Tensor, levels: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored scale and zero point of groups with fp32 minima ``lo`` and maxima ``hi``."""
    scale = _scale(hi - lo, levels, dtype)
    return scale, (-lo / scale.float()).to(dtype)


def quantize_reference(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    scale_dtype: torch.dtype | None = None,
    zero_point: str = "exact",
) -> QuantizedTensor:
    """Groupwise codes of ``x``, computed in fp32 with the scale and zero as stored in
    ``scale_dtype`` (default ``x.dtype``), so dequantization uses exactly the values quantization
    used. ``stochastic``: round up with probability equal to the fractional part (Q-GaLore's
    weight requantization, unbiased), drawing from ``generator`` (on ``x.device``; the caller
    keeps its state for an exact resume) or the global RNG; otherwise round to nearest.
    ``zero_point="integer"`` is the Q-GaLore reference's arithmetic: scale = max(max - min,
    1e-5) / (2^bits - 1), zero = clamp(-round(min / scale), 0, 2^bits - 1), codes
    clamp(round(x / scale) + zero); it clips groups whose values all have one sign."""
    check_format(bits, group_size)
    if zero_point not in ("exact", "integer"):
        raise ValueError(f"zero_point={zero_point!r}: use exact or integer")
    if not x.is_floating_point():
        raise ValueError(f"quantize takes a floating-point tensor, got {x.dtype}")
    scale_dtype = scale_dtype or x.dtype
    levels = 2**bits - 1
    n = x.numel()
    groups = -(-n // group_size)
    flat = x.detach().reshape(-1).float()
    pad = groups * group_size - n
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    grouped = flat.view(groups, group_size)
    lo = grouped.amin(dim=1)
    if zero_point == "integer":
        scale = ((grouped.amax(dim=1) - lo).clamp(min=1e-5) / levels).to(scale_dtype)
        zero = (-torch.round(lo / scale.float())).clamp(0, levels).to(scale_dtype)
        v = grouped / scale.float()[:, None]
        v = (
            torch.floor(v + torch.rand(v.shape, generator=generator, device=v.device))
            if (stochastic)
            else torch.round(v)
        )
        codes = (v + zero.float()[:, None]).clamp_(0, levels).reshape(-1)[:n].to(torch.uint8)
        return QuantizedTensor(
            pack_4bit(codes) if bits == 4 else codes, scale, zero, tuple(x.shape), bits, group_size
        )
    scale, zero = _scale_zero(lo, grouped.amax(dim=1), levels, scale_dtype)
    v = grouped / scale.float()[:, None] + zero.float()[:, None]  # (groups, group_size)
    if stochastic:
        noise = torch.rand(v.shape, generator=generator, device=v.device)
        v = torch.floor(v + noise)
    else:
        v = torch.round(v)
    codes = v.clamp_(0, levels).reshape(-1)[:n].to(torch.uint8)
    if bits == 4:
        codes = pack_4bit(codes)
    return QuantizedTensor(codes, scale, zero, tuple(x.shape), bits, group_size)


def _check_quantized(q: QuantizedTensor) -> int:
    """Refuse codes and scales that do not fit the shape and format; return numel."""
    check_format(q.bits, q.group_size)
    expected = quantized_nbytes(q.shape, q.bits, q.group_size, q.scale.dtype)
    if q.codes.numel() != expected["codes"] or q.scale.nbytes != expected["scale"]:
        raise ValueError(
            f"{q.codes.numel()} code bytes and {q.scale.numel()} scales do not match shape "
            f"{tuple(q.shape)} at bits={q.bits}, group_size={q.group_size}"
        )
    return math.prod(q.shape)


def dequantize_reference(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``scale * (code - zero)`` in fp32, returned in ``dtype`` (default the scale's dtype) and
    the original shape."""
    n = _check_quantized(q)
    codes = unpack_4bit(q.codes, n) if q.bits == 4 else q.codes
    groups = q.scale.numel()
    values = codes.float()
    pad = groups * q.group_size - n
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    grouped = values.view(groups, q.group_size)
    x = (grouped - q.zero.float()[:, None]) * q.scale.float()[:, None]
    return x.reshape(-1)[:n].reshape(q.shape).to(dtype or q.scale.dtype)


def quantized_nbytes(
    shape: tuple[int, ...], bits: int, group_size: int, scale_dtype: torch.dtype
) -> dict[str, int]:
    """Closed-form bytes of ``quantize``'s tensors: codes numel (8 bits) or ceil(numel / 2)
    (4 bits); one scale and one zero per group of ``group_size`` values."""
    check_format(bits, group_size)
    n = math.prod(shape)
    per_group = -(-n // group_size) * scale_dtype.itemsize
    return {"codes": n if bits == 8 else -(-n // 2), "scale": per_group, "zero": per_group}


# --- Triton ---------------------------------------------------------------------------------

BLOCK = 1024


def quantize_triton(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    scale_dtype: torch.dtype | None = None,
    zero_point: str = "exact",
) -> QuantizedTensor:
    """``quantize_reference`` as Triton kernels; round-to-nearest with the exact zero point only."""
    check_format(bits, group_size)
    if stochastic or zero_point != "exact":
        raise ValueError(
            "the Triton quantizer rounds to nearest with the exact zero point; stochastic "
            "rounding and integer zero points run on quantize_reference"
        )
    if not x.is_floating_point():
        raise ValueError(f"quantize takes a floating-point tensor, got {x.dtype}")
    check_triton(x)
    tk = triton_kernels("quant_blockwise")
    scale_dtype = scale_dtype or x.dtype
    levels = 2**bits - 1
    flat = x.detach().reshape(-1).contiguous()
    n = flat.numel()
    groups = -(-n // group_size)
    lo = torch.empty(groups, device=x.device, dtype=torch.float32)
    hi = torch.empty_like(lo)
    tk.group_min_max[(groups,)](flat, lo, hi, n, group_size, BLOCK=min(BLOCK, _pow2(group_size)))
    scale, zero = _scale_zero(lo, hi, levels, scale_dtype)
    n_out = -(-n // 2) if bits == 4 else n
    codes = torch.empty(n_out, device=x.device, dtype=torch.uint8)
    tk.encode[(-(-n_out // BLOCK),)](
        flat, scale, zero, codes, n, n_out, group_size, float(levels), PACK=bits == 4, BLOCK=BLOCK
    )
    return QuantizedTensor(codes, scale, zero, tuple(x.shape), bits, group_size)


def dequantize_triton(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dequantize_reference`` as one Triton kernel."""
    n = _check_quantized(q)
    check_triton(q.codes)
    tk = triton_kernels("quant_blockwise")
    out = torch.empty(n, device=q.codes.device, dtype=dtype or q.scale.dtype)
    tk.decode[(-(-n // BLOCK),)](
        q.codes, q.scale, q.zero, out, n, q.group_size, PACK=q.bits == 4, BLOCK=BLOCK
    )
    return out.view(q.shape)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    scale_dtype: torch.dtype | None = None,
    zero_point: str = "exact",
) -> QuantizedTensor:
    """Groupwise codes of ``x`` (``quantize_reference`` documents the arithmetic): the Triton
    kernels on CUDA for round-to-nearest with the exact zero point, the reference otherwise."""
    if use_triton(x) and not stochastic and zero_point == "exact":
        return quantize_triton(x, bits, group_size, scale_dtype=scale_dtype)
    return quantize_reference(x, bits, group_size, stochastic, generator, scale_dtype, zero_point)


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``scale * (code - zero)`` in fp32, returned in ``dtype`` (default the scale's dtype) and
    the original shape: Triton on CUDA, the reference otherwise."""
    if use_triton(q.codes):
        return dequantize_triton(q, dtype)
    return dequantize_reference(q, dtype)
