import torch
from torch import nn

from llm_pretrain import optim as optimizers
from llm_pretrain.config import ModelConfig, optimizer_settings
from llm_pretrain.memory import SavedTensorCounter, activation_bytes, grad_bytes, weight_bytes
from llm_pretrain.model import build_model


def test_saved_tensor_counter_counts_activations_not_parameters():
    lin = nn.Linear(8, 16)
    x = torch.randn(5, 8)
    with SavedTensorCounter(lin) as counter:
        y = torch.relu(lin(x))
    # linear keeps its input (the weight is a parameter, not an activation); relu its output
    assert counter.bytes == x.nbytes + y.nbytes


def test_model_memory_categories():
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            name="t", hidden_size=32, intermediate_size=48, num_heads=2, num_layers=2, vocab_size=64
        )
    )
    n = model.num_params()
    x = torch.randint(0, 64, (2, 16))
    act = activation_bytes(model, x, x)
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no trace
    assert act > x.numel() * 32 * 4 * 2  # at least a few (B, T, C) fp32 tensors per layer
    opt = optimizers.build(optimizer_settings("adamw"), model)
    model(x, x).backward()
    opt.step()
    assert weight_bytes(model) == grad_bytes(model) == 4 * n
    n_tensors = len(list(model.parameters()))
    by_category = {k: v for k, v in optimizers.state_nbytes(opt).items() if v}
    assert by_category == {"moments": 8 * n, "other": 4 * n_tensors}
