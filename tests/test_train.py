"""End-to-end training: learning, exact resume, sweeps, bad input, logging."""

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from llm_pretrain import checkpoint
from llm_pretrain.train import train
from tests.conftest import REPO, TINY, compose_cfg, run_cli


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_tiny_run_learns_and_writes_outputs(tmp_path):
    cfg = compose_cfg(
        [*TINY, "trainer.max_steps=60", "optimizer.lr=0.01", "trainer.warmup_steps=5"]
    )
    s = train(cfg, tmp_path)
    assert s["eval"]["final_ppl"] < 0.3 * s["eval"]["initial_ppl"]
    assert s["eval"]["final_loss"] > s["eval"]["source_entropy"]  # nobody beats the source
    assert s["tokens_seen"] == 60 * 8 * 32
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["eval"]["final_ppl"] == pytest.approx(s["eval"]["final_ppl"])
    assert len(losses(tmp_path)) == 60
    mem = s["memory"]
    n_params = s["params"]
    assert mem["weights"] == mem["gradients"] == 4 * n_params
    # AdamW: two fp32 moments per parameter plus one fp32 step counter per tensor.
    assert mem["optimizer_state_by_category"]["moments"] == 8 * n_params
    assert mem["activations"] > 0
    assert 0 <= s["timing"]["overhead_fraction"] < 1


@pytest.mark.parametrize(
    "extra",
    [
        [],  # built-in corpus, packed rows, main-process loading
        [
            "data=files",
            "data.path={c4}",
            "data.tokenizer={spiece}",
            "data.layout=paper",
            "data.val_docs=20",
            "data.num_workers=2",
            "model.vocab_size=32000",
        ],
    ],
)
def test_resume_is_exact(tmp_path, shared_data, extra):
    extra = [
        e.format(
            c4=shared_data / "c4" / "c4_en_sample_2000.jsonl.gz",
            spiece=shared_data / "t5_tokenizer" / "spiece.model",
        )
        for e in extra
    ]
    base = [
        *TINY,
        "trainer.max_steps=8",
        "trainer.global_batch_size=8",
        "trainer.micro_batch_size=2",
        *extra,
    ]
    straight = losses_of(tmp_path / "straight", base)
    saving = losses_of(tmp_path / "saving", [*base, "checkpoint.every=4"])
    ckpt = tmp_path / "saving" / "checkpoints" / "step_00000004.pt"
    assert ckpt.is_file()
    resumed = losses_of(tmp_path / "resumed", [*base, f"checkpoint.resume={ckpt}"])
    assert len(straight) == 8 and len(resumed) == 4
    assert saving == straight
    assert resumed == straight[4:]  # bit-identical, not approximately equal


def losses_of(run_dir, overrides):
    train(compose_cfg(overrides), run_dir)
    return losses(run_dir)


def test_resume_auto_and_refusals(tmp_path):
    base = [*TINY, "trainer.max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=1"]
    train(compose_cfg(base), tmp_path / "a")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "a" / "checkpoints")] == [
        "step_00000004.pt"
    ]
    # auto: continue the run in the same directory where it stopped (e.g. after a requeue)
    s = train(compose_cfg([*base, "trainer.max_steps=6", "checkpoint.resume=auto"]), tmp_path / "a")
    assert s["steps"] == 6
    with pytest.raises(checkpoint.CheckpointError, match="different configuration.*model"):
        train(
            compose_cfg([*base, "model.hidden_size=48", f"checkpoint.resume={tmp_path / 'a'}"]),
            tmp_path / "b",
        )
    bad = tmp_path / "corrupt.pt"
    good = tmp_path / "a" / "checkpoints" / "step_00000006.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        train(compose_cfg([*base, f"checkpoint.resume={bad}"]), tmp_path / "c")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not an llm_pretrain checkpoint"):
        train(compose_cfg([*base, f"checkpoint.resume={tmp_path / 'other.pt'}"]), tmp_path / "d")
    with pytest.raises(checkpoint.CheckpointError, match="no such file"):
        train(compose_cfg([*base, "checkpoint.resume=/nope.pt"]), tmp_path / "e")


