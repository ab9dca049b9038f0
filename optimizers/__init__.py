"""Optimizer registry: ``build(cfg, model)`` turns ``conf/optimizer/<name>.yaml`` into a
``torch.optim.Optimizer``, and ``state_nbytes`` reports its state memory by category.

AdamW (torch's own) is the first entry; the memory-efficient methods join the same registry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from llm_pretrain.config import OptimizerConfig

Builder = Callable[[OptimizerConfig, nn.Module], torch.optim.Optimizer]
REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        REGISTRY[name] = fn
        return fn

    return deco


@register("adamw")
def build_adamw(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    impl = {
        "auto": {},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
        "for_loop": {"foreach": False},
    }
    if cfg.implementation not in impl:
        raise ValueError(
            f"optimizer.implementation={cfg.implementation!r}: use auto, foreach, fused or for_loop"
        )
    if len(cfg.betas) != 2:
        raise ValueError(f"optimizer.betas={list(cfg.betas)} must have two values")
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        **impl[cfg.implementation],
    )


def build(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.name not in REGISTRY:
        raise ValueError(
            f"optimizer.name={cfg.name!r} is not registered; known: {sorted(REGISTRY)}"
        )
    if cfg.lr <= 0:
        raise ValueError(f"optimizer.lr={cfg.lr} must be positive")
    return REGISTRY[cfg.name](cfg, model)


MOMENT_KEYS = {"exp_avg", "exp_avg_sq", "momentum_buffer", "max_exp_avg_sq"}


def state_nbytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state by category, each storage counted once.

    Optimizers that know their own layout expose ``state_nbytes()``; for the others the state
    dict is walked: Adam moments are "moments", step counters and anything else "other".
    """
    if hasattr(optimizer, "state_nbytes"):
        return dict(optimizer.state_nbytes())
    seen: set[int] = set()
    out = {"moments": 0, "other": 0}
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                if storage.data_ptr() in seen and storage.nbytes():
                    continue
                seen.add(storage.data_ptr())
                out["moments" if key in MOMENT_KEYS else "other"] += storage.nbytes()
    return out
