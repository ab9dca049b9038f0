"""One of our optimizers in a plain PyTorch loop: any ``nn.Module``, a torch LR scheduler, no
Hydra and nothing else from the training app.

    python examples/plain_torch.py

GaLore projects the weights of the linears whose name contains "mlp" (``param_groups``) at
rank 8; the first linear's group takes its own rank (4), every other tensor (biases, the head)
plain Adam. Prints the loss before and after 20 steps.
"""

from __future__ import annotations

import torch
from torch import nn

from llmpt.optimizers.api import GaLore, param_groups


class Regressor(nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.mlp(x)).squeeze(-1)


def data(seed: int = 0, n: int = 256, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    return x, torch.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]


def build(seed: int = 0):
    """The model, its optimizer and scheduler, the same every call for one seed."""
    torch.manual_seed(seed)
    model = Regressor()
    groups = param_groups(model, ["mlp"])
    first = model.mlp[0].weight
    projected = groups[0]["params"]
    groups = [  # the first linear at rank 4: per-group projection settings
        {"params": [(n, p) for n, p in projected if p is first], "projected": True, "rank": 4},
        {"params": [(n, p) for n, p in projected if p is not first], "projected": True},
        groups[1],
    ]
    optimizer = GaLore(groups, lr=3e-2, rank=8, update_gap=10, scale=1.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
    return model, optimizer, scheduler


def main(steps: int = 20, seed: int = 0) -> tuple[nn.Module, list[float]]:
    model, optimizer, scheduler = build(seed)
    x, y = data(seed)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, losses


if __name__ == "__main__":
    _, losses = main()
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} after {len(losses)} GaLore steps")
