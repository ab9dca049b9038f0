"""Pretrain a LLaMA: one Hydra config in, a trained model, metrics and a summary out.

    python -m llm_pretrain.train                          # built-in corpus, offline, ~3 min on CPU
    python -m llm_pretrain.train model=llama_20m data=files \\
        data.path=../shared/data/c4/c4_en_sample_2000.jsonl.gz \\
        data.tokenizer=../shared/data/t5_tokenizer/spiece.model trainer.max_steps=50
    torchrun --nproc_per_node=2 -m llm_pretrain.train     # DDP, gloo on CPU / NCCL on GPU
    torchrun --nproc_per_node=2 -m llm_pretrain.train trainer.parallelism=fsdp optimizer=galore
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        --rdzv-id=JOB -m llm_pretrain.train model=llama_1b data=c4
    python -m llm_pretrain.train -m optimizer.lr=1e-3,3e-3  # sweep: one row each in results.jsonl

Under torchrun only rank 0 writes (Hydra outputs, logs, checkpoints); the other ranks compose
the same config without an output directory and receive rank 0's run directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm import tqdm

from llm_pretrain import (
    checkpoint,
    continual,
    data,
    distributed,
    hf,
    parallel,
    pretrained,
    rundir,
    sharded_checkpoint,
    tasks,
)
from llm_pretrain import optim as optimizers
from llm_pretrain.checkpointing import apply_activation_checkpointing
from llm_pretrain.config import (
    CONF_DIR,
    check_experiment,
    check_known_keys,
    check_values,
    register_configs,
)
from llm_pretrain.evaluate import evaluate
from llm_pretrain.gradient_analysis import GradientAnalysis
from llm_pretrain.gradient_analysis import check_supported as check_analysis_supported
from llm_pretrain.guard import Diverged, NonFiniteGuard, grads_finite, weights_finite
from llm_pretrain.loggers import RunLogger, json_safe
from llm_pretrain.memory import MemoryReport, activation_bytes, unique_nbytes
from llm_pretrain.memory_estimate import Estimate, estimate
from llm_pretrain.model import IGNORE_INDEX, Llama, build_model, kv_heads
from llm_pretrain.preemption import REQUEUE_EXIT, Preempted, PreemptionHandler
from llm_pretrain.schedule import build_scheduler
from llm_pretrain.summary import format_summary, sweep_row
from llm_pretrain.tokenizer import load_tokenizer
from llm_pretrain.watchdog import StepWatchdog
from llmpt.optimizers.groups import trainable

log = logging.getLogger("llm_pretrain")
SNAPSHOT_STEPS = 3  # trainer.memory_snapshot covers this process's first 3 steps

# Dense bf16 peak FLOP/s, for MFU (torchtitan's table).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return (
            "bf16_autocast" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        )
    if precision not in ("fp32", "bf16_autocast", "bf16"):
        raise ValueError(f"trainer.precision={precision!r}: use auto, fp32, bf16_autocast or bf16")
    return precision


def check_config(cfg: DictConfig, world_size: int) -> int:
    """Refuse impossible settings up front; return the gradient-accumulation count."""
    t, d, m = cfg.trainer, cfg.data, cfg.model
    if OmegaConf.select(cfg, "model.name") == "hf":  # (before any shape is read)
        hf.model_source(t.init_from)
    per_pass = world_size * t.micro_batch_size
    if t.micro_batch_size <= 0 or t.global_batch_size <= 0:
        raise ValueError("trainer.global_batch_size and trainer.micro_batch_size must be positive")
    if t.global_batch_size % per_pass:
        raise ValueError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by world_size "
            f"({world_size}) x trainer.micro_batch_size ({t.micro_batch_size}) = {per_pass}; "
            f"use a multiple of {per_pass} or change trainer.micro_batch_size"
        )
    if d.seq_len > m.max_position_embeddings:
        raise ValueError(
            f"data.seq_len={d.seq_len} exceeds model.max_position_embeddings="
            f"{m.max_position_embeddings} of {m.name}; lower data.seq_len"
        )
    if d.seq_len < 2:
        raise ValueError(f"data.seq_len={d.seq_len}: need at least 2 tokens to predict one")
    if t.max_steps is None:
        if d.source != "tasks":
            raise ValueError(
                "trainer.max_steps=null: only data=tasks has a length of its own (its epochs); "
                f"data.source={d.source} needs a number of steps"
            )
    elif t.max_steps <= 0:
        raise ValueError(f"trainer.max_steps={t.max_steps} must be positive")
    accum = t.global_batch_size // per_pass
    data.split_mode(d)
    parallel.check(cfg, world_size)
    return accum


def fingerprint(cfg: DictConfig, world_size: int, precision: str) -> dict[str, Any]:
    """What a resume must not change: shapes, optimizer kind, data order and batch geometry."""
    m, d, t = cfg.model, cfg.data, cfg.trainer
    return {
        "model": [m.hidden_size, m.intermediate_size, m.num_heads, m.num_layers, m.vocab_size],
        "kv_heads_tied": [kv_heads(m), bool(m.tie_embeddings)],
        "optimizer": cfg.optimizer.name,
        "world_size": world_size,
        "global_batch_size": t.global_batch_size,
        "micro_batch_size": t.micro_batch_size,
        "data": [d.source, d.tokenizer, d.layout, d.seq_len, d.num_workers, d.path or "", d.seed],
        "data_split": data.split_mode(d),
        "tasks": OmegaConf.to_container(d.tasks) if d.source == "tasks" else None,
        "precision": precision,
    }


STEP_PHASES = ("data", "forward_backward", "optimizer", "logging")


class PhaseTimer:
    """Wall time per phase of a step; syncs the GPU at phase ends when asked to."""

    def __init__(self, device: torch.device, sync: bool) -> None:
        self.sync = sync and device.type == "cuda"
        self.totals: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self._t
        self._t = now

    def step_seconds(self) -> float:
        """Time in the phases of a training step (evaluation and checkpoints excluded)."""
        return sum(self.totals.get(k, 0.0) for k in STEP_PHASES)

    def summary(self) -> dict[str, float]:
        step = self.step_seconds()
        out = {f"{k}_s": round(v, 3) for k, v in self.totals.items()}
        out["overhead_fraction"] = (
            (self.totals.get("data", 0.0) + self.totals.get("logging", 0.0)) / step if step else 0.0
        )
        return out


def mfu(
    model, seq_len: int, tokens_per_s: float, device: torch.device, precision: str
) -> float | None:
    if device.type != "cuda" or precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return model.flops_per_token(seq_len) * tokens_per_s / peak if peak else None


def train(
    cfg: DictConfig,
    run_dir: Path,
    sweep_dir: Path | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run one training job; returns the summary (also written to ``run_dir/summary.json``).
    In a sweep, a job that fails or diverges still gets its row, with its overrides."""
    dist_info = distributed.init(cfg.trainer.device, cfg.trainer.dist_timeout_s)
    if sweep_dir is not None and cfg.logger.group is None:
        cfg.logger.group = f"sweep-{Path(sweep_dir).name}"  # one wandb group per sweep
    try:
        check_experiment(cfg)
        run_dir = Path(distributed.broadcast_object(str(run_dir)))
        summary = _train(cfg, run_dir, dist_info)
        # every rank done before any destroys its process group: a gloo peer still reading
        # from a closed one aborts its process ("terminate called"), failing a finished run
        distributed.barrier()
        return summary
    except Exception as e:
        # (a refused run directory keeps the row of the run that owns it)
        if sweep_dir is not None and dist_info.is_main and not isinstance(e, rundir.RunDirTaken):
            status = {Diverged: "diverged", Preempted: "preempted"}.get(type(e), "failed")
            error = str(e) if status != "failed" else f"{type(e).__name__}: {e}"
            row = sweep_row(cfg, run_dir, None, overrides, error=error, status=status)
            if isinstance(e, Diverged):
                row["diverged"] = e.record()
            _append_row(sweep_dir, row)
        raise
    finally:
        distributed.shutdown()


