"""MicroAdam against a hand-written dense version of the paper's algorithm, its exact state
bytes, and its error feedback."""

import io
import math

import pytest
import torch

from llm_pretrain import optim as optimizers
from llmpt.kernels.quant_blockwise import QuantizedTensor, dequantize, quantize
from llmpt.optimizers.microadam import MicroAdam, state_bytes
from tests.conftest import compose_cfg


def dense_microadam(w, grads, lr, betas, eps, m, density, block, q, wd=0.0, alpha=0.0):
    """The algorithm written out on dense vectors: the window as a list of sparse gradients."""
    w = w.clone().reshape(-1)
    d = w.numel()
    b1, b2 = betas
    error = torch.zeros(d)
    window = []  # (step, dense vector with the kept values, zero elsewhere)
    for t, g in enumerate(grads, start=1):
        a = g.reshape(-1).float() + error
        kept = torch.zeros(d)
        for start in range(0, d, block):
            part = a[start : start + block]
            k = math.ceil(density * part.numel())  # a shorter last block keeps fewer
            idx = torch.topk(part.abs(), k).indices + start
            kept[idx] = a[idx].to(torch.bfloat16).float()
        window = (window + [(t, kept)])[-m:]
        residual = a - kept
        e = quantize(residual, 4, q, scale_dtype=torch.bfloat16)
        error = dequantize(e, torch.float32)
        big_m = sum(b1 ** (t - s) * v for s, v in window)
        big_s = sum(b2 ** (t - s) * v * v for s, v in window)
        c1, c2 = (1 - b1) / (1 - b1**t), (1 - b2) / (1 - b2**t)
        u = c1 * big_m / (torch.sqrt(c2 * big_s) + eps)
        if alpha:
            u = u + alpha * error
            again = quantize((1 - alpha) * error, 4, q, scale_dtype=torch.bfloat16)
            error = dequantize(again, torch.float32)
        w = w * (1 - lr * wd) - lr * u
    return w


def _grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + i % 3) for i in range(steps)]


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_microadam_is_the_papers_algorithm(alpha, wd):
    """15 steps with a window of 4 (it wraps three times), 4 Top-K blocks (the last shorter)."""
    shape, steps = (9, 20), 15
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    grads = _grads(shape, steps)
    p = torch.nn.Parameter(w0.clone())
    opt = MicroAdam(
        [p], lr=0.01, window=4, density=0.1, block_size=50, quant_group_size=32, alpha=alpha,
        weight_decay=wd,
    )  # fmt: skip
    for g in grads:
        p.grad = g.clone()
        opt.step()
    want = dense_microadam(w0, grads, 0.01, (0.9, 0.999), 1e-8, 4, 0.1, 50, 32, wd, alpha)
    assert torch.allclose(p.detach().reshape(-1), want, atol=1e-6, rtol=0)
    assert opt.state[p]["window_indices"].shape == (4, 3 * 5 + 3)  # 3 blocks of 50, one of 30


def test_the_cuda_path_takes_the_reference_paths_steps(triton_dispatch):
    """MicroAdam with its Triton kernels (window -> update, 4-bit error codes), run by Triton's
    interpreter on CPU, equals the PyTorch reference path step for step."""
    shape = (9, 20)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    out = {}
    for mode in ("triton", "reference"):
        if mode == "reference":
            triton_dispatch.undo()
        p = torch.nn.Parameter(w0.clone())
        opt = MicroAdam([p], lr=0.01, window=4, density=0.1, block_size=50, quant_group_size=32)
        for g in _grads(shape, 6):
            p.grad = g.clone()
            opt.step()
        out[mode] = (p.detach().clone(), opt.state[p]["error_codes"].clone())
    assert torch.allclose(out["triton"][0], out["reference"][0], atol=1e-6, rtol=0)
    assert torch.equal(out["triton"][1], out["reference"][1])


