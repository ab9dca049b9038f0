"""RSO (optimizers/rso.py): the reparametrization, its saved activations and gradients, the
outer loop against a hand-written reference, and the refusals."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from llm_pretrain import optim as optimizers
from llm_pretrain.memory import SavedTensorCounter, activation_bytes, grad_bytes
from llm_pretrain.train import train
from llmpt.optimizers.projectors.gaussian import draw_seed, gaussian
from llmpt.optimizers.rso import RsoLinear, RsoLinearFunction, linear_seed, unwrap, wrap
from tests.conftest import TINY, compose_cfg, toy_llama
from tests.test_train import losses_of


def rso_cfg(**overrides):
    cfg = compose_cfg(["optimizer=rso"]).optimizer
    OmegaConf.set_struct(cfg, False)
    cfg.rank, cfg.update_gap = 4, 3
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


class Net(nn.Module):
    """One targeted linear (with a bias) between two plain ones."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(6, 16)
        self.mlp = nn.Linear(16, 12)
        self.out = nn.Linear(12, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mlp(torch.tanh(self.inp(x)))))


def batches(n: int):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


def fit(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for x, y in batches(steps):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------- the reparametrized linear
def test_the_function_matches_autograd_on_the_dense_reparametrization():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    w0, bias = torch.randn(12, 16, generator=g), torch.randn(12, generator=g, requires_grad=True)
    b = torch.randn(12, 4, generator=g, requires_grad=True)
    p = gaussian((16, 4), 4, 7, "cpu", torch.float32)
    y = RsoLinearFunction.apply(x, w0, bias, b, None, 7, 4)
    ref_x, ref_bias, ref_b = (t.detach().clone().requires_grad_() for t in (x, bias, b))
    ref = F.linear(ref_x, w0, ref_bias) + F.linear(ref_x @ p, ref_b)
    assert torch.allclose(y, ref, atol=1e-6)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    ref.backward(dy)
    for got, want in [(x, ref_x), (bias, ref_bias), (b, ref_b)]:
        assert torch.allclose(got.grad, want.grad, atol=1e-5)


def test_the_function_passes_gradcheck_in_float64():
    g = torch.Generator().manual_seed(1)
    args = [
        torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(5, 7, generator=g, dtype=torch.float64),
        torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True),
    ]
    assert torch.autograd.gradcheck(
        lambda x, w, c, b: RsoLinearFunction.apply(x, w, c, b, None, 5, 2), args
    )


@pytest.mark.parametrize("store", [False, True])
def test_backward_keeps_x_p_not_x(store):
    """The saved activation of a wrapped linear is tokens x r instead of tokens x d_in."""
    d_in, d_out, r, tokens = 64, 48, 8, 40
    linear = nn.Linear(d_in, d_out, bias=False)
    x = torch.randn(tokens, d_in, requires_grad=True)

    def saved(module):
        counter = SavedTensorCounter(module)
        with counter:
            y = module(x * 1.0)  # a fresh activation, as inside a network
        y.sum().backward()
        return counter.bytes

    plain = saved(linear)
    linear.weight.grad = None
    rso = RsoLinear(linear, r, seed=1, store_projection=store)
    assert plain == tokens * d_in * 4
    assert saved(rso) == tokens * r * 4  # x P only: the stored P is a buffer, not an activation
    assert saved(rso) / plain == r / d_in
    assert rso.weight.grad is None and rso.rso_b.grad.shape == (d_out, r)


def test_the_llama_saves_fewer_activations_and_gradients():
    """Model level: with every attention and MLP linear wrapped, activations and gradients
    shrink (q, k and v share one saved input in the plain model, so the activation saving is
    smaller than r / d_in on that input; the attention and MLP internals remain)."""
    batch = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    plain, wrapped = toy_llama(), toy_llama()
    optimizers.build(rso_cfg(rank=4), wrapped)
    acts = [activation_bytes(m, batch, batch) for m in (plain, wrapped)]
    assert acts[1] < acts[0]
    for m in (plain, wrapped):
        m(batch, batch).backward()
    grads = [grad_bytes(m) for m in (plain, wrapped)]
    targeted = sum(
        mod.weight.numel()
        for n, mod in plain.named_modules()
        if isinstance(mod, nn.Linear) and ("attn" in n or "mlp" in n)
    )
    b_params = sum(m.rso_b.numel() for m in wrapped.modules() if isinstance(m, RsoLinear))
    assert grads[0] - grads[1] == (targeted - b_params) * 4


