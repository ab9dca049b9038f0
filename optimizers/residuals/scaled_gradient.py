"""APOLLO's update (Zhu et al. 2025, Alg. 1; spec projection-family.md section 1b): the raw
full-rank gradient times the factor by which Adam rescaled its random projection.

With R the projected gradient and N = M / (sqrt(V) + eps) Adam's direction on it (no bias
correction; the step size carries it):

- ``channel``: one factor per index of the dimension the projection keeps (the long one under
  ``proj_type=std``), s_j = ||N_j|| / (||R_j|| + 1e-8), the norms taken over the rank dimension;
- ``tensor`` (APOLLO-Mini): s = ||N||_F / (||R||_F + 1e-8).

The update is U = scale * G * s, passed through Fira's norm-growth limiter (gamma 1.01) unless
``limiter=False``; ``scale_front`` puts the scale before the limiter (the reference's flag; the
limiter's ratio is the same, its recorded norm includes the scale). U is never formed: its norm
comes from the norms of G along the same dimension, and the weight takes one fused
``addcmul_(G, s)``. State: ``update_norm`` (the limiter's previous norm, one scalar).
"""

from __future__ import annotations

import torch

from llmpt.optimizers.projectors.svd import LEFT
from llmpt.optimizers.residuals.limiter import limit_growth, limit_growth_many

GRANULARITIES = ("channel", "tensor")
RATIO_EPS = 1e-8


class ScaledGradient:
    def __init__(
        self,
        granularity: str = "channel",
        limiter: bool = True,
        gamma: float = 1.01,
        scale_front: bool = False,
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"scale_type={granularity!r}: use channel or tensor")
        if limiter and gamma <= 1.0:
            raise ValueError(f"limiter_gamma={gamma} must exceed 1")
        self.granularity, self.limiter, self.gamma = granularity, limiter, gamma
        self.scale_front = scale_front
        # APOLLO-Mini's matrices step together (``apply_many``): its per-matrix tensors are
        # 1 x n, so one Python dispatch per matrix and op was most of its step. Channel-wise
        # APOLLO steps matrix by matrix: batching it was slower on a CPU (174 vs 155 ms on
        # llama_60m's 56 matrices at rank 128), as R, M and V of every matrix then leave the
        # cache between the phases (docs/benchmarks.md).
        self.batchable = granularity == "tensor"

    def apply(self, p, state, grad, low, direction, projector, scale, step_size, lr) -> None:
        factor, norm = self.factor(state, grad, low, direction)
        if self.limiter:
            front = scale if self.scale_front else 1.0
            divisor = limit_growth(state, "update_norm", norm * front, self.gamma)
            if divisor is not None:
                factor = factor / divisor
        p.addcmul_(grad, factor, value=step_size * scale)

    def grad_norm(self, grad: torch.Tensor) -> torch.Tensor:
        """||G|| for ``apply_many``, taken right after the projection while G is in cache."""
        return grad.norm()

    def apply_many(
        self,
        params: list[torch.Tensor],
        states: list[dict],
        grads: list[torch.Tensor],
        lows: list[torch.Tensor],
        directions: list[torch.Tensor],
        grad_norms: list[torch.Tensor],
        scale: float,
        step_sizes: list[float],
    ) -> None:
        """``apply`` for many matrices of one dtype at once (tensor-wise only, see
        ``batchable``): the factors and the limiter on stacked scalars, the weight updates as
        one multi-tensor ``addcmul_``, with the arithmetic of ``apply`` element for element,
        so the weights are bit for bit those of ``apply``."""
        if not self.batchable:
            raise RuntimeError("only the tensor-wise scale steps many matrices at once")
        factors = torch.stack(torch._foreach_norm(directions)) / (
            torch.stack(torch._foreach_norm(lows)) + RATIO_EPS
        )
        if self.limiter:
            front = scale if self.scale_front else 1.0
            norms = factors * torch.stack(grad_norms)
            factors = factors / limit_growth_many(states, "update_norm", norms * front, self.gamma)
        sizes = [size * scale for size in step_sizes]
        torch._foreach_addcmul_(params, grads, list(factors.unbind()), sizes)

    def factor(
        self, state: dict, grad: torch.Tensor, low: torch.Tensor, direction: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The scaling factor s (broadcastable to G) and ||G * s||_F, from one pass over G."""
        if self.granularity == "tensor":
            s = direction.norm() / (low.norm() + RATIO_EPS)
            return s, s * grad.norm()
        dim = 0 if state["side"] == LEFT else 1  # the rank dimension of R and N
        s = direction.norm(dim=dim) / (low.norm(dim=dim) + RATIO_EPS)
        norm = (s * grad.norm(dim=dim)).norm()
        return s.unsqueeze(dim), norm

    def extra_memory(self, dtype: torch.dtype) -> dict[str, int]:
        """The limiter's previous norm: one scalar in the parameter's dtype."""
        if not self.limiter:
            return {}
        return {"other": torch.empty((), dtype=dtype).element_size()}
