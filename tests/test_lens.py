"""Backward Lens (llm_pretrain/lens.py): the checks of spec section 1.4 that a small model can
make, on the framework's own Llama in fp64, plus the CLI and its refusals."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from llm_pretrain import lens
from llm_pretrain.config import ModelConfig
from llm_pretrain.corpus import Language, LanguageSpec
from llm_pretrain.model import build_model
from llm_pretrain.tokenizer import BuiltinTokenizer
from llm_pretrain.train import train
from tests.conftest import TINY, compose_cfg

N, LAYERS, HEADS, VOCAB = 7, 3, 4, 128
PROMPT = [5, 17, 33, 2 + 40, 61, 9, 100]  # n = 7 distinct tokens
TARGET = 77


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(
        name="lens_test",
        hidden_size=64,
        intermediate_size=96,
        num_heads=HEADS,
        num_layers=LAYERS,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        init_std=0.2,  # (a wider init: the deep layers' vectors are far from zero)
        attention="sdpa",
    )
    return build_model(cfg).double().eval()


def captured(model, loss_fn, ids=PROMPT):
    _, _, caps = lens.collect(model, torch.tensor([ids]), loss_fn, list(lens.MODULES))
    return {(c.layer, c.module): c for c in caps}


def test_the_gradient_is_the_sum_of_per_token_outer_products(model):
    caps = captured(model, lens.last_token_loss(TARGET))
    assert len(caps) == LAYERS * 7
    for c in caps.values():
        assert c.grad.abs().sum() > 0, c.name
        assert c.decomposition_error() < 1e-13, c.name


def test_ranks_under_the_last_token_loss(model):
    caps = captured(model, lens.last_token_loss(TARGET))
    for (layer, module), c in caps.items():
        assert c.rank() <= N
        if layer < LAYERS - 1:
            # the first position's query sees one key: its gradient is zero, so n - 1
            assert c.rank() == (N - 1 if module == "q" else N), c.name
        elif module in ("gate", "up", "down", "q", "o"):
            assert c.rank() == 1, c.name  # only the last token is in the loss (App. A)
        elif module == "v":
            assert 1 <= c.rank() <= min(N, HEADS)


def test_the_shifted_training_loss_bounds_every_rank_by_n_minus_1(model):
    ids = torch.tensor(PROMPT)

    def lm_loss(logits):
        return F.cross_entropy(logits[0, :-1], ids[1:], reduction="sum")

    for c in captured(model, lm_loss).values():
        assert c.rank() <= N - 1, c.name  # the last position's output has no loss: delta_n = 0


def test_the_last_layers_other_tokens_have_zero_vjps_and_no_ranks(model):
    caps = captured(model, lens.last_token_loss(TARGET))
    tokens = lens.Tokens(PROMPT, TARGET, [TARGET], lambda ids: f"t{ids[0]}")
    for module in ("down", "o"):
        c = caps[(LAYERS - 1, module)]
        assert torch.count_nonzero(c.delta[:-1]) == 0 and c.delta[-1].norm() > 0
        rows = lens.read_vectors(model, c, tokens, PROMPT, answer=0, top_k=3)
        assert all(r["target_rank"] is None for r in rows if r["token_index"] < N - 1)
        assert all(r["target_rank"] is not None for r in rows if r["token_index"] == N - 1)


def test_the_last_tokens_vjp_ranks_the_target_last_in_every_layer(model):
    # Lemma 5.1: delta_n = D^T (p - e_t) through the norms; it holds at random init
    caps = captured(model, lens.last_token_loss(TARGET))
    for layer in range(LAYERS):
        d_n = caps[(layer, "down")].delta[-1]
        for how in lens.PROJECTIONS:
            logits = lens.vocabulary_logits(model, d_n, how)
            assert lens.rank_of(logits, TARGET) == VOCAB - 1, (layer, how)


@pytest.mark.parametrize("module", ["gate", "up", "down"])
def test_lemma_5_2_one_token_sgd_moves_the_output_by_minus_lr_norm_squared_delta(model, module):
    c = captured(model, lens.last_token_loss(TARGET))[(1, module)]
    linear = model.model.layers[1].get_submodule(lens.MODULES[module])
    i, lr = 3, 0.7
    x, delta = c.x[i], c.delta[i]
    before = linear(x[None])[0].detach()
    with torch.no_grad():
        saved = linear.weight.clone()
        linear.weight.sub_(lr * torch.outer(delta, x))  # the step from token i alone
        after = linear(x[None])[0]
        linear.weight.copy_(saved)
    expected = -lr * x.dot(x) * delta
    assert delta.norm() > 0
    torch.testing.assert_close(after - before, expected, rtol=1e-10, atol=1e-14)
    measured, predicted = lens.one_token_step_shift(saved, x, delta, lr)
    torch.testing.assert_close(measured, predicted, rtol=1e-10, atol=1e-14)


def test_the_forward_pass_shift_raises_the_targets_log_probability(model):
    import copy

    edited = copy.deepcopy(model)
    before = lens.last_position_report(edited, PROMPT, TARGET)
    lens.forward_pass_shift(edited, PROMPT, TARGET, layer=1, lr=0.5)
    after = lens.last_position_report(edited, PROMPT, TARGET)
    assert after["log_p_target"] > before["log_p_target"]
    assert not torch.equal(
        edited.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight
    )


@pytest.fixture(scope="module")
def builtin():
    return BuiltinTokenizer(Language(LanguageSpec(seed=1234, vocab_size=2048)))


def test_bad_prompts_targets_and_modules_are_refused_by_name(builtin, caplog):
    words = builtin.language.words
    with pytest.raises(ValueError, match="--prompt is empty"):
        lens.tokenize(builtin, "  ", words[10], 64, "last_token")
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        lens.tokenize(builtin, words[10], "zzqx", 64, "last_token")  # not a word: unknown
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        lens.tokenize(builtin, words[10], "", 64, "last_token")
    with pytest.raises(ValueError, match="more than the model's 3 positions"):
        lens.tokenize(builtin, " ".join(words[10:14]), words[20], 3, "last_token")
    with pytest.raises(ValueError, match="'mlp.fc1' matches no linear"):
        lens.module_names("gate,mlp.fc1")
    assert lens.module_names("down_proj,self_attn.q_proj,up,up") == ["down", "q", "up"]
    with caplog.at_level("INFO", logger="llm_pretrain"):
        tokens = lens.tokenize(builtin, words[10], f"{words[20]} {words[21]}", 64, "last_token")
    assert tokens.target == 20 and tokens.target_pieces == [20, 21]
    assert "is 2 pieces" in caplog.text and "the first with text" in caplog.text


def test_teacher_forcing_reads_every_target_piece(model):
    tokens = lens.Tokens(PROMPT, TARGET, [TARGET, 12, 90], lambda ids: f"t{ids[0]}")
    result = lens.analyse(model, tokens, "teacher_forced", ["down"], top_k=2)
    assert len(result["input_tokens"]) == N + 2
    loss_fn = lens.teacher_forced_loss(N, [TARGET, 12, 90])
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + [TARGET, 12]]))
    logp = F.log_softmax(logits[0], dim=-1)
    expected = -(logp[N - 1, TARGET] + logp[N, 12] + logp[N + 1, 90])
    assert float(loss_fn(logits)) == pytest.approx(float(expected))
    assert result["loss"] == pytest.approx(float(expected))
    assert all(m["rank"] <= m["bound"] == N + 2 for m in result["matrices"])


def test_the_cli_on_a_fresh_llama_tiny_writes_every_output(tmp_path, builtin):
    words = builtin.language.words
    out = tmp_path / "lens"
    args = ["--prompt", " ".join(words[30:36]), "--target", words[50], "--out", str(out)]
    args += ["--shift-layer", "auto", "--val-tokens", "500", "model=llama_tiny"]
    result = lens.run(args)
    summary = json.loads((out / "summary.json").read_text(), parse_constant=float.__new__)
    assert summary["model"]["source"] == "a freshly initialised model"
    assert len(summary["matrices"]) == 4 * 3  # 4 layers x gate, up, down
    assert all(m["decomposition_error"] < 1e-12 for m in summary["matrices"])
    assert all(m["rank"] <= m["bound"] == 6 for m in summary["matrices"])
    rows = list(csv.DictReader((out / "vectors.csv").open()))
    assert len(rows) == 4 * 3 * 6 * len(lens.PROJECTIONS)
    assert {r["projection"] for r in rows} == set(lens.PROJECTIONS)
    shift = summary["shift"]
    assert shift["layer"] == 2 and shift["after"]["log_p_target"] > shift["before"]["log_p_target"]
    assert "held_out_loss" in shift["after"]
    for module in ("gate", "up", "down"):
        assert (out / f"lens_{module}.png").stat().st_size > 1000
    assert "rank / bound" in lens.render(result)


def test_the_cli_reads_a_trained_runs_checkpoint(tmp_path, builtin):
    run = tmp_path / "run"
    cfg = compose_cfg([*TINY, "trainer.max_steps=2", "checkpoint.at_end=true"])
    train(cfg, run)
    words = builtin.language.words
    out = tmp_path / "lens"
    lens.run(
        ["--checkpoint", str(run), "--prompt", " ".join(words[30:33]), "--target", words[40]]
        + ["--modules", "q,o", "--dtype", "float32", "--out", str(out)]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["source"].endswith(".pt")
    assert [m["module"] for m in summary["matrices"]] == ["q", "o"] * 2  # TINY: 2 layers
    assert summary["matrices"][-1]["rank"] == 1  # the last layer's o_proj, last-token loss

    # the same weights as a Hugging Face directory (config.json, safetensors, tokenizer.json)
    from llm_pretrain.export import export

    export(run, tmp_path / "hf")
    lens.run(
        ["--checkpoint", str(tmp_path / "hf"), "--prompt", " ".join(words[30:33])]
        + ["--target", words[40], "--modules", "q,o", "--dtype", "float32"]
        + ["--out", str(tmp_path / "lens_hf")]
    )
    from_hf = json.loads((tmp_path / "lens_hf" / "summary.json").read_text())
    assert from_hf["model"]["source"].startswith("Hugging Face checkpoint")
    assert from_hf["log_p_target"] == pytest.approx(summary["log_p_target"], abs=1e-5)
