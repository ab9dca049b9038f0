"""The contract every library class meets without Hydra or the app: a (class, kwargs) table
on a small module that is not our Llama (other names, LayerNorm, no RoPE)."""

import io

import pytest
import torch
from torch import nn

from llmpt.optimizers import api


class Block(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 24) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.norm(h))
        return h + self.mlp(h)


class Tiny(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([Block(dim), Block(dim)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.layers:
            h = block(h)
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), x.flatten())


X = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(0))


def projected(model):
    return api.param_groups(model, ["attn", "mlp"])


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def layers(model):
    return [m for _, m in api.decoder_layers(model)]


def rso(model, **kw):
    linears = api.rso_wrap(model, ["attn", "mlp"], rank=4, seed=3)
    return api.Rso(trainable(model), linears, update_gap=2, **kw)


def gradnorm_lorp(model, cls=api.GradNormLoRP, **kw):
    linears = api.weight_norm_wrap(model, ["attn", "mlp"])
    return cls(projected(model), linears, rank=4, update_gap=2, **kw)


def welore(model):
    """At fixed ranks (the plan of a resumed run): the structure must not depend on the seed."""
    names = [n for n, _ in api.targeted_linears(model, ["attn", "mlp"])]
    lrcs, _ = api.welore_compress(model, ["attn", "mlp"], ranks=dict.fromkeys(names[1:], 4))
    return api.WeLore(trainable(model), lrcs, lr=1e-2)


# name -> (model -> optimizer)
TABLE = {
    "GaLore": lambda m: api.GaLore(projected(m), rank=4, update_gap=2),
    "GaLore8bit": lambda m: api.GaLore8bit(projected(m), rank=4, update_gap=2, min_8bit_size=100),
    "QGaLore": lambda m: api.QGaLore(projected(m), rank=4, update_gap=2, min_8bit_size=100),
    "Fira": lambda m: api.Fira(projected(m), rank=4, update_gap=2),
    "Frugal": lambda m: api.Frugal(projected(m), update_gap=2, density=0.5),
    "Frugal(svd)": lambda m: api.Frugal(projected(m), projection="svd", update_gap=2),
    "Gum": lambda m: api.Gum(projected(m), layers(m), rank=4, update_gap=2, active_layers=1),
    "Lisa": lambda m: api.Lisa(trainable(m), layers(m), active_layers=1, interval=2),
    "BAdam": lambda m: api.BAdam(trainable(m), layers(m), interval=2),
    "OwLore": lambda m: api.OwLore(
        projected(m), layers(m), rank=4, update_gap=2, active_layers=1, interval=2
    ),
    "Apollo": lambda m: api.Apollo(projected(m), rank=4, update_gap=2),
    "ApolloMini": lambda m: api.ApolloMini(projected(m), update_gap=2),
    "Grass": lambda m: api.Grass(projected(m), rank=4, update_gap=2),
    "I3S": lambda m: api.I3S(projected(m), rank=4, update_gap=2),
    "DctAdamW": lambda m: api.DctAdamW(projected(m), rank=4),
    "Coap": lambda m: api.Coap(projected(m), rank=4, update_gap=2),
    "Coap8bit": lambda m: api.Coap8bit(projected(m), rank=4, update_gap=2, min_8bit_size=100),
    "OnlineSubspaceDescent": lambda m: api.OnlineSubspaceDescent(projected(m), rank=4),
    "Flora": lambda m: api.Flora(projected(m), rank=4, kappa=2),
    "LDAdam": lambda m: api.LDAdam(projected(m), rank=4),
    "MicroAdam": lambda m: api.MicroAdam(trainable(m), density=0.1),
    "MuonWithAdamW": lambda m: api.MuonWithAdamW(projected(m)),
    "Rso": rso,
    "Gorp": lambda m: api.Gorp(projected(m), rank=4, update_gap=2),
    "GradNormLoRP": gradnorm_lorp,
    "WeLore": welore,
    "GradNormLoRP8bit": lambda m: gradnorm_lorp(m, api.GradNormLoRP8bit, min_8bit_size=100),
    "adamw8bit": lambda m: api.adamw8bit(trainable(m), min_8bit_size=100),
    "came": lambda m: api.came(trainable(m)),
}


