"""FRUGAL (Zmushko et al. ICML 2025) against a compact reference written from the paper's Alg. 1
and the spec (docs: galore-family.md, section 4(b, c)), step by step on a toy LLaMA.

Gradients are a fixed random stream written into ``p.grad`` (no backward), so both sides see
the same gradients exactly and any weight difference comes from the update rule alone. The
subspaces are made identical without sharing code: SVD bases are recomputed by the reference
(exact top singular vectors), random columns and rows are re-derived from the documented seeding
(``Generator().manual_seed(matrix_seed * 1_000_003 + draw)``), random orthogonal bases and
randomly drawn blocks are read from the optimizer, and ordered blocks follow FRUGAL's own
``next_block_start`` progressions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from omegaconf import OmegaConf

from llm_pretrain import optim as optimizers
from llmpt.optimizers.projectors.svd import LEFT, RIGHT
from tests.conftest import compose_cfg, toy_llama

TOL = 1e-6
STEPS = 6  # update_gap 2: subspaces (or blocks) drawn at steps 0, 2 and 4


def toy(seed: int = 0):
    """2 decoder layers: 14 targeted matrices, square (32x32), tall (48x32) and wide (32x48)."""
    return toy_llama(layers=2, seed=seed)


def frugal_cfg(**overrides):
    cfg = compose_cfg(["optimizer=frugal"]).optimizer
    OmegaConf.set_struct(cfg, False)
    cfg.lr, cfg.update_gap = 1e-2, 2
    cfg.refresh = "synchronous"  # the reference's schedule: every matrix at the same step
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def gradient_stream(model, steps: int, seed: int = 7) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
        for _ in range(steps)
    ]


# ---------------------------------------------------------------------------------- reference
class Subspace:
    """A state-full subspace: ``down(G)`` (the projection) and ``up(R)`` (its inverse)."""

    def __init__(self, down: Callable, up: Callable) -> None:
        self.down, self.up = down, up


def basis_subspace(basis: torch.Tensor, right: bool) -> Subspace:
    """Right: B is r x n, R = G B^T; left: B is m x r, R = B^T G (FRUGAL's GaLoreProjector)."""
    if right:
        return Subspace(lambda g: g @ basis.T, lambda r: r @ basis)
    return Subspace(lambda g: basis.T @ g, lambda r: basis @ r)


def coordinate_subspace(idx: torch.Tensor, shape, columns: bool) -> Subspace:
    def up(r):
        out = torch.zeros(shape)
        if columns:
            out[:, idx] = r
        else:
            out[idx] = r
        return out

    return Subspace((lambda g: g[:, idx]) if columns else (lambda g: g[idx]), up)


def svd_subspace(grad: torch.Tensor, density: float) -> Subspace:
    """Exact top singular vectors; the side by FRUGAL's ``std`` rule, r = round(density x dim)."""
    m, n = grad.shape
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    if m >= n:
        return basis_subspace(vh[: round(density * n)], right=True)
    return basis_subspace(u[:, : round(density * m)], right=False)


class ReferenceFrugal:
    """FRUGAL(AdamW, signSGD) on plain tensors (Alg. 1; spec 4(b), 4(c)).

    ``subspace(name, grad, draw)`` gives the state-full subspace of a projectable matrix at its
    ``draw``-th refresh; ``blocks(period)`` the active projectable matrices in block mode.
    """

    def __init__(self, weights, projectable, cfg, subspace=None, blocks=None) -> None:
        self.w = {n: t.detach().clone() for n, t in weights}
        self.projectable, self.cfg = list(projectable), cfg
        self.subspace, self.blocks = subspace, blocks
        self.state: dict[str, dict] = {}
        self.t = 0
        self.active: list[str] = []

    def adam(self, name: str, g: torch.Tensor, lr: float) -> torch.Tensor:
        """torch.optim.AdamW's step: eps after sqrt(v) / sqrt(1 - b2^t), lr / (1 - b1^t)."""
        b1, b2 = self.cfg.betas
        st = self.state.setdefault(name, {})
        if "m" not in st:
            st.update(m=torch.zeros_like(g), v=torch.zeros_like(g), step=0)
        st["step"] += 1
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        denom = st["v"].sqrt() / math.sqrt(1 - b2 ** st["step"]) + self.cfg.eps
        return lr / (1 - b1 ** st["step"]) * st["m"] / denom

    def state_free(self, g: torch.Tensor, lr: float) -> torch.Tensor:
        rule = self.cfg.inactive_rule
        if rule == "sign":
            return lr * g.sign()
        if rule == "sgd":
            return lr * g
        return torch.zeros_like(g)

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        c = self.cfg
        lr_proj = c.lr * c.proj_lr_scale
        lr_free = lr_proj * c.inactive_lr_scale
        refresh, draw = self.t % c.update_gap == 0, self.t // c.update_gap
        if c.projection == "block" and refresh:  # every block deactivated, states cleared
            for name in self.projectable:
                self.state.pop(name, None)
            self.active = self.blocks(draw)
        for name, w in self.w.items():
            g = grads[name]
            w.mul_(1 - c.lr * c.weight_decay)  # decoupled weight decay first, every tensor
            if name not in self.projectable:  # regular parameter: full AdamW
                w.sub_(self.adam(name, g, c.lr))
            elif c.projection == "block":
                w.sub_(
                    self.adam(name, g, lr_proj)
                    if name in self.active
                    else self.state_free(g, lr_free)
                )
            else:
                st = self.state.setdefault(name, {})
                if refresh:
                    st["sub"] = self.subspace(name, g, draw)
                    if c.reset_statistics:  # M, V and the step counter restart
                        for key in ("m", "v", "step"):
                            st.pop(key, None)
                sub = st["sub"]
                low = sub.down(g)
                w.sub_(sub.up(self.adam(name, low, lr_proj)))
                w.sub_(self.state_free(g - sub.up(low), lr_free))
        self.t += 1


def frugal_block_progression(order: str, n: int, k: int, periods: int) -> list[list[int]]:
    """FRUGAL's BlockOptimizer._update_states for ordered blocks: a ``next_block_start`` cursor
    that moves by k (ascending, descending) or k / 2 pairs (mirror) each period."""
    out = []
    start = n - 1 if order == "descending" else 0
    for _ in range(periods):
        if order == "ascending":
            chosen = [i % n for i in range(start, start + k)]
            start = start + k - n if start + k >= n else start + k
        elif order == "descending":
            chosen = [i % n for i in range(start, start - k, -1)]
            start = start - k + n if start - k < 0 else start - k
        else:
            half = n // 2
            chosen = []
            for i in range(start, start + k // 2):
                chosen += [i % half, n - 1 - i % half]
            start = start + k // 2 - half if start + k // 2 >= half else start + k // 2
        out.append(sorted(chosen))
    return out


# ---------------------------------------------------------------------------------- driver
def run_against_reference(cfg, steps: int = STEPS, subspace=None, blocks=None, check=None):
    """Step our optimizer and the reference on the same gradient stream; return the largest
    weight difference, our optimizer and, per step, the projectable matrices it held active.
    ``blocks="ours"``: the reference takes the active set our optimizer uses in that period;
    ``subspace="ours"``: the basis our optimizer holds."""
    model = toy()
    opt = optimizers.build(cfg, model)
    projectable = [n for n, _ in optimizers.split_targets(model, list(cfg.target_modules))[0]]
    params = dict(model.named_parameters())
    ours_active: list[list[str]] = []

    def ours_blocks(period):
        return ours_active[period * cfg.update_gap]

    def ours_subspace(name, grad, draw):
        return subspace_from_state(opt.state[params[name]])

    ref = ReferenceFrugal(
        model.named_parameters(),
        projectable,
        cfg,
        ours_subspace if subspace == "ours" else subspace,
        ours_blocks if blocks == "ours" else blocks,
    )
    worst = 0.0
    for t, grads in enumerate(gradient_stream(model, steps)):
        if cfg.projection == "block":
            ours_active.append([projectable[u] for u in opt.active_units()])
        for name, p in params.items():  # a training loop: frozen tensors get no gradient
            p.grad = grads[name].clone() if p.requires_grad else None
        opt.step()
        ref.step(grads)
        if check is not None:
            check(t, opt, ref)
        opt.zero_grad(set_to_none=True)
        worst = max(worst, max((params[n] - w).abs().max().item() for n, w in ref.w.items()))
    return worst, opt, ours_active


def subspace_from_state(state: dict) -> Subspace:
    """Our optimizer's current basis (FRUGAL's random orthogonal projection draws from the global
    RNG, so only the basis itself can be matched)."""
    return basis_subspace(state["basis"], right=state["side"] == RIGHT)


def matrix_seeds(cfg) -> dict[str, int]:
    """The documented per-matrix seed: seed * 1_000_003 + the matrix's index in the optimizer."""
    model = toy()
    names = [n for n, _ in optimizers.split_targets(model, list(cfg.target_modules))[0]]
    return {n: cfg.seed * 1_000_003 + i for i, n in enumerate(names)}


def coordinates_rederived(cfg) -> Callable:
    """floor(density x dim) random columns (rows), re-drawn from the documented seeding, in
    ascending order (FRUGAL keeps randperm's order; with reset_statistics=false the kept moments
    then sit on other columns, an equally arbitrary pairing of stale moments)."""
    seeds = matrix_seeds(cfg)
    columns = cfg.projection == "columns"

    def subspace(name, grad, draw):
        g = torch.Generator().manual_seed(seeds[name] * 1_000_003 + draw)
        dim = grad.shape[1] if columns else grad.shape[0]
        idx = torch.randperm(dim, generator=g)[: math.floor(cfg.density * dim)]
        idx = idx.sort().values  # documented as sorted: kept moments follow the column order
        return coordinate_subspace(idx, grad.shape, columns)

    return subspace


def exact_svd(cfg) -> Callable:
    return lambda name, grad, draw: svd_subspace(grad, cfg.density)


def ordered_blocks(cfg) -> Callable:
    names = [n for n, _ in optimizers.split_targets(toy(), list(cfg.target_modules))[0]]
    k = round(len(names) * cfg.density)
    progression = frugal_block_progression(cfg.block_order, len(names), k, STEPS)
    return lambda period: [names[i] for i in progression[period]]


# ---------------------------------------------------------------------------------- parity
PROJECTED_CASES = {
    "svd-sign": dict(projection="svd"),
    "svd-sgd-scales": dict(
        projection="svd", inactive_rule="sgd", proj_lr_scale=0.5, inactive_lr_scale=0.3
    ),
    "svd-none-keep-stats": dict(projection="svd", inactive_rule="none", reset_statistics=False),
    "svd-sign-decay": dict(projection="svd", weight_decay=0.1),
    "columns-sign": dict(projection="columns", seed=3),
    "columns-sgd-keep-stats": dict(
        projection="columns", inactive_rule="sgd", reset_statistics=False
    ),
    "rows-sign-decay-scaled": dict(projection="rows", weight_decay=0.1, inactive_lr_scale=0.5),
    "rows-none": dict(projection="rows", inactive_rule="none", density=0.4),
}


@pytest.mark.parametrize("case", PROJECTED_CASES)
def test_projected_modes_match_the_reference(case):
    cfg = frugal_cfg(**PROJECTED_CASES[case])
    subspace = exact_svd(cfg) if cfg.projection == "svd" else coordinates_rederived(cfg)
    worst, _, _ = run_against_reference(cfg, subspace=subspace)
    assert worst <= TOL, f"{case}: max |W_ours - W_ref| = {worst:.3g}"


def test_svd_projects_the_short_side_of_tall_and_wide_matrices():
    def check(t, opt, ref):
        for p, state in opt.state.items():
            if "basis" not in state:
                continue
            m, n = p.shape
            if m >= n:  # tall and square: right, r = round(0.25 n)
                assert state["side"] == RIGHT and state["basis"].shape == (8, n)
            else:  # wide (down_proj 32 x 48): left, r = round(0.25 m)
                assert state["side"] == LEFT and state["basis"].shape == (m, 8)

    cfg = frugal_cfg(projection="svd")
    worst, opt, _ = run_against_reference(cfg, subspace=exact_svd(cfg), check=check)
    shapes = {tuple(p.shape) for p, s in opt.state.items() if "basis" in s}
    assert shapes == {(32, 32), (48, 32), (32, 48)}
    assert worst <= TOL


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_random_orthogonal_projection_matches_the_reference(weight_decay):
    cfg = frugal_cfg(projection="random", weight_decay=weight_decay)
    bases = []

    def check(t, opt, ref):
        state = next(s for s in opt.state.values() if "basis" in s)
        basis = state["basis"]  # 8 x 32 rows orthonormal
        assert torch.allclose(basis @ basis.T, torch.eye(8), atol=1e-5)
        bases.append(basis.clone())

    worst, _, _ = run_against_reference(cfg, subspace="ours", check=check)
    assert worst <= TOL
    assert not torch.allclose(bases[0], bases[2])  # a fresh basis at each refresh
    assert torch.equal(bases[0], bases[1])  # and the same one within the period


BLOCK_CASES = {
    "descending-sign": dict(),
    "descending-sgd-scales": dict(inactive_rule="sgd", proj_lr_scale=0.5, inactive_lr_scale=0.5),
    "descending-none": dict(inactive_rule="none"),
    "descending-decay": dict(weight_decay=0.1),
    "descending-keep-stats-ignored": dict(reset_statistics=False),
    "ascending-sign": dict(block_order="ascending", density=0.3),
    "mirror-sign": dict(block_order="mirror"),
}


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_block_mode_matches_the_reference(case):
    cfg = frugal_cfg(projection="block", **BLOCK_CASES[case])
    expected = ordered_blocks(cfg)
    worst, _, ours = run_against_reference(cfg, blocks=expected)
    assert worst <= TOL, f"{case}: max |W_ours - W_ref| = {worst:.3g}"
    for t, active in enumerate(ours):  # FRUGAL's progression, period by period
        assert sorted(active) == sorted(expected(t // cfg.update_gap)), t


def test_descending_blocks_walk_down_from_the_last_matrix():
    cfg = frugal_cfg(projection="block", density=0.25)  # round(14 x 0.25) = 4 of 14
    model = toy()
    opt = optimizers.build(cfg, model)
    n, k = 14, 4
    for period in range(9):  # wraps around the 14 matrices twice
        start = (n - 1 - period * k) % n
        assert opt.active_units() == sorted((start - j) % n for j in range(k)), period
        for _ in range(cfg.update_gap):
            for p in model.parameters():
                p.grad = torch.ones_like(p) if p.requires_grad else None
            opt.step()


def test_random_block_order_matches_the_reference():
    cfg = frugal_cfg(projection="block", block_order="random", weight_decay=0.1)
    worst, _, ours = run_against_reference(cfg, blocks="ours")
    assert worst <= TOL
    assert len({tuple(a) for a in ours}) > 1  # the blocks were redrawn


@pytest.mark.parametrize("projection", ["svd", "columns", "block"])
def test_weight_decay_is_not_scaled_by_proj_lr_scale(projection):
    """FRUGAL decays every tensor by lr x weight_decay (ProjOptimizer.step uses the group's base
    lr); proj_lr_scale multiplies only the Adam and state-free steps."""
    cfg = frugal_cfg(projection=projection, weight_decay=0.1, proj_lr_scale=0.5)
    subspace = exact_svd(cfg) if projection == "svd" else coordinates_rederived(cfg)
    worst, _, _ = run_against_reference(cfg, subspace=subspace, blocks=ordered_blocks(cfg))
    assert worst <= TOL, (
        f"projection={projection}: projectable matrices are not decayed by W <- W (1 - lr wd): "
        f"max difference {worst:.3g} (decayed with lr x proj_lr_scale?)"
    )


def test_block_mode_without_state_free_rule_still_decays_inactive_matrices():
    """Spec 4(b) step 1 and FRUGAL's code: decoupled weight decay applies to every parameter,
    also to inactive blocks under inactive_rule=none (their update is zero, not skipped)."""
    cfg = frugal_cfg(projection="block", inactive_rule="none", weight_decay=0.1)
    worst, _, _ = run_against_reference(cfg, blocks=ordered_blocks(cfg))
    assert worst <= TOL, f"inactive blocks were not decayed: max difference {worst:.3g}"


# ---------------------------------------------------------------------------------- memory
def test_block_mode_keeps_adam_state_only_for_active_matrices():
    cfg = frugal_cfg(projection="block")
    model = toy()
    opt = optimizers.build(cfg, model)
    projectable = [p for _, p in optimizers.split_targets(model, list(cfg.target_modules))[0]]
    regular = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in projectable)
    held = []
    for grads in gradient_stream(model, 8):
        during = opt.active_units()
        for name, p in model.named_parameters():
            p.grad = grads[name].clone()
        opt.step()
        moments = optimizers.state_nbytes(opt)["moments"]
        if opt.active_units() != during:  # a switch: every block freed, new ones not yet stepped
            assert all(not opt.state.get(p) for p in projectable)
            assert moments == 8 * regular
            continue
        for u, p in enumerate(projectable):  # full fp32 M and V for active matrices only
            state = opt.state.get(p, {})
            if u in during:
                assert state["exp_avg"].shape == state["exp_avg_sq"].shape == p.shape
            else:
                assert not state, f"inactive matrix {u} holds state"
        active_numel = sum(projectable[u].numel() for u in during)
        assert moments == 8 * (regular + active_numel)
        held.append(active_numel)
    # 4 of 14 active: 3 mlp matrices + o_proj (5632), then 3 attn + down_proj (4608), ...
    assert held[0] == 3 * 48 * 32 + 32 * 32 and held[1] == 3 * 32 * 32 + 32 * 48
    assert len(set(held)) > 1


def test_block_switch_frees_the_old_blocks_and_starts_the_new_ones_fresh():
    cfg = frugal_cfg(projection="block")
    model = toy()
    opt = optimizers.build(cfg, model)
    projectable = [p for _, p in optimizers.split_targets(model, list(cfg.target_modules))[0]]
    stream = gradient_stream(model, 3)
    for t, grads in enumerate(stream):
        before = opt.active_units()
        for name, p in model.named_parameters():
            p.grad = grads[name].clone()
        opt.step()
        if t == 1:  # the switch ends the second step: old blocks freed, new ones not yet seen
            assert opt.active_units() != before
            assert all(not opt.state.get(p) for p in projectable)
        if t == 2:  # the new blocks took one Adam step from zero moments
            for u in opt.active_units():
                p = projectable[u]
                assert opt.state[p]["step"] == 1
                g = stream[2][next(n for n, q in model.named_parameters() if q is p)]
                assert torch.allclose(opt.state[p]["exp_avg"], (1 - cfg.betas[0]) * g)


def test_density_zero_blocks_put_every_matrix_on_sign_sgd():
    cfg = frugal_cfg(projection="block", density=0.0)
    model = toy()
    opt = optimizers.build(cfg, model)
    projectable = dict(optimizers.split_targets(model, list(cfg.target_modules))[0])
    assert opt.active_units() == []
    for grads in gradient_stream(model, 3):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for name, p in model.named_parameters():
            p.grad = grads[name].clone()
        opt.step()
        for name, p in projectable.items():
            assert torch.allclose(p - before[name], -cfg.lr * grads[name].sign(), atol=1e-7)
            assert not opt.state.get(p)
    assert all(
        "exp_avg" in opt.state[p] for n, p in model.named_parameters() if n not in projectable
    )
    worst, _, _ = run_against_reference(cfg, blocks=lambda period: [])
    assert worst <= TOL


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "overrides, match",
    [
        pytest.param(dict(projection="dense"), r"optimizer\.projection='dense'", id="projection"),
        pytest.param(
            dict(inactive_rule="adam"), r"optimizer\.inactive_rule='adam'", id="inactive_rule"
        ),
        pytest.param(dict(density=1.5), r"optimizer\.density=1\.5", id="block-density-high"),
        pytest.param(dict(density=-0.1), r"optimizer\.density=-0\.1", id="block-density-low"),
        pytest.param(
            dict(projection="svd", density=0.0), r"optimizer\.density=0\.0", id="svd-density"
        ),
        pytest.param(
            dict(projection="columns", density=1.0),
            r"optimizer\.density=1\.0",
            id="columns-density",
        ),
        pytest.param(
            dict(block_order="zigzag"), r"optimizer\.block_order='zigzag'", id="block_order"
        ),
        pytest.param(
            dict(proj_lr_scale=-1.0), r"optimizer\.proj_lr_scale=-1\.0", id="proj_lr_scale"
        ),
        pytest.param(
            dict(inactive_lr_scale=-1.0),
            r"optimizer\.inactive_lr_scale=-1\.0",
            id="inactive_lr_scale",
        ),
        # mirror takes pairs: round(14 x 3/14) = 3 active matrices cannot pair up
        pytest.param(
            dict(block_order="mirror", density=3 / 14),
            r"optimizer\.block_order=mirror",
            id="block_order-mirror-odd",
        ),
        pytest.param(dict(update_gap=0), r"optimizer\.update_gap=0", id="block-update_gap"),
        pytest.param(
            dict(projection="svd", update_gap=0), r"optimizer\.update_gap=0", id="svd-update_gap"
        ),
    ],
)
def test_bad_settings_are_refused_naming_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        optimizers.build(frugal_cfg(**overrides), toy())


def test_svd_density_beyond_the_short_side_is_refused():
    """reverse_std keeps the long side: 0.75 x 48 = 36 singular vectors of a 32 x 48 matrix."""
    cfg = frugal_cfg(projection="svd", proj_type="reverse_std", density=0.75)
    with pytest.raises(ValueError, match="optimizer.density=0.75 with optimizer.proj_type"):
        optimizers.build(cfg, toy())
    optimizers.build(frugal_cfg(projection="random", proj_type="reverse_std", density=0.75), toy())
