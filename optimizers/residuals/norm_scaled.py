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

from optimizers.projectors import FULL, LEFT

LIMITER_EPS = 1e-8


class NormScaledResidual:
    def __init__(self, mode: str = "paper", gamma: float = 1.01) -> None:
        if mode not in ("paper", "code"):
            raise ValueError(f"optimizer.mode={mode!r}: use paper or code")
        if gamma <= 1.0:
            raise ValueError(f"optimizer.limiter_gamma={gamma} must exceed 1")
        self.mode, self.gamma = mode, gamma

    def combine(
        self,
        state: dict,
        grad: torch.Tensor,
        low_grad: torch.Tensor,
        low_dir: torch.Tensor,
        back,
        scale: float,
    ) -> torch.Tensor:
        """The full-size update from the gradient, its projection, Adam's low-rank direction and
        the back-projection ``back``."""
        if state["side"] == FULL:
            raise ValueError(
                "Fira needs a one-sided projector; optimizer.proj_type=full is not supported"
            )
        # Norms along the rank dimension: one ratio per kept row (right side) or column (left).
        dim = 0 if state["side"] == LEFT else 1
        phi = low_dir.norm(dim=dim) / (low_grad.norm(dim=dim) + LIMITER_EPS)
        phi = phi.unsqueeze(dim)
        in_subspace = back(low_grad)
        if self.mode == "code":
            residual = phi * (grad - scale * in_subspace)
        else:
            residual = phi * (grad - in_subspace)
        norm = residual.norm()
        if "residual_norm" in state:
            limiter = torch.clamp(norm / (state["residual_norm"] + LIMITER_EPS), min=self.gamma)
            limiter = limiter / self.gamma  # 1 unless the norm grew by more than gamma
            residual = residual / limiter
            norm = norm / limiter
        state["residual_norm"] = norm.detach().reshape(())
        update = back(low_dir)
        if self.mode == "code":
            return scale * update + residual
        return scale * (update + residual)
