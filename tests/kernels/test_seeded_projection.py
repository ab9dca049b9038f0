"""The seeded projection: Philox in PyTorch equals Triton's, and the tiled kernel equals x @ P."""

import pytest
import torch

from llmpt.kernels import philox, seeded_projection
from llmpt.kernels.dispatch import triton_kernels


def _triton_draws(seed, offsets):
    n = offsets.numel()
    ints = torch.zeros(n, 4, dtype=torch.int64)
    normal = torch.empty(n)
    triton_kernels("philox").draws[(-(-n // 128),)](ints, normal, offsets, seed, n, BLOCK=128)
    return ints, normal


@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 7])
def test_philox_in_pytorch_is_tritons_bit_for_bit(interpret, seed):
    offsets = torch.cat([torch.arange(300), torch.tensor([2**31 - 1, 2**32 + 5, 2**40 + 3])])
    ints, normal = _triton_draws(seed, offsets)
    ours = torch.stack(philox.philox(seed, offsets), dim=1)
    assert torch.equal(ours, ints)  # the integer stream: exact
    assert torch.allclose(philox.randn(seed, offsets), normal, rtol=1e-6, atol=1e-6)


def test_the_gaussian_is_standard_normal_and_depends_only_on_seed_and_position():
    p = seeded_projection.gaussian(7, (400, 300))
    assert abs(p.mean().item()) < 0.01 and abs(p.std().item() - 1) < 0.01
    tile = seeded_projection.gaussian(7, (400, 300))[100:110]
    assert torch.equal(tile, p[100:110])
    assert not torch.equal(seeded_projection.gaussian(8, (400, 300)), p)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_tiled_kernel_equals_x_times_the_materialised_projection(interpret, transpose, dtype):
    torch.manual_seed(0)
    shape = (40, 70)  # not multiples of the 32-wide tiles
    x = torch.randn(50, shape[1] if transpose else shape[0]).to(dtype)
    ours = seeded_projection.triton_impl(x, 99, shape, 0.125, transpose)
    ref = seeded_projection.reference(x, 99, shape, 0.125, transpose)
    assert ours.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(ours.float(), ref.float(), rtol=tol, atol=tol)


def test_strided_inputs_and_the_dispatch_on_cpu(interpret):
    x = torch.randn(70, 30).T  # a transposed view: strides (1, 30)
    ref = seeded_projection.reference(x, 5, (70, 16))
    assert torch.allclose(seeded_projection.triton_impl(x, 5, (70, 16)), ref, atol=1e-5)
    assert torch.equal(seeded_projection.seeded_matmul(x, 5, (70, 16)), ref)  # CPU: reference


def test_a_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"cannot multiply P of P's shape \(8, 4\)"):
        seeded_projection.seeded_matmul(torch.randn(3, 5), 0, (8, 4))
