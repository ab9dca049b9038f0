"""Adam in whatever space it is handed (GaLore Alg. 1, lines 8-12).

``eps="hf"`` (HF ``AdamW`` form, as GaLoreAdamW and FiraAdamW): eps is added to sqrt(v) before
bias correction and the step size carries the whole correction. ``eps="torch"`` (torch's AdamW,
FRUGAL): eps is added to sqrt(v / (1 - beta2^t)), and the step size carries 1 / (1 - beta1^t).
"""

from __future__ import annotations

import math

import torch


def check_adam_settings(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> tuple[float, float]:
    """Refuse Adam hyperparameters no step can use; return the betas."""
    if lr <= 0:
        raise ValueError(f"lr={lr} must be positive")
    b1, b2 = betas
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"betas={list(betas)} must lie in [0, 1)")
    if eps <= 0:
        raise ValueError(f"eps={eps} must be positive")
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay} must be >= 0")
    return b1, b2


class AdamRule:
    """Adam's moments and direction. ``betas`` and ``eps`` are read from the parameter's group at
    every step (torch.optim's semantics: a group's own values, or a scheduler's changes, are
    honoured); the rule itself only fixes where eps goes."""

    state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, eps_placement: str = "hf") -> None:
        if eps_placement not in ("hf", "torch"):
            raise ValueError(f"eps placement {eps_placement!r}: use hf or torch")
        self.torch_eps = eps_placement == "torch"

    @staticmethod
    def check_group(group: dict) -> None:
        check_adam_settings(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    def direction(
        self, state: dict, grad: torch.Tensor, step: int, group: dict
    ) -> tuple[torch.Tensor, float]:
        """Update the moments with ``grad`` at (1-based) ``step``; return M / (sqrt(V) + eps)
        and the bias-correction factor that multiplies the learning rate."""
        (beta1, beta2), eps = group["betas"], group["eps"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        if self.torch_eps:
            denom = v.sqrt().div_(math.sqrt(1.0 - beta2**step)).add_(eps)
            return m / denom, 1.0 / (1.0 - beta1**step)
        correction = math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        return m / (v.sqrt().add_(eps)), correction

    def directions(
        self, states: list[dict], grads: list[torch.Tensor], steps: list[int], group: dict
    ) -> tuple[list[torch.Tensor], list[float]]:
        """``direction`` for many tensors of one group at once with multi-tensor (foreach)
        operations: the same arithmetic, element for element, without one Python dispatch per
        tensor and op."""
        (beta1, beta2), eps = group["betas"], group["eps"]
        for state, grad in zip(states, grads, strict=True):
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
        ms = [state["exp_avg"] for state in states]
        vs = [state["exp_avg_sq"] for state in states]
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1.0 - beta2)
        denom = torch._foreach_sqrt(vs)
        if self.torch_eps:
            torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**t) for t in steps])
            torch._foreach_add_(denom, eps)
            return torch._foreach_div(ms, denom), [1.0 / (1.0 - beta1**t) for t in steps]
        torch._foreach_add_(denom, eps)
        corrections = [math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t) for t in steps]
        return torch._foreach_div(ms, denom), corrections

    @staticmethod
    def first_moment(state: dict) -> torch.Tensor | None:
        return state.get("exp_avg")

    @staticmethod
    def memory(shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, int]:
        """M and V in the dtype of the tensor they follow."""
        return {"moments": 2 * math.prod(shape) * torch.empty((), dtype=dtype).element_size()}
