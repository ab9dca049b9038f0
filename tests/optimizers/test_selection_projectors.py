"""GRASS, I3S and DCT-AdamW: each paper's defining property of its projector, checked against an
independent dense computation (selection matrices, singular vectors, the DCT-II basis)."""

import itertools
import math

import pytest
import torch
from omegaconf import OmegaConf

from llm_pretrain import optim as optimizers
from llmpt.optimizers.accounting import state_nbytes
from llmpt.optimizers.projectors import CoordinateProjector, SvdProjector
from llmpt.optimizers.projectors.dct import DctProjector, dct_basis, dct_rows, idct_rows
from llmpt.optimizers.projectors.svd import LEFT, RIGHT
from llmpt.optimizers.rules import AdamRule
from llmpt.optimizers.subspace import SubspaceOptimizer
from llmpt.optimizers.transitions import MomentTransition
from tests.conftest import compose_cfg, toy_llama

TALL, WIDE = (20, 12), (12, 20)  # std: a tall matrix keeps columns (RIGHT), a wide one rows


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def uneven(shape, seed=0, dtype=torch.float64):
    """A gradient whose rows and columns have clearly different norms."""
    g = randn(*shape, seed=seed, dtype=dtype)
    rows = torch.linspace(0.2, 3.0, shape[0], dtype=dtype)[torch.randperm(shape[0])]
    cols = torch.linspace(0.2, 3.0, shape[1], dtype=dtype)[torch.randperm(shape[1])]
    return g * rows[:, None] * cols[None, :]


def selection_matrix(state, dtype=torch.float64):
    """rho B: r x full_dim, row j is rho_j e_{indices[j]}."""
    idx = state["indices"]
    b = torch.zeros(idx.numel(), state["full_dim"], dtype=dtype)
    b[torch.arange(idx.numel()), idx] = 1.0
    rho = state["scales"].to(dtype) if "scales" in state else torch.ones(idx.numel(), dtype=dtype)
    return rho[:, None] * b


def adam_group(params, projector, **kw):
    return SubspaceOptimizer(
        [{"params": params, "projected": True}],
        lr=0.01,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        projector=projector,
        scale=kw.pop("scale", 1.0),
        **kw,
    )


# ====================================================================== GRASS
GRASS_CASES = [
    ("top", False),
    ("norm", False),
    ("norm", True),
    ("uniform", False),
    ("uniform", True),
]


@pytest.mark.parametrize("shape", [TALL, WIDE], ids=["columns", "rows"])
@pytest.mark.parametrize("selection, replacement", GRASS_CASES)
def test_grass_projection_is_the_selection_matrix_product(shape, selection, replacement):
    """R = P^T G with P = (rho B)^T: rows (left) or columns (right) gathered and scaled; the
    back-projection is P N, a scatter-add."""
    r = 5
    proj = CoordinateProjector(
        None, 10, "std", rank=r, selection=selection, replacement=replacement
    )
    g = uneven(shape, seed=1)
    state = {"seed": 3}
    proj.refresh(state, g)
    side = state["side"]
    assert side == (RIGHT if shape == TALL else LEFT)
    assert state["full_dim"] == (shape[1] if side == RIGHT else shape[0])
    assert state["indices"].shape == (r,) and state["indices"].dtype == torch.int64
    assert ("scales" in state) == replacement
    pt = selection_matrix(state)  # P^T
    before = g.clone()
    low = proj.project(state, g)
    assert torch.equal(g, before)  # the gradient is left as it was
    expected = pt @ g if side == LEFT else g @ pt.T
    assert low.shape == expected.shape
    torch.testing.assert_close(low, expected, rtol=1e-12, atol=1e-12)

    n = randn(*low.shape, seed=2)
    back = pt.T @ n if side == LEFT else n @ pt
    torch.testing.assert_close(proj.project_back(state, n), back, rtol=1e-12, atol=1e-12)
    out = randn(*shape, seed=4)
    want = out - 0.3 * back
    proj.add_back(state, out, n, -0.3)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    if replacement:
        # rho_j = 1 / sqrt(r q_j), q from the squared norms (norm) or 1 / dim (uniform)
        norms = g.norm(dim=1 if side == LEFT else 0) ** 2
        q = (
            norms / norms.sum()
            if selection == "norm"
            else torch.full_like(norms, 1 / norms.numel())
        )
        rho = 1.0 / (r * q[state["indices"]]).sqrt()
        torch.testing.assert_close(state["scales"], rho, rtol=1e-6, atol=0)  # fp32 norms
    else:
        assert torch.equal(state["indices"], state["indices"].sort().values)
        assert state["indices"].unique().numel() == r


