"""Learning-rate schedules as ``LambdaLR`` multipliers, following the GaLore scripts.

Warmup is linear from 0 (step 0 trains at lr 0, as in the references), then cosine (or linear)
decay to ``min_lr_ratio`` x lr at ``max_steps``.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from llm_pretrain.config import TrainerConfig


def lr_multiplier(step: int, cfg: TrainerConfig) -> float:
    if step < cfg.warmup_steps:
        return step / max(1, cfg.warmup_steps)
    if cfg.scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.scheduler == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.scheduler == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"trainer.scheduler={cfg.scheduler!r}: use cosine, linear or constant")
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig) -> LambdaLR:
    lr_multiplier(cfg.warmup_steps, cfg)  # validate trainer.scheduler before training starts
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))
