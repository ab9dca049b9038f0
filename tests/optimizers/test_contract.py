"""The contract every registered optimizer meets, run over the whole registry."""

import copy
import io

import pytest
import torch
from omegaconf import OmegaConf

from llm_pretrain import optim as optimizers
from llm_pretrain.config import TrainerConfig
from llm_pretrain.model import build_model
from llm_pretrain.schedule import build_scheduler
from llmpt.optimizers.projectors import SvdProjector
from tests.conftest import compose_cfg, toy_llama

METHODS = sorted(optimizers.METHODS)
LOW_RANK = [m for m in METHODS if "rank" in compose_cfg([f"optimizer={m}"]).optimizer]
# methods that reparametrize the model instead of projecting gradients (see test_rso.py)
REPARAMETRIZING = ["rso"]
# methods whose surgery renames parameters (WeLore: a low-rank component's weight becomes
# weight_a and weight_b) and freezes most of the model
RENAMING = ["welore"]


def optimizer_cfg(name: str):
    """The method's own defaults (its paper's lr), with a rank the toy model can take."""
    cfg = compose_cfg([f"optimizer={name}"]).optimizer
    OmegaConf.set_struct(cfg, False)
    if "rank" in cfg:  # small enough for the toy model, refreshed within the test
        cfg.rank, cfg.update_gap = 8, 2
    if "active_layers" in cfg:  # the toy has 2 decoder layers; switch within the test
        cfg.active_layers = 1
        if "interval" in cfg:
            cfg.interval = 2
    if "density" in cfg:  # FRUGAL: switch blocks within the test
        cfg.update_gap = 2
    if "window" in cfg:  # MicroAdam: 1% of the toy's small tensors is a handful of values
        cfg.density = 0.1
    if "min_8bit_size" in cfg:  # the toy's tensors are small: quantise the larger ones
        cfg.min_8bit_size = 300
    if name == "welore":  # its lr (1e-4) fine-tunes a pretrained 7B; the toy starts at random
        cfg.lr = 3e-2
    return cfg


def toy_model(seed=0):
    return toy_llama(layers=2, seed=seed)


BATCH = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def train_steps(model, opt, n, sched=None):
    losses = []
    for _ in range(n):
        loss = model(BATCH, BATCH)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name", METHODS)
def test_decreases_the_loss(name):
    model = toy_model()
    opt = optimizers.build(optimizer_cfg(name), model)
    losses = train_steps(model, opt, 60)
    assert losses[-1] < 0.8 * losses[0]  # Flora (RMS-relative lr, momentum): 0.75


def check_exact_resume(cfg, before: int = 3, after: int = 3) -> None:
    """Train ``before`` steps, save model, optimizer and schedule through ``torch.save`` +
    ``torch.load(weights_only=True)``, resume in a fresh model for ``after`` steps: the weights
    equal those of ``before + after`` straight steps, bit for bit."""
    tc = TrainerConfig(max_steps=10, warmup_steps=2)
    straight = toy_model()
    opt = optimizers.build(cfg, straight)
    train_steps(straight, opt, before + after, build_scheduler(opt, tc))

    first = toy_model()
    opt1 = optimizers.build(cfg, first)
    sched1 = build_scheduler(opt1, tc)
    train_steps(first, opt1, before, sched1)
    buf = io.BytesIO()
    torch.save(
        {"opt": opt1.state_dict(), "sched": sched1.state_dict(), "model": first.state_dict()}, buf
    )
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = toy_model(seed=99)
    # the training loop's order: build (RSO reparametrizes the model), then load both states
    opt2 = optimizers.build(cfg, resumed)
    resumed.load_state_dict(saved["model"])
    sched2 = build_scheduler(opt2, tc)  # before loading: LambdaLR's constructor resets the lr
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    train_steps(resumed, opt2, after, sched2)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip_resumes_bit_identically(name):
    check_exact_resume(optimizer_cfg(name))  # crosses a subspace refresh (update_gap=2)


# each of our own step() implementations: the engine per matrix (galore) and batched
# (apollo_mini), Muon inside a composite, RSO, MicroAdam and LDAdam; the wrapped libraries
# (torch, bitsandbytes) implement the closure themselves
OWN_STEPS = ["galore", "apollo_mini", "muon", "rso", "microadam", "ldadam"]


