"""COAP and Online Subspace Descent: each paper's defining property of its projector, checked
against independent dense computations (exact SVDs, autograd, hand-written AdamW steps)."""

import copy
import math
import re

import pytest
import torch

from llm_pretrain import optim as optimizers
from llmpt.optimizers.projectors import coap as coap_module
from llmpt.optimizers.projectors.coap import CoapProjector, range_finder
from llmpt.optimizers.projectors.online_pca import OnlinePcaProjector
from llmpt.optimizers.projectors.svd import LEFT, RIGHT
from llmpt.optimizers.rules import AdamRule, BlockwiseAdam8bitRule
from llmpt.optimizers.subspace import RefreshContext, SubspaceOptimizer
from tests.conftest import compose_cfg, toy_llama

TALL, WIDE = (20, 12), (12, 20)  # std: a tall matrix keeps columns (RIGHT), a wide one rows
BATCH = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def orthonormal(n, r, seed=0, dtype=torch.float32):
    """n x r with orthonormal columns, from a Gaussian draw."""
    return torch.linalg.qr(randn(n, r, seed=seed, dtype=torch.float64))[0].to(dtype)


def spectral(shape, singular, seed=0, dtype=torch.float32):
    """G = U diag(s) V^T with the given singular values; returns G, U, V (float64 factors)."""
    m, n = shape
    k = len(singular)
    u = orthonormal(m, k, seed=seed, dtype=torch.float64)
    v = orthonormal(n, k, seed=seed + 1, dtype=torch.float64)
    s = torch.tensor(singular, dtype=torch.float64)
    return ((u * s) @ v.T).to(dtype), u, v


def subspace_tan(basis_cols: torch.Tensor, target_cols: torch.Tensor) -> float:
    """tan of the largest principal angle between two column spaces with orthonormal bases."""
    q = torch.linalg.qr(basis_cols.double())[0]
    cos = torch.linalg.svdvals(target_cols.double().T @ q).min().clamp(max=1.0)
    return float(torch.sqrt(1 - cos**2) / cos)


def adam_group(params, projector, lr=0.01, scale=1.0, **kw):
    return SubspaceOptimizer(
        [{"params": params, "projected": True}],
        lr=lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        projector=projector,
        scale=scale,
        **kw,
    )


def train(model, opt, n):
    losses = []
    for _ in range(n):
        loss = model(BATCH, BATCH)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


# ====================================================================== COAP: range finder
def test_range_finder_from_a_gaussian_finds_the_top_right_singular_subspace():
    r = 4
    s = [10.0, 8.0, 6.0, 4.0] + [1e-4 * 0.5**i for i in range(8)]
    g, _, v = spectral((40, 24), s, seed=3)
    p = range_finder(g, r, None)
    assert p.shape == (r, 24) and p.dtype == torch.float32
    torch.testing.assert_close(p @ p.T, torch.eye(r), rtol=0, atol=1e-5)  # orthonormal rows
    vr_t = v[:, :r].T.float()  # r x n
    residual = vr_t - (vr_t @ p.T) @ p
    assert residual.norm() < 1e-4, residual.norm()
    # the Gaussian test matrix is seeded (3407): the same basis every time
    assert torch.equal(p, range_finder(g, r, None))
    # without the gap, one pass of the range finder is visibly off the top subspace
    flat, _, v_flat = spectral((40, 24), [10.0, 8.0, 6.0, 4.0, 3.9, 3.8, 3.7, 3.6], seed=3)
    p_flat = range_finder(flat, r, None)
    assert subspace_tan(p_flat.T, v_flat[:, :r]) > 0.05


def _power_iteration_check(tans, ratio):
    """Block power iteration on G^T G (or G G^T): tan of the largest principal angle contracts
    by at least (s_{r+1} / s_r)^2 per pass, down to float32 round-off."""
    assert tans[0] > 1.0  # a random start is far from the top subspace
    for before, after in zip(tans, tans[1:], strict=False):
        if before > 1e-4:
            assert after <= ratio * before * 1.01 + 1e-6, (before, after, ratio)
    assert tans[-1] < 1e-4, tans


