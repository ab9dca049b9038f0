import math

import pytest
import torch
import torch.nn.functional as F

from llm_pretrain.config import ModelConfig
from llm_pretrain.model import IGNORE_INDEX, apply_rope, build_model, rope_tables
from tests.conftest import compose_cfg

# Parameter counts (millions) from the specs' table, section 1.4.
EXPECTED_M = {
    "9m": 9.0,
    "20m": 19.5,
    "35m": 35.2,
    "40m": 42.4,
    "60m": 58.1,
    "71m": 70.6,
    "100m": 100.1,
    "130m": 134.1,
    "250m": 247.4,
    "350m": 368.0,
    "1b": 1339.1,
    "3b": 2685.8,
    "7b": 6738.4,
    "13b": 13015.9,
}


@pytest.mark.parametrize("size", sorted(EXPECTED_M))
def test_paper_config_parameter_count_on_meta(size):
    cfg = compose_cfg([f"model=llama_{size}"]).model
    model = build_model(cfg, "meta")
    assert round(model.num_params() / 1e6, 1) == EXPECTED_M[size]
    assert all(p.device.type == "meta" for p in model.parameters())


def test_shapes_and_names_follow_hf_llama():
    cfg = compose_cfg(["model=llama_60m"]).model
    names = dict(build_model(cfg, "meta").named_parameters())
    assert names["model.embed_tokens.weight"].shape == (32000, 512)
    assert names["lm_head.weight"].shape == (32000, 512)  # untied
    assert names["model.layers.7.self_attn.q_proj.weight"].shape == (512, 512)
    assert names["model.layers.0.mlp.gate_proj.weight"].shape == (1376, 512)
    assert names["model.layers.0.mlp.down_proj.weight"].shape == (512, 1376)
    assert "model.layers.0.input_layernorm.weight" in names
    assert "model.norm.weight" in names
    assert cfg.rms_norm_eps == 1e-6
    assert sum("attn" in n or "mlp" in n for n in names) == 8 * 7


def tiny_model(vocab=101, seed=0, **overrides):
    torch.manual_seed(seed)
    shape = dict(
        hidden_size=32, intermediate_size=48, num_heads=4, num_layers=2, max_position_embeddings=64
    )
    return build_model(ModelConfig(name="t", vocab_size=vocab, **(shape | overrides)))


def test_loss_is_shifted_masked_cross_entropy():
    model = tiny_model()
    x = torch.randint(0, 101, (3, 16))
    y = x.clone()
    y[1, 10:] = IGNORE_INDEX
    logits = model(x)
    ref = F.cross_entropy(
        logits[:, :-1].reshape(-1, 101), y[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert torch.allclose(model(x, y), ref, atol=1e-6)
    n = int((y[:, 1:] != IGNORE_INDEX).sum())
    assert torch.allclose(model(x, y, reduction="sum"), ref * n, rtol=1e-5)


def test_attention_is_causal():
    model = tiny_model()
    x = torch.randint(0, 101, (1, 20))
    x2 = x.clone()
    x2[0, 12:] = (x2[0, 12:] + 1) % 101
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert torch.allclose(a[0, :12], b[0, :12], atol=1e-6)
    assert not torch.allclose(a[0, 12:], b[0, 12:], atol=1e-3)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(8, 64, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(i, j):
        return float(apply_rope(q, cos[i], sin[i]) @ apply_rope(k, cos[j], sin[j]))

    assert math.isclose(score(5, 3), score(40, 38), rel_tol=1e-4)
    assert not math.isclose(score(5, 3), score(5, 4), rel_tol=1e-3)


def test_init_matches_reference_distribution():
    model = tiny_model(vocab=4000)
    w = model.model.embed_tokens.weight
    assert abs(float(w.detach().std()) - 0.02) < 0.002
    assert torch.equal(model.model.norm.weight, torch.ones(32))


def test_bad_model_config_is_refused():
    with pytest.raises(
        ValueError, match="model.hidden_size=30 is not divisible by model.num_heads=4"
    ):
        build_model(
            ModelConfig(name="x", hidden_size=30, intermediate_size=8, num_heads=4, num_layers=1)
        )
    model = tiny_model()
    with pytest.raises(ValueError, match="lower data.seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_flash_request_without_flash_attn_explains():
    model = tiny_model(vocab=11, num_layers=1, attention="flash")
    with pytest.raises(RuntimeError, match="model.attention=auto"):
        model(torch.zeros(1, 4, dtype=torch.long))
