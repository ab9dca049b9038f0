"""Fira's norm-based scaling of the residual with a norm-growth limiter (Chen et al. 2024,
Alg. 1 and Eq. 7-9).

The residual S = G - P P^T G is scaled column-wise (along the dimension the projection keeps)
by phi = ||N_col|| / ||R_col||, the ratio by which Adam rescaled the projected gradient, then
limited so that ||S_t|| <= gamma ||S_{t-1}||.

``mode="paper"``: S = phi (G - P P^T G) and the update is scale * (P N + S).
``mode="code"`` (pip ``fira`` 1.0.2): S = phi (G - scale * P P^T G) and the update is
scale * P N + S, so with scale != 1 the residual keeps (1 - scale) of the in-subspace gradient
and is not multiplied by scale. State: ``residual_norm`` (one fp32 scalar; absent before the
first step).
"""

from __future__ import annotations

import torch

from llmpt.optimizers.projectors import LEFT
from llmpt.optimizers.residuals.limiter import LIMITER_EPS, limit_growth


class NormScaledResidual:
    def __init__(self, mode: str = "paper", gamma: float = 1.01) -> None:
        if mode not in ("paper", "code"):
            raise ValueError(f"mode={mode!r}: use paper or code")
        if gamma <= 1.0:
            raise ValueError(f"limiter_gamma={gamma} must exceed 1")
        self.mode, self.gamma = mode, gamma

    def apply(self, p, state, grad, low, direction, projector, scale, step_size, lr) -> None:
        p.add_(self.combine(state, grad, low, direction, projector, scale), alpha=step_size)

    @staticmethod
    def extra_memory(dtype: torch.dtype) -> dict[str, int]:
        """The limiter's previous residual norm: one scalar in the parameter's dtype."""
        return {"other": torch.empty((), dtype=dtype).element_size()}

    def combine(
        self,
        state: dict,
        grad: torch.Tensor,
        low_grad: torch.Tensor,
        low_dir: torch.Tensor,
        projector,
        scale: float,
    ) -> torch.Tensor:
        """The full-size update from the gradient, its projection and Adam's low-rank direction.

        One full-size buffer: the residual is built and limited in place, and the back-projected
        direction is accumulated into it by one GEMM."""
        # Norms along the rank dimension: one ratio per kept row (right side) or column (left).
        dim = 0 if state["side"] == LEFT else 1
        phi = (low_dir.norm(dim=dim) / (low_grad.norm(dim=dim) + LIMITER_EPS)).unsqueeze(dim)
        residual = projector.project_back(state, low_grad)
        # code: G - scale * P P^T G; paper: G - P P^T G
        residual.mul_(-scale if self.mode == "code" else -1.0).add_(grad).mul_(phi)
        divisor = limit_growth(state, "residual_norm", residual.norm(), self.gamma)
        if divisor is not None:
            residual.div_(divisor)
        if self.mode == "paper":  # scale * (P N + S)
            residual.mul_(scale)
        projector.add_back(state, residual, low_dir, scale)  # code: scale * P N + S
        return residual
