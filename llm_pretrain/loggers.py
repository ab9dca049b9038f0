"""Run logging: ``metrics.jsonl`` and ``summary.json`` always, wandb when enabled.

Only rank 0 constructs a real logger; other ranks get one that does nothing. wandb is imported
lazily, so it is never a requirement, and ``logger.mode=offline`` (or ``WANDB_MODE=offline``)
writes the run under the run directory without a network, to be synced later.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llm_pretrain.config import LoggerConfig


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as null: strict JSON (Python's ``json`` would write
    the non-standard ``NaN`` and ``Infinity``), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def nonfinite_flags(record: dict[str, Any]) -> dict[str, str]:
    """The top-level values ``json_safe`` turns to null, as strings ("nan", "inf", "-inf"): a
    metrics row keeps them, so null still says which."""
    return {k: str(v) for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}


class RunLogger:
    def __init__(
        self,
        run_dir: Path | None,
        cfg: LoggerConfig | None = None,
        config: dict | None = None,
        run_name: str | None = None,
        resume_id: str | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.wandb_run = None
        if run_dir is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if cfg is not None and cfg.wandb:
            self.wandb_run = _start_wandb(cfg, run_dir, config or {}, run_name, resume_id)

    @property
    def wandb_id(self) -> str | None:
        """Stored in checkpoints, so a resumed run keeps logging to the same wandb run."""
        return self.wandb_run.id if self.wandb_run is not None else None

    @property
    def enabled(self) -> bool:
        return self.run_dir is not None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        flags = nonfinite_flags(record)
        row = json_safe(record) | ({"nonfinite": flags} if flags else {})
        self._metrics.write(json.dumps(row, allow_nan=False) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(
                {k: v for k, v in record.items() if k != "step"}, step=int(record["step"])
            )

    def summary(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        text = json.dumps(json_safe(summary), indent=2, allow_nan=False)
        (self.run_dir / "summary.json").write_text(text + "\n")
        if self.wandb_run is not None:
            self.wandb_run.summary.update(_flatten(json_safe(summary)))

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def _start_wandb(
    cfg: LoggerConfig, run_dir: Path, config: dict, run_name: str | None, resume_id: str | None
):
    if cfg.mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.mode={cfg.mode!r}: use online, offline or disabled")
    try:
        import wandb
    except ImportError as e:
        raise ImportError("logger.wandb=true needs wandb: pip install -e '.[wandb]'") from e
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        group=cfg.group,
        tags=list(cfg.tags),
        name=run_name,
        mode=cfg.mode,
        dir=str(run_dir),
        config=config,
        job_type="train",
        id=resume_id,
        resume="allow" if resume_id else None,
    )
    run.define_metric("train/tokens_seen")
    run.define_metric("eval/ppl", summary="min")
    return run