@dataclass
class LastMicroBatch:
    """Whether the backward running now is the step's last (per-layer updates step then)."""

    now: bool = True


@dataclass
class Job:
    """The parts of one run, built once from the config, and its progress counters."""

    cfg: DictConfig
    di: distributed.DistInfo
    run_dir: Path
    precision: str
    autocast: torch.autocast | None
    accum: int
    model: Llama
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: StatefulDataLoader
    val: dict[str, torch.Tensor]
    entropy: float | None
    memory: MemoryReport
    fingerprint: dict[str, Any]
    predicted: Estimate | None = None
    taskrun: continual.TaskRun | None = None  # data=tasks: the tasks, phases, accuracies
    surgery: dict | None = None  # WeLore: the compression's plan, ppl before it
    logger: RunLogger | None = None
    train_model: torch.nn.Module | None = None
    last_micro: LastMicroBatch = field(default_factory=LastMicroBatch)
    guard: NonFiniteGuard = field(default_factory=NonFiniteGuard)
    preemption: PreemptionHandler = field(default_factory=PreemptionHandler)
    analysis: GradientAnalysis | None = None  # trainer.gradient_analysis_every
    watchdog: StepWatchdog = field(default_factory=lambda: StepWatchdog(factor=0, min_s=0))
    step: int = 0
    tokens_seen: int = 0
    prior_wall_s: float = 0.0

    def evaluate(self) -> dict[str, float]:
        di = self.di
        return evaluate(
            self.model,
            self.val,
            self.cfg.eval.batch_size,
            di.device,
            di.rank,
            di.world_size,
            self.cfg.eval.compat,
            self.autocast,
            lockstep=parallel.sharded(self.cfg, di.world_size),
        )

    def accuracies(self) -> dict[str, float]:
        di = self.di
        return self.taskrun.accuracies(
            self.model,
            self.cfg.eval.batch_size,
            di.device,
            di.rank,
            di.world_size,
            self.autocast,
            lockstep=parallel.sharded(self.cfg, di.world_size),
        )

    def phase_loader(self, step: int) -> StatefulDataLoader:
        return self.taskrun.loader(
            step,
            self.cfg.trainer.micro_batch_size,
            self.di.rank,
            self.di.world_size,
            pin_memory=self.di.device.type == "cuda",
        )