def test_range_finder_warm_started_from_the_old_basis_is_block_power_iteration():
    """Tall matrix, RIGHT side: P <- range_finder(G, r, Omega = P^T) repeatedly."""
    r = 3
    s = [6.0, 5.0, 4.0, 2.0, 1.5, 1.0, 0.5, 0.2]
    g, _, v = spectral((50, 30), s, seed=5)
    p = orthonormal(30, r, seed=11).T.contiguous()  # a random r x n start, not the SVD
    tans = [subspace_tan(p.T, v[:, :r])]
    for _ in range(14):
        p = range_finder(g, r, p.T)
        torch.testing.assert_close(p @ p.T, torch.eye(r), rtol=0, atol=1e-5)
        tans.append(subspace_tan(p.T, v[:, :r]))
    _power_iteration_check(tans, (s[r] / s[r - 1]) ** 2)


def test_projector_warm_start_on_a_wide_matrix_converges_to_the_top_left_subspace():
    """Wide matrix, LEFT side, through CoapProjector.refresh at recalibration steps: P (m x r)
    warm-starts the range finder on G^T and converges to the top-r left singular vectors."""
    r = 3
    s = [6.0, 5.0, 4.0, 2.0, 1.5, 1.0, 0.5, 0.2]
    g, u, _ = spectral((30, 50), s, seed=7)
    proj = CoapProjector(r, update_gap=2, reproject_factor=3)
    ctx = RefreshContext(0, AdamRule(), 0.01, 0.01)
    state = {}
    proj.refresh(state, g)  # the first refresh: the seeded Gaussian
    assert state["side"] == LEFT and state["basis"].shape == (30, r)
    state["basis"] = orthonormal(30, r, seed=13)  # now restart from a random basis
    tans = [subspace_tan(state["basis"], u[:, :r])]
    for _ in range(14):
        state["step"] = 6  # a recalibration step (a multiple of update_gap x reproject_factor)
        proj.refresh(state, g, ctx)
        b = state["basis"]
        assert b.shape == (30, r)
        torch.testing.assert_close(b.T @ b, torch.eye(r), rtol=0, atol=1e-5)
        tans.append(subspace_tan(b, u[:, :r]))
    _power_iteration_check(tans, (s[r] / s[r - 1]) ** 2)


# ====================================================================== COAP: schedule
def test_schedule_range_finder_every_k_gaps_correlation_step_in_between(monkeypatch):
    calls = []
    now = [0]
    real_rf, real_cs = coap_module.range_finder, CoapProjector.correlation_step

    def counting_rf(matrix, rank, omega):
        calls.append(("range", now[0], omega is None))
        return real_rf(matrix, rank, omega)

    def counting_cs(self, basis, moment, grad, side):
        calls.append(("corr", now[0], None))
        return real_cs(self, basis, moment, grad, side)

    monkeypatch.setattr(coap_module, "range_finder", counting_rf)
    monkeypatch.setattr(CoapProjector, "correlation_step", counting_cs)
    ws = [torch.nn.Parameter(randn(*shape, seed=i)) for i, shape in enumerate([TALL, WIDE])]
    opt = adam_group(ws, CoapProjector(3, update_gap=2, reproject_factor=3))
    for t in range(14):
        now[0] = t
        before = [opt.state[w]["basis"].clone() if opt.state[w] else None for w in ws]
        for i, w in enumerate(ws):
            w.grad = randn(*w.shape, seed=100 * t + i)
        opt.step()
        for w, b in zip(ws, before, strict=True):
            changed = b is None or not torch.equal(b, opt.state[w]["basis"])
            assert changed == (t % 2 == 0), t  # the basis moves at even steps only
    ranges = [(t, cold) for kind, t, cold in calls if kind == "range"]
    corrs = [t for kind, t, _ in calls if kind == "corr"]
    assert ranges == [(0, True), (0, True), (6, False), (6, False), (12, False), (12, False)]
    assert corrs == [2, 2, 4, 4, 8, 8, 10, 10]


