"""The low-rank methods, each a composition in ``SubspaceOptimizer``: GaLore, 8-bit GaLore,
Q-GaLore, Fira, FRUGAL and GUM."""

from __future__ import annotations

import torch
from torch import nn

from llmpt.optimizers.distributed import replicated_world
from llmpt.optimizers.int8_linear import wrap_int8
from llmpt.optimizers.projectors import CoordinateProjector, SvdProjector
from llmpt.optimizers.projectors.quantized import QuantizedSvdProjector
from llmpt.optimizers.registry import (
    adam_kwargs,
    built_formula,
    param_groups,
    register,
    split_targets,
    targeted_linears,
    with_values,
)
from llmpt.optimizers.residuals import NormScaledResidual, StateFreeResidual
from llmpt.optimizers.rules import AdamRule, BlockwiseAdam8bitRule, MuonRule
from llmpt.optimizers.sampling import LayerSampler, decoder_layers
from llmpt.optimizers.subspace import Sampling, SubspaceOptimizer
from llmpt.optimizers.weight_quant import Int8Storage, Int8Weights


def galore_projector(cfg, **extra) -> SvdProjector:
    return SvdProjector(
        cfg.rank,
        cfg.update_gap,
        cfg.proj_type,
        cfg.svd_backend,
        niter=cfg.svd_power_iters,
        refresh_phase=cfg.refresh_phase,
        **extra,
    )


def _rule_8bit(cfg) -> BlockwiseAdam8bitRule:
    return BlockwiseAdam8bitRule(cfg.min_8bit_size)


def build_subspace(
    cfg,
    model: nn.Module,
    residual=None,
    rule=None,
    sampling=None,
    projector=None,
    weight_quant=None,
    scale: float | None = None,
    **engine,
) -> SubspaceOptimizer:
    """A GaLore-shaped method: the targeted matrices projected, the rest plain, Adam (HF eps)
    unless ``rule``; ``engine`` passes the engine's other options (``decay_first``,
    ``reset_on_refresh``, ``transition``)."""
    projected, plain = split_targets(model, list(cfg.target_modules))
    projector = projector if projector is not None else galore_projector(cfg)
    groups = param_groups(projected, plain, {"projected": True})
    return SubspaceOptimizer(
        groups,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        projector=projector,
        scale=cfg.scale if scale is None else scale,
        residual=residual,
        rule=rule,
        sampling=sampling,
        seed=getattr(cfg, "seed", 0),
        weight_quant=weight_quant,
        **engine,
    )


@register("galore", built_formula("galore"), model_level=True)
def build_galore(cfg, model: nn.Module) -> torch.optim.Optimizer:
    return build_subspace(cfg, model)


@register("galore_8bit", built_formula("galore_8bit"), model_level=True)
def build_galore_8bit(cfg, model: nn.Module) -> torch.optim.Optimizer:
    return build_subspace(cfg, model, rule=_rule_8bit(cfg))


def _q_galore_formula(model: nn.Module, cfg, steps: int) -> dict[str, int]:
    """Optimizer state does not depend on how the weights are stored: the simulated build,
    which leaves the model as it is (INT8 storage would wrap its linears)."""
    return build_q_galore(with_values(cfg, weight_storage="simulated"), model).memory_formula(steps)