def test_the_gradient_is_left_untouched_and_the_error_is_what_the_window_left_out():
    p = torch.nn.Parameter(torch.zeros(400))
    g = torch.randn(400)
    p.grad = g.clone()
    opt = MicroAdam([p], lr=1e-3, density=0.05, block_size=100, quant_group_size=50)
    opt.step()
    assert torch.equal(p.grad, g)
    state = opt.state[p]
    e = QuantizedTensor(
        state["error_codes"], state["error_scale"], state["error_zero"], (400,), 4, 50
    )
    kept = torch.zeros(400)
    starts = torch.arange(20) // 5 * 100
    where = state["window_indices"][0].long() + starts
    kept[where] = state["window_values"][0].float()
    for b in range(4):  # each block kept its 5 largest |g|
        top = torch.topk(g[b * 100 : (b + 1) * 100].abs(), 5).indices + b * 100
        assert set(top.tolist()) == set(where[b * 5 : (b + 1) * 5].tolist())
    residual = g - kept
    spread = residual.view(8, 50).amax(1) - residual.view(8, 50).amin(1)
    err = (dequantize(e, torch.float32) - residual).view(8, 50).abs().amax(1)
    # 4-bit round to nearest: half a step, plus the bf16 rounding of the stored scale and zero
    assert (err <= spread / 15 * 0.55).all()


def test_state_bytes_are_the_closed_form_of_about_0_9_per_parameter():
    """0.5 + 4 m k / d + 4 / q bytes per value, counted on the real tensors."""
    p = torch.nn.Parameter(torch.zeros(1000, 1000))
    opt = MicroAdam([p], lr=1e-3)
    p.grad = torch.randn(1000, 1000)
    opt.step()
    real = sum(t.nbytes for t in opt.state[p].values() if isinstance(t, torch.Tensor))
    d, m, q = 10**6, 10, 100_000
    k = 61 * math.ceil(0.01 * 16384) + math.ceil(0.01 * (d - 61 * 16384))
    assert real == d // 2 + 4 * m * k + 4 * math.ceil(d / q) == 900_440
    assert real / d == pytest.approx(0.5 + 4 * m * k / d + 4 / q)
    cfg = compose_cfg(["optimizer=microadam"]).optimizer
    assert (
        sum(
            state_bytes(
                (1000, 1000), cfg.window, cfg.density, cfg.block_size, cfg.quant_group_size
            ).values()
        )
        == real
    )
    assert optimizers.state_nbytes(opt) == {
        "moments": 2 * m * k,
        "projector": 0,
        "quantization": 40,
        "error": d // 2,
        "indices": 2 * m * k,
        "other": 0,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runs_in_fp32_and_bf16_and_its_checkpoint_moves_between_settings_only_if_equal(dtype):
    p = torch.nn.Parameter(torch.randn(64, 48).to(dtype))
    opt = MicroAdam([p], lr=1e-2, density=0.05, block_size=1024, quant_group_size=256)
    for g in _grads((64, 48), 3):
        p.grad = g.to(dtype)
        opt.step()
    assert opt.state[p]["window_values"].dtype == torch.bfloat16
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    same = MicroAdam([torch.nn.Parameter(p.detach().clone())], lr=1e-2, density=0.05,
                     block_size=1024, quant_group_size=256)  # fmt: skip
    same.load_state_dict(saved)
    other = MicroAdam([torch.nn.Parameter(p.detach().clone())], lr=1e-2, density=0.05,
                      block_size=1536, quant_group_size=256)  # fmt: skip
    with pytest.raises(ValueError, match="resume with the settings it was written with"):
        other.load_state_dict(saved)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": 0}, "window=0 must be at least 1"),
        ({"density": 0.0}, r"density=0.0 must lie in \(0, 1\]"),
        ({"density": 1.5}, r"density=1.5 must lie in \(0, 1\]"),
        ({"block_size": 40000}, r"Top-K block size 40000 must lie in \[1, 32768\]"),
        ({"alpha": 1.0}, r"alpha=1.0 must lie in \[0, 1\)"),
        ({"quant_group_size": 0}, "quant_group_size=0 must be positive"),
    ],
)
def test_bad_settings_are_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MicroAdam([torch.nn.Parameter(torch.zeros(4))], lr=1e-3, **kwargs)
