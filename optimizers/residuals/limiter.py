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


def limit_growth_many(
    states: list[dict], key: str, norms: torch.Tensor, gamma: float
) -> torch.Tensor:
    """``limit_growth`` for many updates at once (``norms``: one per state, stacked): the
    divisors, 1 where a state has no previous norm yet. Element for element the same
    arithmetic, so the recorded norms and divisors equal the one-at-a-time ones."""
    if all(key in state for state in states):
        previous = torch.stack([state[key] for state in states])
        divisors = torch.clamp(norms / (previous + LIMITER_EPS), min=gamma) / gamma
        for state, norm in zip(states, (norms / divisors).unbind(), strict=True):
            state[key] = norm.clone()
        return divisors
    divisors = torch.ones_like(norms)
    for i, (state, norm) in enumerate(zip(states, norms.unbind(), strict=True)):
        divisor = limit_growth(state, key, norm.clone(), gamma)
        if divisor is not None:
            divisors[i] = divisor
    return divisors
