"""Every registered optimizer under 2-rank DDP (gloo): ranks see different data, DDP averages the
gradients, and the optimizer must then keep the replicas identical: the same bases, sampled
layers, quantization draws and updates on every rank, bit for bit."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from llm_pretrain import optim as optimizers
from tests.optimizers.test_contract import METHODS, RENAMING, optimizer_cfg, toy_model


def _worker(rank: int, init_file: str, cfgs: dict, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = {}
    for name, raw in cfgs.items():
        model = toy_model()
        opt = optimizers.build(OmegaConf.create(raw), model)
        initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
        for _ in range(5):  # crosses refreshes and layer switches (gap / interval 2)
            batch = torch.randint(0, 64, (2, 16), generator=g)
            ddp(batch, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        results[name] = {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "initial": initial,  # the trained parameters as the run started
            "state": opt.state_dict(),
        }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


@pytest.mark.slow
def test_every_optimizer_keeps_ddp_replicas_identical(tmp_path):
    cfgs = {name: OmegaConf.to_container(optimizer_cfg(name)) for name in METHODS}
    mp.spawn(_worker, args=(str(tmp_path / "init"), cfgs, str(tmp_path)), nprocs=2)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert set(r0) == set(METHODS)
    for name in METHODS:
        # by name: RSO adds its B matrices (and keeps the wrapped weights' names); WeLore
        # replaces its low-rank components' weights by two factors
        start = dict(toy_model().named_parameters())
        params0, params1 = r0[name]["params"], r1[name]["params"]
        assert params0.keys() == params1.keys(), name
        assert name in RENAMING or start.keys() <= params0.keys(), name
        initial = r0[name]["initial"]
        moved = [not torch.equal(params0[n], p) for n, p in initial.items()]
        assert sum(moved) > 0.5 * len(moved), name  # the run did train
        for n in params0:
            assert torch.equal(params0[n], params1[n]), f"{name}: {n}"
        s0, s1 = dict(_tensors(r0[name]["state"])), dict(_tensors(r1[name]["state"]))
        assert s0.keys() == s1.keys() and s0, name
        for key in s0:
            assert torch.equal(s0[key], s1[key]), f"{name}: {key}"
