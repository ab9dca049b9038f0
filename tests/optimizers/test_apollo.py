"""APOLLO and APOLLO-Mini: parity with apollo-torch's APOLLOAdamW in compat=reference mode, and
the properties of the paper mode (seeded projection never stored, same updates)."""

import copy
import io
import math

import pytest
import torch
from omegaconf import OmegaConf

from llm_pretrain import optim as optimizers
from llmpt.optimizers.projectors.gaussian import GaussianProjector, draw_seed, reference_next_seed
from llmpt.optimizers.residuals.scaled_gradient import ScaledGradient
from llmpt.optimizers.rules import AdamRule
from llmpt.optimizers.subspace import SubspaceOptimizer
from tests.conftest import compose_cfg, toy_llama

SHAPES = [(32, 16), (16, 32), (24, 24)]
STEPS, GAP = 7, 3


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]
    vec = torch.randn(10, generator=g).requires_grad_()
    return mats, vec


def gradients(step, shapes):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g) for s in shapes]


def run(opt, params, steps=STEPS):
    shapes = [tuple(p.shape) for p in params]
    for t in range(steps):
        for p, grad in zip(params, gradients(t, shapes), strict=True):
            p.grad = grad.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def reference(mats, vec, rank, scale, scale_type, scale_front, disable_nl, wd, proj_type="std"):
    from apollo_torch import APOLLOAdamW

    groups = [
        {
            "params": mats,
            "rank": rank,
            "update_proj_gap": GAP,
            "scale": scale,
            "proj_type": proj_type,
            "proj": "random",
            "scale_type": scale_type,
        },
        {"params": [vec]},
    ]
    return APOLLOAdamW(
        groups, lr=0.01, weight_decay=wd, scale_front=scale_front, disable_nl=disable_nl
    )


def ours(mats, vec, rank, scale, scale_type, scale_front, limiter, wd, seeding, proj_type="std"):
    groups = [{"params": mats, "projected": True}, {"params": [vec], "projected": False}]
    return SubspaceOptimizer(
        groups,
        lr=0.01,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=wd,
        projector=GaussianProjector(rank, GAP, proj_type, seeding=seeding),
        scale=math.sqrt(scale) if seeding == "reference" else scale,
        residual=ScaledGradient(scale_type, limiter, 1.01, scale_front),
        rule=AdamRule("hf"),
    )


CASES = [
    # rank, code scale, scale type, scale_front, limiter, weight decay, proj_type
    (4, 1.0, "channel", False, True, 0.0, "std"),
    (4, 2.0, "channel", True, True, 0.1, "std"),
    (4, 3.0, "channel", False, False, 0.0, "std"),
    (1, 128.0, "tensor", True, True, 0.0, "std"),
    (1, 128.0, "tensor", False, True, 0.1, "std"),
    (2, 128.0, "tensor", True, True, 0.0, "left"),
    (2, 128.0, "tensor", True, False, 0.0, "right"),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_reference_mode_matches_apollo_torch(case):
    rank, scale, kind, front, limiter, wd, proj_type = case
    mats, vec = make_params()
    ref = run(
        reference(mats, vec, rank, scale, kind, front, not limiter, wd, proj_type), mats + [vec]
    )
    mats, vec = make_params()
    opt = ours(mats, vec, rank, scale, kind, front, limiter, wd, "reference", proj_type)
    got = run(opt, mats + [vec])
    for a, b in zip(ref, got, strict=True):
        assert (a - b).abs().max() <= 1e-6
    assert max((a - m).abs().max() for a, m in zip(got, make_params()[0], strict=False)) > 1e-3


def test_reference_mode_through_the_registry_matches_apollo_torch():
    """``optimizer=apollo optimizer.compat=reference`` on a LLaMA: the same seeds (ordinals over
    projected, then plain parameters) and the same arithmetic as APOLLOAdamW."""
    from apollo_torch import APOLLOAdamW

    cfg = compose_cfg(
        ["optimizer=apollo", "optimizer.compat=reference", "optimizer.refresh=synchronous"]
    ).optimizer
    OmegaConf.set_struct(cfg, False)
    cfg.rank, cfg.update_gap, cfg.scale = 4, 2, 2.0
    ours_model, ref_model = toy_llama(layers=2, seed=0), toy_llama(layers=2, seed=0)
    opt = optimizers.build(cfg, ours_model)
    projected, plain = optimizers.split_targets(ref_model, ["attn", "mlp"])
    ref_opt = APOLLOAdamW(
        [
            {
                "params": [p for _, p in projected],
                "rank": 4,
                "update_proj_gap": 2,
                "scale": 2.0,
                "proj_type": "std",
                "proj": "random",
                "scale_type": "channel",
            },
            {"params": [p for _, p in plain]},
        ],
        lr=cfg.lr,
        eps=cfg.eps,
    )
    batch = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for model, o in ((ours_model, opt), (ref_model, ref_opt)):
            model(batch, batch).backward()
            o.step()
            o.zero_grad(set_to_none=True)
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters(), strict=True):
        assert (a - b).abs().max() <= 1e-6, name


