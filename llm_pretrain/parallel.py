"""How the model is spread over the ranks: ``trainer.parallelism=ddp`` (replicas, the default) or
``fsdp`` (FSDP2: every parameter split by rows, ``fully_shard`` on each decoder block and on the
root, applied from outside the model).

Under FSDP2 the optimizer is the one built on the unsharded model, stepped by
``llmpt.optimizers.sharded.ShardedOptimizer``: each whole matrix is updated on one owner rank,
which alone holds its state, so every method stays exact (SVD bases, Newton-Schulz, Top-K,
sampled layers) and each rank holds about 1/world of the optimizer state.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

PARALLELISMS = ("ddp", "fsdp")
# Methods FSDP2 cannot run exactly here, with the reason (listed in the README as unsupported);
# RSO with weight decay is refused in check().
FSDP_UNSUPPORTED = {
    "adam_mini": "Adam-mini runs collectives of its own over the ranks and reads every "
    "parameter at each step, also those without a gradient",
}


def check(cfg, world_size: int) -> None:
    """Refuse a parallelism, or a method or setting under it, that cannot run exactly."""
    t = cfg.trainer
    if t.parallelism not in PARALLELISMS:
        raise ValueError(f"trainer.parallelism={t.parallelism!r}: use one of {PARALLELISMS}")
    if t.parallelism != "fsdp":
        return
    name = cfg.optimizer.name
    if name in FSDP_UNSUPPORTED:
        raise ValueError(
            f"optimizer={name} is not supported under trainer.parallelism=fsdp: "
            f"{FSDP_UNSUPPORTED[name]}; use trainer.parallelism=ddp"
        )
    if name == "rso" and cfg.optimizer.weight_decay > 0:
        raise ValueError(
            f"optimizer=rso with optimizer.weight_decay={cfg.optimizer.weight_decay} is not "
            "supported under trainer.parallelism=fsdp: RSO decays the frozen W0 of a linear "
            "when it updates that linear's B, on B's owner rank, while FSDP2 splits W0 over all "
            "ranks; use optimizer.weight_decay=0 or trainer.parallelism=ddp"
        )


def sharded(cfg, world_size: int) -> bool:
    """Whether this run shards its model (FSDP2 on more than one rank; one rank has nothing to
    split and runs as a plain process)."""
    return cfg.trainer.parallelism == "fsdp" and world_size > 1


def fully_shard_model(model: nn.Module, device: torch.device, precision: str) -> None:
    """FSDP2 on each decoder block, then the root (embeddings, final norm, lm_head). On a GPU
    with bf16 autocast, blocks compute in bf16 and reduce gradients in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if device.type == "cuda" and precision == "bf16_autocast"
        else MixedPrecisionPolicy()
    )
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def training_module(
    model: nn.Module, world_size: int, parallelism: str, per_layer_update: bool = False
) -> nn.Module:
    """What the loop calls forward on: DDP around the model, or the model itself (sharded by
    FSDP2, or with per-layer updates, whose hooks reduce each gradient themselves: DDP's
    buckets would reduce it only after the hook has fired)."""
    if world_size == 1 or parallelism == "fsdp" or per_layer_update:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, gradient_as_bucket_view=True, broadcast_buffers=False)


@contextmanager
def gradient_sync(module: nn.Module, sync: bool):
    """Reduce gradients in this backward (``sync``) or only accumulate them locally: DDP's
    ``no_sync``, FSDP2's ``set_requires_gradient_sync``."""
    if not sync and hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    elif not sync and hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:  # reducing now, or one process (nothing to reduce)
        yield
