"""``projection_rng=philox``: APOLLO, Flora and RSO draw P with Triton's Philox
(``kernels/seeded_projection.py``), and their CUDA path applies it tile by tile; ``torch`` draws
refuse to continue on another device type than they were drawn on."""

import io
import math

import pytest
import torch
from torch import nn

from llm_pretrain import optim as optimizers
from llmpt.kernels import seeded_projection
from llmpt.optimizers.projectors.gaussian import GaussianProjector, draw_seed
from llmpt.optimizers.residuals.scaled_gradient import ScaledGradient
from llmpt.optimizers.rso import RsoLinear, RsoLinearFunction
from llmpt.optimizers.subspace import SubspaceOptimizer
from tests.conftest import compose_cfg, toy_llama
from tests.optimizers.test_apollo import make_params, run
from tests.optimizers.test_contract import train_steps

RANK, GAP = 4, 3


def apollo(params, store=False, rng="philox", proj_type="std"):
    mats, vec = params
    return SubspaceOptimizer(
        [{"params": mats, "projected": True}, {"params": [vec], "projected": False}],
        lr=0.01,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=0.0,
        projector=GaussianProjector(RANK, GAP, proj_type, store=store, rng=rng),
        scale=1.0,
        residual=ScaledGradient("channel"),
    )


def steps(store=False, rng="philox", proj_type="std", n=7):
    mats, vec = make_params()
    opt = apollo((mats, vec), store, rng, proj_type)
    return run(opt, mats + [vec], n), opt


def test_philox_p_is_the_kernel_modules_gaussian_of_seed_and_draw():
    _, opt = steps(store=True, n=4)  # two draws: steps 0 and 3
    for p in opt.param_groups[0]["params"]:
        state = opt.state[p]
        d, side = state["full_dim"], state["side"]
        shape = (d, RANK) if side == 0 else (RANK, d)
        seed = draw_seed(state.get("seed", 0), state["draws"] - 1)
        want = seeded_projection.gaussian(seed, shape, 1 / math.sqrt(RANK))
        assert state["draws"] == 2 and torch.equal(state["basis"], want)


@pytest.mark.parametrize("proj_type", ["std", "left", "right"])
def test_regenerated_philox_p_equals_a_stored_one(proj_type):
    """Never stored, P is applied through ``seeded_matmul`` on both sides; the steps equal
    those with P built and kept."""
    lean, opt = steps(store=False, proj_type=proj_type)
    stored, _ = steps(store=True, proj_type=proj_type)
    for a, b in zip(lean, stored, strict=True):
        assert (a - b).abs().max() <= 1e-6
    assert opt.state_nbytes()["projector"] == 0
    assert all("basis" not in opt.state[p] for p in opt.param_groups[0]["params"])


def test_the_triton_path_gives_the_reference_paths_steps(triton_dispatch):
    """The CUDA path of APOLLO (P drawn tile by tile inside the Triton matmul), run by Triton's
    interpreter on CPU, takes the same steps as the PyTorch reference."""
    tiled, _ = steps(n=4)
    triton_dispatch.undo()
    ref, _ = steps(n=4)
    for a, b in zip(tiled, ref, strict=True):
        assert (a - b).abs().max() <= 1e-5


def test_philox_and_torch_draw_different_matrices_with_the_same_step_rule():
    philox, _ = steps(rng="philox")
    torch_, _ = steps(rng="torch")
    assert not torch.equal(philox[0], torch_[0])


def test_resume_continues_bit_identically():
    mats, vec = make_params()
    opt = apollo((mats, vec))
    run(opt, mats + [vec], 4)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in mats + [vec]]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    straight = run(opt, mats + [vec], 3)
    mats2, vec2 = make_params()
    with torch.no_grad():
        for p, q in zip(mats2 + [vec2], saved["params"], strict=True):
            p.copy_(q)
    resumed_opt = apollo((mats2, vec2))
    resumed_opt.load_state_dict(saved["opt"])
    resumed = run(resumed_opt, mats2 + [vec2], 3)
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)


def test_a_torch_draw_refuses_another_device_type():
    """torch's CPU and CUDA generators draw different P from one seed: a state drawn on CUDA
    (simulated) does not silently continue on CPU."""
    mats, vec = make_params()
    opt = apollo((mats, vec), rng="torch")
    run(opt, mats + [vec], 1)
    state = opt.state[mats[0]]
    assert state["draw_device"] == 0  # cpu
    state["draw_device"] = 1
    with pytest.raises(
        RuntimeError, match="drawn by torch's cuda generator.*projection_rng=philox"
    ):
        run(opt, mats + [vec], 1)