def test_checkpoint_save_is_atomic_and_weights_only(tmp_path):
    path = checkpoint.save(
        tmp_path / "step_00000001.pt", {"x": torch.ones(2), "n": 3, "rng": checkpoint.rng_state()}
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt"]  # no temp left
    loaded = checkpoint.load(path, keys=("x", "n", "rng"))
    assert loaded["n"] == 3 and torch.equal(loaded["x"], torch.ones(2))
    checkpoint.set_rng_state(loaded["rng"])
    a = torch.rand(3)
    checkpoint.set_rng_state(loaded["rng"])
    assert torch.equal(a, torch.rand(3))


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (
            ["trainer.global_batch_size=10"],
            ValueError,
            r"trainer.global_batch_size=10 is not divisible by world_size \(1\) x "
            r"trainer.micro_batch_size \(4\) = 4",
        ),
        (
            ["data.seq_len=2048"],
            ValueError,
            "data.seq_len=2048 exceeds model.max_position_embeddings=1024 of llama_tiny",
        ),
        (
            ["data=files", "data.tokenizer=builtin", "data.path=/no/such/*.jsonl"],
            FileNotFoundError,
            "data.path=/no/such/.*no file matches",
        ),
        (["trainer.precision=fp16"], ValueError, "trainer.precision='fp16'"),
        (["optimizer.name=sgdx"], ValueError, "optimizer.name='sgdx' is not registered"),
    ],
)
def test_bad_input_is_explained(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        train(compose_cfg([*TINY, "trainer.max_steps=1", *overrides]), tmp_path)


def test_config_typos_fail_at_composition():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["trainer.max_step=5"])
    assert "Key 'max_step' not in 'TrainerConfig'" in str(e.value.__cause__)
    with pytest.raises(ValueError, match=r"unknown config key trainer.max_step \(not in Trai"):
        train(compose_cfg([*TINY, "+trainer.max_step=5"]), Path("unused"))  # Hydra allows "+"
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["trainer.max_steps=many"])
    assert isinstance(e.value.__cause__, ValidationError)
    with pytest.raises(ConfigCompositionException, match="Could not find 'model/llama_5m'"):
        compose_cfg(["model=llama_5m"])


