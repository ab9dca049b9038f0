"""Triton kernel of kernels/microadam_update.py (loaded by kernels.dispatch.triton_kernels)."""

import triton
import triton.language as tl


@triton.jit
def rebuild(
    idx_ptr, val_ptr, coef1_ptr, coef2_ptr, m_ptr, s_ptr, out_ptr,
    d, k, block_size, k_block, n_rows, c1, c2, eps,
    KB: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    start = b * block_size
    col0 = b * k_block
    kb = tl.minimum(k_block, k - col0)
    for s in range(n_rows):
        w1 = tl.load(coef1_ptr + s)
        w2 = tl.load(coef2_ptr + s)
        row = s * k + col0
        for j0 in range(0, kb, KB):
            j = j0 + tl.arange(0, KB)
            mask = j < kb
            where = start + tl.load(idx_ptr + row + j, mask=mask, other=0).to(tl.int64)
            v = tl.load(val_ptr + row + j, mask=mask, other=0.0).to(tl.float32)
            acc_m = tl.load(m_ptr + where, mask=mask, other=0.0)
            tl.store(m_ptr + where, acc_m + v * w1, mask=mask)
            acc_s = tl.load(s_ptr + where, mask=mask, other=0.0)
            tl.store(s_ptr + where, acc_s + (v * v) * w2, mask=mask)
        tl.debug_barrier()  # the next row may touch the same values from other threads
    size = tl.minimum(block_size, d - start)
    for i0 in range(0, size, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        mask = offs < size
        acc_m = tl.load(m_ptr + start + offs, mask=mask, other=0.0)
        acc_s = tl.load(s_ptr + start + offs, mask=mask, other=0.0)
        u = tl.math.div_rn(acc_m * c1, tl.sqrt_rn(acc_s * c2) + eps)
        tl.store(out_ptr + start + offs, u, mask=mask)