@register("q_galore", _q_galore_formula, model_level=True)
def build_q_galore(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """Q-GaLore (Zhang et al. 2024): 8-bit GaLore whose projector is stored in 4 bits and
    refreshed lazily, with the projected weights kept on an INT8 grid."""
    if cfg.refresh_phase:
        raise ValueError("optimizer.refresh_phase: Q-GaLore's lazy refresh keeps its own schedule")
    if cfg.compat not in ("none", "reference"):
        raise ValueError(f"optimizer.compat={cfg.compat!r}: use none or reference")
    reference = cfg.compat == "reference"
    zero_point = "integer" if reference else "exact"
    projector = QuantizedSvdProjector(
        cfg.rank,
        cfg.update_gap,
        cfg.proj_type,
        cfg.svd_backend,
        niter=cfg.svd_power_iters,
        proj_bits=cfg.proj_bits,
        proj_group_size=cfg.proj_group_size,
        cos_threshold=cfg.cos_threshold,
        queue_size=cfg.queue_size,
        growth=cfg.growth,
        abs_cos=cfg.abs_cos and not reference,
        zero_point=zero_point,
    )
    weights = _int8_weights(cfg, model, zero_point)
    return build_subspace(
        cfg, model, rule=_rule_8bit(cfg), projector=projector, weight_quant=weights
    )


WEIGHT_STORAGES = ("simulated", "int8")


def _int8_weights(cfg, model: nn.Module, zero_point: str):
    """Q-GaLore's INT8 weights: simulated (the parameters stay in their dtype, on the INT8 grid)
    or stored as codes, the targeted linears wrapped in ``Int8Linear`` (single process)."""
    if cfg.weight_storage not in WEIGHT_STORAGES:
        raise ValueError(
            f"optimizer.weight_storage={cfg.weight_storage!r}: use one of {WEIGHT_STORAGES}"
        )
    if not cfg.weight_quant:
        if cfg.weight_storage != "simulated":
            raise ValueError(
                "optimizer.weight_storage=int8 stores INT8 weights, which "
                "optimizer.weight_quant=false turns off: drop one of the two"
            )
        return None
    if cfg.weight_storage == "simulated":
        return Int8Weights(cfg.weight_group_size, cfg.stochastic_round, zero_point)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise ValueError(
            "optimizer.weight_storage=int8 is single-process (as the reference's real INT8): "
            "DDP broadcasts into each weight, which is stored as codes here. Use "
            "optimizer.weight_storage=simulated for multi-GPU runs (the same arithmetic)"
        )
    found = targeted_linears(model, list(cfg.target_modules))
    linears = wrap_int8(model, found, cfg.weight_group_size, zero_point)
    return Int8Storage(
        {lin.weight: lin for lin in linears},
        cfg.weight_group_size,
        cfg.stochastic_round,
        zero_point,
    )


@register("fira", built_formula("fira"), model_level=True)
def build_fira(cfg, model: nn.Module) -> torch.optim.Optimizer:
    return build_subspace(cfg, model, NormScaledResidual(cfg.mode, cfg.limiter_gamma))


FRUGAL_PROJECTIONS = ("block", "svd", "random", "columns", "rows")
# FRUGAL's block_order names -> our sampler orders ("random" is a fresh randperm each time)
FRUGAL_BLOCK_ORDERS = {
    "random": "uniform",
    "ascending": "ascending",
    "descending": "descending",
    "mirror": "mirror",
}


@register("frugal", built_formula("frugal"), model_level=True)
def build_frugal(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """FRUGAL (Zmushko et al. 2025): torch-style Adam on the state-full part, signSGD (or SGD)
    on the state-free rest, weight decay first; regular parameters take full Adam."""
    if cfg.projection not in FRUGAL_PROJECTIONS:
        raise ValueError(
            f"optimizer.projection={cfg.projection!r}: use one of {', '.join(FRUGAL_PROJECTIONS)}"
        )
    if cfg.inactive_rule not in ("sign", "sgd", "none"):
        raise ValueError(f"optimizer.inactive_rule={cfg.inactive_rule!r}: use sign, sgd or none")
    if cfg.proj_lr_scale < 0:
        raise ValueError(f"optimizer.proj_lr_scale={cfg.proj_lr_scale} must be >= 0")
    projectable, regular = split_targets(model, list(cfg.target_modules))
    state_free = StateFreeResidual(cfg.inactive_rule, cfg.inactive_lr_scale)
    kwargs = dict(
        lr=cfg.lr,
        betas=tuple(adam_kwargs(cfg)["betas"]),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        scale=1.0,
        rule=AdamRule("torch"),
        reset_on_refresh=cfg.reset_statistics,
        decay_first=True,
        seed=cfg.seed,
        state_free=state_free,
    )
    scaled = {"lr_scale": cfg.proj_lr_scale}  # the steps' lr; weight decay keeps the base lr
    if cfg.projection == "block":
        if not 0.0 <= cfg.density <= 1.0:
            raise ValueError(f"optimizer.density={cfg.density} must lie in [0, 1]")
        if cfg.block_order not in FRUGAL_BLOCK_ORDERS:
            raise ValueError(
                f"optimizer.block_order={cfg.block_order!r}: use one of "
                f"{', '.join(FRUGAL_BLOCK_ORDERS)}"
            )
        n = len(projectable)
        sampler = LayerSampler(
            n,
            round(n * cfg.density),
            cfg.update_gap,
            FRUGAL_BLOCK_ORDERS[cfg.block_order],
            cfg.seed,
            keys=("optimizer.update_gap", "optimizer.block_order"),
        )
        sampling = Sampling(
            sampler,
            [[p] for _, p in projectable],
            # inactive_rule=none: a zero step, but FRUGAL still decays (and computes) them
            inactive_mode="state_free",
            reset_active=True,
            freeze_grads=not replicated_world(),
        )
        targeted = {"projected": False, **scaled}
        projector, residual = None, None
    else:
        if cfg.projection in ("columns", "rows"):
            projector = CoordinateProjector(cfg.density, cfg.update_gap, cfg.projection)
        else:
            projector = SvdProjector(
                None, cfg.update_gap, cfg.proj_type, density=cfg.density, basis=cfg.projection
            )
        targeted = {"projected": True, **scaled}
        sampling = None
        residual = state_free if cfg.inactive_rule != "none" else None  # none: GaLore-like
    groups = param_groups(projectable, regular, targeted)
    return SubspaceOptimizer(
        groups, projector=projector, residual=residual, sampling=sampling, **kwargs
    )


@register("gum", built_formula("gum"), model_level=True)
def build_gum(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """GUM (Pan et al. 2025): Muon on the GaLore projection of every targeted matrix, except in
    gamma sampled layers per period, which take Muon on the full-rank complement G - P P^T G;
    the importance weights 1/(1-q) and 1/q make the momentum's input unbiased."""
    if len(cfg.adamw_betas) != 2:
        raise ValueError(f"optimizer.adamw_betas={list(cfg.adamw_betas)} must have two values")
    projected, plain = split_targets(model, list(cfg.target_modules))
    layers = decoder_layers(model)
    n = len(layers)
    if not 1 <= cfg.active_layers < n:
        raise ValueError(
            f"optimizer.active_layers={cfg.active_layers}: GUM samples q = active_layers / "
            f"layers in (0, 1), so it must lie in [1, {n - 1}] for {n} decoder layers"
        )
    units = [[p for name, p in projected if name.startswith(prefix + ".")] for prefix, _ in layers]
    if sum(len(u) for u in units) != len(projected):
        raise ValueError("GUM: every targeted matrix must belong to a decoder layer")
    q = cfg.active_layers / n
    sampling = Sampling(
        LayerSampler(
            n,
            cfg.active_layers,
            cfg.update_gap,
            "uniform",
            cfg.seed,
            keys=("optimizer.update_gap", ""),
        ),
        units,
        active_mode="complement",
        inactive_mode="inherit",
        active_weight=1.0 / q,
        inactive_weight=1.0 / (1.0 - q),
    )
    projector = SvdProjector(
        cfg.rank,
        cfg.update_gap,
        cfg.proj_type,
        cfg.svd_backend,
        niter=cfg.svd_power_iters,
    )
    adamw_lr = cfg.adamw_lr if cfg.adamw_lr is not None else cfg.lr
    groups = param_groups(projected, plain, {"projected": True}, {"lr": adamw_lr})
    return SubspaceOptimizer(
        groups,
        lr=cfg.lr,
        betas=tuple(cfg.adamw_betas),
        eps=cfg.adamw_eps,
        weight_decay=cfg.weight_decay,
        projector=projector,
        scale=1.0,
        rule=MuonRule(cfg.momentum, cfg.ns_steps, cfg.adjust_lr_fn, cfg.ns_dtype),
        plain_rule=AdamRule("torch"),
        decay_first=True,
        sampling=sampling,
        seed=cfg.seed,
    )