def test_seeds_follow_names_not_build_order_and_differ_between_linears():
    a, b = toy_llama(), toy_llama()
    wrap(a, ["attn", "mlp"], 4, seed=5)
    wrap(b, ["mlp"], 4, seed=5)  # built in another order: the mlp linears come first
    wrap(b, ["attn"], 4, seed=5)
    pa = {n: m.projection() for n, m in a.named_modules() if isinstance(m, RsoLinear)}
    pb = {n: m.projection() for n, m in b.named_modules() if isinstance(m, RsoLinear)}
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)
    q, k = pa["model.layers.0.self_attn.q_proj"], pa["model.layers.0.self_attn.k_proj"]
    assert not torch.equal(q, k)
    m = a.get_submodule("model.layers.0.self_attn.q_proj")
    assert int(m.rso_seed) == linear_seed(5, "model.layers.0.self_attn.q_proj")
    # N(0, 1/r): E[P^T P] = (d_in / r) I, here checked on the diagonal's mean
    assert q.pow(2).sum(0).mean() == pytest.approx(q.shape[0] / 4, rel=0.3)
    m.resample()
    assert not torch.equal(m.projection(), q) and int(m.rso_draw) == 1


# ---------------------------------------------------------------- the outer loop
def test_the_outer_step_merges_exactly_then_resamples_and_resets():
    model = Net()
    opt = optimizers.build(rso_cfg(update_gap=3), model)
    lin = model.mlp
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, (x, y) in enumerate(batches(3)):
        F.mse_loss(model(x), y).backward()
        for p in params:  # the per-layer path: Adam steps first, the count comes after
            opt.update_parameter(p)
            p.grad = None
        if i == 2:  # the step that ends the outer iteration: B has taken its last Adam step
            w0, b, p_old = lin.weight.clone(), lin.rso_b.detach().clone(), lin.projection()
        opt.step()
    assert torch.equal(lin.weight, torch.addmm(w0, b, p_old.t()))  # W0 + P B, bit for bit
    assert int(lin.rso_draw) == 1 and not torch.equal(lin.projection(), p_old)
    assert torch.count_nonzero(lin.rso_b) == 0
    state = opt.state[lin.rso_b]
    assert state["step"] == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()


def test_merge_and_unwrap_are_exact():
    model = Net()
    opt = optimizers.build(rso_cfg(update_gap=100), model)
    fit(model, opt, 4)
    lin = model.mlp
    w0, b, p = lin.weight.clone(), lin.rso_b.detach().clone(), lin.projection()
    assert b.abs().sum() > 0
    x = batches(1)[0][0]
    before = model(x).detach()
    lin.merge()
    assert torch.equal(lin.weight, torch.addmm(w0, b, p.t()))  # W0 + P B, bit for bit
    assert torch.allclose(lin.weight, w0 + b @ p.t(), atol=1e-6)
    lin.weight.copy_(w0)
    unwrap(model)
    assert type(model.mlp) is nn.Linear and model.mlp.weight.requires_grad
    assert torch.equal(model.mlp.weight, torch.addmm(w0, b, p.t()))
    assert torch.allclose(model(x), before, atol=1e-6)