@pytest.mark.parametrize("shape", [TALL, WIDE], ids=["columns", "rows"])
def test_grass_top_selection_is_the_r_largest_norms(shape):
    r = 4
    proj = CoordinateProjector(None, 10, "std", rank=r, selection="top")
    for seed in range(5):
        g = uneven(shape, seed=seed, dtype=torch.float32)
        state = {}
        proj.refresh(state, g)
        side_axis = 0 if state["side"] == LEFT else 1  # the axis the coordinates run along
        norms = [math.sqrt(sum(float(x) ** 2 for x in vec)) for vec in g.unbind(side_axis)]
        ranked = sorted(range(len(norms)), key=lambda i: -norms[i])[:r]
        assert state["indices"].tolist() == sorted(ranked)


def test_grass_norm_sampling_with_replacement_is_unbiased():
    """E[P P^T] = I: the average of P P^T G over independent draws approaches G, while the same
    draws without the scales rho (plain B^T B) are visibly biased toward the large rows."""
    r, draws = 3, 3000
    g = uneven((8, 14), seed=5)  # wide: rows are selected
    proj = CoordinateProjector(None, 10, "std", rank=r, selection="norm", replacement=True)
    total, plain = torch.zeros_like(g), torch.zeros_like(g)
    for seed in range(draws):
        state = {"seed": seed}
        proj.refresh(state, g)
        assert state["side"] == LEFT
        total += proj.project_back(state, proj.project(state, g))
        plain.index_add_(0, state["indices"], g[state["indices"]])
    err = (total / draws - g).norm() / g.norm()
    assert err < 0.06, err
    assert (plain / draws - g).norm() / g.norm() > 0.3


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)], ids=["rows", "columns"])
def test_grass_only_selected_coordinates_move_between_refreshes(shape):
    r, gap = 3, 5
    w = torch.nn.Parameter(randn(*shape, seed=7, dtype=torch.float32))
    proj = CoordinateProjector(None, gap, "std", rank=r, selection="norm")
    opt = adam_group([w], proj, scale=0.25)
    start = w.detach().clone()
    indices = None
    for t in range(gap):  # steps 0 .. gap-1: one selection, at step 0
        w.grad = uneven(shape, seed=100 + t, dtype=torch.float32)
        opt.step()
        if indices is None:
            indices = opt.state[w]["indices"].clone()
        assert torch.equal(opt.state[w]["indices"], indices)
    axis = 0 if shape[0] < shape[1] else 1
    kept = torch.zeros(shape[axis], dtype=torch.bool)
    kept[indices] = True
    moved = (w.detach() != start).any(dim=1 - axis)
    assert torch.equal(moved, kept)  # exactly the selected rows (columns) changed
    untouched = w.detach().index_select(axis, (~kept).nonzero().flatten())
    assert torch.equal(untouched, start.index_select(axis, (~kept).nonzero().flatten()))
    w.grad = uneven(shape, seed=200, dtype=torch.float32)
    opt.step()  # step gap: a new selection
    assert opt.state[w]["draws"] == 2


class _DenseProductCalled(AssertionError):
    pass


