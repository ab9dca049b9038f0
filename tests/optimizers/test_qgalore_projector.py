"""Q-GaLore's projector: quantized basis, exact state bytes, lazy refresh, checkpoint resume."""

import io

import pytest
import torch

from llmpt.optimizers.accounting import state_nbytes
from llmpt.optimizers.projectors import LEFT, RIGHT, SvdProjector
from llmpt.optimizers.projectors.quantized import QuantizedSvdProjector
from llmpt.optimizers.subspace import SubspaceOptimizer

TALL, WIDE = (96, 48), (40, 120)


def run(projector, grads, state=None, first_step=0):
    """The optimizer's loop around the projector; returns the steps that refreshed."""
    state = {} if state is None else state
    refreshed = []
    for step, grad in enumerate(grads, start=first_step):
        if projector.due(state, step):
            projector.refresh(state, grad)
            refreshed.append(step)
        state["step"] = step + 1
    return state, refreshed


def fixed_direction_grads(shape, n, seed=0):
    """A fixed rank-4 signal with a clear top singular value, plus fresh noise each step."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(shape[0], 4, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(shape[1], 4, generator=gen))
    signal = u @ torch.diag(torch.tensor([10.0, 5.0, 4.0, 3.0])) @ v.T
    return [signal + 0.01 * torch.randn(shape, generator=gen) for _ in range(n)]


def random_grads(shape, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def test_full_projection_refused():
    with pytest.raises(ValueError, match="proj_type=full: Q-GaLore .* one-sided"):
        QuantizedSvdProjector(rank=4, update_gap=2, proj_type="full")


@pytest.mark.parametrize(
    "kwargs,match",
    [({"proj_bits": 2}, "proj_bits=2"), ({"proj_group_size": 0}, "proj_group_size=0"),
     ({"queue_size": 0}, "queue_size=0"), ({"growth": 0.5}, "growth=0.5")],
)  # fmt: skip
def test_bad_config_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizedSvdProjector(rank=4, update_gap=2, **kwargs)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,side", [(TALL, RIGHT), (WIDE, LEFT)])
def test_projection_close_to_fp32_basis(bits, shape, side):
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    exact, quant = {}, {}
    SvdProjector(rank=8, update_gap=2).refresh(exact, grad)
    QuantizedSvdProjector(rank=8, update_gap=2, proj_bits=bits, proj_group_size=64).refresh(
        quant, grad
    )
    projector = QuantizedSvdProjector(rank=8, update_gap=2, proj_bits=bits, proj_group_size=64)
    assert quant["side"] == exact["side"] == side
    floats = {k for k, t in quant.items() if torch.is_tensor(t) and t.is_floating_point()}
    assert floats == {"basis_scale", "basis_zero", "cos_queue"}  # no dense basis kept
    basis = projector.dequantized(quant, torch.float32)
    assert basis.shape == exact["basis"].shape
    # the basis is off by at most half a quantization step per value ...
    step = quant["basis_scale"].repeat_interleave(64)[: basis.numel()].view(basis.shape)
    error = basis - exact["basis"]
    assert (error.abs() <= step / 2 * (1 + 1e-5)).all()
    # ... so the projection is off by at most ||G||_2 ||dB||_F
    low, low_exact = projector.project(quant, grad), SvdProjector.project(exact, grad)
    bound = torch.linalg.matrix_norm(grad, ord=2) * torch.linalg.matrix_norm(step / 2)
    assert (low - low_exact).norm() <= bound
    assert (low - low_exact).norm() / low_exact.norm() < (0.2 if bits == 4 else 0.02)
    # back-projection uses the same dequantized basis, with or without accumulation
    back = basis @ low if side == LEFT else low @ basis
    torch.testing.assert_close(projector.project_back(quant, low), back)
    out = torch.ones(shape)
    projector.add_back(quant, out, low, alpha=0.25)
    torch.testing.assert_close(out, 1 + 0.25 * back)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,group_size", [(TALL, 256), (WIDE, 256), ((33, 19), 7)])
def test_state_bytes_equal_memory(bits, dtype, shape, group_size):
    projector = QuantizedSvdProjector(
        rank=5, update_gap=2, proj_bits=bits, proj_group_size=group_size
    )
    state, _ = run(projector, [g.to(dtype) for g in random_grads(shape, 3)])
    assert state["basis_scale"].dtype == state["basis_zero"].dtype == dtype
    assert state["cos_queue"].dtype == torch.float32
    memory = projector.memory(shape, dtype)
    assert state_nbytes([state]) == memory
    assert memory["projector"] > 0 and memory["quantization"] > 0 and memory["other"] == 20


def test_4bit_codes_take_half_the_bytes_of_8bit():
    grad = torch.randn(TALL)
    codes = {}
    for bits in (4, 8):
        state = {}
        QuantizedSvdProjector(rank=8, update_gap=2, proj_bits=bits).refresh(state, grad)
        codes[bits] = state["basis_codes"].nbytes
    assert codes[8] == 8 * TALL[1] and codes[4] * 2 == codes[8]


@pytest.mark.parametrize("shape", [TALL, WIDE])
def test_gap_grows_while_the_top_direction_stays(shape):
    projector = QuantizedSvdProjector(rank=4, update_gap=2, proj_group_size=64)
    state, refreshed = run(projector, fixed_direction_grads(shape, 40))
    # refresh 0 has no predecessor; 2..10 fill the FIFO; the 5th cosine doubles the gap, and
    # the FIFO is not cleared, so every later refresh doubles it again
    # refreshes fall on multiples of the current gap (the reference's iter % T == 0)
    assert refreshed == [0, 2, 4, 6, 8, 10, 12, 16, 32]
    assert state["gap"] == 32 and state["cos_count"] == 8
    assert (state["cos_queue"] > 0.99).all()


def test_gap_schedule_step_by_step():
    projector = QuantizedSvdProjector(rank=4, update_gap=3, proj_group_size=64)
    state, gaps = {}, []
    for step, grad in enumerate(fixed_direction_grads(TALL, 25)):
        if projector.due(state, step):
            projector.refresh(state, grad)
            gaps.append((step, state["gap"]))
        state["step"] = step + 1
    assert gaps == [(0, 3), (3, 3), (6, 3), (9, 3), (12, 3), (15, 6), (18, 12), (24, 24)]


def test_gap_stays_when_directions_change():
    projector = QuantizedSvdProjector(rank=4, update_gap=2, proj_group_size=64)
    state, refreshed = run(projector, random_grads(TALL, 40))
    assert refreshed == list(range(0, 40, 2))
    assert state["gap"] == 2 and state["cos_count"] == 19
    assert state["cos_queue"].mean() < 0.4


class FlippingSvd(QuantizedSvdProjector):
    """SVD's sign ambiguity made deterministic: every other SVD returns (-U, -V^T), an equally
    valid factorization of the same matrix."""

    calls = 0

    def _svd(self, g, r):
        u, sigma, vh = super()._svd(g, r)
        self.calls += 1
        return (-u, sigma, -vh) if self.calls % 2 == 0 else (u, sigma, vh)


@pytest.mark.parametrize("shape", [TALL, WIDE])
def test_signed_and_absolute_cosine_differ_on_a_sign_flip(shape):
    grads = fixed_direction_grads(shape, 30)
    signed_state, signed = run(FlippingSvd(4, 2, proj_group_size=64, abs_cos=False), grads)
    abs_state, absolute = run(FlippingSvd(4, 2, proj_group_size=64, abs_cos=True), grads)
    assert (signed_state["cos_queue"] < -0.99).all()  # the reference's cosine: "changed"
    assert signed == list(range(0, 30, 2)) and signed_state["gap"] == 2
    assert (abs_state["cos_queue"] > 0.99).all()
    assert absolute == [0, 2, 4, 6, 8, 10, 12, 16] and abs_state["gap"] == 16


def test_state_survives_weights_only_checkpoint_and_resumes_identically():
    """Saved with a part-filled FIFO; the direction then turns random, so the gap grows while
    the stable cosines dominate the FIFO's mean and stops once they have left it."""
    grads = fixed_direction_grads(TALL, 10, seed=3) + random_grads(TALL, 50, seed=4)
    projector = QuantizedSvdProjector(rank=4, update_gap=2, proj_group_size=64)
    state, before = run(projector, grads[:7])
    assert before == [0, 2, 4, 6] and state["cos_count"] == 3
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    live, after = run(projector, grads[7:], state, first_step=7)
    fresh = QuantizedSvdProjector(rank=4, update_gap=2, proj_group_size=64)
    resumed, after_resumed = run(fresh, grads[7:], loaded, first_step=7)
    assert after == after_resumed == [8, 10, 12, 16, 32, 48]
    assert live["gap"] == 16
    assert live.keys() == resumed.keys()
    for key, value in live.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed[key]), key
        else:
            assert value == resumed[key], key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runs_inside_subspace_optimizer_and_resumes(dtype):
    """The optimizer's own step counter drives the schedule, and its state_dict round trip
    keeps the fp32 FIFO and gives the same updates."""

    def make():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(TALL, dtype=dtype))
        projector = QuantizedSvdProjector(rank=4, update_gap=2, proj_group_size=64)
        group = {"params": [w], "projected": True}
        opt = SubspaceOptimizer([group], 1e-2, (0.9, 0.95), 1e-8, 0.0, projector, 0.25)
        return w, opt

    grads = [g.to(dtype) for g in fixed_direction_grads(TALL, 16, seed=6)]
    w, opt = make()
    for g in grads[:8]:
        w.grad = g
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    w2, opt2 = make()
    w2.data.copy_(w.data)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt2.state[w2]["cos_queue"].dtype == torch.float32
    for g in grads[8:]:
        w.grad, w2.grad = g, g.clone()
        opt.step()
        opt2.step()
    assert torch.equal(w, w2)
    state = opt.state[w]
    assert state["gap"] == 8  # refreshed at 0, 2, ..., 10 (gap 4), 12 (gap 8)
    moments = 2 * TALL[0] * 4 * dtype.itemsize
    expected = opt.projector.memory(TALL, dtype)
    expected["moments"] += moments
    assert opt.state_nbytes() == expected == opt.memory_formula()
