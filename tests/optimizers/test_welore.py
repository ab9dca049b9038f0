"""WeLore (optimizers/welore.py): the global threshold hits the target rank reduction, the
low-rank components are the truncated SVD and fold back, a factorisation must save memory, and
only the factors and the 1-D parameters train."""

import pytest
import torch
from torch import nn

from llmpt.optimizers.api import WeLore, welore_compress, welore_uncompress
from llmpt.optimizers.welore import LowRankLinear, normalized, parameter_count, plan, spectra
from tests.conftest import toy_llama

BATCH = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def heavy_tailed(m: int, n: int, seed: int, decay: float) -> torch.Tensor:
    """A matrix whose singular values fall off as decay^i (a spectrum with a tail)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, m, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
    s = decay ** torch.arange(min(m, n), dtype=torch.float32)
    return u[:, : s.numel()] * s @ v[:, : s.numel()].T


def test_the_threshold_drops_the_target_share_to_one_value():
    shapes = {f"m{i}": (48, 32) for i in range(6)}
    found = {
        n: torch.linalg.svdvals(heavy_tailed(48, 32, i, 0.7 + 0.05 * i))
        for i, n in enumerate(shapes)
    }
    total = 6 * 32
    for err in (0.1, 0.3, 0.5, 0.7):
        p = plan(found, shapes, err, min_ratio=0.0)
        assert abs(p.attempted * total - err * total) <= 1  # to one singular value
        # one global tau: a matrix drops exactly its normalised values under it
        for n, s in found.items():
            assert p.dropped[n] == int((normalized(s) < p.tau).sum())
        # non-uniform: faster-decaying spectra lose more
        assert p.dropped["m0"] >= p.dropped["m5"]
    uni = plan(found, shapes, 0.5, min_ratio=0.0, uniform=True)
    assert uni.tau is None and set(uni.dropped.values()) == {16}


def tailed_toy():
    """The toy LLaMA with a heavy-tailed spectrum in its first layer's linears (the others
    random, flat): at a moderate ERR the first become low-rank, the others stay dense."""
    model = toy_llama(seed=0)
    with torch.no_grad():
        for i, (_, m) in enumerate(model.model.layers[0].named_modules()):
            if isinstance(m, nn.Linear):
                m.weight.copy_(heavy_tailed(*m.weight.shape, i, 0.8) * 0.3)
    return model


def test_min_ratio_and_the_memory_check_decide_what_is_factorised():
    shapes = {"square": (32, 32), "flat": (32, 32)}
    found = {
        "square": torch.linalg.svdvals(heavy_tailed(32, 32, 0, 0.6)),
        "flat": torch.linspace(2.0, 1.0, 32),
    }
    p = plan(found, shapes, 0.5, min_ratio=0.0)
    # a matrix that keeps k >= mn / (m + n) = 16 would store more as factors: it stays dense
    kept = {n: 32 - d for n, d in p.dropped.items()}
    for name, k in kept.items():
        assert (name in p.ranks) == (k < 16) and (name in p.no_saving) == (k >= 16)
    strict = plan(found, shapes, 0.5, min_ratio=0.9)
    assert all(p.dropped[n] / 32 > 0.9 for n in strict.ranks)
    counts = parameter_count(p, shapes)
    assert counts["before"] == 2 * 32 * 32
    assert counts["after"] == sum(p.ranks[n] * 64 if n in p.ranks else 32 * 32 for n in shapes)
    with pytest.raises(ValueError, match="err=1.0 must lie in"):
        plan(found, shapes, 1.0)


def test_a_full_rank_component_is_the_weight_and_a_truncated_one_its_best_approximation():
    lin = nn.Linear(32, 48, bias=True)
    with torch.no_grad():
        lin.weight.copy_(heavy_tailed(48, 32, 1, 0.8))
    full, cut = LowRankLinear(lin, 32), LowRankLinear(lin, 8)
    x = torch.randn(5, 32)
    assert torch.allclose(full(x), lin(x), atol=1e-5)
    assert torch.allclose(full.folded().weight, lin.weight, atol=1e-5)
    u, s, vh = torch.linalg.svd(lin.weight.detach())
    best = (u[:, :8] * s[:8]) @ vh[:8]
    assert torch.allclose(cut.folded().weight, best, atol=1e-5)
    assert cut.folded().bias is lin.bias


def test_compression_freezes_all_but_factors_and_norms_and_folds_back():
    model = tailed_toy()
    before = model(BATCH)
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith("proj")}
    lrcs, p = welore_compress(model, ["attn", "mlp"], err=0.3, min_ratio=0.2)
    assert p.ranks and p.dense and len(lrcs) == len(p.ranks)
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trainable == {
        *(f"{n}.weight_{x}" for n in p.ranks for x in "ab"),
        *(n for n, q in model.named_parameters() if q.dim() == 1),
    }
    assert not model.model.embed_tokens.weight.requires_grad
    assert not model.lm_head.weight.requires_grad
    numel = sum(q.numel() for n, q in model.named_parameters() if "proj" in n)
    assert numel == parameter_count(p, shapes)["after"]
    # the same ranks rebuild the same structure (a resume, an export), without a new plan
    twin = tailed_toy()
    twin_lrcs, again = welore_compress(twin, ["attn", "mlp"], ranks=p.ranks)
    assert again is None and [m.rank for m in twin_lrcs] == [m.rank for m in lrcs]
    opt = WeLore([q for q in model.parameters() if q.requires_grad], lrcs, lr=1e-2)
    for _ in range(3):
        model(BATCH, BATCH).backward()
        opt.step()
        opt.zero_grad()
    tuned = model(BATCH)
    assert not torch.allclose(tuned, before)
    welore_uncompress(model)
    assert all(q.requires_grad for q in model.parameters())
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert torch.allclose(model(BATCH), tuned, atol=1e-5)


def test_bad_input_is_refused_by_name():
    model = toy_llama(seed=0)
    with pytest.raises(ValueError, match="ranks names .*not targeted linears"):
        welore_compress(model, ["attn"], ranks={"model.layers.0.mlp.up_proj": 4})
    model = tailed_toy()
    lrcs, _ = welore_compress(model, ["attn", "mlp"], err=0.3, min_ratio=0.2)
    with pytest.raises(ValueError, match="already compressed: pass the ranks"):
        welore_compress(model, ["attn", "mlp"])
    with pytest.raises(ValueError, match="linears is empty"):
        WeLore([model.model.norm.weight], [])
    with pytest.raises(ValueError, match="2-D tensor that is not a low-rank factor"):
        WeLore([*[q for q in model.parameters() if q.requires_grad], model.lm_head.weight], lrcs)
    meta = toy_llama(seed=0).to("meta")
    with pytest.raises(ValueError, match="the model has no weights .*meta"):
        spectra(meta, ["attn"])
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        spectra(nn.Sequential(nn.ReLU()), ["attn"])
