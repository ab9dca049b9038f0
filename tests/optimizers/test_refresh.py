"""Staggered subspace refreshes (``optimizers/refresh.py``, ``optimizer.refresh``): every method
with a periodic basis follows the offset formula, a staggered run resumes bit for bit in the
middle of an interval, and with one matrix or an interval of 1 it is the synchronous run."""

import math

import pytest
import torch

from llm_pretrain import optim as optimizers
from llmpt.optimizers.projectors import coap as coap_module
from llmpt.optimizers.refresh import stagger_offsets
from tests.conftest import compose_cfg
from tests.optimizers.test_contract import (
    BATCH,
    METHODS,
    check_exact_resume,
    optimizer_cfg,
    toy_model,
)

# every registered method whose schema has optimizer.refresh
REFRESHING = [m for m in METHODS if "refresh" in compose_cfg([f"optimizer={m}"]).optimizer]
GAP = 4  # the toy's 14 matrices over 4 steps: offsets 0 (x4), 1 (x3), 2 (x4), 3 (x3)


def test_the_registry_methods_with_a_periodic_basis_all_take_refresh():
    assert set(REFRESHING) == {
        "apollo",
        "apollo_mini",
        "coap",
        "coap_8bit",
        "dct_adamw",
        "fira",
        "flora",
        "frugal",
        "galore",
        "galore_8bit",
        "gorp",
        "gradnorm_lorp",
        "gradnorm_lorp_8bit",
        "grass",
        "gum",
        "i3s",
        "q_galore",
    }
    # staggered is the default (docs/optimizers.md: it costs no measurable loss)
    assert all(compose_cfg([f"optimizer={m}"]).optimizer.refresh == "staggered" for m in REFRESHING)


def refresh_cfg(name: str, refresh: str, gap: int = GAP):
    """The contract's toy settings with interval ``gap`` (Flora's kappa) and ``refresh``."""
    cfg = optimizer_cfg(name)
    cfg.update_gap, cfg.refresh = gap, refresh
    if name == "flora":
        cfg.kappa = gap
    if name == "frugal":  # per-matrix SVD bases (block mode has no basis to stagger)
        cfg.projection = "svd"
    return cfg


def projected(opt) -> list[torch.Tensor]:
    return [p for g in opt.param_groups if g["projected"] for p in g["params"]]


def record_refreshes(opt, model, steps: int) -> dict[int, list[int]]:
    """Train ``steps`` steps; the steps at which each projected matrix (by its position in
    parameter order) refreshed its basis, a step listed once per refresh."""
    matrices = projected(opt)
    out: dict[int, list[int]] = {k: [] for k in range(len(matrices))}
    now = [0]
    for projector in opt._distinct_projectors():
        real = projector.refresh

        def spy(state, grad, *args, real=real):
            k = next(k for k, p in enumerate(matrices) if opt.state.get(p) is state)
            out[k].append(now[0])
            return real(state, grad, *args)

        projector.refresh = spy
    for now[0] in range(steps):
        model(BATCH, BATCH).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def expected_steps(name: str, offset: int, gap: int, steps: int, starts=(0,)) -> list[int]:
    """The formula: the first basis at the matrix's first step, then every step s with
    (s - offset) mod gap = 0. Flora counts its steps from 1 (t = s + 1) and draws its first P
    before it checks for a resample, so a resample due at t = 1 is a second draw at step 0.
    ``starts``: the steps at which the matrix's state (re)starts (GUM: a layer that becomes
    active starts afresh, at a multiple of the gap, so the offsets still hold)."""
    if name == "flora":
        return [0] + [s for s in range(steps) if (s + 1 - offset) % gap == 0]
    return sorted(set(starts) | {s for s in range(1, steps) if (s - offset) % gap == 0})