# ====================================================================== COAP: correlation step
def coap_loss(p, moment, g, side):
    """MSE(G P^T P, G) x (1 - mean_i cos(row_i(M P), row_i(G))) (right; left: P P^T G, P M),
    written out without torch.nn.functional."""
    if side == RIGHT:
        recon, lifted = g @ p.T @ p, moment @ p
    else:
        recon, lifted = p @ (p.T @ g), p @ moment
    mse = ((recon - g) ** 2).sum() / g.numel()
    cos = (lifted * g).sum(dim=1) / (lifted.norm(dim=1) * g.norm(dim=1))
    return mse * (1 - cos.mean())


def coap_case(side, scale, seed=0, dtype=torch.float64):
    """A gradient near a rank-4 subspace, a random orthonormal basis and a moment in the
    projected space that is partly correlated with the gradient."""
    m, n = (24, 16) if side == RIGHT else (16, 24)
    r = 4
    g = (randn(m, r, seed=seed, dtype=dtype) @ randn(r, n, seed=seed + 1, dtype=dtype)) * scale
    g = g + 0.1 * scale * randn(m, n, seed=seed + 2, dtype=dtype)
    if side == RIGHT:
        p = orthonormal(n, r, seed=seed + 3, dtype=dtype).T.contiguous()  # r x n
        moment = g @ p.T + scale * randn(m, r, seed=seed + 4, dtype=dtype)  # m x r
    else:
        p = orthonormal(m, r, seed=seed + 3, dtype=dtype)  # m x r
        moment = p.T @ g + scale * randn(r, n, seed=seed + 4, dtype=dtype)  # r x n
    return p, moment, g


@pytest.mark.parametrize("scale", [0.05, 30.0], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("side", [RIGHT, LEFT], ids=["right", "left"])
def test_correlation_step_is_one_clipped_sgd_step_on_the_loss(side, scale):
    p, moment, g = coap_case(side, scale)
    proj = CoapProjector(4, update_gap=2, reproject_factor=3)
    leaf = p.clone().requires_grad_(True)
    coap_loss(leaf, moment, g, side).backward()
    grad = leaf.grad
    norm = float(grad.norm())
    assert (norm > 1.0) == (scale > 1.0)  # both branches of the clip are exercised
    expected = p - 0.1 * grad * min(1.0, 1.0 / (norm + 1e-6))
    kept = p.clone()
    new = proj.correlation_step(p, moment, g, side)
    assert torch.equal(p, kept)  # the old basis is left as it was
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-12)
    # the new basis stays within sgd_lr of the old one (the gradient is clipped to norm 1)
    moved = float((new - p).norm())
    assert moved <= 0.1 + 1e-12
    assert moved == pytest.approx(0.1 * min(norm, norm / (norm + 1e-6)), rel=1e-9)
    assert not torch.equal(new, p)


@pytest.mark.parametrize("side", [RIGHT, LEFT], ids=["right", "left"])
def test_correlation_step_decreases_the_correlation_aware_loss(side):
    p, moment, g = coap_case(side, 1.0, seed=4)
    lr = 0.01
    proj = CoapProjector(4, update_gap=2, reproject_factor=3, sgd_lr=lr)
    leaf = p.clone().requires_grad_(True)
    before = coap_loss(leaf, moment, g, side)
    before.backward()
    norm = float(leaf.grad.norm())
    first_order = lr * min(1.0, 1.0 / (norm + 1e-6)) * norm**2  # the predicted decrease
    new = proj.correlation_step(p, moment, g, side)
    before = before.detach()
    after = float(coap_loss(new, moment, g, side))
    assert after < float(before)
    assert float(before) - after > 0.5 * first_order, (float(before), after, first_order)
    # and repeated steps keep decreasing it
    losses = [float(before), after]
    for _ in range(10):
        new = proj.correlation_step(new, moment, g, side)
        losses.append(float(coap_loss(new, moment, g, side)))
    assert all(b > a for a, b in zip(losses[1:], losses, strict=False))


