"""Layer sampling: the sampler's orders, and what LISA, BAdam, OwLore and GUM do with the units it
picks (freezing, freeing state, outlier weights, importance weights). Spec: galore-family.md
sections 4(c) (FRUGAL's block orders), 5 (GUM), 6 (OwLore, LISA) and 7 (BAdam)."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from omegaconf import OmegaConf

from llm_pretrain import optim as optimizers
from llmpt.optimizers.groups import decoder_layers
from llmpt.optimizers.rules.muon import newton_schulz
from llmpt.optimizers.sampling import ORDERS, LayerSampler, OutlierWeights
from tests.conftest import compose_cfg, toy_llama

BATCH = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def toy(layers: int = 4, seed: int = 0):
    return toy_llama(layers=layers, seed=seed)


def method_cfg(name: str, **overrides):
    cfg = compose_cfg([f"optimizer={name}"]).optimizer
    OmegaConf.set_struct(cfg, False)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def layer_params(model) -> list[list[torch.Tensor]]:
    return [list(layer.parameters()) for _, layer in decoder_layers(model)]


def always_trained(model) -> list[torch.Tensor]:
    """Embeddings, final norm and lm_head: outside every decoder layer."""
    inside = {id(p) for ps in layer_params(model) for p in ps}
    return [p for p in model.parameters() if id(p) not in inside]


def train_step(model, opt) -> None:
    model(BATCH, BATCH).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def has_state(opt, p) -> bool:
    return bool(opt.state.get(p))  # .get: the state is a defaultdict


# ---------------------------------------------------------------------------------- sampler
def frugal_progression(order: str, n: int, k: int, periods: int) -> list[list[int]]:
    """FRUGAL's BlockOptimizer cursors (next_block_start), one period at a time."""
    out, start = [], n - 1 if order == "descending" else 0
    for _ in range(periods):
        if order == "ascending":
            chosen = [i % n for i in range(start, start + k)]
            start = (start + k) % n
        elif order == "descending":
            chosen = [i % n for i in range(start, start - k, -1)]
            start = (start - k) % n
        else:  # mirror: k / 2 pairs (i, n - 1 - i), i over the first half
            half = n // 2
            chosen = [j for i in range(start, start + k // 2) for j in (i % half, n - 1 - i % half)]
            start = (start + k // 2) % half
        out.append(sorted(chosen))
    return out


VALID = {  # (n_units, n_active) each order accepts
    "uniform": [(8, 3), (5, 5), (4, 1)],
    "weighted": [(8, 3), (6, 2)],
    "shuffled": [(8, 2), (6, 3), (4, 4)],
    "ascending": [(7, 3), (8, 2)],
    "descending": [(7, 3), (14, 4)],
    "mirror": [(8, 2), (10, 4), (6, 4)],
}


@pytest.mark.parametrize("order", ORDERS)
def test_every_order_returns_sorted_distinct_indices(order):
    assert set(VALID) == set(ORDERS)
    for n, k in VALID[order]:
        sampler = LayerSampler(n, k, 1, order, seed=5)
        weights = torch.rand(n, generator=torch.Generator().manual_seed(n)) + 0.1
        for period in range(25):
            chosen = sampler.choose(period, weights if order == "weighted" else None)
            assert chosen == sorted(set(chosen)) and len(chosen) == k
            assert all(0 <= i < n for i in chosen)


@pytest.mark.parametrize("n, k", [(8, 2), (6, 3), (12, 4), (5, 1)])
def test_shuffled_visits_every_unit_once_per_epoch(n, k):
    sampler = LayerSampler(n, k, 3, "shuffled", seed=2)
    per_epoch = n // k
    epochs = []
    for epoch in range(4):
        visits = [i for j in range(per_epoch) for i in sampler.choose(epoch * per_epoch + j)]
        assert sorted(visits) == list(range(n)), epoch
        epochs.append(visits)
    assert len({tuple(e) for e in epochs}) > 1  # a new permutation each epoch


@pytest.mark.parametrize(
    "order, n, k",
    [
        ("ascending", 7, 3),
        ("ascending", 14, 4),
        ("descending", 7, 3),
        ("descending", 14, 4),
        ("descending", 5, 5),
        ("mirror", 10, 4),
        ("mirror", 6, 4),
        ("mirror", 14, 2),
    ],
)
def test_ordered_blocks_follow_frugals_progressions(order, n, k):
    sampler = LayerSampler(n, k, 1, order, seed=0)
    expected = frugal_progression(order, n, k, 30)
    assert [sampler.choose(period) for period in range(30)] == expected


def test_uniform_is_a_function_of_seed_and_period():
    a, b = LayerSampler(10, 3, 4, "uniform", 7), LayerSampler(10, 3, 4, "uniform", 7)
    forward = [a.choose(p) for p in range(20)]
    assert [b.choose(p) for p in reversed(range(20))] == forward[::-1]  # any call order
    assert len({tuple(c) for c in forward}) > 10  # differs across periods
    other = LayerSampler(10, 3, 4, "uniform", 8)
    assert [other.choose(p) for p in range(20)] != forward  # and across seeds
    counts = torch.bincount(
        torch.tensor([i for p in range(300) for i in a.choose(p)]), minlength=10
    )
    assert counts.min() > 60  # every unit is drawn, about 90 times each


def test_weighted_order_picks_the_heavy_units():
    weights = torch.full((8,), 1e-9)
    weights[[2, 5]] = 1.0
    sampler = LayerSampler(8, 2, 1, "weighted", seed=0)
    assert all(sampler.choose(p, weights / weights.sum()) == [2, 5] for p in range(20))
    weights = torch.full((8,), 1e-9)
    weights[6] = 1.0
    one = LayerSampler(8, 1, 1, "weighted", seed=0)
    assert all(one.choose(p, weights) == [6] for p in range(20))


def test_weighted_order_fills_spare_slots_uniformly():
    """Fewer layers with outliers than active slots (likely early in pretraining): the heavy ones
    are always taken and the rest are drawn at random, not always the next indices."""
    weights = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    sampler = LayerSampler(6, 3, 1, "weighted", seed=0)
    draws = [sampler.choose(p, weights) for p in range(30)]
    assert all(2 in d and len(set(d)) == 3 for d in draws)
    assert {u for d in draws for u in d} == set(range(6))  # every layer gets its turn
    zeros = LayerSampler(6, 2, 1, "weighted", seed=0)
    assert {u for p in range(30) for u in zeros.choose(p, torch.zeros(6))} == set(range(6))


@pytest.mark.parametrize(
    "args, match",
    [
        ((4, 5, 1, "uniform"), "5 active units out of 4"),
        ((4, -1, 1, "uniform"), "-1 active units out of 4"),
        ((8, 3, 1, "mirror"), "mirror"),
        ((7, 2, 1, "mirror"), "mirror"),
        ((8, 3, 1, "shuffled"), "shuffled"),
        ((8, 2, 1, "zigzag"), r"sampling_order='zigzag'"),
        ((8, 2, 0, "uniform"), r"interval=0"),
    ],
)
def test_sampler_refuses_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        LayerSampler(*args, seed=0)


# ---------------------------------------------------------------------------------- LISA
def lisa(model, **overrides):
    cfg = method_cfg("lisa", active_layers=1, interval=2, **overrides)
    return optimizers.build(cfg, model), cfg


def test_lisa_freezes_inactive_layers_and_gives_them_no_state():
    model = toy()
    opt, _ = lisa(model)
    layers = layer_params(model)
    (active,) = opt.active_units()
    for u, params in enumerate(layers):
        assert all(p.requires_grad == (u == active) for p in params)
    train_step(model, opt)
    for u, params in enumerate(layers):
        assert all(has_state(opt, p) == (u == active) for p in params), u
    for p in always_trained(model):
        assert p.requires_grad and opt.state[p]["exp_avg"].shape == p.shape


def test_lisa_frees_the_state_of_layers_it_freezes_and_stays_bounded():
    model = toy()
    opt, cfg = lisa(model)
    layers = layer_params(model)
    always = always_trained(model)
    layer_numel = sum(p.numel() for p in layers[0])
    bound = 8 * (layer_numel + sum(p.numel() for p in always))  # fp32 M and V
    seen = set()
    for step in range(24):
        before = opt.active_units()
        train_step(model, opt)
        after = opt.active_units()
        seen.update(before)
        moments = optimizers.state_nbytes(opt)["moments"]
        assert moments <= bound, step
        for u, params in enumerate(layers):
            if u not in after:  # frozen for the next period: no state kept (LMFlow keeps it)
                assert not any(has_state(opt, p) for p in params), (step, u)
                assert not any(p.requires_grad for p in params)
        if (step + 1) % cfg.interval:  # mid-period: exactly one layer's Adam state
            assert moments == bound
        assert all(p.requires_grad and has_state(opt, p) for p in always)
    assert seen == {0, 1, 2, 3}  # the bound held while every layer took its turn


def test_lisa_does_not_touch_frozen_layers():
    model = toy()
    opt, _ = lisa(model, weight_decay=0.1)  # decay must not reach frozen layers either
    layers = layer_params(model)
    for _ in range(10):
        active = opt.active_units()
        before = [[p.detach().clone() for p in params] for params in layers]
        head = [p.detach().clone() for p in always_trained(model)]
        train_step(model, opt)
        for u, params in enumerate(layers):
            same = all(torch.equal(p, b) for p, b in zip(params, before[u], strict=True))
            assert same == (u not in active), u
        assert all(not torch.equal(p, b) for p, b in zip(always_trained(model), head, strict=True))


def test_lisa_keeps_the_state_of_a_layer_that_stays_active():
    """Unlike BAdam (below): periods 3 and 4 (steps 6-9) train the same layer without a reset."""
    seed = shuffled_seed_repeating_across_epochs(4)
    model = toy()
    opt, _ = lisa(model, sampling_order="shuffled", seed=seed)
    for _ in range(9):
        train_step(model, opt)
    (repeat,) = opt.active_units()
    assert all(opt.state[p]["step"] == 3 for p in layer_params(model)[repeat])


# ---------------------------------------------------------------------------------- BAdam
def shuffled_seed_repeating_across_epochs(n: int) -> int:
    """A seed whose shuffled order (1 of n) ends epoch 0 and starts epoch 1 with one layer."""
    for seed in range(200):
        sampler = LayerSampler(n, 1, 1, "shuffled", seed)
        if sampler.choose(n - 1) == sampler.choose(n):
            return seed
    raise AssertionError("no such seed in 0..199")


def test_badam_clears_the_active_block_at_every_switch():
    seed = shuffled_seed_repeating_across_epochs(4)
    model = toy()
    cfg = method_cfg("badam", interval=2, seed=seed)
    opt = optimizers.build(cfg, model)
    for _ in range(7):
        train_step(model, opt)
    period_3 = opt.active_units()
    train_step(model, opt)
    (repeat,) = opt.active_units()  # period 4 (steps 8-9): the block of period 3 again
    assert [repeat] == period_3
    params = layer_params(model)[repeat]
    model(BATCH, BATCH).backward()
    grads = [p.grad.clone() for p in params]
    opt.step()
    for p, g in zip(params, grads, strict=True):  # one step from zero moments
        assert opt.state[p]["step"] == 1
        assert torch.allclose(opt.state[p]["exp_avg"], (1 - cfg.betas[0]) * g)


@pytest.mark.parametrize("active", [1, 2])
def test_badam_shuffled_trains_every_layer_once_per_epoch(active):
    model = toy()
    opt = optimizers.build(method_cfg("badam", interval=1, active_layers=active), model)
    layers = layer_params(model)
    per_epoch = 4 // active
    orders = []
    for _epoch in range(3):
        trained = []
        for _ in range(per_epoch):
            before = [[p.detach().clone() for p in params] for params in layers]
            train_step(model, opt)
            moved = [
                u
                for u, params in enumerate(layers)
                if not all(torch.equal(p, b) for p, b in zip(params, before[u], strict=True))
            ]
            assert len(moved) == active
            trained += moved
        assert sorted(trained) == [0, 1, 2, 3]
        orders.append(tuple(trained))
    assert len(set(orders)) > 1


# ---------------------------------------------------------------------------------- OwLore
def with_outliers(model, heavy: dict[int, float]):
    """Scale a fraction of every linear's weights in the given layers by 100 (OWL's outliers)."""
    g = torch.Generator().manual_seed(3)
    layers = decoder_layers(model)
    with torch.no_grad():
        for u, fraction in heavy.items():
            for m in layers[u][1].modules():
                if isinstance(m, torch.nn.Linear):
                    mask = torch.rand(m.weight.shape, generator=g) < fraction
                    m.weight[mask] *= 100.0
    return model


def outlier_probabilities(model, ratio: float = 13.0) -> torch.Tensor | None:
    weights = OutlierWeights([m for _, m in decoder_layers(model)], ratio)
    weights.attach()
    assert weights.weights() is None  # nothing collected yet
    weights.collect(True)
    model(BATCH)  # a training forward: evaluation and no_grad forwards are not recorded
    return weights.weights()


def test_outlier_weights_favour_the_layer_with_outliers():
    p = outlier_probabilities(with_outliers(toy(), {2: 0.02}))
    assert torch.isclose(p.sum(), torch.tensor(1.0, dtype=p.dtype))
    assert p.argmax() == 2
    assert p[0] == p[1] == 0  # upstream of the outliers: weights and activations are tame


def test_outlier_weights_are_owls_layerwise_outlier_ratios():
    """LOD_l = mean over the layer's scores A_ij = ||X_j||_2 |W_ij| of [A_ij > M mean(A)], then
    normalised (spec 6(b)); X_j: input feature j of the linear over every token."""
    model = with_outliers(toy(), {1: 0.01, 2: 0.03})
    inputs = {}
    linears = [
        [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        for _, layer in decoder_layers(model)
    ]
    handles = [
        m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod, args[0]))
        for layer in linears
        for m in layer
    ]
    expected_p = outlier_probabilities(model, ratio=5.0)  # collects on the same forward
    for h in handles:
        h.remove()
    lod = []
    for layer in linears:
        scores = torch.cat(
            [
                (m.weight.abs() * inputs[m].reshape(-1, m.in_features).norm(dim=0)).flatten()
                for m in layer
            ]
        )
        lod.append((scores > 5.0 * scores.mean()).double().mean())
    lod = torch.stack(lod)
    assert (lod > 0).sum() >= 2
    assert torch.allclose(expected_p, lod / lod.sum(), atol=1e-6)


def test_outlier_weights_fall_back_to_uniform_without_outliers():
    p = outlier_probabilities(toy())  # N(0, 0.02) weights: no score above 13 x the mean
    assert torch.equal(p, torch.full((4,), 0.25, dtype=p.dtype))


def owlore(model, **overrides):
    settings = dict(rank=8, update_gap=2, active_layers=2, interval=2)
    return optimizers.build(method_cfg("owlore", **{**settings, **overrides}), model)


def test_owlore_collects_statistics_only_in_the_last_step_of_each_period():
    model = with_outliers(toy(), {1: 0.02})
    opt = owlore(model, interval=3)
    outliers = opt.sampling.collect.__self__
    flags, recorded = [], []
    for _ in range(9):
        flags.append(outliers.collecting)
        loss = model(BATCH, BATCH)
        recorded.append(bool(outliers.sq))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert not outliers.sq  # consumed by the switch that ends the period
    assert flags == [False, False, True] * 3
    assert recorded == flags


def test_owlore_calibrates_its_first_draw_on_the_loaded_weights():
    """Fine-tuning: OWL's ratios on calibration rows choose the first period's layers (a
    uniform draw otherwise), and the hooks count these no-grad forwards only while calibrating."""
    model = with_outliers(toy(), {2: 0.02, 3: 0.02})
    opt = owlore(model, active_layers=1)
    settings = dict(rank=8, update_gap=2, active_layers=1, interval=2)
    detached = optimizers.build(method_cfg("owlore", **settings), toy(), attach=False)
    with pytest.raises(RuntimeError, match=r"attach\(\) before calibrate"):
        detached.calibrate(lambda: None)
    p = opt.calibrate(lambda: model(BATCH))
    assert p[0] == p[1] == 0 and p[2] > 0 and p[3] > 0
    assert opt.active_units() == LayerSampler(4, 1, 2, "weighted", 0).choose(0, p)
    assert opt.active_units()[0] in (2, 3)
    frozen = {u for u in range(4) if u not in opt.active_units()}
    layers = decoder_layers(model)
    for u in range(4):
        assert all(q.requires_grad == (u not in frozen) for q in layers[u][1].parameters())
    with torch.no_grad():
        model(BATCH)  # an evaluation forward after calibrating records nothing
    assert not opt.sampling.collect.__self__.sq
    model(BATCH, BATCH).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="before step"):
        opt.calibrate(lambda: model(BATCH))


def test_owlore_resumes_its_weighted_layers_bit_identically():
    heavy = [1, 3]
    assert LayerSampler(4, 2, 2, "uniform", 0).choose(0) != heavy  # what a redraw would give

    def run(steps, model=None, opt=None):
        if model is None:
            model = with_outliers(toy(), dict.fromkeys(heavy, 0.03))
            opt = owlore(model)
        for _ in range(steps):
            train_step(model, opt)
        return model, opt

    straight, _ = run(8)  # period 3's set is drawn from statistics of step 6
    first, opt1 = run(4)  # the set of period 2 was drawn from outlier statistics
    assert opt1.active_units() == heavy
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = toy(seed=9)
    resumed.load_state_dict(saved["model"])
    opt2 = owlore(resumed)
    opt2.load_state_dict(saved["opt"])
    assert opt2.active_units() == heavy
    run(4, resumed, opt2)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- GUM
def gum(model, **overrides):
    cfg = method_cfg("gum", **{**dict(rank=8, update_gap=100, momentum=0.0), **overrides})
    return optimizers.build(cfg, model), cfg


def seeds_for_every_active_set(n: int, k: int) -> dict[tuple[int, ...], int]:
    """One seed per k-subset of n layers: the uniform draw of period 0 under that seed."""
    found: dict[tuple[int, ...], int] = {}
    for seed in range(2000):
        found.setdefault(tuple(LayerSampler(n, k, 1, "uniform", seed).choose(0)), seed)
    assert len(found) == len(list(itertools.combinations(range(n), k)))
    return found


def targeted_grads(model, cfg) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    projected = optimizers.split_targets(model, list(cfg.target_modules))[0]
    return {n: torch.randn(p.shape, generator=g) for n, p in projected}


@pytest.mark.parametrize("active", [1, 2])
def test_gum_momentum_input_is_unbiased(active):
    """With momentum 0 the buffer after one step is the weighted input: (1/q)(G - P P^T G) in an
    active layer, (1/(1-q)) P^T G in the others. Averaged over every equally likely active set
    (back-projected), it is G."""
    n, q = 4, active / 4
    total: dict[str, torch.Tensor] = {}
    sets = seeds_for_every_active_set(n, active)
    for chosen, seed in sets.items():
        model = toy()
        opt, cfg = gum(model, active_layers=active, seed=seed)
        assert opt.active_units() == list(chosen)
        grads = targeted_grads(model, cfg)
        params = dict(model.named_parameters())
        for name, g in grads.items():
            params[name].grad = g.clone()
        opt.step()
        for name, g in grads.items():
            state = opt.state[params[name]]
            p_basis, buf = state["basis"], state["momentum_buffer"]
            layer = int(name.split(".")[2])
            if layer in chosen:
                expected = (g - p_basis @ (p_basis.T @ g)) / q
                assert torch.allclose(buf, expected, atol=1e-5)
                estimate = buf
            else:
                assert torch.allclose(buf, p_basis.T @ g / (1 - q), atol=1e-5)
                estimate = p_basis @ buf
            total[name] = total.get(name, 0) + estimate / len(sets)
    for name, g in grads.items():
        assert torch.allclose(total[name], g, atol=1e-4), name


def test_gum_gives_a_layer_that_switches_branch_a_fresh_momentum():
    """Full-rank (m x n) in an active layer, low-rank (r x n) otherwise: at a switch the old
    buffer is dropped, and the first step of the new branch starts from zero momentum."""
    model = toy()
    opt, cfg = gum(model, active_layers=1, update_gap=2, momentum=0.9)
    q = 1 / 4
    named = optimizers.split_targets(model, list(cfg.target_modules))[0]
    layer_of = {name: int(name.split(".")[2]) for name, _ in named}
    previous: set[int] = set(opt.active_units())
    fresh = 0
    g = torch.Generator().manual_seed(4)
    for _ in range(10):
        active = set(opt.active_units())
        grads = {name: torch.randn(p.shape, generator=g) for name, p in named}
        for name, p in named:
            p.grad = grads[name].clone()
        opt.step()
        after = set(opt.active_units())
        for name, p in named:
            state, layer = opt.state[p], layer_of[name]
            if (layer in active) != (layer in after):  # switched branch at the end of the step
                assert "momentum_buffer" not in state
                continue
            now = layer in active
            buf, basis = state["momentum_buffer"], state["basis"]
            assert buf.shape == (p.shape if now else (8, p.shape[1]))
            if (layer in previous) != now:  # the first step in a new branch
                fresh += 1
                g_in = basis.T @ grads[name] / (1 - q)
                if now:
                    g_in = (grads[name] - basis @ (basis.T @ grads[name])) / q
                assert torch.allclose(buf, g_in, atol=1e-5)
        previous = active
    assert fresh >= 2 * 7  # at least a layer in and a layer out of the full-rank branch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(32, 32), (64, 16), (16, 64), (128, 48)])
def test_newton_schulz_pushes_singular_values_near_one(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    u = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g))[0]
    v = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g))[0]
    x = u @ torch.diag(torch.logspace(-1, 1, min(shape))) @ v.T  # condition number 100
    y = newton_schulz(x, dtype=dtype)
    assert y.shape == x.shape and y.dtype == dtype
    y = y.float()
    s = torch.linalg.svdvals(y)
    assert s.min() > 0.5 and s.max() < 1.5, s
    u, _, vh = torch.linalg.svd(x, full_matrices=False)  # and the polar factor's directions
    assert torch.linalg.matrix_norm(y - u @ vh, ord=2) < 0.5