DENSE = [
    (torch.Tensor, "__matmul__"),
    (torch.Tensor, "__rmatmul__"),
    (torch.Tensor, "matmul"),
    (torch.Tensor, "mm"),
    (torch.Tensor, "addmm"),
    (torch.Tensor, "addmm_"),
    (torch.Tensor, "bmm"),
    (torch, "matmul"),
    (torch, "mm"),
    (torch, "addmm"),
    (torch, "bmm"),
    (torch, "einsum"),
]


def _forbid_dense(monkeypatch):
    def refuse(*args, **kwargs):
        raise _DenseProductCalled("a dense matrix product was called")

    for owner, name in DENSE:
        monkeypatch.setattr(owner, name, refuse)


@pytest.mark.parametrize("replacement", [False, True])
@pytest.mark.parametrize("shape", [TALL, WIDE], ids=["columns", "rows"])
def test_grass_projection_needs_no_matrix_product(monkeypatch, shape, replacement):
    g = uneven(shape, seed=8, dtype=torch.float32)
    proj = CoordinateProjector(None, 10, "std", rank=4, selection="norm", replacement=replacement)
    with monkeypatch.context() as m:
        _forbid_dense(m)
        with pytest.raises(_DenseProductCalled):
            g @ g.T  # the patch is live
        state = {}
        proj.refresh(state, g)
        low = proj.project(state, g)
        out = torch.zeros_like(g)
        proj.add_back(state, out, low, 1.0)
        back = proj.project_back(state, low)
        svd = SvdProjector(4, 10, "std")
        svd_state = {}
        svd.refresh(svd_state, g)
        with pytest.raises(_DenseProductCalled):  # a dense projector is caught by the patch
            svd.project(svd_state, g)
    pt = selection_matrix(state, torch.float32)
    dense = pt.T @ (pt @ g) if state["side"] == LEFT else (g @ pt.T) @ pt
    torch.testing.assert_close(out, dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(back, dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("selection, replacement", GRASS_CASES)
def test_grass_state_is_indices_and_scales_only(selection, replacement, dtype):
    r = 5
    proj = CoordinateProjector(
        None, 10, "std", rank=r, selection=selection, replacement=replacement
    )
    for shape in (TALL, WIDE):
        state = {"seed": 1}
        proj.refresh(state, uneven(shape, seed=9).to(dtype))
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        assert set(tensors) == ({"indices", "scales"} if replacement else {"indices"})
        assert tensors["indices"].dtype == torch.int64 and tensors["indices"].shape == (r,)
        if replacement:
            assert tensors["scales"].dtype == dtype and tensors["scales"].shape == (r,)
        held = {k: v for k, v in state_nbytes([state]).items() if v}
        assert held == proj.memory(shape, dtype)
        assert sum(held.values()) == r * 8 + (r * dtype.itemsize if replacement else 0)


def test_grass_optimizer_state_matches_its_formula():
    shapes = [TALL, WIDE, (16, 16)]
    mats = [
        torch.nn.Parameter(randn(*s, seed=i, dtype=torch.float32)) for i, s in enumerate(shapes)
    ]
    proj = CoordinateProjector(None, 2, "std", rank=4, selection="norm", replacement=True)
    opt = adam_group(mats, proj, scale=0.25)
    for t in range(3):
        for i, p in enumerate(mats):
            p.grad = uneven(p.shape, seed=10 * t + i, dtype=torch.float32)
        opt.step()
    assert opt.state_nbytes() == opt.memory_formula()
    assert opt.state_nbytes()["indices"] == 3 * 4 * 8
    assert (
        opt.state_nbytes()["moments"] == 2 * 4 * (20 + 20 + 16) * 4
    )  # M and V: 20 x 4, 4 x 20, 16 x 4


# ====================================================================== I3S
SPECTRUM = torch.tensor([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)


def with_spectrum(m, n, s, seed=0):
    """G = U diag(s) V^T with known orthonormal U (m x k) and V (n x k), k = len(s)."""
    k = len(s)
    u = torch.linalg.qr(randn(m, k, seed=seed))[0]
    v = torch.linalg.qr(randn(n, k, seed=seed + 1))[0]
    return u @ torch.diag(s) @ v.T, u, v


def kept_singular_indices(state, u, v):
    """Which singular vectors the basis holds: each basis vector must be +-u_i (left) or +-v_i
    (right) for exactly one i."""
    if state["side"] == LEFT:
        overlap = (state["basis"].double().T @ u).abs()  # r x k
    else:
        overlap = (state["basis"].double() @ v).abs()
    best = overlap.max(dim=1)
    assert torch.allclose(best.values, torch.ones_like(best.values), atol=1e-5)
    second = overlap.sort(dim=1, descending=True).values[:, 1]
    assert second.max() < 1e-4
    return best.indices.tolist()


def exact_inclusion(weights, r):
    """P(i among r draws without replacement, each draw proportional to weights)."""
    w = [float(x) for x in weights]
    incl = [0.0] * len(w)
    for order in itertools.permutations(range(len(w)), r):
        prob, left = 1.0, sum(w)
        for i in order:
            prob *= w[i] / left
            left -= w[i]
        for i in order:
            incl[i] += prob
    return incl


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)], ids=["right", "left"])
def test_i3s_keeps_r_distinct_singular_vectors(shape):
    r = 3
    g, u, v = with_spectrum(*shape, SPECTRUM)
    proj = SvdProjector(r, 10, "std", selection="sample")
    chosen_sets = set()
    for seed in range(20):
        state = {"seed": seed}
        proj.refresh(state, g.float())
        assert state["side"] == (RIGHT if shape[0] >= shape[1] else LEFT)
        idx = kept_singular_indices(state, u, v)
        assert idx == sorted(set(idx)) and len(idx) == r  # distinct, in ascending order
        chosen_sets.add(tuple(idx))
        p = state["basis"].double()
        gram = p.T @ g @ g.T @ p if state["side"] == LEFT else p @ g.T @ g @ p.T
        torch.testing.assert_close(gram, torch.diag(SPECTRUM[idx] ** 2), rtol=1e-5, atol=1e-4)
    assert len(chosen_sets) > 1  # not always the top r