@pytest.mark.parametrize("name", OWN_STEPS)
def test_step_takes_a_closure(name):
    """``step(closure)`` (torch's protocol) returns the closure's loss and takes the same step."""
    cfg = optimizer_cfg(name)
    plain, with_closure = toy_model(), toy_model()
    losses = train_steps(plain, optimizers.build(cfg, plain), 1)
    opt = optimizers.build(cfg, with_closure)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = with_closure(BATCH, BATCH)
        loss.backward()
        return loss

    for want in losses:
        assert float(opt.step(closure).detach()) == want
    for a, b in zip(plain.parameters(), with_closure.parameters(), strict=True):
        assert torch.equal(a, b)


def real_state_bytes(opt) -> int:
    """Bytes of the distinct storages behind the state, including tensors an optimizer holds once
    for all parameters (bitsandbytes' and our 8-bit code maps)."""
    tensors = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    if hasattr(opt, "shared_state"):
        tensors += [t for ts in opt.shared_state().values() for t in ts]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", METHODS)
def test_state_nbytes_is_exact_and_matches_the_formula(name, dtype):
    cfg = optimizer_cfg(name)
    model = toy_model().to(dtype)
    opt = optimizers.build(cfg, model)
    train_steps(model, opt, 3)
    reported = optimizers.state_nbytes(opt)
    assert sum(reported.values()) == real_state_bytes(opt)
    formula = optimizers.memory_formula(name, model, cfg, steps=3)
    assert {k: v for k, v in formula.items() if v} == {k: v for k, v in reported.items() if v}
    # and the formula needs no memory: the same numbers from a meta-device model
    meta = build_model(copy.deepcopy(model.cfg), "meta").to(dtype)
    assert optimizers.memory_formula(name, meta, cfg, steps=3) == formula


# After the last step of a period the switch has happened (outgoing units freed, incoming ones
# without state yet). OwLore's weighted draw depends on training, so its formula is exact only
# off period boundaries (the test above).
SAMPLED = ["badam", "frugal", "gum", "lisa"]
VARIANTS = [(name, {}) for name in SAMPLED] + [
    ("frugal", {"projection": p}) for p in ("svd", "random", "columns", "rows")
]


@pytest.mark.parametrize("steps", [1, 2, 4, 5])
@pytest.mark.parametrize("name, overrides", VARIANTS)
def test_formula_matches_at_and_between_period_boundaries(name, overrides, steps):
    cfg = optimizer_cfg(name)
    for key, value in overrides.items():
        cfg[key] = value
    model = toy_model()
    opt = optimizers.build(cfg, model)
    train_steps(model, opt, steps)
    reported = {k: v for k, v in optimizers.state_nbytes(opt).items() if v}
    formula = optimizers.memory_formula(name, model, cfg, steps=steps)
    assert {k: v for k, v in formula.items() if v} == reported


@pytest.mark.parametrize("name", [m for m in LOW_RANK if m not in REPARAMETRIZING])
def test_only_targeted_matrices_are_projected(name):
    model = toy_model()
    opt = optimizers.build(optimizer_cfg(name), model)
    train_steps(model, opt, 1)
    names = {p: n for n, p in model.named_parameters()}

    def targeted(n: str) -> bool:  # (GradNormLoRP's magnitudes are plain 1-D tensors)
        return ("self_attn" in n or "mlp" in n) and n.endswith(".weight")

    for p, state in opt.state.items():
        assert ("side" in state) == targeted(names[p])  # every projector records its side
        if not targeted(names[p]):  # embeddings, lm_head, norms: plain Adam on the full tensor
            assert state.get("exp_avg", state.get("state1")).shape == p.shape
    report = opt.projection_report()
    # 2 layers x 7 linears projected; embeddings, lm_head and 5 norms stay plain (and
    # GradNormLoRP's 14 magnitudes)
    plain = sum(not targeted(n) for n in names.values())
    assert plain == (21 if "gradnorm" in name else 7)
    assert report.startswith("14 matrices") and "rank 8" in report
    assert f"{plain} tensors" in report


def test_rank_larger_than_a_matrix_is_refused():
    cfg = optimizer_cfg("galore")
    cfg.rank = 40
    with pytest.raises(
        ValueError,
        match=r"optimizer.rank=40 exceeds min\(shape\)=32 of "
        r"model.layers.0.self_attn.q_proj.weight",
    ):
        optimizers.build(cfg, toy_model())


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("rank", 0, "optimizer.rank=0 must be a positive integer"),
        ("update_gap", 0, "optimizer.update_gap=0"),
        ("proj_type", "diagonal", "optimizer.proj_type='diagonal'"),
        ("svd_backend", "qr", "optimizer.svd_backend='qr'"),
        ("refresh_phase", 2, r"optimizer.refresh_phase=2 must lie in \[0, update_gap\)"),
        ("target_modules", ["ffn"], r"optimizer.target_modules=\['ffn'\] matches no nn.Linear"),
    ],
)
def test_bad_settings_are_explained(key, value, match):
    cfg = optimizer_cfg("galore")
    cfg[key] = value
    with pytest.raises(ValueError, match=match):
        optimizers.build(cfg, toy_model())


