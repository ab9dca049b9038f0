"""What the library needs of ``torch.distributed``: whether parameters are replicated over
several ranks (DDP), a sum over them, and the whole of a sharded tensor. Plain torch calls, so
the library depends on no launcher or application."""

from __future__ import annotations

import torch
import torch.distributed as dist


def replicated_world() -> bool:
    """More than one rank: every rank must then see the same parameters in each backward (a
    sampler may not turn ``requires_grad`` off under DDP)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly) FSDP2-sharded one. For a ``DTensor`` this is a
    collective, so every rank must call it: library code that reads weights outside the
    optimizer's own parameters (OwLore's outlier scores) goes through this."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (a no-op on one process)."""
    if replicated_world():
        dist.all_reduce(t)
    return t
