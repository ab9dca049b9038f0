"""Issue 20: a diverged run stops and says so, a run directory belongs to one run, checkpoints
never lose the last good state (pruning, full disks, interrupted saves), and every JSON file we
write is strict JSON."""

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from llm_pretrain import checkpoint, report, rundir
from llm_pretrain.guard import Diverged
from llm_pretrain.model import Llama
from llm_pretrain.preemption import Preempted
from llm_pretrain.train import _append_row, train
from tests.conftest import T5_SPIECE, TINY, compose_cfg, run_cli

BASE = [*TINY, "trainer.eval_at_start=false"]


def strict_rows(path):
    """Every line parsed as strict JSON: NaN and Infinity are refused."""

    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def steps_on_disk(run_dir):
    return [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(run_dir / "checkpoints")]


def test_a_diverging_run_stops_keeps_its_finite_checkpoints_and_says_so(tmp_path):
    run, sweep = tmp_path / "run", tmp_path / "sweep"
    overrides = ["trainer.lr=1e3", "checkpoint.every=2", "checkpoint.keep_last=2"]
    # the issue's case: llama_tiny at lr 1e3 reaches NaN within a few steps
    issue = ["model=llama_tiny", "trainer.global_batch_size=4", "trainer.micro_batch_size=4"]
    issue += ["data.seq_len=64", "trainer.eval_every=0", "trainer.eval_at_start=false"]
    issue += ["eval.tokens=1000", "trainer.log_every=1", "trainer.warmup_steps=5"]
    cfg = compose_cfg([*issue, "trainer.progress=false", "trainer.max_steps=30", *overrides])
    with pytest.raises(Diverged, match=r"non-finite .* at step \d+.*Lower the learning rate"):
        train(cfg, run, sweep, overrides)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged"
    bad = summary["diverged"]["step"]
    assert summary["diverged"]["last_finite_step"] == bad - 1 == summary["steps"]
    # every checkpoint on disk is from before the divergence, with finite weights
    kept = steps_on_disk(run)
    assert kept and max(kept) < bad
    for p in checkpoint.list_checkpoints(run / "checkpoints"):
        assert all(torch.isfinite(t).all() for t in checkpoint.load(p)["model"].values())
    metrics = strict_rows(run / "metrics.jsonl")
    assert max(r["step"] for r in metrics) < bad
    (row,) = strict_rows(sweep / "results.jsonl")
    assert row["status"] == "diverged" and row["overrides"] == overrides
    assert row["diverged"]["step"] == bad
    text = report.table(report.load_runs(sweep))
    assert "### diverged" in text and "### failed" not in text


