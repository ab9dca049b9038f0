"""torchrun with 2 CPU ranks (gloo) against 1 rank at the same global batch."""

import json
import subprocess
import sys

import pytest

from tests.conftest import TINY, run_cli

COMMON = [
    *TINY,
    "data.layout=paper",
    "trainer.max_steps=6",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=4",
    "eval.tokens=2000",
]
GALORE = ["optimizer=galore", "optimizer.rank=8", "optimizer.update_gap=2"]


def metrics(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return (
        [r["train/loss"] for r in rows if "train/loss" in r],
        [r["eval/loss"] for r in rows if "eval/loss" in r],
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer, parallelism",
    [
        ([], "ddp"),
        # GaLore: refreshes every 2 steps; every rank must compute the same SVD basis
        (GALORE, "ddp"),
        # FSDP2, with 2 micro-batches per rank: each matrix's owner computes its basis
        ([*GALORE, "trainer.micro_batch_size=2"], "fsdp"),
    ],
)
def test_two_ranks_match_one_rank(tmp_path, optimizer, parallelism):
    common = [*COMMON, *optimizer]
    single = run_cli([*common, f"hydra.run.dir={tmp_path / 'single'}"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    work = tmp_path / "ddp_cwd"
    work.mkdir()
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "llm_pretrain.train",
            *common,
            f"trainer.parallelism={parallelism}",
            f"hydra.run.dir={tmp_path / 'ddp'}",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    train1, eval1 = metrics(tmp_path / "single")
    train2, eval2 = metrics(tmp_path / "ddp")
    assert len(train1) == len(train2) == 6
    for a, b in zip(train1 + eval1, train2 + eval2, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallelism"] == parallelism
    per_rank = summary["memory"]["per_rank"]
    if parallelism == "fsdp":  # each rank: its rows of the weights, its matrices' state
        whole = json.loads((tmp_path / "single" / "summary.json").read_text())["memory"]
        assert len(per_rank) == 2
        assert sum(r["weights"] for r in per_rank) >= whole["weights"]  # (FSDP2 pads rows)
        assert max(r["weights"] for r in per_rank) < 0.6 * whole["weights"]
        assert sum(r["optimizer_state"] for r in per_rank) == whole["optimizer_state"]
        assert max(r["optimizer_state"] for r in per_rank) < 0.7 * whole["optimizer_state"]
        # the estimator predicts each rank's weights, gradients and state exactly
        assert summary["memory"]["predicted"]["per_rank"] == per_rank
    else:
        assert per_rank is None
    # Only rank 0 wrote: one run directory, no stray outputs where the ranks were started.
    assert list(work.iterdir()) == []
    assert ddp.stdout.count("run summary") == 1


def _replica_worker(rank: int, init_file: str, results) -> None:
    import torch
    import torch.distributed as dist

    from llm_pretrain import distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    module = torch.nn.Linear(3, 2)
    with torch.no_grad():
        module.weight.fill_(1.0)
        module.bias.fill_(0.0)
    distributed.check_replicas(module)  # identical: passes
    with torch.no_grad():
        module.bias.fill_(float(rank))
    try:
        distributed.check_replicas(module)
        results[rank] = "no error"
    except RuntimeError as e:
        results[rank] = str(e)
    dist.destroy_process_group()


def test_diverged_replicas_are_detected(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_replica_worker, args=(str(tmp_path / "init"), results), nprocs=2)
        assert all("ranks [1] hold different weights" in results[r] for r in (0, 1))


def torchrun(nproc: int, args: list[str], cwd, timeout: int = 300):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "llm_pretrain.train",
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_fsdp_checkpoints_resume_on_any_number_of_ranks_and_under_ddp(tmp_path):
    """An FSDP2 run on 2 ranks saves (DCP) at step 3; it continues bit-identically on 2 ranks,
    and to 1e-5 on 1 and on 3 ranks (the data re-split keeps each step's documents) and under
    DDP, whose single-file checkpoint an FSDP2 run on 3 ranks resumes in turn."""
    common = [
        *TINY,
        "data.layout=paper",
        "trainer.max_steps=6",
        "trainer.global_batch_size=12",  # 6, 3 or 2 micro-batches of 2 per rank
        "trainer.micro_batch_size=2",
        "eval.tokens=500",
        "trainer.eval_at_start=false",
        *GALORE,
        "checkpoint.every=3",
    ]

    def run(name, nproc, parallelism, *extra):
        out = torchrun(
            nproc,
            [
                *common,
                f"trainer.parallelism={parallelism}",
                f"hydra.run.dir={tmp_path / name}",
                *extra,
            ],
            tmp_path,
        )
        assert out.returncode == 0, out.stderr[-4000:]
        return metrics(tmp_path / name)[0]

    straight = run("fsdp2", 2, "fsdp")
    step3 = tmp_path / "fsdp2" / "checkpoints" / "step_00000003"
    assert (step3 / "meta.pt").is_file() and (step3 / ".metadata").is_file()
    assert run("again2", 2, "fsdp", f"checkpoint.resume={step3}") == straight[3:]
    for name, nproc, parallelism in [("on1", 1, "fsdp"), ("on3", 3, "fsdp"), ("ddp", 2, "ddp")]:
        resumed = run(name, nproc, parallelism, f"checkpoint.resume={step3}")
        for a, b in zip(straight[3:], resumed, strict=True):
            assert abs(a - b) <= 1e-5 * abs(a), name
    ddp_file = tmp_path / "ddp" / "checkpoints" / "step_00000006.pt"
    assert ddp_file.is_file()
    onward = run("back", 3, "fsdp", f"checkpoint.resume={ddp_file}", "trainer.max_steps=7")
    assert len(onward) == 1


@pytest.mark.slow
def test_per_layer_updates_on_two_ranks_with_accumulation_match_the_normal_path(tmp_path):
    """2 ranks x 2 micro-batches: each parameter steps once per step, in its hook, on the
    gradient averaged over the ranks (DDP) or on its reduce-scattered shard (FSDP2); the same
    losses as the normal DDP path (on a GQA model with a tied head)."""
    common = [*COMMON, *GALORE, "trainer.micro_batch_size=2", "trainer.grad_clip=0"]
    # grouped-query attention and a tied head, as loaded HF checkpoints may have
    common += ["model.num_kv_heads=1", "model.tie_embeddings=true"]
    layered = ["trainer.per_layer_update=true"]
    runs, summaries = {}, {}
    for name, extra in [
        ("normal", []),
        ("layered", layered),
        ("layered_fsdp", [*layered, "trainer.parallelism=fsdp"]),
    ]:
        out = torchrun(2, [*common, *extra, f"hydra.run.dir={tmp_path / name}"], tmp_path)
        assert out.returncode == 0, out.stderr[-4000:]
        runs[name] = metrics(tmp_path / name)
        summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
        assert summaries[name]["world_size"] == 2
    for name in ("layered", "layered_fsdp"):
        for a, b in zip(sum(runs["normal"], []), sum(runs[name], []), strict=True):
            assert abs(a - b) <= 1e-5 * abs(a), name
    normal = summaries["normal"]["memory"]
    # (DDP accumulating: every gradient is kept until the last micro-batch, no saving there)
    assert summaries["layered"]["memory"]["gradients"] <= normal["gradients"]
    # FSDP2: one block's gradient shards at a time (here the root's: embeddings and head),
    # measured as predicted on each rank
    sharded = summaries["layered_fsdp"]["memory"]
    assert sharded["predicted"]["per_rank"] == sharded["per_rank"]
    assert max(r["gradients"] for r in sharded["per_rank"]) < 0.5 * normal["gradients"]


@pytest.mark.slow
def test_c4_split_by_document_resumes_on_another_number_of_ranks(tmp_path, shared_data):
    """The C4 sample read as files under data.split=documents: an FSDP2 run on 2 ranks saves
    at step 3, and one rank continues with the losses the 2 ranks had (the same documents in
    every later step)."""
    common = [
        *TINY,
        "data=files",
        f"data.path={shared_data / 'c4' / 'c4_en_sample_2000.jsonl.gz'}",
        f"data.tokenizer={shared_data / 't5_tokenizer' / 'spiece.model'}",
        "data.layout=paper",
        "data.val_docs=20",
        "data.split=documents",
        "model.vocab_size=32000",
        "trainer.max_steps=5",
        "trainer.micro_batch_size=2",
        "trainer.eval_at_start=false",
        "eval.tokens=500",
        "checkpoint.every=3",
    ]
    out = torchrun(
        2, [*common, "trainer.parallelism=fsdp", f"hydra.run.dir={tmp_path / 'a'}"], tmp_path
    )
    assert out.returncode == 0, out.stderr[-4000:]
    straight = metrics(tmp_path / "a")[0]
    step3 = tmp_path / "a" / "checkpoints" / "step_00000003"
    one = run_cli(
        [*common, f"checkpoint.resume={step3}", f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path
    )
    assert one.returncode == 0, one.stderr[-4000:]
    assert "re-split over 1" in one.stdout
    resumed = metrics(tmp_path / "b")[0]
    assert len(resumed) == 2
    for a, b in zip(straight[3:], resumed, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)


@pytest.mark.slow
def test_a_continual_run_under_fsdp_matches_one_rank(tmp_path, shared_data):
    """experiment=cl_order1 with GORP on 2 FSDP2 ranks: the same losses, accuracy matrix and
    task subspaces (end_task() on each matrix's owner) as on one process; evaluation runs in
    lockstep whatever each rank's share of the test examples."""
    common = [
        *TINY,
        "model.vocab_size=32000",
        "data.seq_len=96",
        f"data.tokenizer={shared_data / 't5_tokenizer' / 'spiece.model'}",
        f"data.tasks.root={shared_data / 'cl_benchmark'}",
        "experiment=cl_order1",
        "data.tasks.names=[agnews,dbpedia]",
        "data.tasks.train_per_class=1",
        "data.tasks.eval_per_class=1",  # 4 and 14 test examples: 2 and 7 per rank
        "data.tasks.steps_per_task=2",
        "data.tasks.metric=options",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2",
        "trainer.warmup_steps=0",
        "trainer.log_every=1",
        "optimizer=gorp",
        "optimizer.rank=4",
        "eval.tokens=200",
    ]
    one = run_cli([*common, f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, [*common, "trainer.parallelism=fsdp", f"hydra.run.dir={tmp_path / 'two'}"],
                   tmp_path)  # fmt: skip
    assert two.returncode == 0, two.stderr[-4000:]
    (l1, e1), (l2, e2) = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(l1) == len(l2) == 4
    for a, b in zip(l1 + e1, l2 + e2, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s1["tasks"]["continual"]["matrix"] == s2["tasks"]["continual"]["matrix"]
    assert s1["tasks"]["continual"]["aa"] == s2["tasks"]["continual"]["aa"]