def test_correlation_step_reads_the_current_first_moment_through_the_optimizer(monkeypatch):
    """Inside SubspaceOptimizer the correlation step receives the rule's low-rank M."""
    seen = []
    real_cs = CoapProjector.correlation_step

    def spy(self, basis, moment, grad, side):
        seen.append((moment.clone(), side))
        return real_cs(self, basis, moment, grad, side)

    monkeypatch.setattr(CoapProjector, "correlation_step", spy)
    w = torch.nn.Parameter(randn(*TALL, seed=1))
    opt = adam_group([w], CoapProjector(3, update_gap=2, reproject_factor=3))
    for t in range(3):
        w.grad = randn(*TALL, seed=50 + t)
        if t == 2:
            m_before = opt.state[w]["exp_avg"].clone()
        opt.step()
    assert len(seen) == 1
    assert seen[0][1] == RIGHT and torch.equal(seen[0][0], m_before)


# ====================================================================== COAP: restore_state
def _back(side, basis, low):
    return low @ basis if side == RIGHT else basis @ low


def _proj(side, basis, full):
    return full @ basis.T if side == RIGHT else basis.T @ full


@pytest.mark.parametrize("refresh", [2, 10], ids=["correlation_step", "range_finder"])
def test_restore_state_carries_the_moments_into_the_new_basis(refresh):
    """Step 2 refreshes by the correlation step, step 10 (reproject_factor 5 x update_gap 2) by
    the warm-started range finder; either way M <- project_new(back_old(M)) and
    V <- (project_new(back_old(sqrt V)))^2 before this step's Adam update."""
    cfg = compose_cfg(
        [
            "optimizer=coap",
            "optimizer.rank=4",
            "optimizer.update_gap=2",
            "optimizer.restore_state=true",
            "optimizer.refresh=synchronous",  # every matrix refreshes at steps 2 and 10
        ]
    ).optimizer
    model = toy_llama(layers=2, seed=0)
    opt = optimizers.build(cfg, model)
    assert opt.transition is not None
    b1, b2 = cfg.betas
    train(model, opt, refresh)
    params = opt.param_groups[0]["params"]
    before = {id(p): copy.deepcopy(opt.state[p]) for p in params}
    model(BATCH, BATCH).backward()
    opt.step()  # a refresh, then the moments are carried over, then Adam's update
    sides = set()
    for p in params:
        old, new = before[id(p)], opt.state[p]
        side = new["side"]
        sides.add(side)
        p_old, p_new = old["basis"].double(), new["basis"].double()
        g = p.grad.double()
        low = _proj(side, p_new, g)  # this step's R, in the new basis
        m_carried = _proj(side, p_new, _back(side, p_old, old["exp_avg"].double()))
        v_carried = _proj(side, p_new, _back(side, p_old, old["exp_avg_sq"].double().sqrt())) ** 2
        m_want = b1 * m_carried + (1 - b1) * low
        v_want = b2 * v_carried + (1 - b2) * low**2
        torch.testing.assert_close(
            new["exp_avg"].double(), m_want, rtol=1e-4, atol=1e-5 * float(m_want.abs().max())
        )
        torch.testing.assert_close(
            new["exp_avg_sq"].double(), v_want, rtol=1e-4, atol=1e-5 * float(v_want.abs().max())
        )
        if refresh == 10:  # the range finder really turns the basis: keeping M would differ
            assert (p_new - p_old).norm() > 1e-2
            m_kept = b1 * old["exp_avg"].double() + (1 - b1) * low
            assert (m_kept - m_want).norm() > 1e-2 * m_want.norm()
    assert sides == {LEFT, RIGHT}


def test_restore_state_is_refused_for_coap_8bit():
    cfg = compose_cfg(["optimizer=coap_8bit", "optimizer.rank=4", "optimizer.restore_state=true"])
    with pytest.raises(ValueError, match="restore_state"):
        optimizers.build(cfg.optimizer, toy_llama(layers=2, seed=0))


