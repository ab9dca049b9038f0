"""Residuals: what happens to the part of the gradient outside the subspace, G - P P^T G."""

from llmpt.optimizers.residuals.norm_scaled import NormScaledResidual
from llmpt.optimizers.residuals.state_free import StateFreeResidual

__all__ = ["StateFreeResidual", "NormScaledResidual"]
