"""DCT-AdamW's error feedback (``use_ef``): against the reference algorithm written out on dense
tensors, nothing lost over the steps, exact state bytes, resume, and its settings."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from llm_pretrain import optim as optimizers
from llmpt.kernels.quant_blockwise import dequantize, quantize
from llmpt.optimizers.error_feedback import ErrorFeedback
from llmpt.optimizers.projectors.dct import DctProjector
from tests.conftest import compose_cfg, toy_llama
from tests.optimizers.test_contract import check_exact_resume, real_state_bytes, train_steps

RANK, LR, WD, STEPS = 3, 0.01, 0.1, 6
BETAS, EPS = (0.9, 0.999), 1e-8


def dense_dct_adamw_ef(w, grads, basis, bits):
    """Spec projection-family.md 5b with use_ef, a tall matrix (the right-side case): decay,
    A = G + E, the r columns of S = A Q with the largest l1 norms, E = A - g Q_I^T (stored in
    ``bits``, one group per row), Adam with torch-style eps, W -= lr * back(u)."""
    w = w.clone()
    m = v = None
    error = torch.zeros_like(w)
    b1, b2 = BETAS
    for t, g in enumerate(grads, start=1):
        w = w * (1 - LR * WD)
        a = g + error
        s = a @ basis
        idx = torch.topk(s.abs().sum(0), RANK).indices.sort().values  # ours: in column order
        cols = basis[:, idx]
        low = s[:, idx]
        residual = a - low @ cols.T
        if bits:
            q = quantize(residual, bits, w.shape[1], scale_dtype=torch.bfloat16)
            error = dequantize(q, w.dtype)
        else:
            error = residual
        m = low * (1 - b1) if m is None else m * b1 + low * (1 - b1)
        v = low * low * (1 - b2) if v is None else v * b2 + low * low * (1 - b2)
        u = (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + EPS)
        w = w - LR * u @ cols.T
    return w


def dct_cfg(**overrides):
    cfg = compose_cfg(["optimizer=dct_adamw"]).optimizer
    OmegaConf.set_struct(cfg, False)
    cfg.rank, cfg.weight_decay, cfg.use_ef = RANK, WD, True
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


class OneMatrix(torch.nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.mlp = torch.nn.Linear(shape[1], shape[0], bias=False)


@pytest.mark.parametrize("bits", [0, 4, 8])
def test_dct_adamw_with_error_feedback_is_the_reference_algorithm(bits):
    shape = (20, 12)
    model = OneMatrix(shape)
    w0 = model.mlp.weight.detach().clone()
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(shape, generator=gen) for _ in range(STEPS)]
    opt = optimizers.build(dct_cfg(ef_bits=bits, target_modules=["mlp"]), model)
    for g in grads:
        model.mlp.weight.grad = g.clone()
        opt.step()
        assert torch.equal(model.mlp.weight.grad, g)  # the gradient is read, never written
    basis = opt.projector.basis(shape[1], w0)
    want = dense_dct_adamw_ef(w0, grads, basis, bits)
    assert torch.allclose(model.mlp.weight.detach(), want, atol=1e-6, rtol=0)


def test_nothing_is_lost_over_the_steps():
    """Full error feedback telescopes: the back-projected steps plus the last error are the sum
    of the gradients, whatever the columns were."""
    projector = DctProjector(RANK, 1, "std", 1.0, "matmul", 0)
    ef = ErrorFeedback(0)
    state, sent, total = {}, torch.zeros(16, 10), torch.zeros(16, 10)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        g = torch.randn(16, 10, generator=gen)
        total += g
        a = ef.corrected(state, g)
        projector.refresh(state, a) if projector.due(state, step) else None
        low = projector.project(state, a)
        ef.record(state, a, projector, low)
        sent += projector.project_back(state, low)
    assert torch.allclose(sent + state["error_feedback"], total, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [0, 4, 8])
def test_state_bytes_are_exact_and_match_the_formula(bits, dtype):
    cfg = dct_cfg(ef_bits=bits, update_gap=2)
    model = toy_llama().to(dtype)
    opt = optimizers.build(cfg, model)
    train_steps(model, opt, 3)
    reported = optimizers.state_nbytes(opt)
    assert sum(reported.values()) == real_state_bytes(opt)
    formula = optimizers.memory_formula("dct_adamw", model, cfg, steps=3)
    assert {k: v for k, v in formula.items() if v} == {k: v for k, v in reported.items() if v}
    targeted = [p for n, p in model.named_parameters() if "attn" in n or "mlp" in n]
    n = sum(p.numel() for p in targeted)
    if bits == 0:
        assert reported["error"] == n * torch.empty((), dtype=dtype).element_size()
    else:  # codes, plus a bf16 scale and zero point per row
        assert reported["error"] == (
            n if bits == 8 else sum(math.ceil(p.numel() / 2) for p in targeted)
        )
        assert reported["quantization"] == 4 * sum(p.shape[0] for p in targeted)


@pytest.mark.parametrize("bits", [0, 4])
def test_resume_continues_bit_identically(bits):
    check_exact_resume(dct_cfg(ef_bits=bits), before=2, after=3)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"ef_bits": 3}, r"ef_bits=3: use 0 \(the error in full\), 4 or 8"),
        ({"ef_group_size": -1}, r"ef_group_size=-1"),
        ({"use_ef": False, "ef_bits": 4}, r"error feedback, which is off: set optimizer.use_ef"),
    ],
)
def test_bad_settings_are_explained(overrides, match):
    with pytest.raises(ValueError, match=match):
        optimizers.build(dct_cfg(**overrides), toy_llama())


@pytest.mark.parametrize(
    "bits, says",
    [(0, "error feedback in full"), (4, "error feedback in 4 bits (one group per row)")],
)
def test_the_start_up_report_says_how_the_error_is_kept(bits, says):
    assert says in optimizers.build(dct_cfg(ef_bits=bits), toy_llama()).projection_report()
