"""torch.distributed set-up for torchrun (or SLURM via submitit): rank, device, collectives.

Two ways into a process group, both ``env://``: torchrun sets RANK, WORLD_SIZE and the master
address itself; a submitit job with several tasks (``hydra/launcher=slurm`` or
``submitit_local`` with ``tasks_per_node`` > 1, one task per GPU) runs the job once per task with
no torchrun, and ``submitit.helpers.TorchDistributedEnvironment`` derives the same variables from
the job's environment (SLURM's, or the local executor's). Single-process runs need no process
group; every helper degrades to the identity there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_rank() -> int:
    """This process's rank from the launcher's environment (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def export_submitit_environment() -> bool:
    """In a multi-task submitit job not started by torchrun, export RANK, WORLD_SIZE, LOCAL_RANK
    and the master address for ``env://``; returns whether it did."""
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return False
    import submitit
    from submitit.helpers import TorchDistributedEnvironment

    if submitit.JobEnvironment().num_tasks <= 1:
        return False
    # CUDA_VISIBLE_DEVICES stays whole: init() picks the GPU by LOCAL_RANK, as under torchrun.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def init(device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Join the process group torchrun or submitit describes (gloo on CPU, NCCL on CUDA) and pick
    a device. ``timeout_s``: how long a collective waits for a peer before failing."""
    export_submitit_environment()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = launched_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"trainer.device={device!r}: use auto, cpu or cuda")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", **timeout)
    return DistInfo(rank, world, local_rank, dev)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place."""
    if active():
        dist.all_reduce(t)
    return t


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over ranks (e.g. memory peaks)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Sum host-side numbers over ranks; no device round trip when running alone."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_replicas(module: torch.nn.Module) -> None:
    """Raise if the ranks' weights differ: DDP keeps them equal only if every optimizer step is
    deterministic given the all-reduced gradients (SVD bases, seeds, sampling)."""
    if not active():
        return
    sums = [float(p.detach().double().sum()) for p in module.parameters()]
    ranks = gather_objects(sums)
    diverged = [i for i, s in enumerate(ranks) if s != ranks[0]]
    if diverged:
        raise RuntimeError(
            f"ranks {diverged} hold different weights from rank 0 after training: the optimizer "
            "step is not identical on every rank"
        )


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
