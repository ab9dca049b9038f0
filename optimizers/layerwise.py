"""The layer-sampling methods: LISA, BAdam and OwLore (GUM, which also samples layers, is a
low-rank method)."""

from __future__ import annotations

import torch
from torch import nn

from llmpt.optimizers.distributed import replicated_world
from llmpt.optimizers.low_rank import build_subspace
from llmpt.optimizers.registry import (
    adam_kwargs,
    built_formula,
    register,
)
from llmpt.optimizers.rules import AdamRule
from llmpt.optimizers.sampling import LayerSampler, OutlierWeights, decoder_layers, trainable
from llmpt.optimizers.subspace import Sampling, SubspaceOptimizer


def _layer_sampler(cfg, n_layers: int, order: str | None = None) -> LayerSampler:
    if not 1 <= cfg.active_layers <= n_layers:
        raise ValueError(
            f"optimizer.active_layers={cfg.active_layers} must lie in [1, {n_layers}] "
            f"(the model has {n_layers} decoder layers)"
        )
    return LayerSampler(
        n_layers, cfg.active_layers, cfg.interval, order or cfg.sampling_order, cfg.seed
    )


def _layer_wise(cfg, model: nn.Module, reset_active: bool) -> SubspaceOptimizer:
    """LISA and BAdam: full Adam (torch's form) on the active decoder layers, the others frozen;
    embeddings, lm_head and the final norm are always trained."""
    if cfg.sampling_order == "weighted":
        raise ValueError(
            "optimizer.sampling_order=weighted needs OwLore's outlier scores: use optimizer=owlore"
        )
    layers = decoder_layers(model)
    units = [[p for p in layer.parameters() if trainable(p)] for _, layer in layers]
    sampling = Sampling(
        _layer_sampler(cfg, len(layers)),
        units,
        inactive_mode="frozen",
        reset_active=reset_active,
        freeze_grads=not replicated_world(),
    )
    named = [(n, p) for n, p in model.named_parameters() if trainable(p)]
    return SubspaceOptimizer(
        [{"params": named, "projected": False}],
        **adam_kwargs(cfg),
        projector=None,
        scale=1.0,
        rule=AdamRule("torch"),
        decay_first=True,
        sampling=sampling,
        seed=cfg.seed,
    )


@register("lisa", built_formula("lisa"), model_level=True)
def build_lisa(cfg, model: nn.Module) -> torch.optim.Optimizer:
    return _layer_wise(cfg, model, reset_active=False)


@register("badam", built_formula("badam"), model_level=True)
def build_badam(cfg, model: nn.Module) -> torch.optim.Optimizer:
    return _layer_wise(cfg, model, reset_active=True)


@register("owlore", built_formula("owlore"), model_level=True)
def build_owlore(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """OwLore (Li et al. 2024): GaLore on the active decoder layers, which are drawn with
    probabilities from their outlier ratio; inactive layers are frozen and their state freed."""
    if cfg.sampling_order not in ("weighted", "uniform"):
        raise ValueError(
            f"optimizer.sampling_order={cfg.sampling_order!r}: use weighted or uniform"
        )
    layers = decoder_layers(model)
    outliers = OutlierWeights(layers, cfg.outlier_ratio)
    weighted = cfg.sampling_order == "weighted"
    sampling = Sampling(
        _layer_sampler(cfg, len(layers)),
        [[p for p in layer.parameters() if trainable(p)] for _, layer in layers],
        inactive_mode="frozen",
        freeze_grads=not replicated_world(),
        weights=outliers.weights if weighted else None,
        collect=outliers.collect if weighted else None,
        attach=outliers.attach if weighted else None,
    )
    opt = build_subspace(cfg, model, sampling=sampling)
    return opt
