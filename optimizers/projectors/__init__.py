"""Projectors: keep a basis per matrix and map gradients into and out of its subspace."""

from optimizers.projectors.svd import FULL, LEFT, RIGHT, SIDES, SvdProjector

__all__ = ["FULL", "LEFT", "RIGHT", "SIDES", "SvdProjector"]
