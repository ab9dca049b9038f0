"""torch.optim's semantics for hyperparameters: every value lives in the param group and is read
from it inside ``step()``, so a value set on one group (or changed after construction, as a
scheduler changes lr) is honoured for that group's parameters only."""

import pytest
import torch
from omegaconf import OmegaConf

from llm_pretrain import optim as optimizers
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


def trained(cfg, prepare=None):
    """A toy model after 4 synthetic steps of the optimizer ``cfg`` builds (``prepare`` may
    change its groups first), and which group each trained parameter is in."""
    model = toy_model()
    opt = optimizers.build(cfg, model)
    if prepare is not None:
        prepare(opt)
    synthetic_steps(model, opt, 4)
    return model, param_group_index(opt)


def param_group_index(opt) -> dict[int, int]:
    return {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}


def compare_runs(runs: dict, groups_of_mixed: dict, changed_groups: set[int]) -> None:
    """The ``mixed`` run's parameters in ``changed_groups`` equal the ``changed`` run's, the
    others the ``default`` run's, bit for bit; and the two reference runs really differ."""
    mixed = runs["mixed"]
    default, changed = (
        dict(runs["default"].named_parameters()),
        dict(runs["changed"].named_parameters()),
    )
    seen = set()
    for n, p in mixed.named_parameters():
        if id(p) not in groups_of_mixed:
            continue  # not trained (e.g. RSO's frozen W0)
        in_changed = groups_of_mixed[id(p)] in changed_groups
        assert torch.equal(p, (changed if in_changed else default)[n]), n
        seen.add(in_changed)
    assert True in seen
    assert any(not torch.equal(default[n], changed[n]) for n in default)


@pytest.mark.parametrize("name", METHODS)
def test_lr_betas_and_eps_are_read_from_each_group_at_step_time(name):
    """Group 0 given another lr (and betas and eps, where the method has them) after
    construction trains exactly as a run built with those values everywhere, and every other
    group exactly as a run at the defaults."""
    cfg = optimizer_cfg(name)
    other = {"lr": 0.5 * cfg.lr}
    if name in WITH_BETAS:
        other |= {"betas": other_betas(cfg), "eps": 10 * cfg.eps}
    changed = OmegaConf.merge(cfg, other)

    def change_group_0(opt) -> None:
        group = opt.param_groups[0]
        group["lr"] = changed.lr
        if "betas" in other:
            set_betas(group, tuple(changed.betas))
            group["eps"] = changed.eps

    mixed, groups = trained(cfg, change_group_0)
    runs = {"default": trained(cfg)[0], "changed": trained(changed)[0], "mixed": mixed}
    compare_runs(runs, groups, {0})


def split_projected(opts: dict):
    """``param_groups`` with the projected matrices in two groups, the first with ``opts``."""
    from llmpt.optimizers.groups import param_groups

    def make(model, targets):
        projected, *rest = param_groups(model, targets)
        half = len(projected["params"]) // 2
        first = {**projected, "params": projected["params"][:half], **opts}
        second = {**projected, "params": projected["params"][half:]}
        return [first, second, *rest]

    return make


PROJECTING = [
    m for m in METHODS if optimizers.METHODS[m].params == "projected" and "rank" in optimizer_cfg(m)
]
FIXED_RANK = {"flora", "ldadam"}  # one rank for every matrix: a group's own rank is refused


@pytest.mark.parametrize("name", PROJECTING)
def test_a_groups_own_rank_is_honoured_or_refused(name, monkeypatch):
    """Layers can take different ranks: half the projected matrices at rank 4 train exactly as
    in a run at rank 4 everywhere, the other half as at the default rank 8. A method with one
    rank for all refuses the group's value by name."""
    cfg = optimizer_cfg(name)  # rank 8
    runs = {"default": trained(cfg)[0], "changed": trained(OmegaConf.merge(cfg, {"rank": 4}))[0]}
    monkeypatch.setattr(optimizers, "param_groups", split_projected({"rank": 4}))
    if name in FIXED_RANK:
        with pytest.raises(ValueError, match="sets optimizer.rank=4, but .* takes rank for all"):
            optimizers.build(cfg, toy_model())
        return
    runs["mixed"], groups = trained(cfg)
    compare_runs(runs, groups, {0})


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


def test_a_projection_setting_changed_after_construction_is_refused():
    """rank is read when the optimizer is built; a later change would otherwise be ignored."""
    model = toy_model()
    opt = optimizers.build(optimizer_cfg("galore"), model)
    opt.param_groups[0]["rank"] = 4
    with pytest.raises(ValueError, match="param group 0 has rank=4, but its projector was built"):
        train_steps(model, opt, 1)
    assert all(not s for s in opt.state.values())  # refused before any update