def test_randomized_svd_spans_the_same_top_subspace():
    g = torch.randn(64, 8) @ torch.randn(8, 48)  # rank 8: both backends find it
    bases = {}
    for backend in ("exact", "randomized"):
        proj = SvdProjector(8, 2, "std", backend)
        state = {}
        proj.refresh(state, g)
        bases[backend] = state["basis"]  # (8, 48), right side
    overlap = bases["exact"] @ bases["randomized"].T
    assert torch.allclose(torch.linalg.svdvals(overlap), torch.ones(8), atol=1e-4)


def test_muon_takes_the_targeted_matrices_and_adamw_the_rest():
    model = toy_model()
    opt = optimizers.build(optimizer_cfg("muon"), model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in opt.parts["muon"].param_groups for p in g["params"]]
    adamw = [names[id(p)] for g in opt.parts["adamw"].param_groups for p in g["params"]]
    assert len(muon) == 14 and all("self_attn" in n or "mlp" in n for n in muon)
    assert sorted(adamw) == sorted(n for n in names.values() if n not in muon)
    assert opt.param_groups == opt.parts["muon"].param_groups + opt.parts["adamw"].param_groups


def _muon_run(opt_cls, steps=4, **kw):
    torch.manual_seed(0)
    w = [torch.nn.Parameter(torch.randn(12, 7)), torch.nn.Parameter(torch.randn(5, 9))]
    opt = opt_cls(w, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", **kw)
    for i in range(steps):
        for j, p in enumerate(w):
            p.grad = torch.sin(p.detach() * (i + 2) + j)
        opt.step()
    return [p.detach().clone() for p in w]


def test_muon_step_outside_bf16_is_torch_muons_arithmetic(monkeypatch):
    """In bf16 the step is torch.optim.Muon's own; our loop (any other dtype) with its iteration
    forced back to bf16 reproduces it bit for bit; in fp32 (the CPU default) it stays close."""
    import llmpt.optimizers.baselines as baselines
    from llmpt.optimizers.rules import muon as muon_rule

    reference = _muon_run(torch.optim.Muon)
    same = _muon_run(baselines.Muon, ns_dtype="bfloat16")
    assert all(torch.equal(a, b) for a, b in zip(same, reference, strict=True))
    fp32 = _muon_run(baselines.Muon, ns_dtype="float32")
    assert all(torch.allclose(a, b, atol=2e-2) for a, b in zip(fp32, reference, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(fp32, reference, strict=True))
    monkeypatch.setattr(
        baselines,
        "newton_schulz",
        lambda x, steps, dtype, eps: muon_rule.newton_schulz(x, steps, torch.bfloat16, eps),
    )
    ours = _muon_run(baselines.Muon, ns_dtype="float32")
    assert all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True))


def test_muon_refuses_an_unknown_ns_dtype():
    cfg = optimizer_cfg("muon")
    cfg.ns_dtype = "float16"
    with pytest.raises(ValueError, match="ns_dtype='float16': use auto, bfloat16 or float32"):
        optimizers.build(cfg, toy_model())


def test_fira_refuses_a_two_sided_projection_when_built():
    cfg = optimizer_cfg("fira")
    cfg.proj_type = "full"
    with pytest.raises(ValueError, match="optimizer.proj_type=full: a residual needs a one-sided"):
        optimizers.build(cfg, toy_model())


def test_q_galore_compat_reference_selects_the_reference_arithmetic():
    cfg = optimizer_cfg("q_galore")
    cfg.compat, cfg.refresh = "reference", "synchronous"
    opt = optimizers.build(cfg, toy_model())
    assert opt.projector.zero_point == "integer" and not opt.projector.abs_cos
    assert opt.weight_quant.zero_point == "integer"
    cfg.compat = "code"
    with pytest.raises(ValueError, match="optimizer.compat='code': use none or reference"):
        optimizers.build(cfg, toy_model())


def test_every_optimizer_config_is_registered_and_every_method_has_one():
    """A method without a config cannot be selected; a config without a registered builder would
    silently drop out of every registry-wide test above."""
    from pathlib import Path

    conf = Path(__file__).resolve().parents[2] / "conf" / "optimizer"
    assert {p.stem for p in conf.glob("*.yaml")} == set(optimizers.METHODS)