def test_i3s_draws_in_proportion_to_singular_values():
    r, draws = 3, 3000
    g, u, v = with_spectrum(12, 8, SPECTRUM)
    proj = SvdProjector(r, 10, "std", selection="sample")
    counts = torch.zeros(len(SPECTRUM))
    for seed in range(draws):
        state = {"seed": seed}
        proj.refresh(state, g.float())
        counts[kept_singular_indices(state, u, v)] += 1
    freq = counts.double() / draws
    exact = torch.tensor(exact_inclusion(SPECTRUM, r), dtype=torch.float64)
    assert abs(float(exact.sum()) - r) < 1e-9
    assert (freq - exact).abs().max() < 0.04, (freq, exact)
    assert freq[0] > freq[-1] + 0.4
    # the top-r rule would give frequencies (1, 1, 1, 0, ...): far from these
    assert freq[:r].min() < 0.8 and freq[r:].sum() > 0.6


def test_i3s_draws_are_a_function_of_seed_and_refresh_count():
    g, _, _ = with_spectrum(12, 8, SPECTRUM)
    g = g.float()
    proj = SvdProjector(3, 10, "std", selection="sample")
    histories = {}
    for seed in range(12):
        a, b = {"seed": seed}, {"seed": seed}
        runs = []
        for _ in range(3):
            proj.refresh(a, g)
            proj.refresh(b, g)
            assert torch.equal(a["basis"], b["basis"])
            runs.append(a["basis"].clone())
        histories[seed] = runs
        assert a["draws"] == 3
    firsts = {tuple(h[0].flatten().tolist()) for h in histories.values()}
    assert len(firsts) > 1  # different seeds draw different vectors
    assert any(not torch.equal(h[0], h[1]) for h in histories.values())  # and each refresh anew