def fresh_starts(opt, p: torch.Tensor, steps: int) -> list[int]:
    """The steps at which a sampled matrix's state starts: 0, and each period in which its
    unit is newly active (``SubspaceOptimizer._switch`` clears it)."""
    if opt.sampling is None:
        return [0]
    sampler, unit = opt.sampling.sampler, opt._unit[p]
    periods = range(1, (steps - 1) // sampler.interval + 1)
    return [0] + [
        j * sampler.interval
        for j in periods
        if unit in sampler.choose(j) and unit not in sampler.choose(j - 1)
    ]


def test_offsets_are_spread_evenly_over_each_cycle():
    assert stagger_offsets([200] * 56) == [k * 200 // 56 for k in range(56)]
    assert len(set(stagger_offsets([200] * 56))) == 56  # llama_60m: one basis per step at most
    offsets = stagger_offsets([4] * 14)
    assert offsets == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    # matrices with another interval (a group of its own) are spread over theirs
    assert stagger_offsets([4, 6, 4, 6, 4, 6]) == [0, 0, 1, 2, 2, 4]
    assert stagger_offsets([1] * 5) == [0] * 5 and stagger_offsets([7]) == [0]


@pytest.mark.parametrize("refresh", ["synchronous", "staggered"])
@pytest.mark.parametrize("name", REFRESHING)
def test_each_matrix_refreshes_at_the_steps_of_the_formula(name, refresh):
    steps = 3 * GAP + 2
    model = toy_model()
    cfg = refresh_cfg(name, refresh)
    opt = optimizers.build(cfg, model)
    got = record_refreshes(opt, model, steps)
    n = len(got)
    assert n == 14
    # COAP's refreshes repeat every reproject_factor x T_u: its offsets spread over that cycle
    cycle = GAP * cfg.reproject_factor if name.startswith("coap") else GAP
    periodic = []  # the refreshes that are not a matrix's first basis
    for k, seen in got.items():
        offset = k * cycle // n if refresh == "staggered" else 0
        assert opt.refresh_offset(projected(opt)[k]) == offset
        starts = fresh_starts(opt, projected(opt)[k], steps)
        assert seen == expected_steps(name, offset, GAP, steps, starts), (k, offset)
        periodic += [s for s in seen if s not in starts]
    per_step = [periodic.count(step) for step in range(1, steps)]
    if refresh == "synchronous":  # every matrix at once
        assert max(per_step) == 14
    else:
        assert max(per_step) <= math.ceil(n / GAP)


def test_q_galore_grows_each_matrix_gap_on_its_own_staggered_schedule():
    """Q-GaLore's lazy rule under offsets: with a threshold every cosine meets and a queue of
    one, each matrix's gap doubles at every refresh after its first, counted from its offset."""
    steps = 40
    model = toy_model()
    cfg = refresh_cfg("q_galore", "staggered")
    cfg.cos_threshold, cfg.queue_size = 0.0, 1  # |cos| >= 0 always: grow at every refresh
    opt = optimizers.build(cfg, model)
    got = record_refreshes(opt, model, steps)
    for k, seen in got.items():
        offset, gap, want = k * GAP // 14, GAP, [0]
        for s in range(1, steps):
            if (s - offset) % gap == 0:
                want.append(s)
                gap *= 2
        assert seen == want, (k, offset)
        assert opt.state[projected(opt)[k]]["gap"] == gap
    cfg.cos_threshold = 2.0  # never met: the gap stays, every matrix refreshes every GAP steps
    model = toy_model()
    fixed = record_refreshes(optimizers.build(cfg, model), model, steps)
    assert sum(map(len, got.values())) == 70 < sum(map(len, fixed.values())) == 150


def test_coap_spreads_its_range_finders_over_its_whole_cycle(monkeypatch):
    """COAP's warm-started range finder runs when (s - offset) is a multiple of
    reproject_factor x T_u, the cheap correlation step at the other multiples of T_u."""
    calls, now = [], [0]
    real = coap_module.range_finder

    def spy(*args):
        calls.append(now[0])
        return real(*args)

    monkeypatch.setattr(coap_module, "range_finder", spy)
    cfg = refresh_cfg("coap", "staggered")
    cfg.reproject_factor = 3
    model = toy_model()
    opt = optimizers.build(cfg, model)
    steps, cycle = 3 * GAP * 3, GAP * 3
    for now[0] in range(steps):
        model(BATCH, BATCH).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    want = []
    for k in range(14):
        offset = k * cycle // 14
        want += [0] + [s for s in range(1, steps) if (s - offset) % cycle == 0]
    assert sorted(calls) == sorted(want)
    per_step = [calls.count(s) for s in range(1, steps)]
    assert max(per_step) <= math.ceil(14 / cycle)


@pytest.mark.parametrize("name", REFRESHING)
def test_a_staggered_run_resumed_mid_interval_equals_an_uninterrupted_one(name):
    """Saved after 5 steps (the matrices' next refreshes at steps 5, 6, 7 and 8), resumed for 5
    more: the weights equal 10 straight steps' bit for bit."""
    check_exact_resume(refresh_cfg(name, "staggered"), before=5, after=5)


def weights_after(cfg, steps: int = 7) -> list[torch.Tensor]:
    model = toy_model()
    opt = optimizers.build(cfg, model)
    for _ in range(steps):
        model(BATCH, BATCH).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("case", ["gap_1", "one_matrix"])
@pytest.mark.parametrize("name", REFRESHING)
def test_staggered_is_synchronous_with_an_interval_of_1_or_a_single_matrix(name, case):
    runs = []
    for refresh in ("synchronous", "staggered"):
        cfg = refresh_cfg(name, refresh, gap=1 if case == "gap_1" else 3)
        if name.startswith("coap") and case == "gap_1":  # its cycle: reproject_factor x T_u
            cfg.reproject_factor = 1
        if case == "one_matrix":
            cfg.target_modules = ["layers.1.self_attn.q_proj"]
        runs.append(weights_after(cfg))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_the_schedules_differ_otherwise():
    """(The equalities above are not vacuous: with 14 matrices over 4 steps they differ.)"""
    a, b = (weights_after(refresh_cfg("galore", r)) for r in ("synchronous", "staggered"))
    assert not all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_an_unknown_refresh_is_refused_by_name():
    cfg = refresh_cfg("galore", "lazy")
    with pytest.raises(ValueError, match=r"optimizer.refresh='lazy': use one of staggered, sync"):
        optimizers.build(cfg, toy_model())


def test_a_group_cannot_set_its_own_refresh():
    from llmpt.optimizers.api import GaLore

    w = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match=r"param group 0 sets refresh='synchronous'"):
        GaLore([{"params": [w], "projected": True, "refresh": "synchronous"}], rank=2)


def test_the_report_says_when_refreshes_are_staggered():
    opt = optimizers.build(refresh_cfg("galore", "staggered"), toy_model())
    assert "refresh every 4 steps (staggered)" in opt.projection_report()
    opt = optimizers.build(refresh_cfg("galore", "synchronous"), toy_model())
    assert "(staggered)" not in opt.projection_report()


@pytest.mark.parametrize(
    "name, package", [("apollo", "apollo-torch"), ("flora", "flora-opt"), ("q_galore", "q-")]
)
def test_reference_arithmetic_asks_for_the_reference_schedule(name, package):
    """compat=reference reproduces a package whose bases all refresh at one step: with the
    default staggered schedule it is refused, naming the key to set."""
    cfg = optimizer_cfg(name)
    cfg.compat = "reference"
    with pytest.raises(
        ValueError,
        match=rf"optimizer.compat=reference reproduces {package}.*optimizer.refresh='staggered': "
        r"set optimizer.refresh=synchronous",
    ):
        optimizers.build(cfg, toy_model())
    cfg.refresh = "synchronous"
    optimizers.build(cfg, toy_model())
