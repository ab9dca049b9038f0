"""The optimizers outside our training loop: each example runs, and its weights equal those of
the same optimizer driven by a hand-written loop."""

import importlib.util
import subprocess
import sys

import torch
from torch import nn

from tests.conftest import REPO


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_torch_runs_without_hydra():
    code = (
        "import runpy, sys\n"
        "runpy.run_path('examples/plain_torch.py', run_name='__main__')\n"
        "assert not {'hydra', 'omegaconf', 'llm_pretrain'} & {m.split('.')[0] for m in sys.modules}"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "after 20 GaLore steps" in done.stdout


def test_plain_torch_equals_a_hand_written_loop():
    example = load("plain_torch")
    trained, losses = example.main(steps=20)
    assert losses[-1] < 0.5 * losses[0]

    from llmpt.optimizers.api import GaLore

    torch.manual_seed(0)
    model = example.Regressor()
    first, second = model.mlp[0].weight, model.mlp[2].weight
    rest = [p for p in model.parameters() if p is not first and p is not second]
    opt = GaLore(
        [
            {"params": [first], "projected": True, "rank": 4},
            {"params": [second], "projected": True},
            {"params": rest},
        ],
        lr=3e-2,
        rank=8,
        update_gap=10,
        scale=1.0,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    x, y = example.data(0)
    for _ in range(20):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    for a, b in zip(trained.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    # the per-group rank was honoured: the first matrix's basis has 4 columns, the second 8
    assert opt.state[first]["basis"].shape[0] * opt.state[first]["basis"].shape[1] in (
        4 * 32,
        4 * 64,
    )
    assert 8 in opt.state[second]["basis"].shape


def test_hf_trainer_equals_a_hand_written_loop(tmp_path):
    example = load("hf_trainer")
    steps = 4
    trained, losses = example.train(steps=steps, out=tmp_path)
    assert len(losses) == steps

    model = example.tiny_llama(0)
    opt, sched = example.optimizer_and_schedule(model, steps)
    rows = example.byte_rows(example.README)
    model.train()
    hand = []
    for _ in range(steps):
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        model.zero_grad(set_to_none=True)
        hand.append(loss.item())
    assert torch.allclose(torch.tensor(losses), torch.tensor(hand), atol=1e-4)
    for (n, a), b in zip(trained.named_parameters(), model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), n
    # GaLore projected the 14 attention and MLP matrices of transformers' module names
    projected = [p for g in opt.param_groups if g["projected"] for p in g["params"]]
    assert len(projected) == 14
