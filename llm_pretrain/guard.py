"""The non-finite guard: a loss or gradient that is NaN or infinite stops the run (or, with
``trainer.on_nonfinite=skip_step``, its update is skipped) before it reaches the weights.

A diverged run used to train on to the end on NaN weights, exit 0 with ``"status": "ok"``, and
let ``checkpoint.keep_last`` delete its last good checkpoints. The check runs after backward and
before the optimizer step, on every rank, and the ranks agree through one small all-reduce (the
summed loss and the two flags), so every rank stops or skips at the same step. It costs a host
sync per step: the price of never applying a NaN update. With ``trainer.per_layer_update`` the
update happens inside backward, so only ``stop`` is possible, one step late; the checkpoint
writer's own finiteness check (``weights_finite``) keeps such weights off disk either way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from llm_pretrain import distributed

log = logging.getLogger("llm_pretrain")

MODES = ("stop", "skip_step")


class Diverged(RuntimeError):
    """Training produced a non-finite loss, gradient or weight; the run stops with this."""

    def __init__(self, message: str, step: int, last_finite: tuple[int, float] | None) -> None:
        super().__init__(message)
        self.step, self.last_finite = step, last_finite

    def record(self) -> dict:
        """What ``summary.json`` and the sweep row say about it."""
        step, loss = self.last_finite if self.last_finite is not None else (None, None)
        return {"step": self.step, "last_finite_step": step, "last_finite_loss": loss}


def grads_finite(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Whether this rank's gradients (its shards, under FSDP2) are all finite, as a 0-d tensor
    (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    if not grads:
        return torch.tensor(True)
    norms = torch._foreach_norm(grads)
    return torch.isfinite(torch.stack([n.float() for n in norms])).all()


def weights_finite(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether every weight is finite on every rank (the checkpoint writer asks before saving)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    bad = sum(int(not bool(torch.isfinite(t.detach()).all())) for t in local)
    return distributed.sum_over_ranks([float(bad)], device)[0] == 0


@dataclass
class NonFiniteGuard:
    """Checks each step's loss (and gradients) and decides: apply, skip, or stop."""

    mode: str = "stop"
    max_skips: int = 10  # skip_step: consecutive skipped steps before the run stops
    lr: float = 0.0  # (for the message)
    grad_clip: float = 0.0
    last_finite: tuple[int, float] | None = None  # (step, global mean loss)
    skipped: int = 0  # steps skipped so far (skip_step)
    in_a_row: int = 0
    stop_requested: bool = False  # a rank was signalled (preemption.py): stop after this step

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"trainer.on_nonfinite={self.mode!r}: use one of {', '.join(MODES)}")

    @property
    def checks_gradients(self) -> bool:
        """skip_step must see a bad gradient before the update; stop catches it one step later
        through the loss (and the clipped norm, when clipping computes it anyway)."""
        return self.mode == "skip_step"

    def check(
        self,
        step: int,
        loss_sum: torch.Tensor,
        label_tokens: float,
        grads_ok: torch.Tensor | None,
        device: torch.device,
        signalled: bool = False,
    ) -> tuple[bool, float]:
        """Step ``step`` (1-based) has run backward: returns (apply its update?, the global mean
        loss). Raises ``Diverged`` in stop mode, or after ``max_skips`` skips in a row. The same
        all-reduce carries ``signalled`` (this rank got a stop signal) into
        ``stop_requested``."""
        loss_bad = float(not bool(torch.isfinite(loss_sum)))
        grad_bad = float(not bool(grads_ok)) if grads_ok is not None else 0.0
        total, loss_bad, grad_bad, signals = distributed.sum_over_ranks(
            [float(loss_sum) if not loss_bad else 0.0, loss_bad, grad_bad, float(signalled)],
            device,
        )
        self.stop_requested = self.stop_requested or signals > 0
        loss = math.nan if loss_bad else total / max(label_tokens, 1.0)
        if not loss_bad and not grad_bad:
            self.last_finite, self.in_a_row = (step, loss), 0
            return True, loss
        what = "loss" if loss_bad else "gradient"
        if self.mode == "skip_step" and self.in_a_row < self.max_skips:
            self.skipped += 1
            self.in_a_row += 1
            log.warning(
                f"step {step}: non-finite {what}, update skipped ({self.in_a_row} in a row, "
                f"{self.skipped} in all; the run stops after {self.max_skips} in a row)"
            )
            return False, loss
        raise Diverged(self.message(step, what), step, self.last_finite)

    def message(self, step: int, what: str, why: str | None = None) -> str:
        """What went wrong, the last good loss, and what to change."""
        last = (
            f"the last finite loss was {self.last_finite[1]:.4g} at step {self.last_finite[0]}"
            if self.last_finite is not None
            else "no step of this process had a finite loss"
        )
        if why is None:
            why = (
                f"after {self.max_skips} skipped steps in a row"
                if self.mode == "skip_step"
                else "the update was not applied"
            )
        clip = (
            f"enable clipping (trainer.grad_clip=1.0; now {self.grad_clip})"
            if self.grad_clip <= 0
            else f"clip harder (trainer.grad_clip, now {self.grad_clip})"
        )
        return (
            f"training diverged: non-finite {what} at step {step}, {why}; {last}. No checkpoint "
            f"was written from here on. Lower the learning rate (now {self.lr:g}), {clip}, add "
            "warmup (trainer.warmup_steps), or resume from the last checkpoint with "
            "trainer.on_nonfinite=skip_step"
        )
