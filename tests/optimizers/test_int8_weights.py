"""Q-GaLore's real INT8 weights (``optimizer.weight_storage=int8``): the linear, exact equality
with the simulated weights, one byte per weight, checkpoints, per-layer updates, refusals."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm_pretrain import optim as optimizers
from llm_pretrain.memory import weight_bytes
from llmpt.kernels.quant_blockwise import dequantize, quantize
from llmpt.optimizers.int8_linear import Int8Linear, unwrap_int8
from tests.conftest import compose_cfg, toy_llama
from tests.optimizers.test_contract import BATCH, check_exact_resume, train_steps

GROUP = 256


def q_galore_cfg(*overrides):
    cfg = compose_cfg(["optimizer=q_galore", *overrides]).optimizer
    cfg.rank, cfg.update_gap, cfg.min_8bit_size = 8, 2, 300
    return cfg


def test_the_linear_is_the_dequantized_linear_forward_and_backward():
    torch.manual_seed(0)
    plain = nn.Linear(40, 24)
    with torch.no_grad():  # onto the INT8 grid, as wrapping puts it
        plain.weight.copy_(dequantize(quantize(plain.weight, 8, GROUP), torch.float32))
    int8 = Int8Linear(plain, GROUP)
    # requantizing grid values is exact up to rounding of the recomputed scales
    assert torch.allclose(int8.dequantized(), plain.weight.detach(), atol=1e-7, rtol=0)
    assert int8.weight.untyped_storage().nbytes() == 4  # the placeholder: one value
    x = torch.randn(3, 5, 40, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, ref = int8(x), F.linear(x_ref, plain.weight, plain.bias)
    assert torch.allclose(y, ref, atol=1e-6)
    dy = torch.randn(y.shape)
    y.backward(dy)
    ref.backward(dy)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert torch.allclose(int8.weight.grad, plain.weight.grad, atol=1e-5)
    assert int8.weight.grad.shape == (24, 40)


@pytest.mark.parametrize("stochastic", [True, False])
def test_stored_int8_steps_exactly_as_the_simulated_weights(stochastic):
    """From the same grid values and gradients, the codes dequantize to the simulated weights
    bit for bit across refreshes: the step is the same arithmetic on a dequantized temporary."""
    overrides = [f"optimizer.stochastic_round={stochastic}"]
    stored, simulated = toy_llama(), toy_llama()
    opt_stored = optimizers.build(q_galore_cfg("optimizer.weight_storage=int8", *overrides), stored)
    int8 = {n: m for n, m in stored.named_modules() if isinstance(m, Int8Linear)}
    with torch.no_grad():
        for name, module in int8.items():
            simulated.get_submodule(name).weight.copy_(module.dequantized())
    opt_simulated = optimizers.build(q_galore_cfg(*overrides), simulated)
    pairs = list(zip(stored.parameters(), simulated.parameters(), strict=True))
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):  # crosses two refreshes (update_gap 2)
        for a, b in pairs:
            a.grad = torch.randn(b.shape, generator=gen) * 0.1
            b.grad = a.grad.clone()
        opt_stored.step()
        opt_simulated.step()
    for name, module in int8.items():
        assert torch.equal(module.dequantized(), simulated.get_submodule(name).weight)
    for a, b in pairs:
        if a.untyped_storage().nbytes() > 4:  # not a placeholder
            assert torch.equal(a, b)


def test_stored_int8_trains_the_model():
    model = toy_llama()
    losses = train_steps(
        model, optimizers.build(q_galore_cfg("optimizer.weight_storage=int8"), model), 20
    )
    assert losses[-1] < 0.8 * losses[0]


def test_weights_take_one_byte_plus_the_group_scales():
    plain = toy_llama()
    model = toy_llama()
    optimizers.build(q_galore_cfg("optimizer.weight_storage=int8"), model)
    targeted = [
        m.weight for n, m in plain.named_modules() if isinstance(m, nn.Linear) and "layers" in n
    ]
    n = sum(w.numel() for w in targeted)
    groups = sum(-(-w.numel() // GROUP) for w in targeted)
    saved = 4 * n - (n + 2 * 4 * groups + 4 * len(targeted))  # codes, scale + zero, placeholder
    assert weight_bytes(plain) - weight_bytes(model) == saved


def test_checkpoints_resume_exactly():
    check_exact_resume(q_galore_cfg("optimizer.weight_storage=int8"))


def test_per_layer_updates_give_the_same_weights():
    """The parameter hook path (``update_parameter``, what trainer.per_layer_update runs) on the
    placeholders steps the codes as the normal path does."""
    cfg = q_galore_cfg("optimizer.weight_storage=int8")
    normal, hooked = toy_llama(), toy_llama()
    train_steps(normal, optimizers.build(cfg, normal), 3)
    opt = optimizers.build(cfg, hooked)
    for _ in range(3):
        hooked(BATCH, BATCH).backward()
        for p in hooked.parameters():
            opt.update_parameter(p)
            p.grad = None
        opt.step()
    assert all(
        torch.equal(a, b)
        for a, b in zip(normal.state_dict().values(), hooked.state_dict().values(), strict=True)
    )


def test_the_memory_formula_leaves_the_model_alone_and_unwrap_restores_linears():
    model = toy_llama()
    cfg = q_galore_cfg("optimizer.weight_storage=int8")
    optimizers.memory_formula("q_galore", model, cfg, steps=1)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    optimizers.build(cfg, model)
    weights = {n: m.dequantized() for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert len(weights) == 14
    unwrap_int8(model)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    for name, w in weights.items():
        assert torch.equal(model.get_submodule(name).weight, w)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["optimizer.weight_storage=fp4"], r"weight_storage='fp4': use one of"),
        (
            ["optimizer.weight_storage=int8", "optimizer.weight_quant=false"],
            r"weight_quant=false turns off: drop one of the two",
        ),
    ],
)
def test_bad_settings_are_explained(overrides, match):
    with pytest.raises(ValueError, match=match):
        optimizers.build(q_galore_cfg(*overrides), toy_llama())


def test_int8_storage_refuses_ddp(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="single-process .*weight_storage=simulated"):
        optimizers.build(q_galore_cfg("optimizer.weight_storage=int8"), toy_llama())
