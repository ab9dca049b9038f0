"""The projection family (spec projection-family.md), each a composition in
``SubspaceOptimizer``: APOLLO, APOLLO-Mini, Flora, GRASS, COAP (and its 8-bit
variant), DCT-AdamW, Online Subspace Descent and I3S."""

from __future__ import annotations

import math

import torch
from torch import nn

from llmpt.optimizers.error_feedback import ErrorFeedback
from llmpt.optimizers.low_rank import build_subspace, galore_projector
from llmpt.optimizers.projectors import CoordinateProjector
from llmpt.optimizers.projectors.coap import CoapProjector
from llmpt.optimizers.projectors.dct import DctProjector
from llmpt.optimizers.projectors.gaussian import GaussianProjector
from llmpt.optimizers.projectors.online_pca import OnlinePcaProjector
from llmpt.optimizers.registry import built_formula, param_groups, register, split_targets
from llmpt.optimizers.residuals.scaled_gradient import ScaledGradient
from llmpt.optimizers.rules import AdamRule, BlockwiseAdam8bitRule
from llmpt.optimizers.rules.flora import FloraRule
from llmpt.optimizers.subspace import SubspaceOptimizer
from llmpt.optimizers.transitions import MomentTransition

COMPAT = ("none", "reference")


def _check_compat(cfg) -> bool:
    if cfg.compat not in COMPAT:
        raise ValueError(f"optimizer.compat={cfg.compat!r}: use none or reference")
    return cfg.compat == "reference"


def build_apollo(cfg, model: nn.Module) -> SubspaceOptimizer:
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
        rng=cfg.projection_rng,
    )
    update = ScaledGradient(cfg.scale_type, cfg.limiter, cfg.limiter_gamma, cfg.scale_front)
    return build_subspace(
        cfg,
        model,
        residual=update,
        rule=AdamRule("hf"),
        projector=projector,
        scale=math.sqrt(cfg.scale) if reference else cfg.scale,
    )


@register("apollo", built_formula("apollo"), model_level=True)
def build_apollo_channel(cfg, model: nn.Module) -> torch.optim.Optimizer:
    return build_apollo(cfg, model)


@register("apollo_mini", built_formula("apollo_mini"), model_level=True)
def build_apollo_mini(cfg, model: nn.Module) -> torch.optim.Optimizer:
    return build_apollo(cfg, model)