def build_job(cfg: DictConfig, run_dir: Path, di: distributed.DistInfo) -> Job:
    check_known_keys(cfg)
    tc = cfg.trainer
    if tc.lr is not None:
        cfg.optimizer.lr = tc.lr
    accum = check_config(cfg, di.world_size)
    precision = resolve_precision(tc.precision, di.device)
    autocast = (
        torch.autocast(di.device.type, dtype=torch.bfloat16)
        if precision == "bf16_autocast"
        else None
    )
    torch.manual_seed(tc.seed)

    tokenizer = load_tokenizer(cfg.data.tokenizer, data.builtin_spec(cfg.data))
    taskrun = None
    if cfg.data.source == "tasks":  # (refuses a tokenizer larger than the model's vocabulary)
        taskrun = continual.setup(cfg.data, tc, tokenizer, cfg.model.vocab_size)
    elif tokenizer.vocab_size > cfg.model.vocab_size:
        log.warning(
            f"tokenizer has {tokenizer.vocab_size} ids but model.vocab_size="
            f"{cfg.model.vocab_size}: a document with a larger id stops the run"
        )
    model = build_model(cfg.model, di.device)
    if tc.init_from:
        loaded = pretrained.load_initial_weights(model, tc.init_from)
        if di.is_main:
            log.info(f"initial weights from {loaded}")
    if precision == "bf16":
        model.to(torch.bfloat16)
    if tc.compile:
        for block in model.model.layers:
            block.compile()
    if taskrun is not None:
        val = tasks.validation_rows(
            taskrun.tasks, cfg.data.seq_len, tokenizer.pad_id, cfg.eval.tokens
        )
    else:
        val = data.validation_rows(cfg.data, tokenizer, cfg.model.vocab_size, cfg.eval.tokens)
    before_surgery = None
    fresh = tc.eval_at_start and not cfg.checkpoint.resume
    if cfg.optimizer.name == "welore" and cfg.optimizer.ranks is None and fresh:
        # the compression happens in the build: the loaded model's perplexity first
        before_surgery = evaluate(
            model, val, cfg.eval.batch_size, di.device, di.rank, di.world_size,
            cfg.eval.compat, autocast,
        )  # fmt: skip
    optimizer = optimizers.build(cfg.optimizer, model)
    if tc.init_from and hasattr(optimizer, "calibrate"):
        calibrate_layers(optimizer, model, val, cfg.eval.batch_size, di, autocast)
    # after any surgery, before the probe, the first compiled forward and FSDP2's fully_shard
    apply_activation_checkpointing(model, tc.activation_checkpointing, precision)
    if taskrun is not None:
        loader = taskrun.loader(
            0, tc.micro_batch_size, di.rank, di.world_size, pin_memory=di.device.type == "cuda"
        )
    else:
        loader = data.train_loader(
            cfg.data,
            tokenizer,
            cfg.model.vocab_size,
            tc.micro_batch_size,
            di.rank,
            di.world_size,
            pin_memory=di.device.type == "cuda",
        )
    memory = MemoryReport()
    # Saved-tensor bytes of one micro-batch, measured on held-out rows so no data is consumed.
    reps = -(-tc.micro_batch_size // len(val["input_ids"]))
    # (a copy: a slice would keep, and be counted with, the storage of all validation rows)
    probe = val["input_ids"].repeat(reps, 1)[: tc.micro_batch_size].clone().to(di.device)
    memory.activations = activation_bytes(model, probe, probe, autocast)
    if parallel.sharded(cfg, di.world_size):  # (after the probe: it runs the whole model)
        from llmpt.optimizers.sharded import shard_model

        optimizer = shard_model(
            model, optimizer, lambda m: parallel.fully_shard_model(m, di.device, precision)
        )
    if tc.memory_snapshot:
        if di.device.type != "cuda":
            raise ValueError(
                "trainer.memory_snapshot=true records the CUDA caching allocator's history and "
                f"needs a CUDA device (this run is on {di.device.type}); turn it off"
            )
        torch.cuda.memory._record_memory_history(max_entries=100_000)
    if di.device.type == "cuda":  # the peaks' window starts here: step 0 and its refresh in it
        torch.cuda.reset_peak_memory_stats(di.device)
    return Job(
        cfg=cfg,
        di=di,
        run_dir=run_dir,
        precision=precision,
        autocast=autocast,
        accum=accum,
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, tc, taskrun.phase_ranges() if taskrun else None),
        loader=loader,
        val=val,
        entropy=data.source_entropy(cfg.data, tokenizer, val),
        memory=memory,
        fingerprint=fingerprint(cfg, di.world_size, precision),
        predicted=_predict(cfg, precision, di.world_size),
        taskrun=taskrun,
        surgery=_surgery_report(optimizer, before_surgery),
        guard=NonFiniteGuard(
            tc.on_nonfinite,
            tc.max_nonfinite_skips,
            optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"]),
            tc.grad_clip,
        ),
    )


CALIBRATION_ROWS = 32


def calibrate_layers(optimizer, model, val: dict, batch_size: int, di, autocast) -> None:
    """OwLore on trained weights: OWL's outlier ratios from the loaded model on up to 32
    held-out rows (the run's validation rows; no training data is consumed) choose the first
    period's layers, instead of a uniform draw."""
    rows = val["input_ids"][:CALIBRATION_ROWS]

    def forward() -> None:
        for i in range(0, len(rows), batch_size):
            with autocast if autocast is not None else contextlib.nullcontext():
                model(rows[i : i + batch_size].to(di.device))

    weights = optimizer.calibrate(forward)
    if di.is_main and weights is not None:
        log.info(
            f"OwLore: layer probabilities from the loaded weights' outliers on {len(rows)} "
            f"held-out rows: {[round(float(w), 3) for w in weights]}; first active layers "
            f"{optimizer.active_units()}"
        )


def _surgery_report(optimizer, before: dict | None) -> dict | None:
    """WeLore's compression in the summary: its plan, and the loaded model's perplexity before
    it (the initial evaluation is after it)."""
    plan = getattr(optimizer, "plan", None)
    if plan is None:
        return None
    return {
        "err": plan.err,
        "tau": plan.tau,
        "low_rank_components": len(plan.ranks),
        "dense_frozen": len(plan.dense),
        "kept_dense_no_saving": len(plan.no_saving),
        "rank_reduction_attempted": plan.attempted,
        "rank_reduction_achieved": plan.achieved,
        "ppl_before_compression": before["ppl"] if before else None,
    }


def _predict(cfg: DictConfig, precision: str, world_size: int) -> Estimate | None:
    """The estimator's prediction (meta device), reported beside what this run measures; a
    failure is a warning, not a reason to stop a training run."""
    try:
        return estimate(cfg, precision, world_size)
    except Exception as e:  # noqa: BLE001 - any estimator bug must not block training
        log.warning(f"memory estimate failed ({type(e).__name__}: {e}); summary has none")
        return None


def claim_run_dir(
    cfg: DictConfig,
    run_dir: Path,
    di: distributed.DistInfo,
    resume_from: Path | None,
    state: dict | None,
) -> None:
    """Rank 0 decides whether this run may use ``run_dir`` (``llm_pretrain/rundir.py``) before
    any work; every rank raises the same refusal."""

    def claim() -> None:
        step = state["step"] if state is not None else None
        overwrite = cfg.checkpoint.overwrite
        for note in rundir.claim(run_dir, cfg.checkpoint.resume, resume_from, step, overwrite):
            log.info(note)

    decided_on_main(claim, rundir.RunDirTaken, di)


