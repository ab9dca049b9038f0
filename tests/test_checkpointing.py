"""Activation checkpointing (llm_pretrain/checkpointing.py): the same numbers as without it, the
kept bytes measured as the estimator predicts them, in every precision and with the model
wrappers, through the training loop, under torch.compile, DDP and FSDP2."""

import copy
import functools
import json
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from llm_pretrain import checkpointing
from llm_pretrain import optim as optimizers
from llm_pretrain.checkpointing import MODES, apply_activation_checkpointing
from llm_pretrain.config import check_values
from llm_pretrain.memory import activation_bytes, main
from llm_pretrain.memory_estimate import (
    activation_bytes_formula,
    estimate,
    low_rank_layout,
    recompute_bytes_formula,
)
from llm_pretrain.model import build_model
from llm_pretrain.train import train
from tests.conftest import TINY, compose_cfg
from tests.test_distributed import COMMON, metrics, torchrun

PRECISIONS = ["fp32", "bf16_autocast", "bf16"]
# the head's terms do not depend on the checkpointing (test_memory_estimate.py checks both heads)
DENSE = ["model.loss_impl=dense"]


@functools.cache
def _composed(*overrides: str):
    return compose_cfg(list(overrides))


def composed(*overrides: str):
    """``compose_cfg``, composed once per set of overrides (a copy each time)."""
    return copy.deepcopy(_composed(*overrides))


def small(layers: int = 3):
    """C 64, F 96, 4 heads sharing 2 k/v heads, a 128-token vocabulary."""
    overrides = ["model=llama_tiny", "model.hidden_size=64", "model.intermediate_size=96"]
    overrides += [f"model.num_layers={layers}", "model.num_heads=4", "model.num_kv_heads=2"]
    return composed(*overrides, "model.vocab_size=128", *DENSE).model


def built(model_cfg, precision: str, mode: str, surgery=None):
    torch.manual_seed(0)
    model = build_model(model_cfg)
    if precision == "bf16":
        model.to(torch.bfloat16)
    if surgery is not None:
        surgery(model)
    apply_activation_checkpointing(model, mode, precision)
    return model