@register("grass", built_formula("grass"), model_level=True)
def build_grass(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """GRASS (Muhamed et al. 2024): Adam on r rows (or columns) selected by norm; projecting is
    a gather, projecting back a scatter-add into the selected rows, the state r indices."""
    projector = CoordinateProjector(
        None,
        cfg.update_gap,
        cfg.proj_type,
        rank=cfg.rank,
        selection=cfg.selection,
        replacement=cfg.replacement,
    )
    return _galore_like(cfg, model, projector, reset_on_refresh=cfg.reset_on_refresh)


@register("i3s", built_formula("i3s"), model_level=True)
def build_i3s(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """I3S (Zhang et al. 2025): GaLore with singular vectors sampled in proportion to the
    singular values."""
    return _galore_like(cfg, model, galore_projector(cfg, selection="sample"))


@register("dct_adamw", built_formula("dct_adamw"), model_level=True)
def build_dct_adamw(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """DCT-AdamW (Modoranu et al. 2025): Adam on the DCT columns most aligned with the gradient,
    torch-style eps and weight decay first, as the reference ``DCTAdamW``."""
    projector = DctProjector(
        cfg.rank,
        cfg.update_gap,
        cfg.proj_type,
        cfg.selection_norm,
        cfg.transform,
        cfg.refresh_phase,
    )
    transition = MomentTransition("abs") if cfg.rotate_subspace else None
    if not cfg.use_ef and (cfg.ef_bits or cfg.ef_group_size):
        raise ValueError(
            f"optimizer.ef_bits={cfg.ef_bits} / ef_group_size={cfg.ef_group_size} shape the "
            "error feedback, which is off: set optimizer.use_ef=true, or leave them at 0"
        )
    error_feedback = ErrorFeedback(cfg.ef_bits, cfg.ef_group_size) if cfg.use_ef else None
    return _galore_like(
        cfg,
        model,
        projector,
        eps_placement="torch",
        decay_first=True,
        transition=transition,
        error_feedback=error_feedback,
    )


def _galore_like(
    cfg, model: nn.Module, projector, eps_placement: str = "hf", rule=None, **engine
) -> SubspaceOptimizer:
    """Adam in the projector's subspace, scale times the back-projection, Adam elsewhere."""
    if rule is None:
        rule = AdamRule(eps_placement)
    return build_subspace(cfg, model, rule=rule, projector=projector, **engine)


def _coap(cfg, model: nn.Module, rule=None) -> SubspaceOptimizer:
    if cfg.restore_state and rule is not None:
        raise ValueError(
            "optimizer.restore_state=true carries dense moments into the new basis; the 8-bit "
            "variant keeps them quantized: use coap for restore_state"
        )
    projector = CoapProjector(
        cfg.rank, cfg.update_gap, cfg.reproject_factor, cfg.proj_type, cfg.proj_lr
    )
    transition = MomentTransition("sqrt") if cfg.restore_state else None
    return _galore_like(cfg, model, projector, transition=transition, rule=rule)


@register("coap", built_formula("coap"), model_level=True)
def build_coap(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """COAP (Xiao et al. 2025): GaLore with an incrementally updated, correlation-aware basis."""
    return _coap(cfg, model)


@register("coap_8bit", built_formula("coap_8bit"), model_level=True)
def build_coap_8bit(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """COAP with blockwise 8-bit subspace moments (the reference's CoapAdamW8bit)."""
    rule = BlockwiseAdam8bitRule(cfg.min_8bit_size)
    return _coap(cfg, model, rule=rule)


@register("osd", built_formula("osd"), model_level=True)
def build_osd(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """Online Subspace Descent (Liang et al. 2024): one SVD, then an online-PCA AdamW step on the
    basis at every step."""
    projector = OnlinePcaProjector(
        cfg.rank,
        cfg.update_gap,
        cfg.proj_type,
        cfg.mode,
        cfg.proj_lr_ratio,
        cfg.ortho_penalty,
        cfg.proj_weight_decay,
    )
    return _galore_like(cfg, model, projector)


@register("flora", built_formula("flora"), model_level=True)
def build_flora(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """Flora (Hao et al. 2024): Adafactor whose momentum of each targeted matrix lives in a
    seeded Gaussian projection resampled every ``kappa`` steps; the other tensors keep a full
    momentum, as the reference's uncompressed path."""
    reference = _check_compat(cfg)
    rule = FloraRule(
        cfg.beta1,
        cfg.kappa,
        cfg.decay_rate,
        cfg.eps1,
        cfg.eps2,
        cfg.clip_threshold,
        cfg.scale_parameter,
        cfg.weight_decay,
    )
    # the projector's own schedule is unused: the rule resamples every kappa steps
    projector = GaussianProjector(
        cfg.rank,
        cfg.kappa,
        cfg.proj_type,
        seeding="flora" if reference else "paper",
        rng=cfg.projection_rng,
    )
    projected, plain = split_targets(model, list(cfg.target_modules))
    return SubspaceOptimizer(
        param_groups(projected, plain, {"projected": True}),
        lr=cfg.lr,
        betas=(cfg.beta1, 0.999),  # unused: the rule keeps its own
        eps=cfg.eps2,
        weight_decay=0.0,  # the rule decays with its RMS-scaled step, as the reference
        projector=projector,
        scale=1.0,
        rule=rule,
        plain_rule=rule,
        seed=cfg.seed,
    )