@pytest.mark.parametrize("active", [0, 4, 5])
def test_gum_refuses_active_layers_outside_one_to_layers_minus_one(active):
    with pytest.raises(ValueError, match=f"optimizer.active_layers={active}"):
        gum(toy(), active_layers=active)


def test_outlier_statistics_ignore_eval_and_no_grad_forwards():
    model = toy(layers=2)
    outliers = OutlierWeights([m for _, m in decoder_layers(model)], ratio=13.0)
    outliers.attach()
    outliers.collect(True)
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        model(x, x)
    model.eval()
    model(x, x)
    assert not outliers.sq
    model.train()
    model(x, x)
    assert len(outliers.sq) == 14  # 7 linears x 2 layers, from the training forward only


def test_frozen_units_are_marked_for_clipping_also_under_ddp(monkeypatch):
    """Under DDP frozen layers keep requires_grad (DDP needs them) and get gradients; the
    training loop clips over the other parameters, so the norm is the same as on one process."""
    from llmpt.optimizers import layerwise

    monkeypatch.setattr(layerwise, "replicated_world", lambda: True)
    model = toy(layers=4)
    opt = optimizers.build(method_cfg("lisa", active_layers=1, interval=2), model)
    frozen = {u for u in range(4)} - set(opt.active_units())
    for u, (_, layer) in enumerate(decoder_layers(model)):
        for p in layer.parameters():
            assert p.requires_grad
            assert getattr(p, "frozen_by_sampler", False) == (u in frozen)


def test_a_checkpoint_from_another_sampling_setup_is_refused():
    model = toy(layers=4)
    opt = optimizers.build(method_cfg("lisa", active_layers=1, interval=2), model)
    state = opt.state_dict()
    other = optimizers.build(method_cfg("lisa", active_layers=2, interval=2), toy(layers=4))
    with pytest.raises(ValueError, match="samples 2 of 4"):
        other.load_state_dict(state)
