"""MicroAdam's window-to-update kernel: Triton (interpreted) against the PyTorch reference."""

import math

import pytest
import torch

from llmpt.kernels.microadam_update import TopKLayout, microadam_update, reference, triton_impl


def _window(layout: TopKLayout, rows: int, seed: int = 0):
    """Rows of unique block-relative indices (a real Top-K selection) and bf16 values."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.empty(rows, layout.k, dtype=torch.int16)
    for s in range(rows):
        cols = []
        for b in range(layout.blocks):
            size = layout.block_size if b < layout.blocks - 1 else layout.last_size
            keep = layout.k_block if b < layout.blocks - 1 else layout.k_last
            cols.append(torch.randperm(size, generator=g)[:keep])
        indices[s] = torch.cat(cols).to(torch.int16)
    values = torch.randn(rows, layout.k, generator=g).to(torch.bfloat16)
    return indices, values


@pytest.mark.parametrize("numel, block", [(1000, 300), (5000, 5000), (20000, 4096)])
def test_the_kernel_equals_the_reference(interpret, numel, block):
    layout = TopKLayout(numel, block, 0.02)
    indices, values = _window(layout, 6)
    ages = torch.tensor([2, 1, 0, 5, 4, 3])  # a wrapped ring: slot 2 is the newest
    coef1, coef2 = (0.9**ages).float(), (0.999**ages).float()
    coef1[4] = coef2[4] = 0.0  # an unfilled row
    t = 6
    c1, c2 = (1 - 0.9) / (1 - 0.9**t), (1 - 0.999) / (1 - 0.999**t)
    ref = reference(indices, values, coef1, coef2, layout, c1, c2, 1e-8)
    ours = triton_impl(indices, values, coef1, coef2, layout, c1, c2, 1e-8)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0)
    assert (ref != 0).sum() <= 5 * layout.k  # only the filled rows' coordinates move


def test_the_reference_is_adam_on_the_sparse_gradients():
    layout = TopKLayout(100, 100, 0.1)
    indices, values = _window(layout, 3, seed=1)
    dense = torch.zeros(3, 100)
    for s in range(3):
        dense[s, indices[s].long()] = values[s].float()
    # slot s was written at step s + 1; at step 3 its age is 2 - s
    m = sum(0.9 ** (2 - s) * dense[s] for s in range(3))
    v = sum(0.999 ** (2 - s) * dense[s] ** 2 for s in range(3))
    c1, c2 = 0.1 / (1 - 0.9**3), 0.001 / (1 - 0.999**3)
    want = c1 * m / (torch.sqrt(c2 * v) + 1e-8)
    ages = torch.tensor([2, 1, 0])
    got = microadam_update(
        indices, values, (0.9**ages).float(), (0.999**ages).float(), layout, c1, c2, 1e-8
    )
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_the_layout_counts_a_shorter_last_block():
    layout = TopKLayout(10**6, 16384, 0.01)
    assert layout.blocks == 62 and layout.last_size == 10**6 - 61 * 16384
    assert layout.k == 61 * math.ceil(163.84) + math.ceil(5.76)
    with pytest.raises(ValueError, match="int16"):
        TopKLayout(10, 2**15 + 1, 0.1)
