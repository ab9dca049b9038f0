"""Learning-rate schedules as ``LambdaLR`` multipliers, following the GaLore scripts.

Warmup is linear from 0 (step 0 trains at lr 0, as in the references), then cosine (or linear)
decay to ``min_lr_ratio`` x lr at ``max_steps``.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from llm_pretrain.config import TrainerConfig


def lr_multiplier(step: int, cfg: TrainerConfig, length: int | None = None) -> float:
    """At ``step`` of a schedule ``length`` steps long (default: ``trainer.max_steps``)."""
    length = cfg.max_steps if length is None else length
    if step < cfg.warmup_steps:
        return step / max(1, cfg.warmup_steps)
    if cfg.scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, length - cfg.warmup_steps))
    if cfg.scheduler == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.scheduler == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"trainer.scheduler={cfg.scheduler!r}: use cosine, linear or constant")
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: TrainerConfig,
    phases: list[tuple[int, int]] | None = None,
) -> LambdaLR:
    """``phases`` ((start, end) step ranges): the schedule restarts in each, warmup included, as
    every task of a continual-learning run is a fine-tuning run of its own."""
    lr_multiplier(cfg.warmup_steps, cfg, 1)  # validate trainer.scheduler before training starts
    if not phases:
        return LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))

    def multiplier(step: int) -> float:
        start, end = next(((a, b) for a, b in phases if step < b), phases[-1])
        return lr_multiplier(step - start, cfg, end - start)

    return LambdaLR(optimizer, multiplier)
