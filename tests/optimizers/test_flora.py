"""Flora: parity with flora-opt's torch ``Flora`` (compat=reference seeds) across several
resamplings, and the paper mode's properties (projection never stored, momentum transferred)."""

import pytest
import torch

from llm_pretrain import optim as optimizers
from llmpt.optimizers.projectors.gaussian import GaussianProjector, split_seed
from llmpt.optimizers.rules.flora import FloraRule
from llmpt.optimizers.subspace import SubspaceOptimizer
from tests.conftest import compose_cfg, toy_llama

SHAPES = [(32, 16), (16, 32), (24, 24)]
PLAIN = [(10,), (64, 8)]  # a vector and a matrix whose aspect ratio keeps a full momentum


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]
    plain = [torch.randn(s, generator=g).requires_grad_() for s in PLAIN]
    return mats, plain


def run(opt, params, steps=9):
    for t in range(steps):
        g = torch.Generator().manual_seed(100 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


def ours(mats, plain, kappa, wd, scale_parameter, seeding="flora", seed=0):
    rule = FloraRule(0.9, kappa, weight_decay=wd, scale_parameter=scale_parameter)
    return SubspaceOptimizer(
        [{"params": mats, "projected": True}, {"params": plain, "projected": False}],
        lr=0.01,
        betas=(0.9, 0.999),
        eps=1e-3,
        weight_decay=0.0,
        projector=GaussianProjector(4, kappa, "std", seeding=seeding),
        scale=1.0,
        rule=rule,
        plain_rule=rule,
        seed=seed,
    )


@pytest.mark.parametrize(
    "kappa, wd, scale_parameter, seed",
    [(3, 0.0, True, 0), (3, 0.1, True, 0), (1, 0.0, False, 0), (4, 0.0, True, 7)],
)
def test_matches_flora_opt(kappa, wd, scale_parameter, seed):
    from flora_opt.optimizers.torch.flora import Flora

    mats, plain = make()
    ref = Flora(
        [{"params": mats}, {"params": plain, "rank": None}],
        lr=0.01,
        rank=4,
        kappa=kappa,
        beta1=0.9,
        weight_decay=wd,
        scale_parameter=scale_parameter,
        seed=seed,
    )
    expected = run(ref, mats + plain)
    mats, plain = make()
    got = run(ours(mats, plain, kappa, wd, scale_parameter, seed=seed), mats + plain)
    start = make()[0] + make()[1]
    for a, b, s in zip(expected, got, start, strict=True):
        assert (a - b).abs().max() <= 1e-6
        assert (a - s).abs().max() > 1e-4  # the weights moved


def test_paper_mode_stores_only_compressed_momentum_and_factored_statistics():
    mats, plain = make()
    opt = ours(mats, plain, 3, 0.0, True, seeding="paper")
    run(opt, mats + plain, steps=4)
    for p in mats:
        state = opt.state[p]
        m, n = p.shape
        assert state["exp_avg"].shape == ((m, 4) if m >= n else (4, n))
        assert state["exp_avg_sq_row"].shape == (m,) and state["exp_avg_sq_col"].shape == (n,)
        assert "basis" not in state
    assert opt.state_nbytes() == {
        k: v for k, v in opt.memory_formula().items() if k in opt.state_nbytes()
    }


def test_momentum_transfer_preserves_the_momentum_in_expectation():
    """At a resampling the momentum moves to the new basis by up(old) then down(new): with
    N(0, 1/r) entries E[P P^T] = I, so averaged over seeds up_new(down_new(X)) = X."""
    proj = GaussianProjector(8, 1, "std")
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    total = torch.zeros_like(x)
    n = 3000
    for s in range(n):
        state = {"seed": s}
        proj.refresh(state, x)
        total += proj.project_back(state, proj.project(state, x))
    assert (total / n - x).norm() / x.norm() < 0.1


def test_split_seed_matches_flora_opt():
    from flora_opt.optimizers.torch.flora import split_seed as reference

    for seed in (1, 5, 123456):
        assert split_seed(seed) == reference(seed)


def test_registry_defaults_build_and_train():
    cfg = compose_cfg(["optimizer=flora", "optimizer.rank=4"]).optimizer
    model = toy_llama(layers=2, seed=0)
    opt = optimizers.build(cfg, model)
    batch = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(60):
        loss = model(batch, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.rank=0", "rank=0"),
        ("optimizer.kappa=0", "kappa=0"),
        ("optimizer.beta1=0.0", "beta1=0.0"),
        ("optimizer.compat=paper", "compat='paper'"),
        ("optimizer.proj_type=full", "one-sided"),
    ],
)
def test_bad_input_is_refused(override, message):
    cfg = compose_cfg(["optimizer=flora", override]).optimizer
    with pytest.raises(ValueError, match=message):
        optimizers.build(cfg, toy_llama(layers=2, seed=0))