# ====================================================================== COAP: 8-bit
def test_coap_8bit_trains_the_toy_model(monkeypatch):
    moments = []
    real_cs = CoapProjector.correlation_step

    def spy(self, basis, moment, grad, side):
        moments.append(moment)
        return real_cs(self, basis, moment, grad, side)

    monkeypatch.setattr(CoapProjector, "correlation_step", spy)
    cfg = compose_cfg(
        [
            "optimizer=coap_8bit",
            "optimizer.rank=4",
            "optimizer.update_gap=2",
            "optimizer.min_8bit_size=64",
            "optimizer.refresh=synchronous",  # (the count of correlation steps below)
        ]
    ).optimizer
    model = toy_llama(layers=2, seed=0)
    opt = optimizers.build(cfg, model)
    assert isinstance(opt.rule, BlockwiseAdam8bitRule)
    losses = train(model, opt, 8)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05, losses
    for p in opt.param_groups[0]["params"]:
        state = opt.state[p]
        assert state["state1"].dtype == torch.uint8  # quantized moments in the subspace
        assert state["state1"].shape == opt.projector.reduced_shape(tuple(p.shape))
    # the correlation steps (steps 2, 4, 6 for 14 matrices) read a dequantized fp32 moment
    assert len(moments) == 3 * 14
    assert all(m.dtype == torch.float32 and m.abs().sum() > 0 for m in moments)


def test_8bit_first_moment_dequantizes_close_to_fp32_adam():
    """first_moment dequantizes state1: close to fp32 Adam's M on the same gradients (one
    8-bit round trip costs about 1%; re-quantizing every step lets the error grow to about
    1% / sqrt(1 - beta1^2), 2.5%), and state1 is bitsandbytes' own Adam8bit state."""
    import bitsandbytes as bnb

    shape = (48, 16)
    rule8 = BlockwiseAdam8bitRule(min_8bit_size=256)
    rule32 = AdamRule()
    group = {"betas": (0.9, 0.999), "eps": 1e-6}
    ref = torch.nn.Parameter(torch.zeros(shape))
    ref_opt = bnb.optim.Adam8bit([ref], lr=1.0, betas=(0.9, 0.999), eps=1e-6, min_8bit_size=256)
    s8, s32 = {}, {}
    assert rule8.first_moment(s8) is None
    errors = []
    for t in range(1, 21):
        g = randn(*shape, seed=t) * torch.linspace(0.1, 3.0, shape[1])
        rule8.direction(s8, g, t, group)
        rule32.direction(s32, g, t, group)
        ref.grad = g.clone()
        ref_opt.step()
        assert s8["state1"].dtype == torch.uint8 and s8["absmax1"].shape == (3,)
        assert torch.equal(s8["state1"], ref_opt.state[ref]["state1"])
        m8, m32 = rule8.first_moment(s8), s32["exp_avg"]
        assert m8.shape == shape and m8.dtype == torch.float32
        errors.append(float((m8 - m32).norm() / m32.norm()))
    assert 0 < errors[0] < 0.015  # it is quantized, not a copy
    assert max(errors[:3]) < 0.02, errors
    assert max(errors) < 0.03, errors
    # a small tensor keeps fp32 moments, returned as they are
    small = {}
    rule8.direction(small, randn(4, 4, seed=0), 1, group)
    assert small["state1"].dtype == torch.float32
    assert rule8.first_moment(small) is small["state1"]


# ====================================================================== OSD: the loss gradient
def osd_loss(p, g, side, lam):
    g = g / g.norm()
    if side == RIGHT:  # P r x n
        recon = ((g @ p.T @ p - g) ** 2).sum()
        gram = p @ p.T
    else:  # P m x r
        recon = ((p @ p.T @ g - g) ** 2).sum()
        gram = p.T @ p
    return recon + lam * ((gram - torch.eye(gram.shape[0], dtype=p.dtype)) ** 2).sum()