def test_cli_default_job_shape_and_summary(tmp_path):
    """The default command, shortened: progress lines, eval, and the summary table."""
    out = run_cli(
        [*TINY, "trainer.max_steps=12", "trainer.log_every=4", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "run summary" in out.stdout
    for key in (
        "val ppl (start -> end)",
        "tokens seen",
        "tokens/s",
        "memory: weights",
        "memory: gradients",
        "memory: optimizer state",
        "memory: activations",
        "source entropy",
    ):
        assert key in out.stdout
    assert "step 12/12 loss" in out.stderr + out.stdout
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "run" / "summary.json").is_file()


def test_cli_unknown_model_names_the_options(tmp_path):
    out = run_cli(["model=llama_5m"], cwd=tmp_path)
    assert out.returncode != 0
    assert "Could not find 'model/llama_5m'" in out.stderr and "llama_60m" in out.stderr


def test_multirun_appends_one_row_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    out = run_cli(
        # -m after some overrides: Hydra's own parser would refuse it; ours moves it first
        [*TINY, "trainer.max_steps=3", "-m", "trainer.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (sweep / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert sorted(r["config"]["optimizer"]["lr"] for r in rows) == [1e-3, 3e-3]
    for r in rows:
        assert r["status"] == "ok" and math.isfinite(r["final_val_ppl"])
        assert r["tokens_seen"] == 3 * 8 * 32 and r["memory"]["weights"] > 0
        assert Path(r["run_dir"]).parent == sweep
    # and the report reads it: one line per job, told apart by the swept override
    report = run_cli([str(sweep)], cwd=tmp_path, module="llm_pretrain.report")
    assert report.returncode == 0, report.stderr[-3000:]
    assert "| adamw trainer.lr=0.001 |" in report.stdout  # (as Hydra writes the value)
    assert "| adamw trainer.lr=0.003 |" in report.stdout
    assert (sweep / "report.png").is_file()


def test_multirun_flag_is_moved_before_the_overrides():
    from llm_pretrain.train import _multirun_flag_first

    assert _multirun_flag_first(["t", "a=1", "--multirun", "b=2,3"]) == ["t", "-m", "a=1", "b=2,3"]
    assert _multirun_flag_first(["t", "a=1"]) == ["t", "a=1"]


def test_failed_sweep_job_still_gets_a_row(tmp_path):
    sweep = tmp_path / "sweep"
    out = run_cli(
        [
            "-m",
            *TINY,
            "trainer.max_steps=2",
            "trainer.global_batch_size=8,6",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode != 0
    rows = [json.loads(line) for line in (sweep / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "not divisible" in rows[1]["error"]


def test_wandb_offline_logs_config_metrics_and_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    base = [*TINY, "trainer.max_steps=3", "logger=wandb", "checkpoint.at_end=true"]
    s = train(compose_cfg(base), tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))  # the offline run file `wandb sync` uploads
    assert s["status"] == "ok"
    run_id = runs[0].name.rsplit("-", 1)[1]
    # a resumed run keeps logging to the same wandb run id
    train(compose_cfg([*base, "trainer.max_steps=5", "checkpoint.resume=auto"]), tmp_path)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[1] for r in runs} == {run_id}


def test_readme_starts_with_the_two_commands():
    head = "\n".join((REPO / "README.md").read_text().splitlines()[:60])
    assert "make run" in head and "make test" in head
    assert (REPO / ".ci" / "run").read_text().strip().endswith("make test")


@pytest.mark.parametrize(
    "precision, dtype", [("bf16_autocast", torch.float32), ("bf16", torch.bfloat16)]
)
def test_bf16_precisions_train_on_cpu(tmp_path, precision, dtype):
    cfg = compose_cfg(
        [*TINY, "trainer.max_steps=30", "optimizer.lr=0.01", f"trainer.precision={precision}"]
    )
    s = train(cfg, tmp_path)
    assert s["precision"] == precision
    assert s["eval"]["final_ppl"] < 0.5 * s["eval"]["initial_ppl"]
    n = s["params"]
    # pure bf16 (the papers' setting) halves weights, gradients and Adam moments
    assert s["memory"]["weights"] == n * torch.finfo(dtype).bits // 8
    assert (
        s["memory"]["optimizer_state_by_category"]["moments"]
        == 2 * n * torch.finfo(dtype).bits // 8
    )


def test_compiled_blocks_train_like_eager(tmp_path):
    base = [*TINY, "trainer.max_steps=3", "trainer.eval_at_start=false"]
    eager = losses_of(tmp_path / "eager", base)
    compiled = losses_of(tmp_path / "compiled", [*base, "trainer.compile=true"])
    assert compiled == pytest.approx(eager, rel=1e-4)


@pytest.mark.parametrize("name", ["galore", "galore_8bit", "fira"])
def test_low_rank_optimizers_train_the_model(tmp_path, name):
    cfg = compose_cfg(
        [
            *TINY,
            f"optimizer={name}",
            "optimizer.rank=8",
            "optimizer.update_gap=10",
            "trainer.max_steps=40",
            "trainer.warmup_steps=4",
        ]
    )
    s = train(cfg, tmp_path)
    assert s["optimizer"] == name
    assert s["eval"]["final_ppl"] < 0.5 * s["eval"]["initial_ppl"]
    by_cat = s["memory"]["optimizer_state_by_category"]
    assert by_cat["projector"] > 0 and by_cat["moments"] > 0


LOW_RANK = ["optimizer.rank=8", "optimizer.update_gap=2"]
SAMPLED = ["optimizer.active_layers=1", "optimizer.interval=2"]


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("adamw", []),
        ("adamw8bit", []),
        ("adafactor", []),
        ("came", []),
        ("adam_mini", []),
        ("muon", []),
        ("galore", LOW_RANK),
        ("galore_8bit", LOW_RANK),
        ("q_galore", LOW_RANK),
        ("fira", LOW_RANK),
        ("frugal", ["optimizer.update_gap=2"]),  # blocks switch at steps 2 and 4
        ("frugal", ["optimizer.projection=columns", "optimizer.update_gap=2"]),
        ("lisa", SAMPLED),
        ("badam", SAMPLED),
        ("owlore", [*LOW_RANK, *SAMPLED]),
        ("gum", ["optimizer.rank=8", "optimizer.update_gap=2", "optimizer.active_layers=1"]),
        ("rso", LOW_RANK),  # merges and resamples at steps 2 and 4
    ],
)
def test_per_layer_updates_match_the_normal_path(tmp_path, name, overrides):
    base = [
        *TINY,
        f"optimizer={name}",
        *overrides,
        "trainer.max_steps=5",
        "trainer.global_batch_size=4",
        "trainer.grad_clip=0",
        "trainer.eval_at_start=false",
        "checkpoint.at_end=true",
    ]
    normal = train(compose_cfg(base), tmp_path / "normal")
    layered = train(compose_cfg([*base, "trainer.per_layer_update=true"]), tmp_path / "layered")
    weights = [
        checkpoint.load(checkpoint.checkpoint_path(tmp_path / d, 5))["model"]
        for d in ("normal", "layered")
    ]
    for key, w in weights[0].items():
        assert (w - weights[1][key]).abs().max() <= 1e-6, key
    # gradients never coexist: the peak is far below one full set of gradients (the layer
    # samplers' frozen layers have no gradients in either path)
    assert layered["memory"]["gradients"] < 0.5 * normal["memory"]["gradients"]


@pytest.mark.parametrize(
    "name, overrides", [("adamw", []), ("galore", LOW_RANK), ("lisa", SAMPLED)]
)
def test_per_layer_updates_with_accumulation_step_once_after_the_last_micro_batch(
    tmp_path, name, overrides
):
    """2 micro-batches per step: the hooks only accumulate in the first backward and step in
    the second, on the whole batch's gradient (GaLore#78 stepped on every micro-batch)."""
    base = [
        *TINY,  # 8 sequences per step as 2 x 4
        f"optimizer={name}",
        *overrides,
        "trainer.max_steps=4",
        "trainer.grad_clip=0",
        "trainer.eval_at_start=false",
        "checkpoint.at_end=true",
    ]
    train(compose_cfg(base), tmp_path / "normal")
    train(compose_cfg([*base, "trainer.per_layer_update=true"]), tmp_path / "layered")
    weights = [
        checkpoint.load(checkpoint.checkpoint_path(tmp_path / d, 4))["model"]
        for d in ("normal", "layered")
    ]
    for key, w in weights[0].items():
        assert (w - weights[1][key]).abs().max() <= 1e-6, key


def test_per_layer_updates_say_clipping_is_off(tmp_path, caplog):
    cfg = compose_cfg(
        [
            *TINY,
            "trainer.per_layer_update=true",
            "trainer.global_batch_size=4",
            "trainer.grad_clip=1.0",
            "trainer.max_steps=1",
        ]
    )
    with caplog.at_level("WARNING", logger="llm_pretrain"):
        train(cfg, tmp_path)
    assert "clipping is off" in caplog.text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["trainer.parallelism=zero3"],
            r"trainer.parallelism='zero3': use one of \('ddp', 'fsdp'\)",
        ),
        (
            ["trainer.parallelism=fsdp", "optimizer=rso", "optimizer.weight_decay=0.1"],
            "RSO decays the frozen W0",
        ),
        (["trainer.parallelism=fsdp", "optimizer=adam_mini"], "Adam-mini runs collectives"),
        (["data.split=rows"], "data.split='rows': use one of"),
    ],
)
def test_parallelism_refuses_what_it_cannot_run_exactly(overrides, message):
    from llm_pretrain.train import check_config

    with pytest.raises(ValueError, match=message):
        check_config(compose_cfg([*TINY, *overrides]), world_size=2)
