"""Triton kernel of kernels/seeded_projection.py (loaded by kernels.dispatch.triton_kernels)."""

import triton
import triton.language as tl


@triton.jit
def seeded_matmul(
    x_ptr, out_ptr, seed, scale, M, N, K, p_cols,
    stride_xm, stride_xk, stride_om, stride_on,
    TRANSPOSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        ).to(tl.float32)
        if TRANSPOSE:  # P is N x K: the tile's element (k, n) is P[n, k]
            idx = offs_n[None, :].to(tl.int64) * p_cols + offs_k[:, None].to(tl.int64)
        else:  # P is K x N
            idx = offs_k[:, None].to(tl.int64) * p_cols + offs_n[None, :].to(tl.int64)
        p = tl.randn(seed, idx) * scale
        p = tl.where((offs_k[:, None] < K) & (offs_n[None, :] < N), p, 0.0)
        acc += tl.dot(x, p, input_precision="ieee")
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )
