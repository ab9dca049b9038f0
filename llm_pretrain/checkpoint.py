"""Atomic, weights_only-safe checkpoints that resume bit-exactly.

(FSDP2 runs write directories instead: ``sharded_checkpoint.py``.) One file per save, written by
rank 0: model, optimizer, scheduler, every rank's data-loader
position and RNG states, step counters and a fingerprint of the config that must not change
across a resume. Everything is tensors and plain Python values, so loading with
``weights_only=True`` reads it without unpickling code. A save goes to a temp file in the same
directory, is fsynced, then renamed: a crash mid-save never leaves a truncated checkpoint under
the final name.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "llm_pretrain.checkpoint/1"
SHARDED_META = "meta.pt"  # the file that makes a step_* directory a sharded checkpoint
NAME_RE = re.compile(r"step_(\d+)(\.pt)?$")  # a file, or a directory (sharded: DCP)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason and the fix."""


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` through a temp file that is removed whatever happens; a full
    disk is named, with the bytes needed and the fix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = _no_room_error(e)
        if full is not None:
            reason = f" ({full.strerror})" if full.errno == errno.EFBIG else ""
            raise CheckpointError(no_room_message(path, tensor_nbytes(payload)) + reason) from e
        raise
    return path


def _no_room_error(e: BaseException | None) -> OSError | None:
    """The full-disk (or quota, or file-size limit) error behind ``e``, if any: torch's zip
    writer turns one into a RuntimeError about the file position when it closes."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def tensor_nbytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) payload: about what a checkpoint of it takes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_nbytes(v) for v in obj)
    return 0


def _free_bytes(path: Path) -> int:
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def no_room_message(path: Path, needed: int) -> str:
    free = _free_bytes(path)
    return (
        f"no room for checkpoint {path}: it needs about {needed / 2**20:,.1f} MiB and "
        f"{free / 2**20:,.1f} MiB are free on that filesystem. Free some space, keep fewer "
        "checkpoints (checkpoint.keep_last), or put the run on a larger disk (hydra.run.dir=...)"
    )


def check_room(path: Path, needed: int) -> None:
    """Refuse before writing (the temp file would fill the disk and be removed anyway)."""
    if needed > _free_bytes(path):
        raise CheckpointError(no_room_message(path, needed))


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}.pt"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """A sharded run's checkpoint: a directory (``llm_pretrain/sharded_checkpoint.py``)."""
    return run_dir / "checkpoints" / f"step_{step:08d}"


def _is_checkpoint(p: Path) -> bool:
    m = NAME_RE.fullmatch(p.name)
    if m is None:
        return False
    return p.is_file() if m.group(2) else (p / SHARDED_META).is_file()


def step_of(path: Path) -> int:
    """The step in a checkpoint's name (``step_00000040.pt`` or ``step_00000040/``)."""
    return int(NAME_RE.fullmatch(path.name).group(1))


def list_checkpoints(directory: Path) -> list[Path]:
    found = [p for p in directory.glob("step_*") if _is_checkpoint(p)]
    return sorted(found, key=step_of)


def prune(run_dir: Path, keep: int, newest: Path | None = None) -> None:
    """Delete all but the ``keep`` latest checkpoints; ``newest`` (the one just written) always
    stays, whatever sorts after it. ``keep`` <= 0: delete nothing."""
    if keep <= 0:
        return
    found = [p for p in list_checkpoints(run_dir / "checkpoints") if p != newest]
    for old in found[: max(len(found) - (keep - (newest is not None)), 0)]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def make_room(run_dir: Path, keep_last: int) -> None:
    """Before a save: keep ``keep_last - 1`` checkpoints, so the new one makes ``keep_last`` and
    the disk never holds more. With ``keep_last=1`` the old one stays until the new one is
    complete (room for 2), or a kill mid-save would leave none."""
    if keep_last >= 2:
        prune(run_dir, keep_last - 1)


def resolve(spec: str, run_dir: Path) -> Path | None:
    """``checkpoint.resume``: ``auto`` (latest in this run, or none), a file, or a run directory."""
    if spec == "auto":
        found = list_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(spec).expanduser()
    if _is_checkpoint(path):
        return path
    if path.is_dir():
        found = list_checkpoints(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
        if not found:
            raise CheckpointError(
                f"checkpoint.resume={spec}: the directory holds no checkpoint (step_*.pt file "
                "or step_* directory)"
            )
        return found[-1]
    if not path.is_file():
        raise CheckpointError(f"checkpoint.resume={spec}: no such file or directory")
    return path


# what a resume reads from a checkpoint (a sharded one's meta.pt has all but model and optimizer)
RESUME_KEYS = ("step", "tokens_seen", "wall_time_s", "scheduler", "data", "rng", "fingerprint")
WHOLE_KEYS = (*RESUME_KEYS, "model", "optimizer")


def read(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` with our messages: a file holding objects other than
    tensors and plain values is refused as unsafe (never 'try weights_only=False'), a damaged
    one as corrupt or truncated."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found is None:  # not a pickle of ours at all: damaged (quote the reason, not the hint)
            detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()
            raise CheckpointError(
                f"{what} {path} is corrupt or truncated and cannot be read "
                f"({detail[0] if detail else type(e).__name__}); delete it or resume from an "
                "earlier one"
            ) from None
        raise CheckpointError(
            f"{what} {path} holds objects other than tensors and plain values "
            f"({found.group(1)}), which could run code when loaded: it "
            "will not be loaded. Use a checkpoint this project wrote"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"{what} {path} is corrupt or truncated and cannot be read ({type(e).__name__}: "
            f"{first}); delete it or resume from an earlier one"
        ) from None