@pytest.mark.parametrize("weight_decay, proximal", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.5)])
def test_matches_adam_on_b_with_merges_resamples_and_resets(weight_decay, proximal):
    """A hand-written RSO: torch's Adam(W) on B with a fixed P for tau steps, then W0 += B P^T,
    the next seeded P, B = 0 and a fresh Adam for B; the other tensors keep one AdamW."""
    tau, rank, steps, lr = 3, 4, 8, 0.01
    model = Net()
    opt = optimizers.build(
        rso_cfg(rank=rank, update_gap=tau, lr=lr, weight_decay=weight_decay, proximal=proximal),
        model,
    )
    ref = Net()
    w0 = ref.mlp.weight.detach().clone()
    bias = ref.mlp.bias
    seed = linear_seed(0, "mlp")
    b = nn.Parameter(torch.zeros(12, rank))
    plain = [ref.inp.weight, ref.inp.bias, bias, ref.out.weight]
    kw = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8)
    plain_opt = torch.optim.AdamW(plain, weight_decay=weight_decay, **kw)

    def inner_opt():
        if proximal:  # Adam's coupled L2 is the proximal term's gradient B / eta
            return torch.optim.Adam([b], weight_decay=proximal, **kw)
        return torch.optim.AdamW([b], weight_decay=weight_decay, **kw)

    b_opt, draw = inner_opt(), 0

    def ref_forward(x):
        p = gaussian((16, rank), rank, draw_seed(seed, draw), "cpu", torch.float32)
        h = torch.tanh(ref.inp(x))
        return ref.out(torch.tanh(F.linear(h, w0, bias) + F.linear(h @ p, b)))

    for t, (x, y) in enumerate(batches(steps), start=1):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        F.mse_loss(ref_forward(x), y).backward()
        w0.mul_(1 - lr * weight_decay)
        plain_opt.step()
        b_opt.step()
        plain_opt.zero_grad()
        b_opt.zero_grad()
        if t % tau == 0:
            p = gaussian((16, rank), rank, draw_seed(seed, draw), "cpu", torch.float32)
            with torch.no_grad():
                w0.addmm_(b, p.t())
                b.zero_()
            b_opt, draw = inner_opt(), draw + 1
    assert int(model.mlp.rso_draw) == draw == steps // tau
    assert (model.mlp.weight - w0).abs().max() <= 1e-6
    assert (model.mlp.rso_b - b).abs().max() <= 1e-6
    for got, want in zip(
        [model.inp.weight, model.inp.bias, model.mlp.bias, model.out.weight], plain, strict=True
    ):
        assert (got - want).abs().max() <= 1e-6


def test_a_stored_projection_trains_identically_and_is_counted():
    runs = {}
    for store in (False, True):
        model = Net()
        cfg = rso_cfg(store_projection=store)
        opt = optimizers.build(cfg, model)
        fit(model, opt, 7)
        runs[store] = (model.state_dict(), optimizers.state_nbytes(opt))
        assert optimizers.state_nbytes(opt) == optimizers.memory_formula("rso", Net(), cfg)
    for key, value in runs[False][0].items():
        assert torch.equal(value, runs[True][0][key]), key
    # P: d_in x r fp32 more, for the one wrapped linear
    assert runs[True][1]["projector"] - runs[False][1]["projector"] == 16 * 4 * 4


def test_memory_formula_leaves_the_model_alone():
    model = toy_llama()
    before = [n for n, _ in model.named_parameters()]
    formula = optimizers.memory_formula("rso", model, rso_cfg())
    assert [n for n, _ in model.named_parameters()] == before
    assert not any(isinstance(m, RsoLinear) for m in model.modules())
    # 14 linears: Adam on B (2 r d_out) and two int64 buffers; Adam on the 7 other tensors
    d_outs = [32, 32, 32, 32, 48, 48, 32] * 2
    other = sum(
        p.numel() for n, p in model.named_parameters() if "attn" not in n and "mlp" not in n
    )
    assert formula["moments"] == (sum(2 * d * 4 for d in d_outs) + 2 * other) * 4
    assert formula["projector"] == 14 * 24


def test_resume_needs_the_model_state_of_the_same_checkpoint():
    model = Net()
    opt = optimizers.build(rso_cfg(update_gap=2), model)
    fit(model, opt, 3)
    fresh = Net()
    opt2 = optimizers.build(rso_cfg(update_gap=2), fresh)
    with pytest.raises(ValueError, match="load the model state of the same checkpoint"):
        opt2.load_state_dict(opt.state_dict())  # the model is still at draw 0
    fresh.load_state_dict(model.state_dict())
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(fresh.mlp.projection(), model.mlp.projection())


def test_autocast_runs_in_bf16_and_keeps_fp32_gradients():
    model = toy_llama()
    optimizers.build(rso_cfg(), model)
    batch = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(batch, batch)
    loss.backward()
    lin = model.get_submodule("model.layers.0.mlp.down_proj")
    assert lin.rso_b.grad.dtype == torch.float32 and torch.isfinite(lin.rso_b.grad).all()
    assert lin.rso_b.grad.abs().sum() > 0


