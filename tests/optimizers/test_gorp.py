"""GORP (optimizers/low_rank.py ``Gorp`` + optimizers/task_subspace.py): GaLore until a task
ends; then an orthonormal subspace of the first moment, kept out of every later projected
gradient; less forgetting on a two-task toy; the subspace in checkpoints and in the formula."""

import io

import pytest
import torch
from torch import nn

from llmpt.optimizers.api import GaLore, Gorp, memory_formula, param_groups, state_nbytes
from llmpt.optimizers.projectors.svd import LEFT, RIGHT
from llmpt.optimizers.task_subspace import KEY, TaskSubspaceFilter
from tests.conftest import toy_llama

SETTINGS = dict(lr=1e-2, rank=4, update_gap=3, scale=0.25, eps=1e-6)
BATCH = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def steps(model, opt, n, batch=BATCH):
    for _ in range(n):
        model(batch, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_before_any_task_ends_it_is_galore_bit_for_bit():
    a, b = toy_llama(seed=0), toy_llama(seed=0)
    steps(a, GaLore(param_groups(a), **SETTINGS), 7)
    steps(b, Gorp(param_groups(b), **SETTINGS), 7)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_subspace_is_orthonormal_and_later_moments_stay_out_of_it():
    model = toy_llama(seed=0)
    opt = Gorp(param_groups(model), **SETTINGS)
    steps(model, opt, 5)
    widths = opt.end_task()
    projected = [p for g in opt.param_groups if g["projected"] for p in g["params"]]
    assert len(widths) == len(projected) and all(w >= 1 for w in widths.values())
    sides = set()
    for p in projected:
        state = opt.state[p]
        assert set(state) == {KEY}  # everything else restarts for the next task
        s = state[KEY]
        assert torch.allclose(s.T @ s, torch.eye(s.shape[1]), atol=1e-5)
    other = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(7))
    steps(model, opt, 4, other)  # the second task (a refresh at its step 3)
    for p in projected:
        state = opt.state[p]
        s, m = state[KEY], state["exp_avg"].float()
        sides.add(state["side"])
        # every R the moment summed was filtered: no component left in S
        inside = s.T @ m if state["side"] == RIGHT else m @ s
        assert inside.norm() < 1e-5 * m.norm()
    assert sides == {LEFT, RIGHT}  # tall/square and wide matrices both


def test_a_later_task_grows_the_subspace_by_the_residual_only():
    f = TaskSubspaceFilter(threshold=0.9)
    state = {"side": RIGHT}
    torch.manual_seed(0)
    first = torch.randn(20, 3) @ torch.diag(torch.tensor([10.0, 1.0, 0.1]))
    assert f.extend(state, first) == 1  # 10^2 / (100 + 1 + 0.01) > 0.9
    # one column of LAPACK's column-major U counts as contiguous: the stored basis must still
    # own only its 20 values, not keep all of U alive (it did: 1.9 MB too much in make cl-bench)
    assert state[KEY].untyped_storage().nbytes() == 20 * 4
    s1 = state[KEY].clone()
    assert f.extend(state, first) == 1  # a task that moves along S adds nothing
    second = torch.randn(20, 3)
    k = f.extend(state, second)
    assert k > 1 and torch.equal(state[KEY][:, :1], s1)  # old directions kept as they were
    s = state[KEY]
    assert torch.allclose(s.T @ s, torch.eye(k), atol=1e-5)
    res = second - s @ (s.T @ second)
    assert res.square().sum() <= 0.1 * second.square().sum() + 1e-6  # 90% of it captured


def test_the_released_codes_count_may_keep_nothing():
    m = torch.zeros(10, 2)
    m[0, 0], m[1, 1] = 10.0, 1.0  # the first direction alone holds 99% of the energy
    ours, ref = {"side": RIGHT}, {"side": RIGHT}
    assert TaskSubspaceFilter(0.9).extend(ours, m) == 1
    assert TaskSubspaceFilter(0.9, compat="reference").extend(ref, m) == 0
    assert TaskSubspaceFilter.apply(ref, m) is m  # an empty subspace filters nothing


def regression_tasks(aligned: bool):
    """Two least-squares tasks on one 16 x 8 linear from the same inputs: A moves W0 by a large
    rank-1 change along the output direction u, B by a small one along a direction orthogonal
    to u (and wants W's u-component back at W0's). ``aligned``: u is a coordinate axis, so
    Adam's element-wise normalisation cannot leak the filtered component back."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(16, 8, generator=g)
    x = torch.randn(256, 8, generator=g)
    u = torch.zeros(16)
    if aligned:
        u[0] = 1.0
    else:
        u = torch.randn(16, generator=g)
        u /= u.norm()
    v, u2, v2 = (
        torch.randn(8, generator=g),
        torch.randn(16, generator=g),
        torch.randn(8, generator=g),
    )
    ta = w0 + 2.0 * torch.outer(u, v)
    tb = w0 + 0.3 * torch.outer(u2 - (u2 @ u) * u, v2)
    return w0, x, x @ ta.T, x @ tb.T


@torch.no_grad()
def loss(lin, x, y):
    return float(nn.functional.mse_loss(lin(x), y))


def forgetting(filtered: bool, aligned: bool) -> float:
    """How much task A's loss rises while task B is trained."""
    w0, x, ya, yb = regression_tasks(aligned)
    lin = nn.Linear(8, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w0)
    groups = [{"params": [lin.weight], "projected": True}]
    opt = Gorp(groups, lr=0.05, rank=4, update_gap=50, scale=1.0, eps=1e-8)
    for y in (ya, yb):
        for _ in range(200):
            nn.functional.mse_loss(lin(x), y).backward()
            opt.step()
            opt.zero_grad()
        if y is ya:
            learned = loss(lin, x, ya)
            if filtered:
                assert opt.end_task() == {"0": 1}  # A's change is rank 1
            else:  # the same restart, without a subspace
                opt.state.clear()
    assert learned < 1e-4  # task A was learned
    return loss(lin, x, ya) - learned


@pytest.mark.parametrize("aligned, ratio", [(True, 0.3), (False, 0.8)])
def test_the_filter_keeps_more_of_the_first_task_than_galore(aligned, ratio):
    kept, lost = forgetting(True, aligned), forgetting(False, aligned)
    assert lost > 1.0 and kept < ratio * lost


def test_the_subspace_survives_a_weights_only_checkpoint_and_is_counted():
    model = toy_llama(seed=0)
    opt = Gorp(param_groups(model), **SETTINGS)
    steps(model, opt, 4)
    opt.end_task()
    assert state_nbytes(opt) == memory_formula(opt)
    assert state_nbytes(opt)["projector"] > 0  # (only the subspaces are left)
    steps(model, opt, 2)
    assert state_nbytes(opt) == memory_formula(opt)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    twin = toy_llama(seed=0)
    twin.load_state_dict(model.state_dict())
    opt2 = Gorp(param_groups(twin), **SETTINGS)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    steps(model, opt, 3)
    steps(twin, opt2, 3)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_two_sided_projection_is_refused():
    model = toy_llama(seed=0)
    with pytest.raises(ValueError, match="proj_type=full: the task subspace"):
        Gorp(param_groups(model), proj_type="full")
    with pytest.raises(ValueError, match="threshold=0 must lie in"):
        Gorp(param_groups(model), threshold=0)