def require(payload: dict[str, Any], keys: tuple[str, ...], path: Path) -> dict[str, Any]:
    """Name what a checkpoint lacks, rather than fail on the first key read."""
    missing = [k for k in keys if k not in payload]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {', '.join(missing)}: it was not written by a complete "
            "save of this project; resume from another checkpoint"
        )
    return payload


def load(path: Path, keys: tuple[str, ...] = WHOLE_KEYS) -> dict[str, Any]:
    """A single-file checkpoint, checked for our format and for ``keys``."""
    payload = read(path)
    found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
    if found != FORMAT:
        raise CheckpointError(
            f"{path} is not an llm_pretrain checkpoint (format {found!r}, expected {FORMAT!r})"
        )
    return require(payload, keys, path)


# Settings a resume may change: how long to train, how to log, evaluate, checkpoint and stop,
# and where to run. Every other setting (the model, the data, the optimizer's, the lr and its
# schedule, the batch geometry, precision, seed) shapes the optimizer state or the schedule that
# was saved, so a resume that changes one is refused by name.
RESUME_MAY_CHANGE = (
    "trainer.max_steps",  # (a longer run: the schedule now spans the new length)
    "trainer.max_time_s",
    "trainer.log_every",
    "trainer.eval_every",
    "trainer.eval_at_start",
    "trainer.progress",
    "trainer.phase_timing",
    "trainer.compile",
    "trainer.device",
    "trainer.parallelism",  # (checkpoints reshard: sharded_checkpoint.py)
    "trainer.init_from",  # (a resume loads the checkpoint's weights, not these)
    "trainer.memory_snapshot",
    "trainer.on_nonfinite",
    "trainer.max_nonfinite_skips",
    "trainer.dist_timeout_s",
    "trainer.stall_factor",
    "trainer.stall_min_s",
    "trainer.gradient_analysis_every",
    "trainer.grad_clip",
    "eval.",
    "checkpoint.",
    "logger.",
    "experiment.",
    "run_name",
)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def config_changes(saved: dict, current: dict) -> tuple[dict, dict]:
    """Keys whose value differs between a checkpoint's config and this run's, split into
    (allowed: ``RESUME_MAY_CHANGE``, refused), each as key -> (saved, current). A key the
    checkpoint lacks is a setting added since it was written: not compared."""
    old, new = _flat(saved), _flat(current)
    changed = {
        k: (old[k], new.get(k, "<absent>")) for k in sorted(old) if old[k] != new.get(k, "<absent>")
    }
    allowed = {k: v for k, v in changed.items() if k.startswith(RESUME_MAY_CHANGE)}
    return allowed, {k: v for k, v in changed.items() if k not in allowed}


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse a resume whose config changed in a way that breaks exact continuation."""
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}"
        for k, v in current.items()
        if saved.get(k) != v
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written under a different configuration ("
            + "; ".join(diffs)
            + "); resume with the settings it was written with, or start a new run"
        )
