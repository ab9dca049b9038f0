"""Fira's norm-growth limiter (Chen et al. 2024, Eq. 9), shared by Fira and APOLLO: an update
whose norm grew by more than ``gamma`` since the previous step is shrunk back to ``gamma`` times
the previous norm. The state keeps the previous (limited) norm as one scalar tensor."""

from __future__ import annotations

import torch

LIMITER_EPS = 1e-8


def limit_growth(state: dict, key: str, norm: torch.Tensor, gamma: float) -> torch.Tensor | None:
    """Record the limited norm under ``key`` and return the divisor (>= 1) for an update of
    ``norm``, or None at the first step, when there is nothing to compare with."""
    divisor = None
    if key in state:
        divisor = torch.clamp(norm / (state[key] + LIMITER_EPS), min=gamma) / gamma
        norm = norm / divisor
    state[key] = norm.detach().reshape(())
    return divisor
