"""FRUGAL's state-free complement (Zmushko et al. 2025, Alg. 1): the part of the gradient outside
the state-full subspace, G - P P^T G (or the unselected coordinates), takes a step that keeps no
state: signSGD (``rule="sign"``, the paper's default), plain SGD (``rule="sgd"``) or nothing
(``rule="none"``: pure GaLore or BAdam inside FRUGAL's code), at
``lr x lr_scale`` (FRUGAL's ``inactive_lr_scale``) and without Adam's bias correction.
"""

from __future__ import annotations

import torch

RULES = ("sign", "sgd", "none")


class StateFreeResidual:
    def __init__(self, rule: str = "sign", lr_scale: float = 1.0) -> None:
        if rule not in RULES:
            raise ValueError(f"inactive_rule={rule!r}: use sign, sgd or none")
        if lr_scale < 0:
            raise ValueError(f"inactive_lr_scale={lr_scale} must be >= 0")
        self.rule, self.lr_scale = rule, lr_scale

    def step(self, p: torch.Tensor, grad: torch.Tensor, lr: float, scratch: bool = False) -> None:
        """p -= lr * lr_scale * rule(grad), for a gradient (or residual) with no state; ``none``
        leaves p as it is (FRUGAL's inactive_update_rule=no). ``scratch``: ``grad`` is a
        temporary that may be overwritten (saves a full-size buffer)."""
        if self.rule == "none":
            return
        if self.rule == "sign":
            grad = grad.sign_() if scratch else grad.sign()
        p.add_(grad, alpha=-lr * self.lr_scale)

    def apply(self, p, state, grad, low, direction, projector, scale, step_size, lr) -> None:
        """Adam's step in the subspace, then the state-free step on the complement, built in
        one buffer: G, minus the back-projected R accumulated into it by one GEMM."""
        projector.add_back(state, p, direction, step_size * scale)
        residual = grad.clone()
        projector.add_back(state, residual, low, -1.0)
        self.step(p, residual, lr, scratch=True)

    @staticmethod
    def extra_memory(dtype: torch.dtype) -> dict[str, int]:
        return {}
