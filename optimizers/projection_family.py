"""The projection family (spec projection-family.md), each a composition in
``SubspaceOptimizer``: APOLLO and APOLLO-Mini so far."""

from __future__ import annotations

import math

import torch
from torch import nn

from llm_pretrain.config import ApolloConfig
from optimizers.projectors.gaussian import GaussianProjector
from optimizers.registry import built_formula, param_groups, register, split_targets
from optimizers.residuals.scaled_gradient import ScaledGradient
from optimizers.rules import AdamRule
from optimizers.subspace import SubspaceOptimizer

COMPAT = ("none", "reference")


def _check_compat(cfg) -> bool:
    if cfg.compat not in COMPAT:
        raise ValueError(f"optimizer.compat={cfg.compat!r}: use none or reference")
    return cfg.compat == "reference"


def build_apollo(cfg: ApolloConfig, model: nn.Module) -> SubspaceOptimizer:
    """APOLLO (Zhu et al. 2025): Adam moments on a seeded Gaussian projection R of the gradient
    give the factor ||N|| / ||R|| per channel (or per tensor, APOLLO-Mini) by which the raw
    gradient is scaled; embeddings, lm_head and norms take AdamW in the same optimizer."""
    reference = _check_compat(cfg)
    if cfg.scale <= 0:
        raise ValueError(f"optimizer.scale={cfg.scale} must be positive")
    projector = GaussianProjector(
        cfg.rank,
        cfg.update_gap,
        cfg.proj_type,
        store=cfg.store_projection,
        seeding="reference" if reference else "paper",
    )
    update = ScaledGradient(cfg.scale_type, cfg.limiter, cfg.limiter_gamma, cfg.scale_front)
    projected, plain = split_targets(model, list(cfg.target_modules))
    return SubspaceOptimizer(
        param_groups(projected, plain, {"projected": True}),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        projector=projector,
        scale=math.sqrt(cfg.scale) if reference else cfg.scale,
        residual=update,
        rule=AdamRule(tuple(cfg.betas), cfg.eps, "hf"),
        seed=cfg.seed,
    )


@register("apollo", built_formula("apollo"), model_level=True)
def build_apollo_channel(cfg: ApolloConfig, model: nn.Module) -> torch.optim.Optimizer:
    return build_apollo(cfg, model)


@register("apollo_mini", built_formula("apollo_mini"), model_level=True)
def build_apollo_mini(cfg: ApolloConfig, model: nn.Module) -> torch.optim.Optimizer:
    return build_apollo(cfg, model)
