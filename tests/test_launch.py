"""Launchers: Hydra's submitit plugin runs a sweep's jobs (locally here; on SLURM on a cluster)."""

import json

from tests.conftest import TINY, run_cli


def test_a_two_job_sweep_runs_through_submitit_local(tmp_path):
    sweep = tmp_path / "sweep"
    out = run_cli(
        [
            "-m",
            "hydra/launcher=submitit_local",
            *TINY,
            "trainer.max_steps=3",
            "trainer.lr=1e-3,3e-3",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Submitit 'local' sweep" in out.stdout + out.stderr
    rows = [json.loads(line) for line in (sweep / "results.jsonl").read_text().splitlines()]
    assert sorted(r["config"]["optimizer"]["lr"] for r in rows) == [1e-3, 3e-3]
    assert all(r["status"] == "ok" for r in rows)
    assert list((sweep / ".submitit").iterdir())  # submitit's own job folders


def test_a_two_task_submitit_job_trains_as_two_ranks_without_torchrun(tmp_path):
    """One sweep point as a submitit job of two tasks (as one task per GPU on SLURM): each task
    runs the job, TorchDistributedEnvironment gives them ranks and a master address, and they
    train as one 2-rank DDP job (gloo here) that writes a single row."""
    sweep = tmp_path / "sweep"
    out = run_cli(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.tasks_per_node=2",
            *TINY,
            "trainer.max_steps=3",
            "trainer.global_batch_size=4",
            "trainer.micro_batch_size=2",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (sweep / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["status"] == "ok", rows
    assert rows[0]["world_size"] == 2
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "2 rank(s), 1 micro-batch(es) of 2 per step" in logs


def test_the_slurm_launcher_takes_the_cluster_keys(tmp_path):
    out = run_cli(
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.account=proj",
            "hydra.launcher.nodes=2",
            "hydra.launcher.gpus_per_node=8",
            "hydra.launcher.timeout_min=600",
            "--cfg",
            "hydra",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "SlurmLauncher" in text
    for line in ("partition: gpu", "account: proj", "nodes: 2", "gpus_per_node: 8"):
        assert line in text, line
    assert "timeout_min: 600" in text
