"""Projectors: keep a basis per matrix and map gradients into and out of its subspace."""

from optimizers.projectors.coordinates import CoordinateProjector
from optimizers.projectors.svd import FULL, LEFT, RIGHT, SIDES, SvdProjector

__all__ = ["CoordinateProjector", "FULL", "LEFT", "RIGHT", "SIDES", "SvdProjector"]
