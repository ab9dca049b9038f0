"""GradNormLoRP (optimizers/weight_norm.py + ``GradNormLoRP`` in optimizers/low_rank.py): the
reparametrization's gradients against autograd, the same function before and after wrapping
and folding, and the optimizer against GaLore on torch's own weight_norm parametrization."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from llmpt.optimizers.api import (
    GaLore,
    GradNormLoRP,
    GradNormLoRP8bit,
    param_groups,
    weight_norm_unwrap,
    weight_norm_wrap,
)
from llmpt.optimizers.weight_norm import WeightNormLinear, WeightNormLinearFunction
from tests.conftest import toy_llama

BATCH = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bias", [False, True])
def test_the_gradients_equal_autograd_through_the_formula(bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    m = torch.rand(6, dtype=torch.float64, generator=g).add(0.5).requires_grad_()
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    dy = torch.randn(3, 5, 6, dtype=torch.float64, generator=g)
    ours = WeightNormLinearFunction.apply(x, v, m, b)
    want = F.linear(x, m[:, None] * v / v.norm(dim=1, keepdim=True), b)
    assert torch.allclose(ours, want, rtol=0, atol=1e-12)
    inputs = [x, v, m] + ([b] if bias else [])
    got = torch.autograd.grad(ours, inputs, dy)
    ref = torch.autograd.grad(want, inputs, dy)
    for a, r in zip(got, ref, strict=True):
        assert torch.allclose(a, r, rtol=0, atol=1e-12)
    # the direction's gradient has no radial part: <dL/dV_i, V_i> = 0
    assert (got[1] * v).sum(1).abs().max() < 1e-12


def test_wrapping_and_folding_keep_the_function_and_the_names():
    model = toy_llama(seed=0)
    before = model(BATCH)
    names = dict(model.named_parameters()).keys()
    linears = weight_norm_wrap(model, ["attn", "mlp"])
    assert len(linears) == 14 and all(isinstance(m, WeightNormLinear) for m in linears)
    wrapped = dict(model.named_parameters())
    assert set(names) <= set(wrapped)  # weight (V) keeps its key; magnitude is new
    assert {n for n in wrapped if n not in names} == {
        n.replace(".weight", ".magnitude") for n in names if "proj" in n
    }
    assert torch.allclose(model(BATCH), before, atol=1e-6)
    opt = GradNormLoRP(param_groups(model), linears, rank=4, update_gap=2, lr=1e-2)
    for _ in range(3):
        model(BATCH, BATCH).backward()
        opt.step()
        opt.zero_grad()
    trained = model(BATCH)
    weight_norm_unwrap(model)
    assert not any(isinstance(m, WeightNormLinear) for m in model.modules())
    assert set(dict(model.named_parameters())) == set(names)
    assert torch.allclose(model(BATCH), trained, atol=1e-5)


def test_it_is_galore_on_torchs_weight_norm_parametrization():
    """The reference: torch.nn.utils.parametrizations.weight_norm (dim=0: one g per output row),
    GaLore projecting the direction (``original1``) and Adam on g (``original0``)."""
    ours, ref = toy_llama(seed=0), toy_llama(seed=0)
    linears = weight_norm_wrap(ours, ["attn", "mlp"])
    for _, m in [(n, m) for n, m in ref.named_modules() if "proj" in n]:
        parametrizations.weight_norm(m, dim=0)
    settings = dict(lr=1e-2, rank=4, update_gap=2, scale=0.25)
    opt = GradNormLoRP(param_groups(ours), linears, **settings)
    directions = [p for n, p in ref.named_parameters() if n.endswith("original1")]
    others = [p for n, p in ref.named_parameters() if not n.endswith("original1")]
    opt_ref = GaLore([{"params": directions, "projected": True}, {"params": others}], **settings)
    for model, o in ((ours, opt), (ref, opt_ref)):
        for _ in range(5):
            model(BATCH, BATCH).backward()
            o.step()
            o.zero_grad()
    for lin, (name, m) in zip(
        linears, [(n, m) for n, m in ref.named_modules() if n.endswith("proj")], strict=True
    ):
        assert torch.allclose(lin.folded().weight, m.weight, atol=1e-5), name
    assert torch.allclose(ours(BATCH), ref(BATCH), atol=1e-4)


def test_the_optimizer_refuses_a_model_that_was_not_wrapped():
    model = toy_llama(seed=0)
    with pytest.raises(ValueError, match="linears is empty"):
        GradNormLoRP(param_groups(model), [], rank=4)
    other = toy_llama(seed=1)
    linears = weight_norm_wrap(other, ["attn"])
    with pytest.raises(ValueError, match="is projected but is not the direction"):
        GradNormLoRP8bit(param_groups(model), linears, rank=4)
    wrapped = toy_llama(seed=0)
    linears = weight_norm_wrap(wrapped, ["attn", "mlp"])
    plain = [
        (n, p) for n, p in wrapped.named_parameters() if "magnitude" not in n and "proj" not in n
    ]
    groups = [param_groups(wrapped)[0], {"params": plain}]
    with pytest.raises(ValueError, match="magnitude is not in the optimizer"):
        GradNormLoRP(groups, linears, rank=4)
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        weight_norm_wrap(nn.Sequential(nn.ReLU()), ["attn"])