def test_paper_mode_stores_no_projection_and_equals_a_stored_one():
    """Paper mode regenerates P from (seed, draw) at every use; storing it changes memory, not
    the arithmetic."""
    runs = {}
    for store in (False, True):
        mats, vec = make_params()
        groups = [{"params": mats, "projected": True}, {"params": [vec], "projected": False}]
        opt = SubspaceOptimizer(
            groups,
            lr=0.01,
            betas=(0.9, 0.999),
            eps=1e-6,
            weight_decay=0.0,
            projector=GaussianProjector(4, GAP, "std", store=store),
            scale=1.0,
            residual=ScaledGradient("channel"),
        )
        runs[store] = (run(opt, mats + [vec]), opt)
    for a, b in zip(runs[False][0], runs[True][0], strict=True):
        assert torch.equal(a, b)
    lean, stored = runs[False][1], runs[True][1]
    assert lean.state_nbytes()["projector"] == 0
    expected = 4 * (16 + 16 + 24) * 4  # r x short side, fp32, per matrix
    assert stored.state_nbytes()["projector"] == expected
    for p in lean.param_groups[0]["params"]:
        assert all(
            k
            in (
                *("side", "full_dim", "draws", "seed", "draw_device", "step"),
                *("exp_avg", "exp_avg_sq", "update_norm"),
            )
            for k in lean.state[p]
        )


def test_projection_seeds_are_a_function_of_seed_and_draw():
    proj = GaussianProjector(3, 2, "std")
    g = torch.zeros(8, 6)
    a, b = {"seed": 5}, {"seed": 5}
    proj.refresh(a, g)
    proj.refresh(b, g)
    assert torch.equal(proj.basis(a, g), proj.basis(b, g))
    first = proj.basis(a, g)
    proj.refresh(a, g)
    assert not torch.equal(first, proj.basis(a, g))  # a new draw at the next refresh
    c = {"seed": 6}
    proj.refresh(c, g)
    assert not torch.equal(first, proj.basis(c, g))
    assert len({draw_seed(s, d) for s in range(50) for d in range(50)}) == 2500
    p = proj.basis(a, g)
    assert p.shape == (3, 6)  # tall matrix: right side, r x n
    big = GaussianProjector(64, 2, "std")
    state = {"seed": 0}
    big.refresh(state, torch.zeros(4096, 128))
    # entries N(0, 1/r): E[P P^T] = I, so the rows have squared norm ~ n / r
    assert abs(big.basis(state, torch.zeros(1)).pow(2).mean().item() * 64 - 1.0) < 0.02


def test_reference_seed_chain_matches_apollo_torch():
    from apollo_torch.random_projector import next_seed

    for seed in (1, 2, 77):
        assert reference_next_seed(seed) == next_seed(seed)


def test_resume_redraws_the_same_projection():
    cfg = compose_cfg(["optimizer=apollo"]).optimizer
    OmegaConf.set_struct(cfg, False)
    cfg.rank, cfg.update_gap = 4, 2
    model = toy_llama(layers=2, seed=0)
    opt = optimizers.build(cfg, model)
    batch = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))

    def steps(m, o, n):
        for _ in range(n):
            m(batch, batch).backward()
            o.step()
            o.zero_grad(set_to_none=True)

    steps(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, buf)
    twin = copy.deepcopy(model)
    steps(model, opt, 3)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    twin.load_state_dict(saved["model"])
    opt2 = optimizers.build(cfg, twin)
    opt2.load_state_dict(saved["opt"])
    steps(twin, opt2, 3)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.rank=0", "rank=0 must be a positive"),
        ("optimizer.update_gap=0", "update_gap=0 must be a positive"),
        ("optimizer.scale_type=row", "scale_type='row'"),
        ("optimizer.proj_type=full", "one-sided"),
        ("optimizer.compat=code", "compat='code'"),
        ("optimizer.rank=100", "exceeds min"),
    ],
)
def test_bad_input_is_refused(override, message):
    cfg = compose_cfg(["optimizer=apollo", override]).optimizer
    with pytest.raises(ValueError, match=message):
        optimizers.build(cfg, toy_llama(layers=2, seed=0))


def test_mini_state_is_sgd_like():
    """APOLLO-Mini keeps 2 x (long side) moments per matrix and one limiter scalar."""
    cfg = compose_cfg(["optimizer=apollo_mini"]).optimizer
    model = toy_llama(layers=2, seed=0)
    opt = optimizers.build(cfg, model)
    projected, _ = optimizers.split_targets(model, ["attn", "mlp"])
    model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)).backward()
    opt.step()
    for _, p in projected:
        state = opt.state[p]
        assert state["exp_avg"].numel() == max(p.shape)
        assert state["update_norm"].numel() == 1
        assert "basis" not in state


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["optimizer.weight_decay=0.1"],
        ["optimizer.compat=reference", "optimizer.refresh=synchronous"],
        ["optimizer.limiter=false", "optimizer.proj_type=left"],
        ["optimizer.scale_front=false", "optimizer.projection_rng=philox"],
    ],
)
def test_apollo_mini_steps_its_matrices_together_bit_for_bit(overrides):
    """APOLLO-Mini's batched step (multi-tensor Adam on the 1 x n projections, stacked factors
    and limiter, one foreach addcmul_) gives the weights of stepping matrix by matrix, exactly,
    across refreshes; channel-wise APOLLO is not batched."""
    weights = []
    for batched in (True, False):
        model = toy_llama()
        cfg = compose_cfg(["optimizer=apollo_mini", *overrides]).optimizer
        cfg.update_gap = 3
        opt = optimizers.build(cfg, model)
        assert opt._batched
        opt._batched = batched
        batch = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
        for _ in range(7):
            model(batch, batch).backward()
            opt.step()
            opt.zero_grad()
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
    channel = compose_cfg(["optimizer=apollo"]).optimizer
    channel.rank = 4
    assert not optimizers.build(channel, toy_llama())._batched
