"""The end-of-run table a person reads, and the one-line row a sweep collects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

MiB = 2**20


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:,.1f} MiB"


def _duration(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def format_summary(s: dict[str, Any]) -> str:
    ev, mem, tm = s["eval"], s["memory"], s["timing"]
    ppl = f"{ev['final_ppl']:,.2f}"
    if ev["initial_ppl"] is not None:
        ppl = f"{ev['initial_ppl']:,.1f} -> {ppl}"
    rows = [
        ("model / optimizer", f"{s['model']} ({s['params'] / 1e6:.2f}M params) / {s['optimizer']}"),
        ("val ppl (start -> end)" if ev["initial_ppl"] is not None else "val ppl", ppl),
        (
            "val loss",
            f"{ev['final_loss']:.4f} nats/token over {ev['tokens']:,} tokens"
            + (" (galore-compat estimator)" if ev["compat"] == "galore" else ""),
        ),
    ]
    if ev["source_entropy"] is not None:
        rows.append(
            (
                "source entropy (optimum)",
                f"{ev['source_entropy']:.4f} nats/token, gap {ev['gap_to_entropy']:+.4f}",
            )
        )
    rows += [
        ("steps / tokens seen", f"{s['steps']:,} / {s['tokens_seen']:,}"),
        (
            "tokens/s",
            f"{s['tokens_per_s']:,.0f} ({s['world_size']} rank(s), {s['precision']})"
            + (f", MFU {s['mfu']:.1%}" if s.get("mfu") else ""),
        ),
        ("time outside fwd/bwd/step", f"{tm['overhead_fraction']:.1%} (data + logging)"),
        ("wall time", _duration(s["wall_time_s"])),
        ("memory: weights", _mib(mem["weights"])),
        ("memory: gradients", _mib(mem["gradients"])),
        ("memory: optimizer state", _mib(mem["optimizer_state"])),
        ("memory: activations", _mib(mem["activations"]) + " (saved for backward, 1 micro-batch)"),
    ]
    predicted = mem.get("predicted")
    if predicted:
        measured = sum(mem[k] for k in ("weights", "gradients", "optimizer_state", "activations"))
        rows.append(
            (
                "memory: predicted",
                f"{_mib(predicted['total'])} in all (measured {_mib(measured)}); "
                "python -m llm_pretrain.memory",
            )
        )
    if mem.get("cuda_peak_allocated") is not None:
        rows.append(
            (
                "memory: CUDA peak",
                f"{_mib(mem['cuda_peak_allocated'])} allocated, "
                f"{_mib(mem['cuda_peak_reserved'])} reserved",
            )
        )
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 50)
    body = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    return f"\n{line}\nrun summary  ({s['run_dir']})\n{line}\n{body}\n{line}"


def sweep_row(
    cfg: DictConfig,
    run_dir: Path,
    summary: dict[str, Any] | None,
    overrides: list[str] | None = None,
    error: str | None = None,
    status: str = "failed",
) -> dict[str, Any]:
    """One row of a sweep's ``results.jsonl``; a failed or diverged job (``status``) still gets
    a row, with its error."""
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # the job failed on this config: keep it as written
        config = OmegaConf.to_container(cfg, resolve=False)
    row: dict[str, Any] = {
        "run_dir": str(run_dir),
        "overrides": overrides or [],
        "model": cfg.model.name,
        "optimizer": cfg.optimizer.name,
        "config": config,
    }
    if summary is None:
        return row | {"status": status, "error": error}
    ev, mem = summary["eval"], summary["memory"]
    return row | {
        "status": "ok",
        "final_val_ppl": ev["final_ppl"],
        "final_val_loss": ev["final_loss"],
        "tokens_seen": summary["tokens_seen"],
        "tokens_per_s": summary["tokens_per_s"],
        "world_size": summary["world_size"],
        "wall_time_s": summary["wall_time_s"],
        "tasks": summary.get("tasks"),
        "memory": {
            k: mem[k]
            for k in (
                "weights",
                "gradients",
                "optimizer_state",
                "activations",
                "cuda_peak_allocated",
                "cuda_peak_reserved",
                "optimizer_state_by_category",
            )
        },
    }