def decided_on_main(check, refusal: type[Exception], di: distributed.DistInfo) -> None:
    """Run ``check`` on rank 0 only; if it raises ``refusal``, every rank raises the same
    message (none is left waiting in a collective for a rank that stopped)."""
    message = None
    if di.is_main:
        try:
            check()
        except refusal as e:
            message = str(e)
    message = distributed.broadcast_object(message)
    if message is not None:
        raise refusal(message)


def check_resumed_settings(job: Job, saved: dict | None, path: Path) -> None:
    """Compare every setting with the checkpoint's: the ones a resume may change
    (``checkpoint.RESUME_MAY_CHANGE``) are applied, each with a log line; any other change is
    refused by key, as the saved state and schedule would silently not follow it. (Checkpoints
    written before the config was saved are compared by fingerprint only.)"""
    if saved is None:
        if job.di.is_main:
            log.warning(f"{path} predates saved configs: only its fingerprint was compared")
        return
    allowed, refused = checkpoint.config_changes(
        saved, OmegaConf.to_container(job.cfg, resolve=True)
    )
    if refused:
        listed = "; ".join(
            f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in refused.items()
        )
        raise checkpoint.CheckpointError(
            f"checkpoint {path} was written with other settings ({listed}); the saved optimizer "
            "state and schedule would not follow them. Resume with the checkpoint's values, or "
            "start a new run (trainer.init_from loads its weights only)"
        )
    if job.di.is_main:
        for k, (old, new) in allowed.items():
            log.info(f"resume: {k} is {new!r} now ({old!r} in the checkpoint), applied")


def restore(job: Job, state: dict[str, Any], path: Path) -> None:
    """Resume from a single-file checkpoint (DDP, one process) or a DCP directory (FSDP2), on
    this run's number of ranks and parallelism, whichever wrote it."""
    di = job.di
    # the world size may change: the model and optimizer reshard, the data is re-split
    current = {k: v for k, v in job.fingerprint.items() if k != "world_size"}
    saved = dict(state["fingerprint"])
    # (written before these keys existed: what every run was then)
    if "data_split" not in saved:
        saved["data_split"] = "documents" if saved["data"][0] == "builtin" else "shards"
    saved.setdefault("kv_heads_tied", [saved["model"][2], False])
    saved.setdefault("tasks", None)
    checkpoint.check_compatible(saved, current, path)
    check_resumed_settings(job, state.get("config"), path)
    max_steps = job.cfg.trainer.max_steps
    if state["step"] > max_steps:
        raise checkpoint.CheckpointError(
            f"checkpoint {path} is at step {state['step']}, past trainer.max_steps={max_steps}: "
            "raise trainer.max_steps to train on, or start a new run"
        )
    if state["step"] == max_steps and di.is_main:
        log.info(
            f"checkpoint {path} is at trainer.max_steps={max_steps}: nothing left to train, "
            "only the final evaluation runs"
        )
    if sharded_checkpoint.is_sharded_checkpoint(path):
        sharded_checkpoint.load_into(path, state, job.model, job.optimizer)
    elif parallel.sharded(job.cfg, di.world_size):  # a whole checkpoint into FSDP2 shards
        sharded_checkpoint.load_whole_model(job.model, state["model"])
        job.optimizer.load_state_dict(state["optimizer"])
    else:
        job.model.load_state_dict(state["model"])
        job.optimizer.load_state_dict(state["optimizer"])
    job.scheduler.load_state_dict(state["scheduler"])
    if job.taskrun is not None:  # the phase of the saved step, and the accuracies so far
        job.taskrun.matrix = [list(row) for row in state.get("task_matrix") or []]
        job.taskrun.state_bytes = list(state.get("task_state_bytes") or [])
        job.loader = job.phase_loader(state["step"])
    saved_ranks = len(state["data"])
    if saved_ranks == di.world_size:
        job.loader.load_state_dict(state["data"][di.rank])
    else:
        data.resplit(job.loader, state["data"], job.cfg.data, path)
        if di.is_main:
            log.info(
                f"{path} was written on {saved_ranks} rank(s): the data stream is re-split "
                f"over {di.world_size} (see data.resplit)"
            )
    checkpoint.set_rng_state(state["rng"][di.rank % saved_ranks])
    job.step, job.tokens_seen = state["step"], state["tokens_seen"]
    job.prior_wall_s = state["wall_time_s"]
    if job.di.is_main:
        log.info(f"resumed from {path} at step {job.step} ({job.tokens_seen:,} tokens seen)")


def saved_path(job: Job) -> Path:
    """Where ``save`` puts this step's checkpoint: a file, or a directory under FSDP2."""
    if parallel.sharded(job.cfg, job.di.world_size):
        return checkpoint.checkpoint_dir(job.run_dir, job.step)
    return checkpoint.checkpoint_path(job.run_dir, job.step)


def save(job: Job, wall_s: float) -> Path:
    """Every rank contributes its data position and RNG state; rank 0 writes the file (under
    FSDP2 every rank writes its shards of one directory). Non-finite weights are never saved:
    that raises ``Diverged`` instead, so ``keep_last`` never prunes a good checkpoint for a bad
    one."""
    if not weights_finite(job.model, job.di.device):
        why = "the checkpoint was not written"
        message = job.guard.message(job.step, "weights", why)
        raise Diverged(message, job.step, job.guard.last_finite)
    # (about: the weights and the state measured at the first step, over all ranks)
    m = job.memory
    needed = distributed.sum_over_ranks([float(m.weights + m.optimizer_state)], job.di.device)[0]
    path = saved_path(job)

    def room() -> None:
        checkpoint.make_room(job.run_dir, job.cfg.checkpoint.keep_last)
        checkpoint.check_room(path, int(needed))

    decided_on_main(room, checkpoint.CheckpointError, job.di)
    states = distributed.gather_objects((job.loader.state_dict(), checkpoint.rng_state()))
    meta = {
        "step": job.step,
        "tokens_seen": job.tokens_seen,
        "wall_time_s": job.prior_wall_s + wall_s,
        "scheduler": job.scheduler.state_dict(),
        "data": [s[0] for s in states],
        "rng": [s[1] for s in states],
        "fingerprint": job.fingerprint,
        "config": OmegaConf.to_container(job.cfg, resolve=True),  # (a resume compares it all)
        "task_matrix": job.taskrun.matrix if job.taskrun is not None else None,
        "task_state_bytes": job.taskrun.state_bytes if job.taskrun is not None else None,
        "wandb_id": job.logger.wandb_id if job.logger else None,
    }
    if parallel.sharded(job.cfg, job.di.world_size):  # every rank writes its shards
        sharded_checkpoint.save(path, job.model, job.optimizer, meta)
    elif job.di.is_main:
        checkpoint.save(
            path,
            {**meta, "model": job.model.state_dict(), "optimizer": job.optimizer.state_dict()},
        )
    if not job.di.is_main:
        return path
    checkpoint.prune(job.run_dir, job.cfg.checkpoint.keep_last, newest=path)
    log.info(f"saved {path}")
    return path


