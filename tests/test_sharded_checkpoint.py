"""DCP checkpoints (llm_pretrain/sharded_checkpoint.py): the optimizer state's flattening, a
one-process round trip, and refusals of corrupt or hostile files. The multi-rank resumes (N to M
ranks, DDP <-> FSDP2) run through torchrun in tests/test_distributed.py."""

import os
import pickle

import pytest
import torch
from omegaconf import OmegaConf

from llm_pretrain import optim as optimizers
from llm_pretrain import sharded_checkpoint as sc
from llm_pretrain.checkpoint import CheckpointError
from tests.optimizers.test_contract import BATCH, optimizer_cfg, toy_model, train_steps


def test_flatten_keeps_structure_and_tensors():
    state = {
        "state": {0: {"step": 3, "exp_avg": torch.ones(2)}},
        "groups": [{"betas": (0.9, 0.99)}],
    }
    skeleton, tensors = sc.flatten(state)
    assert tensors.keys() == {"optim/state/0/exp_avg"}
    assert skeleton["groups"][0]["betas"] == (0.9, 0.99)
    back = sc.unflatten(skeleton, tensors)
    assert back["state"][0]["step"] == 3 and torch.equal(back["state"][0]["exp_avg"], torch.ones(2))
    # two ranks, each with the state of the matrices it owns
    other, _ = sc.flatten({"state": {1: {"step": 3, "exp_avg": torch.ones(2)}}, "groups": []})
    merged = sc.merge([skeleton, other])
    assert sorted(merged["state"]) == [0, 1]
    assert sc.tensor_keys(merged) == ["optim/state/0/exp_avg", "optim/state/1/exp_avg"]


def test_one_process_round_trip_is_exact(tmp_path):
    cfg = optimizer_cfg("galore")
    model = toy_model()
    opt = optimizers.build(cfg, model)
    train_steps(model, opt, 3)
    path = sc.save(tmp_path / "step_00000003", model, opt, {"step": 3})
    assert sorted(os.listdir(tmp_path)) == ["step_00000003"]  # (no temporary left behind)
    fresh = toy_model(seed=1)
    fresh_opt = optimizers.build(cfg, fresh)
    meta = sc.load_meta(path, keys=("step",))
    assert meta["step"] == 3
    sc.load_into(path, meta, fresh, fresh_opt)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    train_steps(model, opt, 2)
    train_steps(fresh, fresh_opt, 2)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


class _Hostile:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_or_corrupt_files_are_refused(tmp_path):
    model = toy_model()
    opt = optimizers.build(OmegaConf.create({"name": "adamw", "lr": 1e-3}), model)
    model(BATCH, BATCH).backward()
    opt.step()
    path = sc.save(tmp_path / "step_00000001", model, opt, {"step": 1})
    meta = sc.load_meta(path, keys=("step",))

    hostile = _Hostile()
    hostile.marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(hostile))
    with pytest.raises(CheckpointError, match="posix.system, which a checkpoint never holds"):
        sc.load_into(path, meta, toy_model(), opt)
    assert not hostile.marker.exists()

    (path / ".metadata").write_bytes(b"\x80\x04truncated")
    with pytest.raises(CheckpointError, match="DCP metadata is corrupt or truncated"):
        sc.load_into(path, meta, toy_model(), opt)

    (path / "meta.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="meta.pt is corrupt or truncated"):
        sc.load_meta(path)


def test_export_writes_one_weights_only_file(tmp_path):
    from tests.conftest import run_cli

    model = toy_model()
    opt = optimizers.build(optimizer_cfg("galore"), model)
    train_steps(model, opt, 2)
    path = sc.save(tmp_path / "step_00000002", model, opt, {"step": 2})
    out = run_cli(
        ["export", str(path), str(tmp_path / "model.pt")],
        tmp_path,
        module="llm_pretrain.sharded_checkpoint",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    exported = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    fresh = toy_model(seed=1)
    fresh.load_state_dict(exported)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    bad = run_cli(
        ["export", str(tmp_path), "x.pt"], tmp_path, module="llm_pretrain.sharded_checkpoint"
    )
    assert bad.returncode != 0 and "not a sharded checkpoint directory" in bad.stderr


def test_a_truncated_shard_file_is_refused(tmp_path):
    model = toy_model()
    opt = optimizers.build(optimizer_cfg("galore"), model)
    train_steps(model, opt, 1)
    path = sc.save(tmp_path / "step_00000001", model, opt, {"step": 1})
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="its DCP files are corrupt or incomplete"):
        sc.load_into(
            path,
            sc.load_meta(path, keys=("step",)),
            toy_model(),
            optimizers.build(optimizer_cfg("galore"), toy_model()),
        )


def test_sharded_directories_are_listed_resolved_and_pruned_with_files(tmp_path):
    from llm_pretrain import checkpoint

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "step_00000001.pt").write_bytes(b"x")
    for step in (2, 3):
        (ckpts / f"step_0000000{step}").mkdir()
        (ckpts / f"step_0000000{step}" / "meta.pt").write_bytes(b"x")
    (ckpts / ".step_00000004.tmp").mkdir()  # an interrupted save
    (ckpts / "step_00000005").mkdir()  # not a checkpoint: no meta.pt
    names = [p.name for p in checkpoint.list_checkpoints(ckpts)]
    assert names == ["step_00000001.pt", "step_00000002", "step_00000003"]
    assert checkpoint.resolve("auto", tmp_path).name == "step_00000003"
    assert checkpoint.resolve(str(ckpts / "step_00000002"), tmp_path).name == "step_00000002"
    checkpoint.prune(tmp_path, keep=1)
    assert sorted(p.name for p in ckpts.iterdir()) == [
        ".step_00000004.tmp",
        "step_00000003",
        "step_00000005",
    ]
