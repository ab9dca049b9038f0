"""Muon's update as a rule (Jordan et al. 2024; GUM, Pan et al. 2025): heavy-ball momentum of
the (projected) gradient, orthogonalised by five quintic Newton-Schulz iterations in bf16.

GUM writes the momentum as R <- beta R + g (not torch.optim.Muon's lerp) and steps
W <- W - lr * NS(R); the learning rate is scaled to the full matrix's shape as torch.optim.Muon
does (``original``: sqrt(max(1, rows / cols)); ``match_rms_adamw``: 0.2 sqrt(max(rows, cols))).
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def newton_schulz(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximate polar factor U V^T of ``x`` (singular values pushed into about [0.5, 1.5]),
    computed in bf16 as Muon does: the iteration tolerates the rounding."""
    a, b, c = NS_COEFFICIENTS
    y = x.bfloat16()
    tall = y.shape[0] > y.shape[1]
    if tall:
        y = y.T
    y = y / (y.norm() + NS_EPS)
    for _ in range(steps):
        gram = y @ y.T
        y = a * y + (b * gram + c * gram @ gram) @ y
    if tall:
        y = y.T
    return y.to(x.dtype)


class MuonRule:
    state_keys = ("momentum_buffer",)

    def __init__(self, momentum: float = 0.95, ns_steps: int = 5, adjust_lr: str = "original"):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"optimizer.momentum={momentum} must lie in [0, 1)")
        if ns_steps <= 0:
            raise ValueError(f"optimizer.ns_steps={ns_steps} must be positive")
        if adjust_lr not in ("original", "match_rms_adamw"):
            raise ValueError(
                f"optimizer.adjust_lr_fn={adjust_lr!r}: use original or match_rms_adamw"
            )
        self.momentum, self.ns_steps, self.adjust_lr = momentum, ns_steps, adjust_lr

    def lr_factor(self, shape: tuple[int, int]) -> float:
        rows, cols = shape
        if self.adjust_lr == "original":
            return math.sqrt(max(1.0, rows / cols))
        return 0.2 * math.sqrt(max(rows, cols))

    def direction(
        self, state: dict, grad: torch.Tensor, step: int, weight: float = 1.0
    ) -> tuple[torch.Tensor, float]:
        """R <- momentum R + weight * grad; returns NS(R) and 1 (no bias correction)."""
        buf = state.get("momentum_buffer")
        if buf is None or buf.shape != grad.shape:  # new, or the branch changed shape
            buf = state["momentum_buffer"] = torch.zeros_like(grad)
        buf.mul_(self.momentum).add_(grad, alpha=weight)
        return newton_schulz(buf, self.ns_steps), 1.0

    @staticmethod
    def memory(shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, int]:
        """One momentum buffer in the dtype of the tensor it follows."""
        return {"moments": math.prod(shape) * torch.empty((), dtype=dtype).element_size()}