def attach_per_layer_updates(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    memory: MemoryReport,
    last: LastMicroBatch,
    world_size: int = 1,
    sharded: bool = False,
) -> None:
    """Step each parameter in a post-accumulate-grad hook, then free its gradient.

    In the step's last backward (``last.now``), when a parameter's hook fires every other
    parameter's gradient is either already consumed (None) or not complete yet, so a plain
    ``optimizer.step()`` updates exactly this parameter: any torch optimizer works, with its own
    state and one learning-rate schedule. In earlier micro-batches the hook only sets the
    gradient aside, so the step happens once, on the whole batch's gradient. On several ranks
    (no DDP wrapper in this mode) the hook first averages the gradient over the ranks, so each
    parameter steps on the same reduced gradient everywhere. Under FSDP2 (``sharded``) the hooks
    are the shards': FSDP2 runs them after a block's reduce-scatter, only in the backward that
    synchronises (the last), so each shard steps on its reduced gradient through the sharded
    optimizer (the owner gathers, updates and scatters, in the same order on every rank). The
    gradient storages alive at each hook (set-aside ones included; under FSDP2 a shard's gradient
    is a view of its block's reduce-scatter output, counted whole) are recorded, so the memory
    report shows the peak this mode actually reaches.
    """
    # every trained parameter, also those a layer sampler has frozen for now
    params = [p for p in model.parameters() if trainable(p)]

    # our optimizers step one parameter at a time here and count the step once, in the
    # gradient-free optimizer.step() of train_step: layer samplers switch on optimizer steps
    step_one = getattr(optimizer, "update_parameter", None)

    stash: dict[torch.Tensor, torch.Tensor] = {}

    def hook(p: torch.Tensor) -> None:
        if not last.now:  # accumulating: the step comes after the last micro-batch
            # kept aside, so that in the last backward a parameter's .grad exists only once it
            # is complete (a torch optimizer's step() then sees no other parameter's gradient)
            stash[p] = stash[p].add_(p.grad) if p in stash else p.grad
            p.grad = None
            return
        if p in stash:  # (g_last + (g_1 + ...): IEEE addition commutes, as the normal path's)
            p.grad.add_(stash.pop(p))
        if getattr(p, "frozen_by_sampler", False):  # (marked, not frozen, on several ranks)
            p.grad = None
            return
        if world_size > 1 and not sharded:
            distributed.all_reduce(p.grad).div_(world_size)
        if memory.weights == 0:  # measured during the first step only: it costs O(params)
            alive = unique_nbytes(
                [*(q.grad for q in params if q.grad is not None), *stash.values()]
            )
            memory.gradients = max(memory.gradients, alive)
        if step_one is not None:
            step_one(p)
        else:
            optimizer.step()
        p.grad = None

    for p in params:
        frozen = not p.requires_grad  # (torch hooks only tensors that require grad)
        p.requires_grad_(True)
        p.register_post_accumulate_grad_hook(hook)
        p.requires_grad_(not frozen)


