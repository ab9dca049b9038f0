"""LDAdam against the paper's update written out in float64, and its error buffer's behaviour."""

import pytest
import torch

from llm_pretrain import optim as optimizers
from llmpt.optimizers.ldadam import LDAdam
from tests.conftest import compose_cfg, toy_llama


def spec_ldadam(w, grads, lr, rank, betas=(0.908, 0.99), rho=0.908, eps=1e-8, method="power"):
    """Section 1(b) of the spec, line by line, in float64 (left projection of the shorter side)."""
    transpose = w.shape[0] > w.shape[1]
    w = (w.T if transpose else w).double().clone()
    b1, b2 = betas
    rows, cols = w.shape
    e = torch.zeros(rows, cols, dtype=torch.float64)
    p_old = torch.zeros(rows, rank, dtype=torch.float64)
    m = torch.zeros(rank, cols, dtype=torch.float64)
    v = torch.zeros(rank, cols, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        a = (g.T if transpose else g).double() + e
        k = t - 1
        if t == 1:
            p = torch.linalg.svd(a, full_matrices=False).U[:, :rank]
        else:
            b = rho * (p_old @ m) / (1 - b1**k) + (1 - rho) * a
            if method == "svd":
                p = torch.linalg.svd(b, full_matrices=False).U[:, :rank]
            else:
                p = torch.linalg.qr(b @ (b.T @ p_old)).Q
        gt = p.T @ a
        e_new = a - p @ gt
        c = p.T @ p_old if t > 1 else torch.zeros(rank, rank, dtype=torch.float64)
        m_new = c @ m
        if t > 1:
            e_new = e_new + b1 / (1 - b1) * (p_old @ m - p @ m_new)
            bc1, bc2 = 1 - b1**k, 1 - b2**k
            s = v / bc2 - (m / bc1) ** 2
            v_new = bc2 * ((c * c) @ s + (m_new / bc1) ** 2).abs()
        else:
            v_new = torch.zeros_like(v)
        m = b1 * m_new + (1 - b1) * gt
        v = b2 * v_new + (1 - b2) * gt**2
        d = p @ ((m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps))
        w = w - lr * d
        p_old, e = p, e_new
    return w.T if transpose else w


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
@pytest.mark.parametrize("method", ["power_iteration", "svd"])
def test_ldadam_is_the_papers_update(shape, method):
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    base = torch.randn(shape)
    grads = [base + 0.5 * torch.randn(shape) for _ in range(6)]
    p = torch.nn.Parameter(w0.clone())
    opt = LDAdam([{"params": [p], "projected": True}], lr=0.01, rank=4, proj_method=method)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    want = spec_ldadam(w0, grads, 0.01, 4, method="svd" if method == "svd" else "power")
    assert torch.allclose(p.detach().double(), want, atol=2e-5, rtol=0)
    assert opt.state[p]["side"] == ("left" if shape[0] <= shape[1] else "right")


def test_the_error_buffer_survives_zero_grad_and_clipping_and_holds_what_projection_lost():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(16, 24))
    opt = LDAdam([{"params": [p], "projected": True}], lr=0.01, rank=3)
    g = torch.randn(16, 24)
    p.grad = g.clone()
    opt.step()
    state = opt.state[p]
    basis, error = state["basis"], state["error_feedback"].clone()
    # step 1: A = G, and G = P P^T G + E exactly (up to fp32)
    assert torch.allclose(basis @ (basis.T @ g) + error, g, atol=1e-5)
    opt.zero_grad(set_to_none=True)
    assert torch.equal(state["error_feedback"], error)
    p.grad = torch.randn(16, 24) * 100
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    assert torch.equal(state["error_feedback"], error)  # clipping sees only the gradient
    assert p.grad.norm() <= 1.0 + 1e-5


def test_the_error_buffer_dtype_is_a_setting_and_is_counted():
    model_cfg = compose_cfg(["optimizer=ldadam"]).optimizer

    for error_dtype, size in (("param", 2), ("float32", 4)):
        model = toy_llama(layers=1).to(torch.bfloat16)
        cfg = model_cfg.copy()
        cfg.rank, cfg.error_dtype = 4, error_dtype
        opt = optimizers.build(cfg, model)
        loss = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
        loss.backward()
        opt.step()
        targeted = [p for p, s in opt.state.items() if "side" in s]
        assert opt.state[targeted[0]]["error_feedback"].dtype == (
            torch.bfloat16 if size == 2 else torch.float32
        )
        assert optimizers.state_nbytes(opt)["error"] == size * sum(p.numel() for p in targeted)
        assert "error feedback in" in opt.projection_report()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "rank=0 must be a positive integer"),
        ({"rank": 9}, r"rank=9 exceeds min\(shape\)=8"),
        ({"rho": 1.5}, r"rho=1.5 must lie in \[0, 1\]"),
        ({"proj_method": "qr"}, "proj_method='qr'"),
        ({"error_dtype": "fp8"}, "error_dtype='fp8'"),
    ],
)
def test_bad_settings_are_explained(kwargs, match):
    p = torch.nn.Parameter(torch.zeros(8, 12))
    with pytest.raises(ValueError, match=match):
        LDAdam([{"params": [p], "projected": True}], lr=1e-3, **{"rank": 4, **kwargs})
