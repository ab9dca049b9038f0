"""A seeded Gaussian projection applied without materialising it (APOLLO, Flora, RSO).

P is the rows x cols matrix with P[i, j] = scale * N(seed, i * cols + j), the draws of Triton's
``tl.randn`` (``kernels.philox``). ``seeded_matmul(x, seed, shape, scale)`` returns x @ P, or
x @ P^T with ``transpose=True``; the Triton kernel generates each tile of P in registers as the
matmul consumes it (Philox is counter-based, so any tile can be drawn on its own), so an m x r
projection never exists in memory and nothing has to be stored to regenerate it exactly, on any
rank or after a resume. The reference materialises P with the same draws and calls torch.matmul.
"""

from __future__ import annotations

import torch

from llmpt.kernels import philox
from llmpt.kernels.dispatch import check_triton, triton_kernels, use_triton


def gaussian(seed: int, shape: tuple[int, int], scale: float = 1.0, device=None) -> torch.Tensor:
    """P itself, fp32: the matrix the kernel never builds."""
    rows, cols = shape
    offsets = torch.arange(rows * cols, device=device, dtype=torch.int64)
    return (philox.randn(seed, offsets) * scale).view(rows, cols)


def _check(x: torch.Tensor, shape: tuple[int, int], transpose: bool) -> None:
    if x.dim() != 2:
        raise ValueError(f"seeded_matmul takes a 2-D x, got shape {tuple(x.shape)}")
    inner = shape[1] if transpose else shape[0]
    if x.shape[1] != inner or min(shape) < 1:
        raise ValueError(
            f"x {tuple(x.shape)} cannot multiply P{'^T' if transpose else ''} of P's shape "
            f"{tuple(shape)}"
        )


def reference(
    x: torch.Tensor, seed: int, shape: tuple[int, int], scale: float = 1.0, transpose: bool = False
) -> torch.Tensor:
    """x @ P (or x @ P^T) with P materialised, in fp32, returned in x's dtype."""
    _check(x, shape, transpose)
    p = gaussian(seed, shape, scale, x.device)
    return (x.float() @ (p.T if transpose else p)).to(x.dtype)


def triton_impl(
    x: torch.Tensor, seed: int, shape: tuple[int, int], scale: float = 1.0, transpose: bool = False
) -> torch.Tensor:
    """x @ P (or x @ P^T), P drawn tile by tile; fp32 accumulation, returned in x's dtype."""
    _check(x, shape, transpose)
    check_triton(x)
    tk = triton_kernels("seeded_projection")
    m, k = x.shape
    n = shape[0] if transpose else shape[1]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    block_m, block_n, block_k = 32, 32, 32
    grid = (-(-m // block_m), -(-n // block_n))
    tk.seeded_matmul[grid](
        x, out, seed, float(scale), m, n, k, shape[1],
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        TRANSPOSE=transpose, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out


def seeded_matmul(
    x: torch.Tensor, seed: int, shape: tuple[int, int], scale: float = 1.0, transpose: bool = False
) -> torch.Tensor:
    """x @ P, or x @ P^T, for the seeded Gaussian P of ``shape``: Triton on CUDA, else the
    reference."""
    if use_triton(x):
        return triton_impl(x, seed, shape, scale, transpose)
    return reference(x, seed, shape, scale, transpose)
