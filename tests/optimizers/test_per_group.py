"""torch.optim's semantics for hyperparameters: every value lives in the param group and is read
from it inside ``step()``, so a value set on one group (or changed after construction, as a
scheduler changes lr) is honoured for that group's parameters only."""

import pytest
import torch
from omegaconf import OmegaConf

from llmpt.optimizers import api as optimizers
from llmpt.optimizers.projectors import SvdProjector
from llmpt.optimizers.subspace import SubspaceOptimizer
from tests.optimizers.test_contract import METHODS, optimizer_cfg, toy_model, train_steps

WITH_BETAS = [m for m in METHODS if "betas" in optimizer_cfg(m) and m != "came"]  # CAME: 3


def other_betas(cfg) -> list[float]:
    b1, b2 = cfg.betas
    return [0.5 * b1, 1.0 - 2.0 * (1.0 - b2)]


def set_betas(group: dict, betas: tuple[float, float]) -> None:
    """Adam-mini's official class keeps beta1 and beta2 as two group keys."""
    if "betas" in group:
        group["betas"] = betas
    else:
        group["beta1"], group["beta2"] = betas


def synthetic_steps(model, opt, n: int) -> None:
    """Steps on fixed random gradients, the same in every run: each parameter's trajectory then
    depends on its own group's settings only (a loss would couple the groups)."""
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) if p.requires_grad else None
        opt.step()
        opt.zero_grad(set_to_none=True)


def param_group_index(opt) -> dict[int, int]:
    return {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}


@pytest.mark.parametrize("name", WITH_BETAS)
def test_betas_and_eps_are_read_from_each_group_at_step_time(name):
    """Group 0 given other betas and eps after construction trains exactly as a run built with
    those values everywhere, and every other group exactly as a run at the defaults."""
    cfg = optimizer_cfg(name)
    changed = OmegaConf.merge(cfg, {"betas": other_betas(cfg), "eps": 10 * cfg.eps})
    runs = {}
    for label, c in (("default", cfg), ("changed", changed), ("mixed", cfg)):
        model = toy_model()
        opt = optimizers.build(c, model)
        if label == "mixed":
            set_betas(opt.param_groups[0], tuple(changed.betas))
            opt.param_groups[0]["eps"] = changed.eps
        synthetic_steps(model, opt, 4)
        runs[label] = (model, param_group_index(opt))
    mixed, groups = runs["mixed"]
    names = dict(runs["default"][0].named_parameters())
    changed_params = dict(runs["changed"][0].named_parameters())
    in_group0 = 0
    for n, p in mixed.named_parameters():
        if id(p) not in groups:
            continue  # not trained (e.g. RSO's frozen W0)
        want = changed_params[n] if groups[id(p)] == 0 else names[n]
        assert torch.equal(p, want), n
        in_group0 += groups[id(p)] == 0
    assert in_group0 > 0
    if len(set(groups.values())) > 1:  # the other groups did not take group 0's values
        assert any(
            not torch.equal(p, changed_params[n])
            for n, p in mixed.named_parameters()
            if id(p) in groups and groups[id(p)] != 0
        )


def test_differing_betas_per_group_differ_from_a_shared_value():
    """Issue 15's case: betas (0, 0.999) and (0.5, 0.999) on the projected group give different
    weights (they were bit-identical when the rule captured the constructor's betas)."""
    finals = []
    for b1 in (0.0, 0.5):
        model = toy_model()
        projected, plain = optimizers.split_targets(model, ["attn", "mlp"])
        opt = SubspaceOptimizer(
            [
                {"params": projected, "projected": True, "betas": (b1, 0.999)},
                {"params": plain},
            ],
            lr=1e-2,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=0.0,
            projector=SvdProjector(8, 200),
            scale=0.25,
        )
        train_steps(model, opt, 3)
        finals.append(torch.cat([p.detach().flatten() for _, p in projected]))
    assert not torch.equal(*finals)


def test_a_projector_without_a_projected_group_is_refused():
    """Building with a projector while every group is plain would silently run full Adam."""
    model = toy_model()
    with pytest.raises(ValueError, match="no param group has projected=True"):
        SubspaceOptimizer(
            model.parameters(),
            lr=1e-2,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=0.0,
            projector=SvdProjector(8, 200),
            scale=0.25,
        )


@pytest.mark.parametrize("betas", [(1.0, 0.999), (0.9, -0.1)])
def test_a_groups_own_bad_betas_are_refused_at_construction(betas):
    model = toy_model()
    projected, plain = optimizers.split_targets(model, ["attn", "mlp"])
    with pytest.raises(ValueError, match="betas"):
        SubspaceOptimizer(
            [{"params": projected, "projected": True}, {"params": plain, "betas": betas}],
            lr=1e-2,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=0.0,
            projector=SvdProjector(8, 200),
            scale=0.25,
        )