# ---------------------------------------------------------------- refusals
class WithEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp_table = nn.Embedding(10, 8)
        self.mlp = nn.Linear(8, 8)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp_in = nn.Linear(8, 8, bias=False)
        self.mlp_out = nn.Linear(8, 8, bias=False)
        self.mlp_out.weight = self.mlp_in.weight


@pytest.mark.parametrize(
    "model, overrides, error, match",
    [
        (WithEmbedding, {}, TypeError, "nn.Linear modules only: mlp_table is a Embedding"),
        (Tied, {}, ValueError, "tied weights"),
        (Net, {"rank": 0}, ValueError, "rank=0 must be a positive integer"),
        (Net, {"rank": 17}, ValueError, r"rank must lie in \[1, d_in=16\]"),
        (Net, {"update_gap": 0}, ValueError, "update_gap=0 must be >= 1"),
        (Net, {"proximal": -1.0}, ValueError, "proximal=-1.0 must be >= 0"),
        (Net, {"target_modules": ["attn"]}, ValueError, "matches no nn.Linear"),
    ],
)
def test_bad_input_is_refused(model, overrides, error, match):
    net = model()
    before = [type(m) for m in net.modules()]
    with pytest.raises(error, match=match):
        optimizers.build(rso_cfg(rank=overrides.pop("rank", 4), **overrides), net)
    assert [type(m) for m in net.modules()] == before  # nothing was wrapped


def test_a_rank_too_large_for_one_linear_leaves_the_others_unwrapped():
    model = toy_llama()  # 32 x 32 attention, 48 x 32 and 32 x 48 MLP: d_in 48 for down_proj only
    # layer 0's down_proj (d_in 48) comes before layer 1's q_proj (d_in 32), which is refused
    cfg = rso_cfg(rank=40, target_modules=["down_proj", "layers.1.self_attn"])
    with pytest.raises(ValueError, match=r"rank must lie in \[1, d_in=32\]"):
        optimizers.build(cfg, model)
    assert not any(isinstance(m, RsoLinear) for m in model.modules())


# ---------------------------------------------------------------- in training
def test_rso_trains_the_model_and_resumes_exactly(tmp_path):
    base = [
        *TINY,
        "optimizer=rso",
        "optimizer.rank=8",
        "optimizer.update_gap=4",
        "optimizer.lr=0.01",
        "trainer.max_steps=40",
        "trainer.warmup_steps=4",
    ]
    s = train(compose_cfg(base), tmp_path / "rso")
    adamw = train(compose_cfg([*TINY, "trainer.max_steps=1"]), tmp_path / "adamw")
    assert s["eval"]["final_ppl"] < 0.5 * s["eval"]["initial_ppl"]
    mem, ref = s["memory"], adamw["memory"]
    assert mem["activations"] < ref["activations"] and mem["gradients"] < ref["gradients"]
    assert mem["optimizer_state"] < ref["optimizer_state"]

    # resumed mid-subspace (step 5 of tau 4): bit-identical losses
    short = [*base, "trainer.max_steps=10", "trainer.eval_every=0"]
    straight = losses_of(tmp_path / "straight", [*short, "checkpoint.every=5"])
    ckpt = tmp_path / "straight" / "checkpoints" / "step_00000005.pt"
    resumed = losses_of(tmp_path / "resumed", [*short, f"checkpoint.resume={ckpt}"])
    assert len(resumed) == 5 and resumed == straight[5:]


def test_a_stored_projection_is_redrawn_for_the_loaded_draw():
    """Loading a state at draw 2 into a fresh model (at draw 0) gives the draw-2 P, not the one
    drawn when the fresh model was wrapped."""
    trained = RsoLinear(nn.Linear(12, 8), 3, seed=4, store_projection=True)
    trained(torch.randn(2, 12))
    for _ in range(2):
        trained.resample()
    fresh = RsoLinear(nn.Linear(12, 8), 3, seed=4, store_projection=True)
    assert not torch.equal(fresh.projection(), trained.projection())
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.projection(), trained.projection())