@pytest.mark.parametrize("lam", [0.0, 0.1])
@pytest.mark.parametrize("side", [RIGHT, LEFT], ids=["right", "left"])
def test_osd_loss_grad_matches_autograd(side, lam):
    m, n, r = (20, 12, 5) if side == RIGHT else (12, 20, 5)
    proj = OnlinePcaProjector(r, 10, "std", ortho_penalty=lam)
    g = randn(m, n, seed=1, dtype=torch.float64) * 7.0
    # a basis off orthonormality, so that the penalty matters
    p = randn(r, n, seed=2, dtype=torch.float64) if side == RIGHT else randn(m, r, seed=2)
    p = (p * 0.4).double()
    leaf = p.clone().requires_grad_(True)
    osd_loss(leaf, g, side, lam).backward()
    got = proj.loss_grad(p, g, side)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, leaf.grad, rtol=1e-10, atol=1e-10)
    if lam:  # the penalty term is really there
        plain = OnlinePcaProjector(r, 10, "std", ortho_penalty=0.0).loss_grad(p, g, side)
        assert (plain - got).norm() > 1e-3 * got.norm()


# ====================================================================== OSD: the online PCA
def osd_state(basis):
    return {
        "side": RIGHT if basis.shape[0] < basis.shape[1] else LEFT,
        "basis": basis,
        "basis_exp_avg": torch.zeros_like(basis),
        "basis_exp_avg_sq": torch.zeros_like(basis),
        "basis_step": 0,
    }


def relative_residual(p, g, side):
    recon = g @ p.T @ p if side == RIGHT else p @ (p.T @ g)
    return float((g - recon).norm() / g.norm())


@pytest.mark.parametrize("mode", ["paper", "code"])
@pytest.mark.parametrize("side", [RIGHT, LEFT], ids=["right", "left"])
def test_osd_post_step_tracks_the_gradient_subspace(side, mode):
    """A stream of gradients from a fixed rank-r subspace plus small noise: starting from a
    random orthonormal basis, the online-PCA steps shrink ||G - P P^T G|| / ||G||."""
    r = 4
    m, n = (48, 32) if side == RIGHT else (32, 48)
    dim = n if side == RIGHT else m
    fixed = orthonormal(dim, r, seed=3)  # dim x r: the subspace the gradients live in
    start = orthonormal(dim, r, seed=4)
    basis = start.T.contiguous() if side == RIGHT else start.clone()
    # update_gap 100 makes the code form's lr 1/100 at the initial lr
    proj = OnlinePcaProjector(r, 100, "std", mode=mode)
    lr = 0.002 if mode == "paper" else 0.01  # paper: 5 x lr_t = 0.01 on P
    ctx = RefreshContext(0, None, lr, lr)
    state = osd_state(basis)
    assert state["side"] == side

    def grad(t):
        coeff = randn(m if side == RIGHT else n, r, seed=1000 + t)
        low = coeff @ fixed.T if side == RIGHT else fixed @ coeff.T
        return low + 0.01 * randn(m, n, seed=2000 + t)

    probe = grad(-1)
    errors = [relative_residual(state["basis"], probe, side)]
    for t in range(300):
        proj.post_step(state, grad(t), ctx)
        if t % 50 == 49:
            errors.append(relative_residual(state["basis"], probe, side))
    assert state["basis_step"] == 300
    assert errors[0] > 0.8  # a random start misses most of the gradient
    assert errors[-1] < 0.1 * errors[0], errors
    assert errors[-1] < 0.05, errors  # the noise floor is about 0.03
    assert errors[-1] < errors[1] < errors[0], errors
    if mode == "paper":  # the penalty keeps P near orthonormal
        gram = (
            state["basis"] @ state["basis"].T
            if side == RIGHT
            else state["basis"].T @ state["basis"]
        )
        assert (gram - torch.eye(r)).norm() < 0.02


def test_osd_takes_only_one_svd_per_matrix(monkeypatch):
    calls = []
    real_svd = torch.linalg.svd

    def counting(a, *args, **kwargs):
        calls.append(tuple(a.shape))
        return real_svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting)
    shapes = [TALL, WIDE, (16, 16)]
    ws = [torch.nn.Parameter(randn(*shape, seed=i)) for i, shape in enumerate(shapes)]
    opt = adam_group(ws, OnlinePcaProjector(3, update_gap=2))  # GaLore would refresh every 2
    for t in range(10):
        before = [opt.state[w]["basis"].clone() if opt.state[w] else None for w in ws]
        for i, w in enumerate(ws):
            w.grad = randn(*w.shape, seed=10 * t + i)
        opt.step()
        for w, b in zip(ws, before, strict=True):
            assert b is None or not torch.equal(b, opt.state[w]["basis"])  # moves every step
    assert sorted(calls) == sorted(shapes)
    for w in ws:
        assert opt.state[w]["basis_step"] == 9  # one projector step at each of steps 1..9


