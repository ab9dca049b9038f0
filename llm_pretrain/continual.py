"""A run on ``data=tasks``: its phases, the accuracy after each, AA and BWT.

``data.tasks.order=mixed`` is one phase over every task (multi-task fine-tuning);
``sequential`` is the continual-learning protocol: a phase per task, in order, and after each
phase the exact-match accuracy on every task (the row ``matrix[j]``: each task after phase j,
tasks still to come included). The learning-rate schedule restarts in each phase. Between
phases, an optimizer with an ``end_task()`` method (a continual-learning method: GORP) has it
called; any other restarts its state (``data.tasks.restart_optimizer``, on by default: the
papers build a new optimizer per task), keeping the model's surgery and its settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from llm_pretrain import tasks as task_data
from llm_pretrain.config import DataConfig, TrainerConfig
from llm_pretrain.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def continual_metrics(matrix: list[list[float]]) -> dict[str, float | None]:
    """AA and BWT of an accuracy matrix (``matrix[j][i]``: task i after phase j).

    AA = mean over tasks of the accuracy after the last phase; BWT = mean over the tasks before
    the last of (final accuracy - accuracy right after learning it). Both None until every phase
    has run; BWT None for one task."""
    T = len(matrix[0]) if matrix else 0
    if not matrix or len(matrix) < T:
        return {"aa": None, "bwt": None}
    final = matrix[T - 1]
    aa = sum(final) / T
    bwt = sum(final[i] - matrix[i][i] for i in range(T - 1)) / (T - 1) if T > 1 else None
    return {"aa": aa, "bwt": bwt}


@dataclass
class TaskRun:
    cfg: DataConfig
    tokenizer: Tokenizer
    tasks: list[task_data.TaskData]
    phases: list[task_data.Phase]
    matrix: list[list[float]] = field(default_factory=list)  # one row per finished phase
    # optimizer-state bytes (this rank's) at the end of each phase, before end_task(): GORP's
    # subspace of earlier tasks grows with them
    state_bytes: list[int] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [t.task.name for t in self.tasks]

    @property
    def sequential(self) -> bool:
        return self.cfg.tasks.order == "sequential"

    def phase_ranges(self) -> list[tuple[int, int]] | None:
        """The scheduler's restarts (sequential only)."""
        return [(p.start, p.end) for p in self.phases] if self.sequential else None

    def phase_end(self, step: int) -> bool:
        """Whether ``step`` (steps done) closes a phase of a sequential run."""
        return self.sequential and any(p.end == step for p in self.phases)

    def loader(
        self, step: int, micro_batch: int, rank: int, world_size: int, pin_memory: bool
    ) -> StatefulDataLoader:
        """The training stream of the phase that trains step ``step``."""
        phase = self.phases[task_data.phase_at(self.phases, step)]
        return task_data.train_loader(
            self.tasks, phase, self.cfg, self.tokenizer, micro_batch, rank, world_size, pin_memory
        )

    def accuracies(
        self,
        model: torch.nn.Module,
        batch_size: int,
        device,
        rank: int,
        world_size: int,
        autocast,
        lockstep: bool,
    ) -> dict[str, float]:
        return {
            t.task.name: task_data.accuracy(
                model,
                t,
                self.cfg.tasks.metric,
                self.tokenizer,
                batch_size,
                device,
                rank,
                world_size,
                autocast,
                lockstep,
            )
            for t in self.tasks
        }

    def summary(self, final: dict[str, float]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "names": self.names,
            "order": self.cfg.tasks.order,
            "metric": self.cfg.tasks.metric,
            "accuracy": final,
            "examples": {
                t.task.name: {"train": len(t.train), "test": len(t.test)} for t in self.tasks
            },
            "splits": {t.task.name: t.task.split for t in self.tasks},
            "truncated_prompts": {t.task.name: t.truncated for t in self.tasks},
            "dropped_unknown_labels": {t.task.name: t.task.dropped for t in self.tasks},
        }
        if self.sequential:
            out["continual"] = {
                "matrix": self.matrix,
                "phases_done": len(self.matrix),
                "steps_per_phase": [p.end - p.start for p in self.phases],
                "optimizer_state_per_phase": self.state_bytes,
                **continual_metrics(self.matrix),
            }
        return out


def setup(
    cfg: DataConfig, trainer: TrainerConfig, tokenizer: Tokenizer, model_vocab: int
) -> TaskRun:
    """Read and tokenize the tasks, plan the phases and resolve ``trainer.max_steps``."""
    tasks = task_data.load(cfg, tokenizer, model_vocab)
    phases = task_data.plan(tasks, cfg.tasks, trainer.global_batch_size, trainer.max_steps)
    shortest = min(p.end - p.start for p in phases)
    if cfg.tasks.order == "sequential" and trainer.warmup_steps >= shortest:
        raise task_data.TaskError(
            f"trainer.warmup_steps={trainer.warmup_steps} is not shorter than the shortest "
            f"phase ({shortest} steps); the schedule restarts in every phase: lower it"
        )
    trainer.max_steps = phases[-1].end
    for t in tasks:
        log.info(
            f"task {t.task.name}: {len(t.train)} training and {len(t.test)} test examples "
            f"({t.task.split})"
        )
    return TaskRun(cfg, tokenizer, tasks, phases)