def autocast_for(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16_autocast" else None


def method(name: str, *overrides: str):
    """Model surgery as ``optimizers.build`` does it; returns the optimizer config."""
    cfg = composed(f"optimizer={name}", *overrides).optimizer

    def surgery(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (bitsandbytes' notices)
            optimizers.build(cfg, model)

    return cfg, surgery


@pytest.mark.parametrize("precision", PRECISIONS)
def test_checkpointing_changes_no_number(precision):
    """The recompute runs the same kernels on the same inputs: loss and every gradient are
    bitwise those without checkpointing."""
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    results = {}
    for mode in MODES:
        model = built(small(2), precision, mode)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16_autocast"):
            loss = model(x, x)
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    loss, grads = results["none"]
    for mode in ("blocks", "selective"):
        assert torch.equal(results[mode][0], loss), mode
        for name, g in grads.items():
            assert torch.equal(results[mode][1][name], g), (mode, name)


def _rso(rank: int, targets: list[str]):
    cfg, surgery = method("rso", f"optimizer.rank={rank}")
    cfg.target_modules = targets
    return surgery, {"rso_rank": rank, "rso_targets": targets}


def _int8():
    cfg, surgery = method("q_galore", "optimizer.rank=8", "optimizer.weight_storage=int8")
    return surgery, {"int8_targets": list(cfg.target_modules)}


def _weight_norm():
    cfg, surgery = method("gradnorm_lorp", "optimizer.rank=8")
    return surgery, {"weight_norm_targets": list(cfg.target_modules)}


def _frozen():
    def surgery(model):  # as LISA freezes the inactive layers
        for layer in model.model.layers[:2]:
            layer.requires_grad_(False)

    return surgery, {"frozen_layers": 2}


def _welore():
    from llmpt.optimizers.welore import compress

    def surgery(model):
        compress(model, ["attn", "mlp"], err=0.5, min_ratio=0.5)

    return surgery, "low_rank"


VARIANTS = {
    "plain": lambda: (None, {}),
    "rso_all": lambda: _rso(8, ["attn", "mlp"]),
    "rso_some": lambda: _rso(4, ["q_proj", "down_proj"]),
    "int8": _int8,
    "weight_norm": _weight_norm,
    "frozen": _frozen,
    "welore": _welore,
}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(
    "variant, mode",
    [("plain", "none"), *((v, m) for v in VARIANTS for m in ("blocks", "selective"))],
)
def test_kept_bytes_equal_the_formula(precision, variant, mode):
    """blocks: each layer's input; selective: also its matmul and attention outputs (SAC's
    cache, counted through the policy). ``none``: the saved-tensor count as it always was."""
    surgery, features = VARIANTS[variant]()
    model_cfg = small()
    model = built(model_cfg, precision, mode, surgery)
    if features == "low_rank":
        features = {"low_rank": low_rank_layout(model)}
    batch = 1 if variant == "welore" else 2  # (one sequence: the head's slices are views)
    x = torch.randint(0, 128, (batch, 16), generator=torch.Generator().manual_seed(1))
    measured = activation_bytes(model, x, x, autocast_for(precision))
    predicted = activation_bytes_formula(
        model_cfg, precision, batch, 16, **features, checkpointing=mode
    )
    assert measured == predicted
    if mode == "blocks":
        assert measured < activation_bytes_formula(model_cfg, precision, batch, 16, **features)


def test_blocks_keep_one_residual_stream_per_layer_and_the_recompute_is_one_layer():
    cfg, (B, T) = small(), (2, 16)
    head = activation_bytes_formula(cfg, "fp32", B, T, checkpointing="blocks") - 3 * 4 * 64 * B * T
    none = [activation_bytes_formula(small(n), "fp32", B, T) for n in (2, 3)]
    assert head == none[0] - (none[1] - none[0]) * 2  # the head's bytes, without any layer
    assert recompute_bytes_formula(cfg, "fp32", B, T) == none[1] - none[0]


@pytest.mark.parametrize(
    "mode, extra",
    [
        *(
            (m, ["optimizer=galore", "optimizer.rank=8", "trainer.per_layer_update=true"])
            for m in ("blocks", "selective")
        ),
        ("selective", ["optimizer=rso", "optimizer.rank=8", "trainer.precision=bf16_autocast"]),
        (
            "blocks",
            ["optimizer=q_galore", "optimizer.rank=8", "optimizer.weight_storage=int8"]
            + ["trainer.precision=bf16"],
        ),
    ],
)
def test_the_training_loop_measures_the_estimate_and_trains_as_without(tmp_path, mode, extra):
    """Per-layer updates (each parameter steps in its hook, during the recompute's backward),
    RSO and INT8-stored weights: the same losses as without checkpointing, and the summary's
    activations are the estimate's."""
    base = [*TINY, *DENSE, *extra, "trainer.max_steps=2", "trainer.eval_at_start=false"]
    base += ["trainer.global_batch_size=4"]
    losses = {}
    for m in ("none", mode):
        run = tmp_path / m
        s = train(compose_cfg([*base, f"trainer.activation_checkpointing={m}"]), run)
        losses[m] = metrics(run)[0]
        predicted = estimate(OmegaConf.load(run / "config.yaml"), s["precision"])
        assert s["memory"]["activations"] == predicted.activations
        assert (predicted.recompute > 0) == (m != "none")
    assert losses[mode] == losses["none"] and len(losses[mode]) == 2


@pytest.mark.slow
def test_compiled_selective_blocks_train_like_eager(tmp_path):
    """torch.compile traces the checkpoint with its policy (checkpoint, then compile)."""
    base = [*TINY, "trainer.max_steps=2", "trainer.eval_at_start=false"]
    base += ["trainer.activation_checkpointing=selective"]
    train(compose_cfg(base), tmp_path / "eager")
    train(compose_cfg([*base, "trainer.compile=true"]), tmp_path / "compiled")
    eager, compiled = metrics(tmp_path / "eager")[0], metrics(tmp_path / "compiled")[0]
    assert compiled == pytest.approx(eager, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallelism, mode, extra",
    [("ddp", "blocks", []), ("fsdp", "selective", ["trainer.per_layer_update=true"])],
)
def test_two_ranks_checkpointed_match_one_rank_without(tmp_path, parallelism, mode, extra):
    """DDP (its bucket hooks fire during the recompute's backward) and FSDP2 (fully_shard on
    the checkpointed blocks: weights gathered again before each recompute), gloo on 2 CPUs."""
    common = [*COMMON, *DENSE, "trainer.max_steps=3", "trainer.grad_clip=0"]
    train(compose_cfg(common), tmp_path / "single")
    run = tmp_path / parallelism
    args = [*common, *extra, f"trainer.parallelism={parallelism}"]
    args += [f"trainer.activation_checkpointing={mode}", f"hydra.run.dir={run}"]
    out = torchrun(2, args, tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    for a, b in zip(sum(metrics(tmp_path / "single"), []), sum(metrics(run), []), strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)
    memory = json.loads((run / "summary.json").read_text())["memory"]
    assert memory["activations"] == memory["predicted"]["activations"]


def test_a_bad_mode_is_refused_by_name():
    cfg = compose_cfg(["trainer.activation_checkpointing=full"])
    with pytest.raises(ValueError, match=r"^trainer.activation_checkpointing='full' must be"):
        check_values(cfg)
    model = build_model(small(1))
    with pytest.raises(ValueError, match="trainer.activation_checkpointing='full': use one of"):
        apply_activation_checkpointing(model, "full")
    apply_activation_checkpointing(model, "blocks")
    with pytest.raises(RuntimeError, match="applied twice"):
        apply_activation_checkpointing(model, "selective")


def test_selective_refuses_a_flash_attn_kernel_it_cannot_see(monkeypatch):
    """An older flash-attn runs its CUDA kernel outside torch's op registry: SAC would recompute
    attention unseen, so selective is refused (the check needs no GPU)."""
    model = build_model(small(1))
    monkeypatch.setattr(checkpointing.llama, "flash_attn_func", lambda *a, **k: None)
    monkeypatch.setattr(checkpointing, "flash_attn_op", lambda: None)
    with pytest.raises(ValueError, match="model.attention=sdpa"):
        checkpointing.check_selective(model, "bf16_autocast", "cuda")
    checkpointing.check_selective(model, "bf16_autocast", "cpu")  # (no flash-attn there)
    model.cfg.attention = "sdpa"
    checkpointing.check_selective(model, "bf16_autocast", "cuda")


def test_the_cli_compares_the_modes(capsys):
    main(
        ["model=llama_20m", "trainer.micro_batch_size=8", "data.seq_len=256"]
        + ["--compare", "trainer.activation_checkpointing=none,blocks,selective"]
    )
    out = capsys.readouterr().out
    assert "recompute of one block" in out
    cells = next(line for line in out.splitlines() if line.startswith("| activations"))
    none, blocks, _, selective, _ = (float(c) for c in cells.split("|")[2:-1])
    assert blocks < selective < none