@pytest.mark.parametrize("shape", [TALL, WIDE], ids=["right", "left"])
def test_osd_step_t_projects_with_the_basis_before_its_update(shape):
    lr, scale, b1, b2, eps = 0.01, 0.25, 0.9, 0.999, 1e-8
    w = torch.nn.Parameter(randn(*shape, seed=0, dtype=torch.float64))
    opt = adam_group([w], OnlinePcaProjector(4, 10), lr=lr, scale=scale)
    for t in range(3):
        w.grad = randn(*shape, seed=20 + t, dtype=torch.float64)
        opt.step()
    state = opt.state[w]
    side = state["side"]
    assert side == (RIGHT if shape == TALL else LEFT)
    p_t = state["basis"].clone()
    proj_state = {k: state[k] for k in ("basis_exp_avg", "basis_exp_avg_sq", "basis_step")}
    replay = copy.deepcopy({"side": side, "basis": p_t, **proj_state})
    m, v, step = state["exp_avg"].clone(), state["exp_avg_sq"].clone(), state["step"] + 1
    w_before = w.detach().clone()
    g = randn(*shape, seed=99, dtype=torch.float64)
    w.grad = g
    opt.step()  # step 3

    def expected_with(basis):
        low = _proj(side, basis, g)
        m1 = b1 * m + (1 - b1) * low
        v1 = b2 * v + (1 - b2) * low**2
        corr = math.sqrt(1 - b2**step) / (1 - b1**step)
        return w_before - lr * corr * scale * _back(side, basis, m1 / (v1.sqrt() + eps))

    torch.testing.assert_close(w.detach(), expected_with(p_t), rtol=1e-12, atol=1e-12)
    p_next = state["basis"]
    assert (p_next - p_t).norm() > 1e-4  # the basis did move after the projection
    assert (expected_with(p_next) - w.detach()).norm() > 1e-6  # and P_{t+1} would differ
    # P_{t+1} is the projector's step on L(P_t; G_t), taken from P_t
    opt.projector.post_step(replay, g, RefreshContext(0, None, lr, lr))
    assert torch.equal(replay["basis"], p_next)