def test_skip_step_drops_one_bad_update_and_trains_on(tmp_path, monkeypatch):
    forward, calls = Llama.forward, {"n": 0}

    def one_bad_batch(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if kwargs.get("reduction") == "sum":  # (the training step's calls only)
            calls["n"] += 1
            if calls["n"] == 3:  # the third micro-batch: step 2's first
                return out * float("inf")
        return out

    monkeypatch.setattr(Llama, "forward", one_bad_batch)
    cfg = compose_cfg([*BASE, "trainer.max_steps=4", "trainer.on_nonfinite=skip_step"])
    s = train(cfg, tmp_path)
    assert s["status"] == "ok" and s["steps"] == 4 and s["skipped_steps"] == 1
    rows = [r for r in strict_rows(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows if r["train/loss"] is None] == [2]
    assert rows[1]["nonfinite"]["train/loss"] == "nan"  # (null in the row, and why)
    assert rows[1]["train/skipped_steps"] == 1 and rows[2]["train/loss"] > 0


def test_a_skipped_first_update_is_not_retried_forever(tmp_path, monkeypatch):
    forward = Llama.forward
    monkeypatch.setattr(Llama, "forward", lambda self, *a, **k: forward(self, *a, **k) * torch.nan)
    overrides = ["trainer.on_nonfinite=skip_step", "trainer.max_nonfinite_skips=2"]
    cfg = compose_cfg([*BASE, "trainer.max_steps=6", *overrides])
    with pytest.raises(Diverged, match="after 2 skipped steps in a row.*no step of this"):
        train(cfg, tmp_path)


def test_a_fresh_run_refuses_a_directory_with_another_runs_files(tmp_path):
    first = [*BASE, "trainer.max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=5"]
    train(compose_cfg(first), tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    again = [*BASE, "trainer.max_steps=3", "checkpoint.every=1"]
    with pytest.raises(rundir.RunDirTaken, match=r"checkpoint\.overwrite=true"):
        train(compose_cfg(again), tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing touched
    s = train(compose_cfg([*again, "checkpoint.overwrite=true"]), tmp_path)
    assert s["steps"] == 3 and steps_on_disk(tmp_path) == [2, 3]  # its own, none of the old
    assert [r["step"] for r in strict_rows(tmp_path / "metrics.jsonl")][-1] == 3


def test_resume_auto_cuts_the_metrics_to_the_resumed_step_and_refuses_a_later_checkpoint(
    tmp_path,
):
    base = [*BASE, "checkpoint.every=2", "checkpoint.keep_last=5"]
    train(compose_cfg([*base, "trainer.max_steps=5"]), tmp_path)
    # a kill after step 5 left the rows of steps 5 (and a torn line); the last checkpoint is 4
    (tmp_path / "summary.json").unlink()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')
    s = train(compose_cfg([*base, "trainer.max_steps=6", "checkpoint.resume=auto"]), tmp_path)
    steps = [r["step"] for r in strict_rows(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6] and s["steps"] == 6  # each step once
    with pytest.raises(checkpoint.CheckpointError, match="past trainer.max_steps=5"):
        train(compose_cfg([*base, "trainer.max_steps=5", "checkpoint.resume=auto"]), tmp_path)
    s = train(compose_cfg([*base, "trainer.max_steps=6", "checkpoint.resume=auto"]), tmp_path)
    assert s["steps"] == 6  # at max_steps: nothing to train, evaluated again


def test_resume_auto_without_a_checkpoint_starts_over_only_an_unfinished_run(tmp_path):
    train(compose_cfg([*BASE, "trainer.max_steps=2"]), tmp_path)  # finished, no checkpoint
    auto = [*BASE, "trainer.max_steps=2", "checkpoint.resume=auto"]
    with pytest.raises(rundir.RunDirTaken):
        train(compose_cfg(auto), tmp_path)
    (tmp_path / "summary.json").unlink()  # as if killed before its first checkpoint
    assert train(compose_cfg(auto), tmp_path)["steps"] == 2
    assert [r["step"] for r in strict_rows(tmp_path / "metrics.jsonl") if "train/loss" in r] == [
        1,
        2,
    ]


def test_pruning_keeps_the_checkpoint_just_written_and_needs_room_for_keep_last(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (35, 40):
        checkpoint.save(checkpoint.checkpoint_path(tmp_path, step), {"step": step})
    new = checkpoint.save(checkpoint.checkpoint_path(tmp_path, 5), {"step": 5})
    checkpoint.prune(tmp_path, 2, newest=new)
    assert steps_on_disk(tmp_path) == [5, 40]  # 35 went; 5, the run's own, stayed
    checkpoint.make_room(tmp_path, 2)  # before the next save: one left, the new one makes 2
    assert len(list(ckpts.iterdir())) == 1
    checkpoint.make_room(tmp_path, 1)  # keep_last=1 keeps the old one until the new is whole
    assert len(list(ckpts.iterdir())) == 1


def test_a_full_disk_is_named_with_the_bytes_and_the_fix_and_leaves_no_temp_file(
    tmp_path, monkeypatch
):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    path = checkpoint.checkpoint_path(tmp_path, 3)
    with pytest.raises(checkpoint.CheckpointError, match=r"no room for checkpoint .*step_00000003"):
        checkpoint.save(path, {"w": torch.zeros(1024)})
    assert list((tmp_path / "checkpoints").iterdir()) == []  # the temp file went too

    monkeypatch.undo()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10))
    cfg = compose_cfg([*BASE, "trainer.max_steps=2", "checkpoint.every=2"])
    with pytest.raises(checkpoint.CheckpointError, match=r"MiB and 0\.0 MiB are free.*keep_last"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_interrupted_saves_temp_file_is_removed_at_start(tmp_path, caplog):
    stale = tmp_path / "checkpoints" / ".step_00000004.pt.tmp-12345"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x" * 100)
    caplog.set_level("INFO", logger="llm_pretrain")
    train(compose_cfg([*BASE, "trainer.max_steps=1"]), tmp_path)
    assert not stale.exists()
    assert "left by an interrupted save (100 bytes)" in caplog.text


def test_a_sweep_row_is_replaced_by_its_job_never_duplicated(tmp_path):
    _append_row(tmp_path, {"run_dir": "s/0", "status": "failed", "x": float("nan")})
    _append_row(tmp_path, {"run_dir": "s/1", "status": "ok"})
    _append_row(tmp_path, {"run_dir": "s/0", "status": "ok"})
    rows = strict_rows(tmp_path / "results.jsonl")
    assert [(r["run_dir"], r["status"]) for r in rows] == [("s/1", "ok"), ("s/0", "ok")]


class _Hostile:
    def __reduce__(self):
        return (print, ("this ran",))


def test_an_unsafe_or_incomplete_checkpoint_is_refused_with_what_is_wrong(tmp_path):
    hostile = tmp_path / "hostile.pt"
    torch.save({"format": checkpoint.FORMAT, "step": _Hostile()}, hostile)
    with pytest.raises(checkpoint.CheckpointError, match="could run code.*will not be loaded") as e:
        checkpoint.load(hostile)
    assert "weights_only" not in str(e.value) and "corrupt" not in str(e.value)
    bare = tmp_path / "bare.pt"
    torch.save({"format": checkpoint.FORMAT}, bare)
    with pytest.raises(checkpoint.CheckpointError, match="lacks step, tokens_seen, .*optimizer"):
        train(compose_cfg([*BASE, f"checkpoint.resume={bare}"]), tmp_path / "run")


def test_help_lists_what_a_user_picks_and_hides_the_internal_groups(tmp_path):
    out = run_cli(["--help"], cwd=tmp_path)
    assert out.returncode == 0
    assert "optimizer: adafactor, adam_mini, adamw," in out.stdout
    assert "base_" not in out.stdout and "experiment_optimizer" not in out.stdout


def test_a_resume_applies_only_the_settings_it_may_change_and_refuses_the_rest(tmp_path, caplog):
    base = [*BASE, "optimizer=galore", "optimizer.rank=4", "checkpoint.every=2"]
    train(compose_cfg([*base, "trainer.max_steps=2"]), tmp_path)
    resume = [*base, "checkpoint.resume=auto"]
    for changed in (["trainer.lr=0.03"], ["optimizer.rank=8"], ["trainer.scheduler=linear"]):
        key = changed[0].split("=")[0]
        with pytest.raises(checkpoint.CheckpointError, match=rf"other settings \(.*{key}: "):
            train(compose_cfg([*resume, "trainer.max_steps=3", *changed]), tmp_path)
    caplog.set_level("INFO", logger="llm_pretrain")
    s = train(compose_cfg([*resume, "trainer.max_steps=3", "trainer.log_every=2"]), tmp_path)
    assert s["steps"] == 3
    assert "resume: trainer.max_steps is 3 now (2 in the checkpoint), applied" in caplog.text
    assert "resume: trainer.log_every is 2 now (1 in the checkpoint), applied" in caplog.text


def test_a_file_the_encoding_cannot_read_or_an_empty_one_is_refused_before_training(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = "".join(f"document number {i} about the weather and the sea\n" for i in range(60))
    (corpus / "a.txt").write_text(text)
    (corpus / "b.txt").write_bytes(("café " * 40 + "\n").encode("latin-1") * 20)
    files = [
        *BASE,
        "data=files",
        f"data.path={corpus}/*.txt",
        f"data.tokenizer={T5_SPIECE}",
        "model.vocab_size=32000",
        "data.val_docs=10",
        "trainer.max_steps=1",
    ]
    with pytest.raises(ValueError, match=r"b\.txt is not valid utf-8 \(byte 3: .*latin-1"):
        train(compose_cfg(files), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before any work
    assert train(compose_cfg([*files, "data.encoding=latin-1"]), tmp_path / "l1")["steps"] == 1
    s = train(compose_cfg([*files, "data.on_decode_error=replace"]), tmp_path / "rep")
    assert s["steps"] == 1
    (corpus / "c.txt").write_text("")
    with pytest.raises(ValueError, match=r"c\.txt is empty"):
        train(compose_cfg([*files, "data.encoding=latin-1"]), tmp_path / "empty")


def test_sigusr1_saves_at_the_step_boundary_and_the_resume_is_exact(tmp_path, monkeypatch):

    base = [*BASE, "trainer.max_steps=4"]
    whole = train(compose_cfg(base), tmp_path / "whole")
    forward, calls = Llama.forward, {"n": 0}

    def signalled(self, *args, **kwargs):
        if kwargs.get("reduction") == "sum":
            calls["n"] += 1
            if calls["n"] == 3:  # during step 2
                os.kill(os.getpid(), signal.SIGUSR1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Llama, "forward", signalled)
    with pytest.raises(Preempted, match="stopped by SIGUSR1 after step 2"):
        train(compose_cfg(base), tmp_path / "cut")
    monkeypatch.undo()
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["preempted"]["signal"] == "SIGUSR1"
    assert steps_on_disk(tmp_path / "cut") == [2]  # saved though checkpoint.every=0
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is gone again
    resumed = train(compose_cfg([*base, "checkpoint.resume=auto"]), tmp_path / "cut")
    assert resumed["eval"]["final_loss"] == whole["eval"]["final_loss"]


def _children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    with open(path) as f:
        return [int(c) for c in f.read().split()]


def _torchrun(args, cwd):

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.Popen(
        [*cmd, "-m", "llm_pretrain.train", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _seconds_until_exit(pid: int, timeout: float = 120) -> float:
    """How long ``pid`` ran on (torchrun itself waits its grace period before it kills a
    stopped rank, so the test watches the survivor, not torchrun)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):  # exited, not yet reaped
                    break
        except FileNotFoundError:  # exited and reaped
            break
        time.sleep(0.2)
    return time.monotonic() - start


def _wait_for_step(run_dir, step, proc, timeout=120):

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(
            json.loads(line).get("step", 0) >= step
            for line in metrics.read_text().splitlines()
            if line.endswith("}")
        ):
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {timeout}s")


LONG_RUN = [*BASE, "trainer.max_steps=100000", "trainer.global_batch_size=8"]


@pytest.mark.slow
def test_on_two_ranks_sigterm_to_one_rank_stops_both_after_the_same_step_with_a_checkpoint(
    tmp_path,
):

    run = tmp_path / "run"
    proc = _torchrun([*LONG_RUN, f"hydra.run.dir={run}"], tmp_path)
    try:
        _wait_for_step(run, 2, proc)
        workers = _children(proc.pid)
        assert len(workers) == 2

        os.kill(workers[1], signal.SIGTERM)  # one rank only
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "preempted", out[-3000:]
    assert steps_on_disk(run) == [summary["steps"]]  # the step both ranks stopped after
    assert "exit code 75" in out


@pytest.mark.slow
def test_on_two_ranks_a_stalled_rank_fails_the_other_within_the_timeout(tmp_path):
    run = tmp_path / "run"
    proc = _torchrun([*LONG_RUN, "trainer.dist_timeout_s=5", f"hydra.run.dir={run}"], tmp_path)
    stalled = None
    try:
        _wait_for_step(run, 2, proc)
        survivor, stalled = _children(proc.pid)
        os.kill(stalled, signal.SIGSTOP)
        waited = _seconds_until_exit(survivor)
    finally:
        if stalled is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stalled, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    # the survivor failed within the timeout and some start-up slack (30 minutes without it)
    assert waited < 60, f"the survivor waited {waited:.0f}s"


def _rank_of(pid: int) -> int:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    return int(env[b"RANK"])


@pytest.mark.slow
def test_on_two_ranks_the_step_watchdog_names_the_stalled_rank(tmp_path):
    # a 10-minute collective timeout: the watchdog, not gloo, must end the run
    args = ["trainer.dist_timeout_s=600", "trainer.stall_factor=3", "trainer.stall_min_s=2"]
    run = tmp_path / "run"
    proc = _torchrun([*LONG_RUN, *args, f"hydra.run.dir={run}"], tmp_path)
    stalled = None
    try:
        _wait_for_step(run, 20, proc)  # (the watchdog judges after a few measured steps)
        workers = _children(proc.pid)
        stalled = next(p for p in workers if _rank_of(p) == 1)
        os.kill(stalled, signal.SIGSTOP)
        waited = _seconds_until_exit(next(p for p in workers if p != stalled))
    finally:
        if stalled is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stalled, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "rank 1 stalled: no heartbeat" in out, out[-3000:]
    assert waited < 30, f"the survivor waited {waited:.0f}s"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stalled" and summary["error"].startswith("rank 1 stalled")
