"""What the library needs of ``torch.distributed``: whether parameters are replicated over
several ranks (DDP), and a sum over them. Plain torch calls, so the library depends on no
launcher or application."""

from __future__ import annotations

import torch
import torch.distributed as dist


def replicated_world() -> bool:
    """More than one rank: every rank must then see the same parameters in each backward (a
    sampler may not turn ``requires_grad`` off under DDP)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (a no-op on one process)."""
    if replicated_world():
        dist.all_reduce(t)
    return t
