"""The soak test (``make soak``; not part of ``make test``): faults injected into real training
runs, again and again, each run then finished by ``checkpoint.resume=auto`` and checked against
an uninterrupted run.

    python tests/soak.py [--minutes 15] [--seed 0] [--json soak.json]

Trials, in turn until the time is up (each kind at least once):
- ``kill9``: SIGKILL at a random moment (start-up, a step, a checkpoint write), then resume;
  repeated until the run finishes;
- ``sigterm``: SIGTERM at a random moment: the run must checkpoint and exit 75 (or finish, or
  not have started training), then resume;
- ``file_limit``: the run may write no file over 64 KiB (``RLIMIT_FSIZE``: the kernel refuses the
  checkpoint write mid-file as a full disk would): it must fail with our "no room" message and
  leave no temp file; the resume, without the limit, finishes the run.
Each on the built-in corpus and on the shared C4 sample with 2 DataLoader workers. A trial
passes when the finished run's loss at every step equals the uninterrupted run's bit for bit,
each step is logged once, and no temp file is left. Prints the counts (and writes them as JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLM_PRETRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))
COMMON = [
    "model=llama_tiny",
    "model.hidden_size=64",
    "model.intermediate_size=176",
    "model.num_layers=2",
    "trainer.max_steps=24",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=4",
    "trainer.warmup_steps=4",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.eval_at_start=false",
    "trainer.progress=false",
    "eval.tokens=1000",
    "checkpoint.every=3",
    "checkpoint.keep_last=2",
    "data.seq_len=64",
]
CORPORA = {
    "builtin": [],
    "c4_2_workers": [
        "data=files",
        f"data.path={SHARED / 'c4' / 'c4_en_sample_2000.jsonl.gz'}",
        f"data.tokenizer={SHARED / 't5_tokenizer' / 'spiece.model'}",
        "model.vocab_size=32000",
        "data.val_docs=20",
        "data.num_workers=2",
    ],
}
REQUEUE_EXIT = 75
FILE_LIMIT = 64 * 1024


def launch(run_dir: Path, corpus: str, file_limit: bool = False) -> subprocess.Popen:
    args = [*COMMON, *CORPORA[corpus], f"hydra.run.dir={run_dir}", "checkpoint.resume=auto"]

    def limit() -> None:
        if file_limit:
            resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))

    return subprocess.Popen(
        [sys.executable, "-m", "llm_pretrain.train", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit,
    )


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def leftovers(run_dir: Path) -> list[str]:
    return [p.name for p in (run_dir / "checkpoints").glob(".*tmp*")]


def finish(run_dir: Path, corpus: str) -> None:
    proc = launch(run_dir, corpus)
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"the resume failed ({proc.returncode}): {err[-2000:]}")


def trial(kind: str, corpus: str, base: Path, rng: random.Random, counts: dict) -> None:
    run = Path(tempfile.mkdtemp(dir=base, prefix=f"{kind}-{corpus}-"))
    if kind == "file_limit":
        proc = launch(run, corpus, file_limit=True)
        _, err = proc.communicate(timeout=600)
        if proc.returncode == 0 or "no room for checkpoint" not in err:
            raise AssertionError(f"file limit: exit {proc.returncode}, {err[-2000:]}")
        if leftovers(run):
            raise AssertionError(f"file limit left {leftovers(run)}")
        counts["faults"] += 1
        finish(run, corpus)
    else:
        sig = signal.SIGKILL if kind == "kill9" else signal.SIGTERM
        while True:
            proc = launch(run, corpus)
            time.sleep(rng.uniform(0.2, 1.0) * DURATION[corpus])  # (start-up included)
            if proc.poll() is not None:  # finished before the fault
                if proc.returncode != 0:
                    raise AssertionError(f"{kind}: exit {proc.returncode}: {proc.stderr.read()}")
                break
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=600)
            counts["faults"] += 1
            if kind == "sigterm" and proc.returncode not in (REQUEUE_EXIT, 0, -signal.SIGTERM):
                raise AssertionError(f"sigterm: exit {proc.returncode}: {err[-2000:]}")
            if proc.returncode == 0:
                break
    got = losses(run)
    want = REFERENCE[corpus]
    if got != want:
        raise AssertionError(f"{kind} on {corpus}: losses differ\n{got}\n{want}")
    if leftovers(run):
        raise AssertionError(f"{kind} on {corpus}: left {leftovers(run)}")
    counts["trials"] += 1
    counts[f"{kind}/{corpus}"] = counts.get(f"{kind}/{corpus}", 0) + 1


REFERENCE: dict[str, list] = {}  # corpus -> the uninterrupted run's (step, loss) rows
DURATION: dict[str, float] = {}  # corpus -> its wall time, start-up included


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    start = time.monotonic()
    counts = {"trials": 0, "faults": 0}
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        base = Path(tmp)
        for corpus in CORPORA:
            ref = base / f"reference-{corpus}"
            began = time.monotonic()
            finish(ref, corpus)
            DURATION[corpus] = time.monotonic() - began
            REFERENCE[corpus] = losses(ref)
        kinds = [(k, c) for k in ("kill9", "sigterm", "file_limit") for c in CORPORA]
        i = 0
        while i < len(kinds) or time.monotonic() - start < args.minutes * 60:
            kind, corpus = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
            trial(kind, corpus, base, rng, counts)
            i += 1
            print(
                f"[{time.monotonic() - start:6.0f}s] {kind} on {corpus}: ok  {counts}", flush=True
            )
    counts["minutes"] = round((time.monotonic() - start) / 60, 1)
    print(json.dumps(counts, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(counts, indent=2) + "\n")


if __name__ == "__main__":
    main()
