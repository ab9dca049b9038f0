"""The step watchdog: a rank that stalls inside a training step fails every rank, with a message
that names it.

``trainer.dist_timeout_s`` bounds a collective's wait, but its error is gloo's or NCCL's and
says nothing of which rank stopped. Here every rank runs a small thread that publishes, once a
second, where its main thread is (step, phase, since when) to the rendezvous store torchrun or
submitit already runs. When this rank's step has lasted ``trainer.stall_factor`` times the median
step (and at least ``trainer.stall_min_s``), the thread reads every rank's record and decides:

- a rank whose record is older than ``stall_min_s`` is not running (SIGSTOP, a hung node, a
  process frozen in the kernel): it stalled;
- otherwise a rank that is behind the others (an earlier step or phase) and has sat in a
  training phase for longer than the limit stalled (a data loader that never returns, a
  deadlock in one process);
- otherwise every rank is slow at the same place (a subspace refresh on every rank, a slow
  file system): a warning, once per step, and no failure.

A stall ends the process from the thread with ``os._exit(STALL_EXIT)``, after logging the
message (and, on rank 0, writing ``summary.json`` with status ``stalled``): the main thread is
blocked inside a C++ collective, where no Python exception can reach it. torchrun then stops the
other ranks, whose own watchdogs usually say the same first. Evaluation and checkpoint writing
are outside the timed phases (only ``dist_timeout_s`` bounds them), so a long save on rank 0 is
never taken for a stall. One process alone only warns: there is no peer waiting on it.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger("llm_pretrain")

STALL_EXIT = 124  # (what timeout(1) returns)
# the phases of a training step, in order; "between" is the time outside any step
PHASES = ("data", "forward_backward", "optimizer")
BETWEEN = "between"
MEDIAN_OF = 50  # the median is over the last this many steps
WARM_STEPS = 3  # steps measured before the watchdog judges (the first one is not counted)
POLL_S = 0.5


def limit_s(durations: list[float], factor: float, min_s: float) -> float | None:
    """How long a step may run before it is judged: ``factor`` x the median, at least
    ``min_s``; None until enough steps are measured."""
    if len(durations) < WARM_STEPS:
        return None
    return max(factor * statistics.median(durations), min_s)


def progress(record: dict) -> tuple[int, int]:
    """Order of a rank's place: its step, then its phase within it (between steps last)."""
    phase = record["phase"]
    return record["step"], PHASES.index(phase) if phase in PHASES else len(PHASES)


def stalled_ranks(
    records: dict[int, dict], now: float, limit: float, min_s: float
) -> tuple[list[int], str]:
    """Which ranks stalled, given every rank's last published record, and why (empty when
    every rank is merely slow at the same place)."""
    silent = [r for r, rec in records.items() if now - rec["beat"] > min_s]
    if silent:
        ages = ", ".join(f"rank {r}: {now - records[r]['beat']:.0f} s" for r in silent)
        return silent, f"no heartbeat for longer than trainer.stall_min_s={min_s:g} s ({ages})"
    places = {r: progress(rec) for r, rec in records.items()}
    if len(set(places.values())) <= 1:
        return [], ""
    first = min(places.values())
    behind = [
        r
        for r, place in places.items()
        if place == first and records[r]["phase"] in PHASES and now - records[r]["since"] > limit
    ]
    if not behind:
        return [], ""
    where = "; ".join(
        f"rank {r} in {records[r]['phase']} of step {records[r]['step']} for "
        f"{now - records[r]['since']:.0f} s"
        for r in behind
    )
    return behind, f"behind the other ranks ({where})"


def describe(records: dict[int, dict]) -> str:
    return ", ".join(
        f"rank {r}: {rec['phase']} of step {rec['step']}" for r, rec in sorted(records.items())
    )


