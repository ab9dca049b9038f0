"""Projectors: keep a basis per matrix and map gradients into and out of its subspace."""

from llmpt.optimizers.projectors.coordinates import CoordinateProjector
from llmpt.optimizers.projectors.svd import FULL, LEFT, RIGHT, SIDES, SvdProjector

__all__ = ["CoordinateProjector", "FULL", "LEFT", "RIGHT", "SIDES", "SvdProjector"]