def fresh(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def start(name: str, seed: int = 0):
    model = fresh(seed)
    opt = TABLE[name](model)
    if hasattr(opt, "attach") and getattr(opt, "sampling", None) is not None:
        opt.attach()
    return model, opt


def steps(model, opt, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        loss = model(X)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", TABLE)
def test_descends_and_state_bytes_equal_the_formula(name):
    model, opt = start(name)
    losses = steps(model, opt, 8)
    assert losses[-1] < losses[0]
    real = {k: v for k, v in api.state_nbytes(opt).items() if v}
    formula = {k: v for k, v in api.memory_formula(opt, steps=8).items() if v}
    assert real == formula


@pytest.mark.parametrize("name", TABLE)
def test_resumes_bit_identically_through_weights_only_checkpoints(name):
    straight, opt = start(name)
    steps(straight, opt, 6)
    first, opt1 = start(name)
    steps(first, opt1, 3)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed, opt2 = start(name, seed=99)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    steps(resumed, opt2, 3)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_building_an_optimizer_leaves_the_model_as_it_is():
    """Freezing is ``attach``'s, not the constructor's; ``detach`` gives every layer back."""
    model = fresh()
    opt = api.Lisa(trainable(model), layers(model), active_layers=1, interval=2)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(RuntimeError, match=r"call optimizer.attach\(\)"):
        steps(model, opt, 1)
    opt.attach()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and len(frozen) == len(list(model.layers[0].parameters()))
    opt.detach()
    assert all(p.requires_grad for p in model.parameters())


def test_rso_surgery_is_reversible():
    model = fresh()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    linears = api.rso_wrap(model, ["attn", "mlp"], rank=4)
    assert len(linears) == 6
    api.rso_unwrap(model)
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_weight_norm_surgery_is_reversible():
    model = fresh()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(X)
    linears = api.weight_norm_wrap(model, ["attn", "mlp"])
    assert len(linears) == 6 and torch.allclose(model(X), out, atol=1e-6)
    api.weight_norm_unwrap(model)
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    assert all(torch.allclose(after[n], before[n], atol=1e-6) for n in before)


def test_welore_surgery_is_reversible():
    model = fresh()
    names = {n for n, _ in model.named_parameters()}
    lrcs, plan = api.welore_compress(model, ["attn", "mlp"], err=0.6, min_ratio=0.0)
    assert len(lrcs) == len(plan.ranks) > 0 and not model.embed.weight.requires_grad
    tuned = model(X)
    api.welore_uncompress(model)
    assert {n for n, _ in model.named_parameters()} == names
    assert all(p.requires_grad for p in model.parameters())
    assert torch.allclose(model(X), tuned, atol=1e-5)


def test_errors_name_the_constructor_argument():
    model = fresh()
    with pytest.raises(ValueError, match=r"^rank=64 exceeds min\(shape\)=16"):
        api.GaLore(projected(model), rank=64)
    with pytest.raises(ValueError, match="param group 0 sets svd_backend='randomized'"):
        groups = projected(model)
        groups[0]["svd_backend"] = "randomized"
        api.GaLore(groups, rank=4)


def test_adam_mini_refuses_names_it_does_not_know():
    model = fresh()
    with pytest.raises(ValueError, match="recognises no query/key"):
        api.AdamMini(model.named_parameters(), dim=16, n_heads=2)


def test_a_group_may_hold_one_tensor_as_torch_allows():
    """``{"params": w}`` is one parameter (torch's form), not the rows of ``w``."""
    model = fresh()
    w = model.layers[0].attn.weight
    rest = [p for p in model.parameters() if p is not w]
    opt = api.Frugal([{"params": w, "projected": True}, {"params": rest}], density=1.0)
    assert opt.param_groups[0]["params"] == [w]
    for cls in (api.GaLore, api.Frugal):  # torch's check, and ours where groups are edited
        with pytest.raises(TypeError, match="iterable of"):
            cls(w)