def train_step(job: Job, batches, timer: PhaseTimer) -> tuple[float, float, float, Any]:
    """One optimizer step over ``accum`` micro-batches per rank.

    The loss is normalised by the global count of predicted tokens, so every token weighs the
    same whatever its micro-batch, rank or padding. The non-finite guard sees the loss (and,
    when it needs them, the gradients) before the update: it may skip the update or raise
    ``Diverged``. Returns (predicted tokens, non-pad input tokens, the global mean loss (NaN
    when the update was skipped), grad norm or None).
    """
    di, tc = job.di, job.cfg.trainer
    job.watchdog.begin(job.step + 1)
    micro = [next(batches) for _ in range(job.accum)]
    label_tokens, input_tokens = distributed.sum_over_ranks(
        [
            sum(float((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro),
            # (task rows carry their own count: their prompts are not labels)
            sum(
                float(
                    mb["tokens"].sum() if "tokens" in mb else (mb["labels"] != IGNORE_INDEX).sum()
                )
                for mb in micro
            ),
        ],
        di.device,
    )
    timer.mark("data")
    job.watchdog.phase("forward_backward")

    loss_sum = torch.zeros((), device=di.device, dtype=torch.float64)
    for i, mb in enumerate(micro):
        x = mb["input_ids"].to(di.device, non_blocking=True)
        y = mb["labels"].to(di.device, non_blocking=True)
        sync = di.world_size == 1 or i == job.accum - 1  # reduce once, on the last one
        job.last_micro.now = i == job.accum - 1
        with parallel.gradient_sync(job.train_model, sync):
            with job.autocast if job.autocast is not None else nullcontext():
                s = job.train_model(x, y, reduction="sum")
            # DDP and FSDP average over ranks: scale each rank's sum to the global token mean.
            (s * (di.world_size / max(label_tokens, 1.0))).backward()
        loss_sum += s.detach().double()
    timer.mark("forward_backward")
    job.watchdog.phase("optimizer")

    grad_norm, grads_ok = None, None
    if not tc.per_layer_update:  # (per-layer: the hooks stepped every parameter in backward)
        # layers a sampler froze for this period are left out, also under DDP where their
        # gradients exist: the norm is the one of the gradients the optimizer applies
        applied = [p for p in job.model.parameters() if not getattr(p, "frozen_by_sampler", 0)]
        if tc.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(applied, tc.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, the same on every rank
                grad_norm = grad_norm.full_tensor()
            grads_ok = torch.isfinite(grad_norm)
        elif job.guard.checks_gradients:
            grads_ok = grads_finite(applied)
    signalled = job.preemption.received is not None
    apply, loss = job.guard.check(
        job.step + 1, loss_sum, label_tokens, grads_ok, di.device, signalled
    )
    analysis = None
    if job.analysis is not None and job.analysis.due(job.step + 1) and apply:
        timer.mark("optimizer")
        analysis = job.analysis.measure(label_tokens) if di.is_main else None
        timer.mark("gradient_analysis")
    if apply:
        # (per-layer: every gradient is consumed; this only counts the step and lets samplers
        # switch)
        job.optimizer.step()
        if job.analysis is not None and di.is_main:
            job.analysis.observe_bases()
    with warnings.catch_warnings():  # (torch warns when the first update was skipped)
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`")
        job.scheduler.step()  # (a skipped step still moves the schedule: it follows job.step)
    if job.memory.weights == 0 and apply:  # this process's first update: the state exists now
        job.memory.measure_training_state(job.model, job.optimizer)
        if parallel.sharded(job.cfg, di.world_size):
            m = job.memory
            job.memory.per_rank = distributed.gather_objects(
                {
                    "weights": m.weights,
                    "gradients": m.gradients,
                    "optimizer_state": m.optimizer_state,
                }
            )
    job.optimizer.zero_grad(set_to_none=True)
    timer.mark("optimizer")
    job.watchdog.end()
    job.step += 1
    job.tokens_seen += int(input_tokens)
    if analysis and job.logger is not None:
        job.logger.log({"step": job.step, **analysis})
    return label_tokens, input_tokens, loss, grad_norm


def _train(cfg: DictConfig, run_dir: Path, di: distributed.DistInfo) -> dict[str, Any]:
    t_start = time.perf_counter()
    tc = cfg.trainer
    check_known_keys(cfg)  # (before the run directory is touched)
    check_values(cfg)
    resume_from = (
        checkpoint.resolve(cfg.checkpoint.resume, run_dir) if cfg.checkpoint.resume else None
    )
    state = None
    if resume_from is not None:
        sharded_file = sharded_checkpoint.is_sharded_checkpoint(resume_from)
        state = (sharded_checkpoint.load_meta if sharded_file else checkpoint.load)(resume_from)
    claim_run_dir(cfg, run_dir, di, resume_from, state)
    job = build_job(cfg, run_dir, di)
    if state is not None:
        restore(job, state, resume_from)
    if di.is_main:
        job.logger = RunLogger(
            run_dir,
            cfg.logger,
            OmegaConf.to_container(cfg, resolve=True),
            cfg.run_name,
            resume_id=state.get("wandb_id") if state else None,
        )
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        log.info(
            f"model {cfg.model.name}: {job.model.num_params() / 1e6:.2f}M parameters "
            f"({job.model.num_params(non_embedding=True) / 1e6:.2f}M outside embeddings); "
            f"{di.world_size} rank(s), {job.accum} micro-batch(es) of {tc.micro_batch_size} per "
            f"step, precision {job.precision}, activation checkpointing "
            f"{tc.activation_checkpointing}, run dir {run_dir}"
        )
        if hasattr(job.optimizer, "projection_report"):
            log.info(f"optimizer {cfg.optimizer.name}: {job.optimizer.projection_report()}")
    logger = job.logger or RunLogger(None)
    if tc.per_layer_update:
        attach_per_layer_updates(
            job.model,
            job.optimizer,
            job.memory,
            job.last_micro,
            di.world_size,
            parallel.sharded(cfg, di.world_size),
        )
        if tc.grad_clip > 0 and di.is_main:
            log.warning(
                f"trainer.grad_clip={tc.grad_clip} is not applied: with "
                "trainer.per_layer_update=true a parameter is updated before the global gradient "
                "norm exists, so clipping is off (set trainer.grad_clip=0 to silence this)"
            )
    check_analysis_supported(
        tc.gradient_analysis_every, tc.per_layer_update, parallel.sharded(cfg, di.world_size)
    )
    if tc.gradient_analysis_every:
        job.analysis = GradientAnalysis(job.model, job.optimizer, tc.gradient_analysis_every)
    job.train_model = parallel.training_module(
        job.model, di.world_size, tc.parallelism, tc.per_layer_update
    )

    initial = job.evaluate() if tc.eval_at_start and job.step == 0 else None
    if initial is not None:
        logger.log(
            {
                "step": 0,
                "eval/loss": initial["loss"],
                "eval/ppl": initial["ppl"],
                "eval/tokens": initial["tokens"],
            }
        )

    show_bar = tc.progress and di.is_main and sys.stderr.isatty()
    bar = tqdm(
        total=tc.max_steps,
        initial=job.step,
        disable=not show_bar,
        dynamic_ncols=True,
        unit="step",
        mininterval=0.5,
    )
    timer = PhaseTimer(di.device, tc.phase_timing)
    window_tokens, window_s, loop_tokens = 0, 0.0, 0
    batches = iter(job.loader)
    job.train_model.train()
    first_of_process = job.step  # (a resumed run starts later)
    job.preemption.install()
    job.watchdog = StepWatchdog(
        tc.stall_factor,
        tc.stall_min_s,
        di.rank,
        di.world_size,
        namespace=str(job.run_dir),
        on_stall=lambda message: record_stall(job, logger, message, time.perf_counter() - t_start),
    )
    job.watchdog.start()
    try:
        while job.step < tc.max_steps:
            first_step = job.memory.weights == 0  # this process's first: memory gets measured
            label_tokens, input_tokens, loss, grad_norm = train_step(job, batches, timer)
            if first_step and job.memory.weights:  # (not when the first update was skipped)
                logger.log(job.memory.record(job.step))
            snapshot_due = job.step == min(tc.max_steps, first_of_process + SNAPSHOT_STEPS)
            if tc.memory_snapshot and snapshot_due:
                path = job.run_dir / f"memory_snapshot_rank{di.rank}.pickle"
                torch.cuda.memory._dump_snapshot(str(path))
                torch.cuda.memory._record_memory_history(enabled=None)
                log.info(
                    f"saved the CUDA memory snapshot to {path} (open it at pytorch.org/memory_viz)"
                )
            window_tokens += int(input_tokens)
            loop_tokens += int(input_tokens)
            bar.update(1)
            if job.step % tc.log_every == 0 or job.step == tc.max_steps:
                # Throughput over the step's phases only: evals and checkpoints are timed apart.
                tps = window_tokens / max(timer.step_seconds() - window_s, 1e-9)
                window_tokens, window_s = 0, timer.step_seconds()
                lr = job.scheduler.get_last_lr()[0]
                record = {
                    "step": job.step,
                    "train/loss": loss,
                    "train/lr": lr,
                    "train/tokens_seen": job.tokens_seen,
                    "train/tokens_per_s": tps,
                }
                if grad_norm is not None:
                    record["train/grad_norm"] = float(grad_norm)
                if job.guard.skipped:
                    record["train/skipped_steps"] = job.guard.skipped
                logger.log(record)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                if di.is_main and not show_bar:
                    log.info(
                        f"step {job.step}/{tc.max_steps} loss {loss:.4f} lr {lr:.3e} "
                        f"tok/s {tps:.0f}"
                    )
            timer.mark("logging")
            phase_over = job.taskrun is not None and job.taskrun.phase_end(job.step)
            if phase_over and finish_phase(job, logger, show_bar):  # the next task's stream
                batches = iter(job.loader)
            timer.mark("eval")

            stop = False
            if tc.max_time_s > 0:  # every rank must agree, so rank 0's clock decides
                stop = distributed.broadcast_object(time.perf_counter() - t_start > tc.max_time_s)
            if (
                tc.eval_every
                and job.step % tc.eval_every == 0
                and job.step < tc.max_steps
                and not stop
            ):
                ev = job.evaluate()
                logger.log({"step": job.step, "eval/loss": ev["loss"], "eval/ppl": ev["ppl"]})
                if di.is_main and not show_bar:
                    log.info(f"step {job.step} eval loss {ev['loss']:.4f} ppl {ev['ppl']:.2f}")
            timer.mark("eval")
            saved_now = cfg.checkpoint.every and job.step % cfg.checkpoint.every == 0
            if saved_now:
                save(job, time.perf_counter() - t_start)
            timer.mark("checkpoint")
            if job.guard.stop_requested:  # SIGTERM / SIGUSR1 on some rank: save and go
                path = save(job, time.perf_counter() - t_start) if not saved_now else None
                raise Preempted(
                    f"stopped by {job.preemption.received or 'a signal on another rank'} after "
                    f"step {job.step}; its checkpoint is saved: resume with "
                    f"checkpoint.resume=auto (exit code {REQUEUE_EXIT})",
                    job.preemption.received or "another rank's",
                    str(path or saved_path(job)),
                )
            if stop:
                if di.is_main:
                    log.info(f"trainer.max_time_s={tc.max_time_s} reached at step {job.step}")
                break
        saved_now = cfg.checkpoint.every and job.step % cfg.checkpoint.every == 0
        if cfg.checkpoint.at_end and not saved_now:
            save(job, time.perf_counter() - t_start)
    except (Diverged, Preempted) as e:
        bar.close()
        stopped(job, logger, e, time.perf_counter() - t_start)
        raise
    finally:
        job.preemption.restore()
        job.watchdog.stop()
    bar.close()
    if not parallel.sharded(cfg, di.world_size):  # (FSDP2: every rank holds other rows)
        distributed.check_replicas(job.model)
    final = job.evaluate()
    logger.log(
        {
            "step": job.step,
            "eval/loss": final["loss"],
            "eval/ppl": final["ppl"],
            "eval/tokens": final["tokens"],
        }
    )
    task_summary = None
    if job.taskrun is not None:
        run = job.taskrun
        done = run.sequential and len(run.matrix) == len(run.phases)
        accs = dict(zip(run.names, run.matrix[-1], strict=True)) if done else job.accuracies()
        if not done:
            logger.log({"step": job.step, **{f"tasks/{k}": v for k, v in accs.items()}})
        task_summary = run.summary(accs)
    job.memory.measure_cuda_peaks(di.device)
    summary = build_summary(
        job,
        initial,
        final,
        loop_tokens / max(timer.step_seconds(), 1e-9),
        timer,
        job.prior_wall_s + time.perf_counter() - t_start,
    )
    if task_summary is not None:
        summary["tasks"] = task_summary
    if job.surgery is not None:
        summary["welore"] = job.surgery
    logger.summary(summary)
    logger.close()
    if di.is_main:
        print(format_summary(summary), flush=True)
    return summary


def stopped(job: Job, logger: RunLogger, e: Diverged | Preempted, wall_s: float) -> None:
    """The run stops on ``e``: ``summary.json`` says so (status ``diverged``, with the step and
    the last finite loss, the checkpoints on disk being the last finite ones, all kept; or
    ``preempted``, with the signal and the checkpoint just saved)."""
    diverging = isinstance(e, Diverged)
    if job.di.is_main:
        (log.error if diverging else log.warning)(str(e))
    detail = (
        {"diverged": e.record()}
        if diverging
        else {"preempted": {"signal": e.signal_name, "checkpoint": e.checkpoint}}
    )
    logger.summary(
        {
            "status": "diverged" if diverging else "preempted",
            "run_dir": str(job.run_dir),
            "model": job.cfg.model.name,
            "optimizer": job.cfg.optimizer.name,
            "steps": job.step,
            "tokens_seen": job.tokens_seen,
            "wall_time_s": job.prior_wall_s + wall_s,
            **detail,
            "error": str(e),
        }
    )
    logger.close()


def record_stall(job: Job, logger: RunLogger, message: str, wall_s: float) -> None:
    """The watchdog's thread is about to end this process (watchdog.py): ``summary.json`` says
    ``stalled``, with the message that names the rank."""
    logger.summary(
        {
            "status": "stalled",
            "run_dir": str(job.run_dir),
            "model": job.cfg.model.name,
            "optimizer": job.cfg.optimizer.name,
            "steps": job.step,
            "tokens_seen": job.tokens_seen,
            "wall_time_s": job.prior_wall_s + wall_s,
            "error": message,
        }
    )
    logger.close()


def finish_phase(job: Job, logger: RunLogger, show_bar: bool) -> bool:
    """A sequential task run's phase is done: every task's accuracy becomes a row of the
    matrix; unless it was the last, the optimizer's ``end_task()`` runs (if it has one; else,
    with ``data.tasks.restart_optimizer``, its state restarts) and the next task's stream
    replaces this one (returns True)."""
    run = job.taskrun
    accs = job.accuracies()
    run.matrix.append([accs[n] for n in run.names])
    run.state_bytes.append(sum(optimizers.state_nbytes(job.optimizer).values()))
    phase = len(run.matrix) - 1
    logger.log(
        {"step": job.step, "tasks/phase": phase, **{f"tasks/{k}": v for k, v in accs.items()}}
    )
    if job.di.is_main and not show_bar:
        log.info(
            f"phase {phase} ({run.names[phase]}) done at step {job.step}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in accs.items())
        )
    if job.step >= job.cfg.trainer.max_steps:
        return False
    end_task = getattr(job.optimizer, "end_task", None)
    if end_task is not None:
        end_task()
    elif job.cfg.data.tasks.restart_optimizer:
        optimizers.restart_state(job.optimizer)
    job.loader = job.phase_loader(job.step)
    return True


def build_summary(
    job: Job,
    initial: dict | None,
    final: dict,
    tokens_per_s: float,
    timer: PhaseTimer,
    wall_s: float,
) -> dict[str, Any]:
    cfg, di = job.cfg, job.di
    return {
        "status": "ok",
        "run_dir": str(job.run_dir),
        "model": cfg.model.name,
        "optimizer": cfg.optimizer.name,
        "params": job.model.num_params(),
        "world_size": di.world_size,
        "parallelism": cfg.trainer.parallelism,
        "precision": job.precision,
        "steps": job.step,
        "skipped_steps": job.guard.skipped,  # trainer.on_nonfinite=skip_step
        "tokens_seen": job.tokens_seen,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(
            job.model, cfg.data.seq_len, tokens_per_s / di.world_size, di.device, job.precision
        ),
        "wall_time_s": wall_s,
        "eval": {
            "initial_loss": initial["loss"] if initial else None,
            "initial_ppl": initial["ppl"] if initial else None,
            "final_loss": final["loss"],
            "final_ppl": final["ppl"],
            "tokens": final["tokens"],
            "compat": cfg.eval.compat,
            "source_entropy": job.entropy,
            "gap_to_entropy": final["loss"] - job.entropy if job.entropy is not None else None,
        },
        "memory": {
            **job.memory.to_dict(),
            "predicted": job.predicted.to_dict() if job.predicted is not None else None,
        },
        "timing": timer.summary(),
    }


def _append_row(sweep_dir: Path, row: dict[str, Any]) -> None:
    """Add a job's row to the sweep's ``results.jsonl``, replacing any earlier row of the same
    run directory (a sweep run again with ``checkpoint.resume=auto``): one row per job."""
    import fcntl

    sweep_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps(json_safe(row), allow_nan=False) + "\n"
    with open(sweep_dir / "results.jsonl", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        old = f.read().splitlines(keepends=True)
        kept = [ln for ln in old if _row_dir(ln) != row["run_dir"]]
        if len(kept) == len(old):
            f.write(line)
        else:
            f.seek(0)
            f.truncate()
            f.writelines([*kept, line])
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)


def _row_dir(line: str) -> str | None:
    try:
        return json.loads(line).get("run_dir")
    except (json.JSONDecodeError, AttributeError):
        return None  # (a row cut short: kept, the report lists it)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    sweep_dir = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    overrides = list(hc.overrides.task)
    try:
        summary = train(cfg, Path(hc.runtime.output_dir), sweep_dir, overrides)
    except Preempted:
        sys.exit(REQUEUE_EXIT)  # (logged and summarised already; the launcher requeues)
    if sweep_dir is not None and distributed.launched_rank() == 0:
        _append_row(sweep_dir, sweep_row(cfg, Path(summary["run_dir"]), summary, overrides))
    return summary["eval"]["final_loss"]


def _argv_for_rank(argv: list[str], rank: int) -> list[str]:
    """Ranks other than 0 compose the same config but write nothing (no .hydra/, no log file)."""
    if rank == 0:
        return argv
    if any(a in ("-m", "--multirun") for a in argv):
        raise SystemExit(
            "multirun (-m) under torchrun is not supported: run the sweep without "
            "torchrun, or launch each point with torchrun"
        )
    kept = [a for a in argv if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    return kept + [
        "hydra.run.dir=.",
        "hydra.output_subdir=null",
        "hydra/job_logging=disabled",
        "hydra/hydra_logging=disabled",
    ]


def _multirun_flag_first(argv: list[str]) -> list[str]:
    """Hydra's argparse only takes ``-m`` before the overrides (``train a=1 -m b=2,3`` is an
    'unrecognized arguments' error): move it to the front."""
    flags = [a for a in argv[1:] if a in ("-m", "--multirun")]
    if not flags:
        return argv
    return [argv[0], "-m", *[a for a in argv[1:] if a not in ("-m", "--multirun")]]


def main() -> None:
    sys.argv = _argv_for_rank(_multirun_flag_first(sys.argv), distributed.launched_rank())
    register_configs()
    hydra_main()


if __name__ == "__main__":
    main()