def rendezvous_store(timeout_s: float) -> dist.Store | None:
    """A client of the store torchrun (or, under submitit, rank 0) runs at MASTER_ADDR:PORT;
    its own connection, so the thread never shares one with the main thread."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (dist.is_available() and dist.is_initialized()) or not host or not port:
        return None
    store = dist.TCPStore(
        host,
        int(port),
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    return store


class StepWatchdog:
    """Times each training step on this rank and judges a step that runs too long (module
    docstring). ``begin``/``phase``/``end`` are called by the training loop and only set
    attributes; the thread does all the talking to the store."""

    def __init__(
        self,
        factor: float,
        min_s: float,
        rank: int = 0,
        world_size: int = 1,
        namespace: str = "",
        on_stall: Callable[[str], None] | None = None,
        exit: Callable[[int], None] = os._exit,
    ) -> None:
        self.factor, self.min_s = factor, min_s
        self.rank, self.world_size = rank, world_size
        self.namespace = namespace
        self.on_stall, self._exit = on_stall, exit
        self.durations: deque[float] = deque(maxlen=MEDIAN_OF)
        self.step, self.phase_name, self.since = 0, BETWEEN, time.time()
        self._step_start: float | None = None
        self._counted = 0
        self._warned_step = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: dist.Store | None = None
        self._started = time.time()

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    # -- the training loop's side (no I/O) --------------------------------------------------

    def begin(self, step: int) -> None:
        """Step ``step`` (1-based) starts: its data phase."""
        self.step, self._step_start = step, time.time()
        self.phase(PHASES[0])

    def phase(self, name: str) -> None:
        self.phase_name, self.since = name, time.time()

    def end(self) -> None:
        """The step's update is done; its duration joins the median (the process's first step,
        with its warm-up and first measurements, does not)."""
        if self._step_start is not None:
            if self._counted:
                self.durations.append(time.time() - self._step_start)
            self._counted += 1
        self._step_start = None
        self.phase(BETWEEN)

    # -- the thread -------------------------------------------------------------------------

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        if self.world_size > 1:
            self._store = rendezvous_store(timeout_s=max(self.min_s, 10.0))
        self._thread = threading.Thread(target=self._run, name="step-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _key(self, rank: int) -> str:
        return f"llm_pretrain/watchdog/{self.namespace}/rank{rank}"

    def record(self) -> dict:
        return {"step": self.step, "phase": self.phase_name, "since": self.since}

    def _run(self) -> None:
        self._started = time.time()
        while True:
            try:
                self.tick(time.time())
            except Exception as e:  # the watchdog must never take a healthy run down
                if self._store is not None and self.step_overdue(time.time()):
                    self.stall(
                        f"rank {self.rank}: the rendezvous store at {os.environ.get('MASTER_ADDR')}"
                        f":{os.environ.get('MASTER_PORT')} does not answer ({e}); its host (rank 0 "
                        "under submitit, torchrun's agent otherwise) has probably stalled"
                    )
                    return
                log.debug(f"step watchdog: {e}")
            if self._stop.wait(POLL_S):
                return

    def step_overdue(self, now: float) -> float | None:
        """The limit, when this rank is inside a step that has run past it."""
        limit = limit_s(list(self.durations), self.factor, self.min_s)
        if limit is None or self._step_start is None or now - self._step_start <= limit:
            return None
        return limit

    def tick(self, now: float) -> None:
        """Publish this rank's place; judge the step if it has run past the limit."""
        if self._store is not None:
            self._store.set(self._key(self.rank), json.dumps({**self.record(), "beat": now}))
        limit = self.step_overdue(now)
        if limit is None:
            return
        elapsed = now - self._step_start
        head = (
            f"step {self.step} has run {elapsed:.0f} s on rank {self.rank}, past "
            f"trainer.stall_factor={self.factor:g} x the median step "
            f"({statistics.median(self.durations):.3g} s; at least trainer.stall_min_s="
            f"{self.min_s:g} s)"
        )
        if self._store is None:  # alone: nobody waits on this process
            self._warn_once(f"{head}, in {self.phase_name}: slow, still waiting")
            return
        # a rank that never published counts as silent since this watchdog started
        never = {"step": 0, "phase": BETWEEN, "since": self._started, "beat": self._started}
        records = {
            r: json.loads(self._store.get(key)) if self._store.check([key]) else never
            for r, key in enumerate(self._key(r) for r in range(self.world_size))
        }
        stalled, why = stalled_ranks(records, now, limit, self.min_s)
        if not stalled:
            self._warn_once(
                f"{head}: every rank is slow at the same place ({describe(records)}); not a "
                "stall, still waiting"
            )
            return
        names = ", ".join(map(str, stalled))
        self.stall(
            f"rank{'s' if len(stalled) > 1 else ''} {names} stalled: {why}. {head}. Every rank "
            f"stops (exit {STALL_EXIT}); resume from the last checkpoint with "
            "checkpoint.resume=auto once the cause is found (trainer.stall_factor=0 turns the "
            "watchdog off)"
        )

    def _warn_once(self, message: str) -> None:
        if self._warned_step != self.step:
            self._warned_step = self.step
            log.warning(message)

    def stall(self, message: str) -> None:
        log.error(message)
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        if self.on_stall is not None:
            try:
                self.on_stall(message)
            except Exception as e:  # (the exit must happen regardless)
                log.error(f"could not record the stall: {e}")
        self._exit(STALL_EXIT)
