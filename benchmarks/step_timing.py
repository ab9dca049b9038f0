"""What the side-by-side step benchmarks share (compile_cpu.py, activation_checkpointing.py):
the autocast context of a precision, one timed training step, and the rotating order of rounds
that spreads a shared machine's drift over every setting alike."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch


def cpu_autocast(precision: str) -> torch.autocast:
    """bf16 autocast for ``bf16_autocast``, a disabled one (a no-op context) for ``fp32``."""
    if precision == "bf16_autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def timed_step(model, opt, ids: torch.Tensor, autocast) -> tuple[float, float]:
    """One training step (forward on ``ids`` as inputs and labels, backward, ``opt``): its
    seconds and its loss."""
    start = time.perf_counter()
    with autocast:
        loss = model(ids, ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start, float(loss.detach())


def rotating(names: Sequence[str], rounds: int) -> Iterator[str]:
    """``names`` ``rounds`` times, round r starting at the r-th (mod len) name."""
    names = list(names)
    for r in range(rounds):
        k = r % len(names)
        yield from names[k:] + names[:k]