def test_i3s_bad_input_is_refused():
    with pytest.raises(ValueError, match="SVD basis and a one-sided"):
        SvdProjector(4, 10, "std", basis="random", selection="sample")
    with pytest.raises(ValueError, match="SVD basis and a one-sided"):
        SvdProjector(4, 10, "full", selection="sample")
    with pytest.raises(ValueError, match="selection='foo'"):
        SvdProjector(4, 10, "std", selection="foo")


# ====================================================================== DCT
@pytest.mark.parametrize("n", [7, 8, 64, 512])
def test_dct_basis_is_orthonormal_dct2(n):
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        c = dct_basis(n, dtype)
        assert c.shape == (n, n) and c.dtype == dtype
        assert (c.T @ c - torch.eye(n, dtype=dtype)).abs().max() < tol
        assert (c @ c.T - torch.eye(n, dtype=dtype)).abs().max() < tol
    c = dct_basis(n, torch.float64)
    for k in sorted({0, 1, 2, n // 2, n - 1}):
        col = [
            (
                math.sqrt(1 / n)
                if k == 0
                else math.sqrt(2 / n) * math.cos(math.pi * k * (2 * j + 1) / (2 * n))
            )
            for j in range(n)
        ]
        torch.testing.assert_close(
            c[:, k], torch.tensor(col, dtype=torch.float64), rtol=0, atol=1e-13
        )


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 33, 64])
def test_fft_dct_equals_the_basis_product(n):
    x = randn(5, n, seed=n, dtype=torch.float32)
    c = dct_basis(n, torch.float64)
    want = (x.double() @ c).float()
    got = dct_rows(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(idct_rows(x), (x.double() @ c.T).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(idct_rows(dct_rows(x)), x, rtol=1e-5, atol=1e-5)
    batched = randn(2, 3, n, seed=n + 1, dtype=torch.float32)
    torch.testing.assert_close(
        dct_rows(batched), (batched.double() @ c).float(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("norm", [1.0, 2.0])
@pytest.mark.parametrize("shape", [(24, 16), (16, 24)], ids=["right", "left"])
def test_dct_selects_the_most_aligned_columns(shape, norm):
    r = 5
    g = randn(*shape, seed=11, dtype=torch.float32)
    g2 = randn(*shape, seed=12, dtype=torch.float32)
    right = shape[0] >= shape[1]
    c = dct_basis(shape[1] if right else shape[0], torch.float64)
    s = g.double() @ c if right else c.T @ g.double()
    scores = s.abs().pow(norm).sum(dim=0 if right else 1)
    want = scores.topk(r).indices.sort().values
    results = {}
    for transform in ("matmul", "fft"):
        proj = DctProjector(r, 5, "std", norm=norm, transform=transform)
        state = {}
        proj.refresh(state, g)
        assert state["side"] == (RIGHT if right else LEFT)
        assert state["indices"].dtype == torch.int64
        assert torch.equal(state["indices"], want), transform
        ci = c[:, want]
        low = proj.project(state, g)  # the selection step: S[:, I]
        exp = (s[:, want] if right else s[want]).float()
        torch.testing.assert_close(low, exp, rtol=1e-4, atol=1e-4)
        low2 = proj.project(state, g2)  # between selections: G C[:, I]
        exp2 = (g2.double() @ ci if right else ci.T @ g2.double()).float()
        torch.testing.assert_close(low2, exp2, rtol=1e-4, atol=1e-4)
        back = (low2.double() @ ci.T if right else ci @ low2.double()).float()
        torch.testing.assert_close(proj.project_back(state, low2), back, rtol=1e-4, atol=1e-4)
        out = g2.clone()
        proj.add_back(state, out, low2, -1.0)  # G - C_I C_I^T G: no component left on I
        rest = out.double() @ ci if right else ci.T @ out.double()
        assert rest.abs().max() < 1e-4
        results[transform] = (low, low2)
    for a, b in zip(results["matmul"], results["fft"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("transform", ["matmul", "fft"])
def test_dct_basis_is_shared_per_dimension_and_memory_matches(transform):
    shapes = [(32, 16), (16, 32), (24, 16), (16, 24), (40, 24), (24, 24)]  # sides 16 and 24
    mats = [
        torch.nn.Parameter(randn(*s, seed=i, dtype=torch.float32)) for i, s in enumerate(shapes)
    ]
    vec = torch.nn.Parameter(torch.zeros(10))
    proj = DctProjector(4, 1, "std", transform=transform)
    opt = SubspaceOptimizer(
        [{"params": mats, "projected": True}, {"params": [vec], "projected": False}],
        lr=0.01,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        projector=proj,
        scale=1.0,
        rule=AdamRule("torch"),
        decay_first=True,
        transition=MomentTransition("abs"),
    )
    for t in range(3):
        for i, p in enumerate(mats + [vec]):
            p.grad = randn(*p.shape, seed=100 * t + i, dtype=torch.float32)
        opt.step()
    bases = proj.shared_tensors()["projector"]
    if transform == "matmul":
        assert sorted(tuple(b.shape) for b in bases) == [(16, 16), (24, 24)]
        assert opt.state_nbytes()["projector"] == (16 * 16 + 24 * 24) * 4
    else:
        assert bases == []
        assert opt.state_nbytes()["projector"] == 0
    assert opt.state_nbytes() == opt.memory_formula()
    assert opt.state_nbytes()["indices"] == len(shapes) * 4 * 8
    for p in mats:
        held = {k for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        assert held == {"indices", "exp_avg", "exp_avg_sq"}


def _dct_gradient(rows, n, strong, seed):
    """G = A C^T whose DCT coefficients A are small except for the columns ``strong`` (in
    decreasing strength), so the selection is known."""
    a = 0.05 * randn(rows, n, seed=seed, dtype=torch.float32)
    for rank, k in enumerate(strong):
        a[:, k] = (5.0 - rank) * (1.0 + 0.1 * randn(rows, seed=seed + 1 + k, dtype=torch.float32))
    c = dct_basis(n, torch.float64)
    return (a.double() @ c.T).float(), a


def test_dct_rotate_subspace_carries_moments_to_their_new_slots():
    """dct_adamw with rotate_subspace: M <- C_new^T C_old M (a 0/1 matching of the kept
    columns), V likewise with |.|; a newly selected column starts from zero."""
    name = "model.layers.0.mlp.gate_proj.weight"  # 48 x 32: columns, n = 32
    n, first, second = 32, [3, 9, 20], [9, 20, 27]  # 9 and 20 kept (slots 1, 2 -> 0, 1)
    g1, a1 = _dct_gradient(48, n, first, seed=1)
    g2, a2 = _dct_gradient(48, n, second, seed=2)
    moments = {}
    for rotate in (True, False):
        cfg = compose_cfg(
            [
                "optimizer=dct_adamw",
                "optimizer.rank=3",
                f"optimizer.rotate_subspace={str(rotate).lower()}",
            ]
        ).optimizer
        model = toy_llama(layers=2, seed=0)
        opt = optimizers.build(cfg, model)
        assert isinstance(opt.transition, MomentTransition) == rotate
        w = dict(model.named_parameters())[name]
        w.grad = g1.clone()
        opt.step()
        state = opt.state[w]
        assert state["indices"].tolist() == first
        m1, v1 = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
        torch.testing.assert_close(m1, 0.1 * a1[:, first], rtol=1e-4, atol=1e-5)
        w.grad = g2.clone()
        opt.step()
        assert state["indices"].tolist() == second
        moments[rotate] = (m1, v1, state["exp_avg"].clone(), state["exp_avg_sq"].clone())
    b1, b2 = 0.9, 0.999
    m1, v1, m2, v2 = moments[True]
    carried_m = torch.zeros_like(m1)
    carried_m[:, :2] = m1[:, 1:]
    carried_v = torch.zeros_like(v1)
    carried_v[:, :2] = v1[:, 1:]
    s2 = a2[:, second]
    torch.testing.assert_close(m2, b1 * carried_m + (1 - b1) * s2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v2, b2 * carried_v + (1 - b2) * s2**2, rtol=1e-4, atol=1e-6)
    assert (v2 >= 0).all()
    # the new column holds only this step's gradient, no trace of the dropped column 3
    torch.testing.assert_close(m2[:, 2], (1 - b1) * s2[:, 2], rtol=0, atol=1e-5)
    # without the transition the moments stay in their slots: column 3's moment lands on 9
    m1_, _, m2_plain, _ = moments[False]
    torch.testing.assert_close(m2_plain, b1 * m1_ + (1 - b1) * s2, rtol=1e-4, atol=1e-5)
    assert (m2_plain - m2).abs().max() > 0.1


def test_dct_adamw_built_model_shares_one_basis():
    cfg = compose_cfg(["optimizer=dct_adamw", "optimizer.rank=4"]).optimizer
    model = toy_llama(layers=2, seed=0)
    opt = optimizers.build(cfg, model)
    batch = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(batch, batch).backward()
    opt.step()
    bases = opt.projector.shared_tensors()["projector"]
    assert [tuple(b.shape) for b in bases] == [(32, 32)]  # every targeted side is 32
    assert opt.state_nbytes() == opt.memory_formula()


# ====================================================================== bad input
@pytest.mark.parametrize(
    "method, overrides, message",
    [
        ("dct_adamw", ["optimizer.rank=0"], "rank=0 must be a positive"),
        ("dct_adamw", ["optimizer.rank=4", "optimizer.update_gap=0"], "update_gap=0 must be"),
        ("dct_adamw", ["optimizer.rank=4", "optimizer.proj_type=full"], "one-sided"),
        ("dct_adamw", ["optimizer.rank=4", "optimizer.transform=dft"], "transform='dft'"),
        ("dct_adamw", ["optimizer.rank=33"], "rank=33 exceeds the 32 DCT columns"),
        ("grass", ["optimizer.rank=0"], "rank=0 must be a positive"),
        ("grass", ["optimizer.rank=4", "optimizer.selection=foo"], "selection='foo'"),
        (
            "grass",
            ["optimizer.rank=4", "optimizer.selection=top", "optimizer.replacement=true"],
            "replacement=true needs a random selection",
        ),
        ("grass", ["optimizer.rank=33"], "rank=33 exceeds the 32 coordinates"),
        ("i3s", ["optimizer.rank=0"], "rank=0 must be a positive"),
        ("i3s", ["optimizer.rank=33"], "rank=33 exceeds min"),
        ("i3s", ["optimizer.rank=4", "optimizer.proj_type=full"], "one-sided"),
    ],
)
def test_bad_input_is_refused(method, overrides, message):
    cfg = compose_cfg([f"optimizer={method}", *overrides]).optimizer
    with pytest.raises(ValueError, match=message):
        optimizers.build(cfg, toy_llama(layers=2, seed=0))


def test_valid_configs_build():
    """The refusals above are specific: the same methods at a valid rank build and step."""
    for method in ("dct_adamw", "grass", "i3s"):
        cfg = compose_cfg([f"optimizer={method}", "optimizer.rank=4"]).optimizer
        OmegaConf.set_struct(cfg, False)
        model = toy_llama(layers=2, seed=0)
        opt = optimizers.build(cfg, model)
        batch = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
        model(batch, batch).backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