def hand_adamw(p, d, m, v, t, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * d
    v = b2 * v + (1 - b2) * d * d
    denom = (v / (1 - b2**t)).sqrt() + eps
    return p - lr / (1 - b1**t) * m / denom, m, v


@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("side", [RIGHT, LEFT], ids=["right", "left"])
def test_osd_post_step_is_one_adamw_step(side, mode):
    """code: no penalty, weight decay 0.01, lr (lr_t / lr_0) / update_gap; paper: penalty 0.1,
    lr 5 x lr_t, weight decay proj_weight_decay."""
    r, gap, lr_t, lr_0 = 4, 10, 0.003, 0.01
    m_, n_ = (20, 12) if side == RIGHT else (12, 20)
    shape = (r, n_) if side == RIGHT else (m_, r)
    proj = OnlinePcaProjector(r, gap, "std", mode=mode, weight_decay=0.02)
    basis = randn(*shape, seed=5) * 0.3
    m0 = randn(*shape, seed=6) * 0.01
    v0 = randn(*shape, seed=7).abs() * 1e-4
    state = {
        "side": side,
        "basis": basis.clone(),
        "basis_exp_avg": m0.clone(),
        "basis_exp_avg_sq": v0.clone(),
        "basis_step": 4,
    }
    g = randn(m_, n_, seed=8) * 3.0
    proj.post_step(state, g, RefreshContext(0, None, lr_t, lr_0))
    assert state["basis_step"] == 5
    if mode == "code":
        lam, lr, wd = 0.0, (lr_t / lr_0) / gap, 0.01
    else:
        lam, lr, wd = 0.1, 5 * lr_t, 0.02
    leaf = basis.double().requires_grad_(True)
    osd_loss(leaf, g.double(), side, lam).backward()
    want, m1, v1 = hand_adamw(basis.double(), leaf.grad, m0.double(), v0.double(), 5, lr, wd)
    torch.testing.assert_close(state["basis_exp_avg"].double(), m1, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(state["basis_exp_avg_sq"].double(), v1, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(state["basis"].double(), want, rtol=1e-5, atol=1e-6)
    assert (state["basis"].double() - basis.double()).norm() > 1e-3
    # the same as torch's AdamW from that state (the reference repository's projector optimizer)
    ref = torch.nn.Parameter(basis.clone())
    adamw = torch.optim.AdamW([ref], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    adamw.state[ref] = {
        "step": torch.tensor(4.0),
        "exp_avg": m0.clone(),
        "exp_avg_sq": v0.clone(),
    }
    ref.grad = leaf.grad.float()
    adamw.step()
    torch.testing.assert_close(state["basis"], ref.detach(), rtol=1e-5, atol=1e-6)


# ====================================================================== memory
@pytest.mark.parametrize(
    "overrides",
    [
        ["optimizer=osd", "optimizer.rank=4"],
        ["optimizer=coap", "optimizer.rank=4", "optimizer.update_gap=2"],
        [
            "optimizer=coap_8bit",
            "optimizer.rank=4",
            "optimizer.update_gap=2",
            "optimizer.min_8bit_size=64",
        ],
    ],
    ids=["osd", "coap", "coap_8bit"],
)
def test_state_bytes_match_the_formula(overrides):
    cfg = compose_cfg(overrides).optimizer
    model = toy_llama(layers=2, seed=0)
    opt = optimizers.build(cfg, model)
    train(model, opt, 3)
    reported = opt.state_nbytes()
    assert reported == opt.memory_formula(3)
    assert reported == optimizers.memory_formula(cfg.name, model, cfg, steps=3)
    projected = opt.param_groups[0]["params"]
    assert len(projected) == 14
    # the short side (RIGHT: n for tall and square, LEFT: m for the wide down_proj)
    short = [p.shape[1] if p.shape[0] >= p.shape[1] else p.shape[0] for p in projected]
    per_basis = [4 * s * 4 for s in short]  # r x short side, fp32
    factor = 3 if cfg.name == "osd" else 1  # OSD: P and its two Adam moments
    assert reported["projector"] == factor * sum(per_basis)
    long = [max(p.shape) for p in projected]
    plain = [p for g in opt.param_groups[1:] for p in g["params"]]
    moment_bytes = sum(2 * 4 * x * 4 for x in long)  # M and V, r x long side, fp32
    moment_bytes += sum(2 * p.numel() * 4 for p in plain)  # full Adam elsewhere
    if cfg.name != "coap_8bit":
        assert reported["moments"] == moment_bytes


# ====================================================================== bad input
@pytest.mark.parametrize(
    "name, override, key",
    [
        ("osd", "optimizer.mode=foo", "optimizer.mode"),
        ("osd", "optimizer.proj_type=full", "optimizer.proj_type"),
        ("coap", "optimizer.reproject_factor=0", "optimizer.reproject_factor"),
        ("coap", "optimizer.rank=0", "optimizer.rank"),
        ("coap", "optimizer.proj_type=full", "optimizer.proj_type"),
        ("coap", "optimizer.update_gap=0", "optimizer.update_gap"),
        ("coap_8bit", "optimizer.reproject_factor=0", "optimizer.reproject_factor"),
        ("osd", "optimizer.update_gap=0", "optimizer.update_gap"),
        ("osd", "optimizer.rank=0", "optimizer.rank"),
    ],
)
def test_bad_input_is_refused_naming_the_key(name, override, key):
    cfg = compose_cfg([f"optimizer={name}", override]).optimizer
    with pytest.raises(ValueError, match=re.escape(key)):
        optimizers.build(cfg, toy_llama(layers=2, seed=0))
