"""Launchers: Hydra's submitit plugin runs a sweep's jobs (locally here; on SLURM on a cluster),
and the torchrun / sbatch scripts under launch/ start multi-process jobs."""

import json
import os
import socket
import subprocess
import sys

from tests.conftest import REPO, TINY, run_cli

TWO_RANKS = [
    *TINY,
    "trainer.max_steps=2",
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=2",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script(path, args, env, cwd):
    full = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        ["bash", str(REPO / path), *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_torchrun_sh_starts_one_process_per_rank(tmp_path):
    run = tmp_path / "run"
    out = _script(
        "launch/torchrun.sh", [*TWO_RANKS, f"hydra.run.dir={run}"], {"NPROC": "2"}, tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2


def test_the_sbatch_script_runs_srun_torchrun_with_c10d(tmp_path):
    """SLURM's commands stubbed (one node, this host): the script's rendezvous, run directory
    and resume flag reach a real 2-process torchrun job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho localhost\n")
    (bin_dir / "srun").write_text(  # drop srun's own flags, run the command once (one node)
        '#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n'
    )
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    run = tmp_path / "slurm-run"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[01]",
        "SLURM_JOB_NUM_NODES": "1",
        "GPUS_PER_NODE": "2",
        "RDZV_PORT": str(_free_port()),
        "RUN_DIR": str(run),
    }
    # (FSDP2 here: the script passes trainer.parallelism through with the other overrides)
    args = [*TWO_RANKS, "trainer.parallelism=fsdp"]
    out = _script("launch/slurm/pretrain.sbatch", args, env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "job 4242: 1 node(s) x 2 process(es), rendezvous at localhost:" in out.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallelism"] == "fsdp"
    resolved = (run / "config.yaml").read_text()
    assert "resume: auto" in resolved


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
    train as one 2-rank job (FSDP2 over gloo here) that writes a single row."""
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
            "trainer.parallelism=fsdp",  # FSDP2 over the tasks' process group
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (sweep / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["status"] == "ok", rows
    assert rows[0]["world_size"] == 2
    assert rows[0]["config"]["trainer"]["parallelism"] == "fsdp"
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
