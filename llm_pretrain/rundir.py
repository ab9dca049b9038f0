"""A run directory belongs to one run: what a new run may do with the files it finds there.

Without this, a fresh run started in a finished run's directory appended to its
``metrics.jsonl``, had its own first checkpoint pruned at once (the stale ones sort higher), and a
later ``checkpoint.resume=auto`` resumed the *old* run. The rules, decided by rank 0 before any
work:

- a directory with another run's checkpoints, metrics or summary is refused, unless the run
  resumes one of this directory's checkpoints (``checkpoint.resume=auto`` or its path), or
  ``checkpoint.overwrite=true`` says to start over (the old files are then removed, each named
  in the log);
- ``resume=auto`` finding no checkpoint starts over only if the old run never finished (no
  ``summary.json``: it was killed before its first checkpoint); a finished run without
  checkpoints is refused like any other;
- a resumed run's ``metrics.jsonl`` keeps the rows up to the resumed step only, so each step is
  there once;
- temp files a killed save left (``.step_*.tmp*``) are removed, with a log line.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from llm_pretrain import checkpoint

log = logging.getLogger("llm_pretrain")

RUN_FILES = ("metrics.jsonl", "summary.json")


class RunDirTaken(RuntimeError):
    """The run directory holds another run's files; nothing was changed."""


def _owned_files(run_dir: Path) -> list[Path]:
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    found += checkpoint.list_checkpoints(run_dir / "checkpoints")
    return found


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def claim(
    run_dir: Path,
    resume_spec: str | None,
    resume_from: Path | None,
    resumed_step: int | None,
    overwrite: bool,
) -> list[str]:
    """Make ``run_dir`` this run's (rank 0 only): refuse it, or clean it. Returns what was
    removed or cut, for the log. Raises ``RunDirTaken``."""
    notes = remove_stale_temp_files(run_dir)
    found = _owned_files(run_dir)
    if not found:
        return notes
    names = ", ".join(str(p.relative_to(run_dir)) for p in found[:6])
    if overwrite:
        for p in found:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return notes + [f"checkpoint.overwrite=true: removed {names} from {run_dir}"]
    if resume_from is not None and _inside(resume_from, run_dir):
        cut = truncate_metrics(run_dir / "metrics.jsonl", resumed_step)
        (run_dir / "summary.json").unlink(missing_ok=True)  # (a new one comes at the end)
        return notes + (
            [f"metrics.jsonl: {cut} rows after step {resumed_step} removed"] if cut else []
        )
    finished = (run_dir / "summary.json").is_file()
    if resume_spec == "auto" and resume_from is None and not finished:
        for p in found:  # killed before its first checkpoint: nothing to resume, start over
            p.unlink()
        return notes + [
            f"checkpoint.resume=auto: no checkpoint in {run_dir}, so the run starts over "
            f"(removed {names}, left by a run that never finished)"
        ]
    raise RunDirTaken(
        f"the run directory {run_dir} holds another run's files ({names}"
        f"{', ...' if len(found) > 6 else ''}); a new run there would mix its metrics and "
        "checkpoints with them. Use another directory (hydra.run.dir=... or hydra.sweep.dir=...), "
        "resume that run (checkpoint.resume=auto), or start over and delete them "
        "(checkpoint.overwrite=true)"
    )


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the rows logged after ``step`` (a resume repeats them); returns how many. A row cut
    short by a kill, the last line, goes too."""
    if not path.is_file():
        return 0
    kept, cut = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            cut += 1
            continue
        if row_step is not None and row_step > step:
            cut += 1
        else:
            kept.append(line)
    if cut:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return cut


def remove_stale_temp_files(run_dir: Path) -> list[str]:
    """A save killed mid-write leaves ``.step_*.tmp-PID`` (a file) or ``.step_*.tmp`` (a sharded
    directory) behind; nothing else removes them."""
    notes = []
    for tmp in sorted((run_dir / "checkpoints").glob(".step_*.tmp*")):
        size = tmp.stat().st_size if tmp.is_file() else 0
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        notes.append(f"removed {tmp.name}, left by an interrupted save ({size:,} bytes)")
    return notes
