"""MicroAdam's update rebuilt from its window of sparse gradients (Modoranu et al. 2024, Alg. 1).

The window holds the last m Top-K selections of a tensor of d values: ``indices`` (int16,
relative to the Top-K block they came from) and ``values`` (bf16), both m x k. Top-K block b
covers values [b * block_size, (b + 1) * block_size) and owns window columns
[b * k_block, b * k_block + k_b) (the last block may be shorter and keep fewer). With
``coef1[s] = beta1^age(s)`` and ``coef2[s] = beta2^age(s)`` for row s (0 for unfilled rows),

    M_i = sum_s coef1[s] v[s, i],   S_i = sum_s coef2[s] v[s, i]^2,
    u_i = (c1 M_i) / (sqrt(c2 S_i) + eps),   c1 = (1 - beta1) / (1 - beta1^t),
                                            c2 = (1 - beta2) / (1 - beta2^t),

a dense fp32 update that is 0 wherever the window holds nothing. Rows are accumulated in order
s = 0, 1, ..., m - 1 by both implementations, with the same fp32 operations, so they agree to the
last bit up to the hardware's fused multiply-adds. The Triton kernel gives each Top-K block to
one program: it scatters the block's rows into fp32 scratch (indices are unique within a row, a
barrier separates rows) and then writes the block's dense update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmpt.kernels.dispatch import check_triton, triton_kernels, use_triton

MAX_BLOCK = 2**15  # int16 indices relative to their block


@dataclass(frozen=True)
class TopKLayout:
    """How d values split into Top-K blocks and how many each keeps (ceil(density x size))."""

    numel: int
    block_size: int
    density: float

    def __post_init__(self) -> None:
        if not 1 <= self.block_size <= MAX_BLOCK:
            raise ValueError(
                f"Top-K block size {self.block_size} must lie in [1, {MAX_BLOCK}] "
                "(indices are int16 within a block)"
            )
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density {self.density} must lie in (0, 1]")
        if self.numel < 1:
            raise ValueError("an empty tensor has nothing to select")

    @property
    def blocks(self) -> int:
        return -(-self.numel // self.block_size)

    @property
    def last_size(self) -> int:
        return self.numel - (self.blocks - 1) * self.block_size

    @property
    def k_block(self) -> int:
        """Values kept by a full block (and window columns per block)."""
        return math.ceil(self.density * min(self.block_size, self.numel))

    @property
    def k_last(self) -> int:
        return math.ceil(self.density * self.last_size)

    @property
    def k(self) -> int:
        """Values kept per step, i.e. window columns."""
        return (self.blocks - 1) * self.k_block + self.k_last

    def block_starts(self, device=None) -> torch.Tensor:
        """For each window column, the first value of its block (int64)."""
        cols = torch.arange(self.k, device=device, dtype=torch.int64)
        return (cols // self.k_block) * self.block_size


def _check(indices, values, coef1, coef2, layout: TopKLayout) -> None:
    m = indices.shape[0]
    if indices.shape != (m, layout.k) or values.shape != (m, layout.k):
        raise ValueError(
            f"window of shape {tuple(indices.shape)} / {tuple(values.shape)} does not fit "
            f"{layout.k} values per row"
        )
    if coef1.shape != (m,) or coef2.shape != (m,):
        raise ValueError("one coefficient per window row")


def reference(
    indices: torch.Tensor,
    values: torch.Tensor,
    coef1: torch.Tensor,
    coef2: torch.Tensor,
    layout: TopKLayout,
    c1: float,
    c2: float,
    eps: float,
) -> torch.Tensor:
    """The dense fp32 update u (``layout.numel`` values) from the window, with index_add_."""
    _check(indices, values, coef1, coef2, layout)
    where = indices.to(torch.int64) + layout.block_starts(indices.device)
    m_acc = torch.zeros(layout.numel, device=values.device, dtype=torch.float32)
    s_acc = torch.zeros_like(m_acc)
    for s in range(indices.shape[0]):
        v = values[s].float()
        m_acc.index_add_(0, where[s], v * coef1[s])
        s_acc.index_add_(0, where[s], (v * v) * coef2[s])
    return (m_acc * c1) / (torch.sqrt(s_acc * c2) + eps)


def triton_impl(
    indices: torch.Tensor,
    values: torch.Tensor,
    coef1: torch.Tensor,
    coef2: torch.Tensor,
    layout: TopKLayout,
    c1: float,
    c2: float,
    eps: float,
) -> torch.Tensor:
    """``reference`` as one Triton kernel, one program per Top-K block."""
    _check(indices, values, coef1, coef2, layout)
    check_triton(indices, values)
    tk = triton_kernels("microadam_update")
    d = layout.numel
    m_acc = torch.zeros(d, device=values.device, dtype=torch.float32)
    s_acc = torch.zeros_like(m_acc)
    out = torch.empty_like(m_acc)
    kb_pow2 = 1 << max(4, (layout.k_block - 1).bit_length())
    tk.rebuild[(layout.blocks,)](
        indices.contiguous(), values.contiguous(), coef1.float().contiguous(),
        coef2.float().contiguous(), m_acc, s_acc, out,
        d, layout.k, layout.block_size, layout.k_block, indices.shape[0],
        float(c1), float(c2), float(eps),
        KB=min(kb_pow2, 1024), BLOCK=1024,
    )  # fmt: skip
    return out


def microadam_update(
    indices: torch.Tensor,
    values: torch.Tensor,
    coef1: torch.Tensor,
    coef2: torch.Tensor,
    layout: TopKLayout,
    c1: float,
    c2: float,
    eps: float,
) -> torch.Tensor:
    """The dense update from the window: Triton on CUDA, the reference otherwise."""
    if use_triton(indices, values):
        return triton_impl(indices, values, coef1, coef2, layout, c1, c2, eps)
    return reference(indices, values, coef1, coef2, layout, c1, c2, eps)