@pytest.mark.parametrize("name", ["apollo", "apollo_mini", "flora", "rso"])
def test_every_seeded_method_trains_with_philox(name):
    model = toy_llama()
    cfg = compose_cfg([f"optimizer={name}", "optimizer.projection_rng=philox"]).optimizer
    cfg.rank = 4
    losses = train_steps(model, optimizers.build(cfg, model), 4)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["apollo", "flora"])
def test_philox_with_the_reference_seeding_is_refused(name):
    cfg = compose_cfg(
        [
            f"optimizer={name}",
            "optimizer.projection_rng=philox",
            "optimizer.compat=reference",
            "optimizer.refresh=synchronous",
        ]
    ).optimizer
    with pytest.raises(ValueError, match="compat=reference reproduces the reference code"):
        optimizers.build(cfg, toy_llama())


@pytest.mark.parametrize("name", ["apollo", "flora", "rso"])
def test_an_unknown_rng_is_refused(name):
    cfg = compose_cfg([f"optimizer={name}", "optimizer.projection_rng=mt19937"]).optimizer
    model = toy_llama()
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match=r"projection_rng='mt19937': use one of \('torch'"):
        optimizers.build(cfg, model)
    assert [n for n, _ in model.named_modules()] == before  # RSO wrapped nothing


# ---------------------------------------------------------------------- RSO


def rso_linear(rng, store=False, seed=3):
    torch.manual_seed(0)
    linear = nn.Linear(24, 16)
    lin = RsoLinear(linear, RANK, seed=seed, store_projection=store, rng=rng)
    with torch.no_grad():
        lin.rso_b.normal_()
    return lin


def test_rso_philox_forward_and_backward_match_the_dense_reparametrization():
    lin = rso_linear("philox")
    p = seeded_projection.gaussian(lin.draw_seed(), (24, RANK), 1 / math.sqrt(RANK))
    assert torch.equal(lin.projection(), p)
    x = torch.randn(5, 24, requires_grad=True)
    y = lin(x)
    ref_x = x.detach().clone().requires_grad_()
    ref_b = lin.rso_b.detach().clone().requires_grad_()
    ref = nn.functional.linear(ref_x, lin.weight, lin.bias) + (ref_x @ p) @ ref_b.T
    assert torch.allclose(y, ref, atol=1e-5)
    dy = torch.randn(y.shape)
    y.backward(dy)
    ref.backward(dy)
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-5)
    assert torch.allclose(lin.rso_b.grad, ref_b.grad, atol=1e-5)
    assert torch.allclose(lin.merged_weight(), lin.weight + lin.rso_b @ p.T, atol=1e-6)


def test_rso_triton_path_gives_the_reference_paths_gradients(triton_dispatch):
    x = torch.randn(6, 24)
    out = {}
    for mode in ("triton", "reference"):
        if mode == "reference":
            triton_dispatch.undo()
        lin = rso_linear("philox")
        xi = x.clone().requires_grad_()
        y = lin(xi)
        y.square().sum().backward()
        out[mode] = (y.detach(), xi.grad, lin.rso_b.grad)
    for a, b in zip(out["triton"], out["reference"], strict=True):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_rso_function_takes_philox_as_an_argument():
    """The function itself, with a philox seed, against P materialised by the kernel module."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 10, generator=g, requires_grad=True)
    w0, b = torch.randn(6, 10, generator=g), torch.randn(6, 2, generator=g, requires_grad=True)
    y = RsoLinearFunction.apply(x, w0, None, b, None, 11, 2, "philox")
    p = seeded_projection.gaussian(11, (10, 2), 1 / math.sqrt(2))
    assert torch.allclose(y, x @ w0.T + (x @ p) @ b.T, atol=1e-5)


@pytest.mark.parametrize("store", [False, True])
def test_rso_torch_draw_refuses_another_device_type_until_resampled(store):
    lin = rso_linear("torch", store)
    x = torch.randn(2, 24)
    lin(x)
    assert int(lin.rso_draw_device) == 0  # drawn on cpu
    state = {k: v.clone() for k, v in lin.state_dict().items()}
    state["rso_draw_device"].fill_(1)  # a checkpoint of a model trained on CUDA
    if store:  # the stored P is redrawn at load: refused there
        with pytest.raises(RuntimeError, match="RSO's P was drawn by torch's cuda generator"):
            lin.load_state_dict(state)
        return
    lin.load_state_dict(state)
    with pytest.raises(RuntimeError, match="merge the model there first"):
        lin(x)
    lin.resample()  # a new subspace: B = 0, P not drawn yet
    assert int(lin.rso_draw_device) == -1
    lin(x)
    assert int(lin.rso_draw_device) == 0


def test_rso_philox_ignores_the_device_record():
    lin = rso_linear("philox")
    lin(torch.randn(2, 24))
    assert int(lin.rso_draw_device) == -1  # nothing to record: philox is the same everywhere
