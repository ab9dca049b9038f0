"""Adam in whatever space it is handed (GaLore Alg. 1, lines 8-12; HF ``AdamW`` form).

eps is added to sqrt(v) before bias correction and the step size carries the correction,
exactly as GaLoreAdamW and FiraAdamW do (torch's AdamW places eps after the correction).
"""

from __future__ import annotations

import math

import torch


class AdamRule:
    def __init__(self, betas: tuple[float, float], eps: float) -> None:
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"optimizer.betas={list(betas)} must lie in [0, 1)")
        if eps <= 0:
            raise ValueError(f"optimizer.eps={eps} must be positive")
        self.beta1, self.beta2, self.eps = b1, b2, eps

    def direction(self, state: dict, grad: torch.Tensor, step: int) -> tuple[torch.Tensor, float]:
        """Update the moments with ``grad`` at (1-based) ``step``; return M / (sqrt(V) + eps)
        and the bias-correction factor that multiplies the learning rate."""
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(self.beta1).add_(grad, alpha=1.0 - self.beta1)
        v.mul_(self.beta2).addcmul_(grad, grad, value=1.0 - self.beta2)
        correction = math.sqrt(1.0 - self.beta2**step) / (1.0 - self.beta1**step)
        return m / (v.sqrt().add_(self.eps)), correction

    @staticmethod
    def state_numel(shape: tuple[int, ...]) -> int:
        return 2 * math.prod(shape)
