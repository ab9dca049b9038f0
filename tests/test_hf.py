"""Hugging Face LlamaForCausalLM in and out: export, init_from, and what is refused."""

import json

import pytest
import torch

from llm_pretrain import checkpoint, hf
from llm_pretrain.export import export, load_trained_model, main
from llm_pretrain.model import build_model
from llm_pretrain.pretrained import load_initial_weights
from llm_pretrain.tokenizer import load_tokenizer
from llm_pretrain.train import train
from tests.conftest import TINY, compose_cfg

SHORT = ["trainer.max_steps=2", "trainer.global_batch_size=4", "trainer.micro_batch_size=4"]
SHORT += ["trainer.eval_at_start=false", "eval.tokens=300", "checkpoint.at_end=true"]


def hf_llama(path, **overrides):
    """A tiny random LlamaForCausalLM saved with save_pretrained (the hub's stand-in):
    grouped-query attention, a tied head and a non-default rope_theta by default."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    kwargs = dict(
        vocab_size=2048,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=50000.0,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(LlamaConfig(**(kwargs | overrides))).eval()
    model.save_pretrained(path)
    return model


def hf_logits(path, ids):
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        return LlamaForCausalLM.from_pretrained(path).eval()(ids).logits


IDS = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("optimizer", [["optimizer=adamw"], ["optimizer=rso", "optimizer.rank=4"]])
def test_an_exported_run_loads_in_transformers_with_the_same_logits(tmp_path, optimizer):
    """RSO trains W0 + B P^T behind a wrapper: the export folds it into plain weights."""
    run = tmp_path / "run"
    train(compose_cfg([*TINY, *SHORT, *optimizer]), run)
    out = tmp_path / "hf"
    export(run, out)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    ckpt = checkpoint.checkpoint_path(run, 2)
    from omegaconf import OmegaConf

    ours = load_trained_model(ckpt, OmegaConf.load(run / "config.yaml")).eval()
    with torch.no_grad():
        mine = ours(IDS)
    assert (mine - hf_logits(out, IDS)).abs().max() <= 1e-5
    # the tokenizer files give our ids (the built-in language, word level, EOS appended)
    from transformers import AutoTokenizer

    tok = load_tokenizer("builtin")
    text = tok.decode(tok.language.document([1, 0, 3])[:60])
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == tok.encode_batch([text])[0]


def test_the_t5_sentencepiece_tokenizer_exports_with_the_same_ids(tmp_path, shared_data):
    from transformers import AutoTokenizer

    spec = str(shared_data / "t5_tokenizer" / "spiece.model")
    ours = load_tokenizer(spec)
    hf.write_tokenizer(spec, ours, tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["Hello world, this is a test.", " two  spaces\nand a line", "naïve café 123"]
    for text in texts:
        assert theirs(text).input_ids == ours.encode_batch([text])[0]
    assert (theirs.pad_token_id, theirs.eos_token_id) == (ours.pad_id, ours.eos_id)


def test_a_hf_checkpoint_with_gqa_and_a_tied_head_loads_fine_tunes_and_exports(tmp_path):
    src = tmp_path / "src"
    reference = hf_llama(src)
    cfg = compose_cfg(["model=hf", f"trainer.init_from={src}"])
    assert cfg.model.num_kv_heads == 2 and cfg.model.tie_embeddings and cfg.model.rope_theta == 5e4
    model = build_model(cfg.model)
    load_initial_weights(model, str(src))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert (model(IDS) - reference(IDS).logits).abs().max() <= 1e-5
    # fine-tune from it (GaLore), export, and transformers sees the fine-tuned weights
    run = tmp_path / "run"
    overrides = ["model=hf", f"trainer.init_from={src}", "data.seq_len=32", *SHORT]
    summary = train(compose_cfg([*overrides, "optimizer=galore", "optimizer.rank=4"]), run)
    assert summary["memory"]["predicted"]["activations"] == summary["memory"]["activations"]
    out = tmp_path / "out"
    export(run, out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_key_value_heads"] == 2 and saved["tie_word_embeddings"] is True
    tuned = checkpoint.load(checkpoint.checkpoint_path(run, 2))["model"]
    assert not torch.equal(
        tuned["model.layers.0.mlp.up_proj.weight"],
        model.state_dict()["model.layers.0.mlp.up_proj.weight"],
    )
    model.load_state_dict(tuned)
    with torch.no_grad():
        assert (model(IDS) - hf_logits(out, IDS)).abs().max() <= 1e-5


def test_init_from_our_run_loads_its_weights_only(tmp_path):
    run = tmp_path / "run"
    train(compose_cfg([*TINY, *SHORT]), run)
    cfg = compose_cfg([*TINY])
    model = build_model(cfg.model)
    load_initial_weights(model, str(run))
    saved = checkpoint.load(checkpoint.checkpoint_path(run, 2))["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    with pytest.raises(checkpoint.CheckpointError, match="holds another model"):
        load_initial_weights(build_model(compose_cfg([*TINY, "model.num_layers=3"]).model), run)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "only LlamaForCaus"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope type='linear'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ],
)
def test_an_unsupported_hf_config_is_refused_by_name(tmp_path, change, match):
    hf_llama(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | change))
    with pytest.raises(ValueError, match=match):
        hf.read_config(tmp_path)


def test_hf_weights_are_refused_when_unsafe_unknown_or_misshapen(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    hf_llama(src)
    model = build_model(compose_cfg(["model=hf", f"trainer.init_from={src}"]).model)
    tensors = load_file(src / hf.WEIGHTS)
    save_file(
        {**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}, src / hf.WEIGHTS
    )
    with pytest.raises(ValueError, match=r"does not have: \['model.layers.0.self_attn.q_proj.bias"):
        hf.load_weights(model, src)
    del tensors["model.norm.weight"]
    save_file(tensors, src / hf.WEIGHTS)
    with pytest.raises(ValueError, match=r"it lacks: \['model.norm.weight'\]"):
        hf.load_weights(model, src)
    (src / hf.WEIGHTS).unlink()
    torch.save({}, src / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no model.safetensors.*pickled weights"):
        hf.load_weights(model, src)


def test_init_from_a_hf_checkpoint_of_other_shapes_is_refused_with_the_fix(tmp_path):
    hf_llama(tmp_path)
    model = build_model(compose_cfg([*TINY]).model)
    with pytest.raises(ValueError, match=r"model.num_kv_heads=None vs 2.*use model=hf"):
        load_initial_weights(model, str(tmp_path))
    from llm_pretrain.train import check_config

    with pytest.raises(ValueError, match="model=hf takes its shapes from trainer.init_from"):
        check_config(compose_cfg(["model=hf"]), world_size=1)


def test_export_refuses_a_used_output_directory_and_a_missing_config(tmp_path, capsys):
    run = tmp_path / "run"
    train(compose_cfg([*TINY, *SHORT]), run)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not an empty directory"):
        main([str(run), str(tmp_path / "busy")])
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    (run / "config.yaml").rename(tmp_path / "moved.yaml")
    with pytest.raises(SystemExit, match="needs the run's config.yaml"):
        main([str(checkpoint.checkpoint_path(run, 2)), str(tmp_path / "new")])


@pytest.mark.parametrize(
    "optimizer",
    [
        ["optimizer=gorp", "optimizer.rank=4"],
        ["optimizer=gradnorm_lorp", "optimizer.rank=4"],
        ["optimizer=welore", "optimizer.err=0.5", "optimizer.min_ratio=0.4", "optimizer.lr=1e-2"],
    ],
)
def test_fine_tuning_methods_train_from_a_hf_model_and_export_plain_weights(tmp_path, optimizer):
    """GORP, GradNormLoRP (g V / ||V|| folded back) and WeLore (B A folded back, at the ranks
    config.yaml recorded) from a loaded LlamaForCausalLM (GQA, tied head), with the memory
    prediction exact, and out again with our logits."""
    src = tmp_path / "src"
    hf_llama(src)
    run = tmp_path / "run"
    overrides = ["model=hf", f"trainer.init_from={src}", "data.seq_len=32", *SHORT, *optimizer]
    s = train(compose_cfg(overrides), run)
    mem = s["memory"]
    for key in ("weights", "gradients", "optimizer_state", "activations"):
        assert mem["predicted"][key] == mem[key], key
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config.yaml")
    if cfg.optimizer.name == "welore":  # the compression's choice, for the export to rebuild
        assert cfg.optimizer.ranks and mem["gradients"] < mem["weights"] / 2
    out = tmp_path / "hf"
    export(run, out)
    ours = load_trained_model(checkpoint.checkpoint_path(run, 2), cfg).eval()
    reference = build_model(ours.cfg)
    load_initial_weights(reference, str(src))
    with torch.no_grad():
        mine = ours(IDS)
        assert not torch.allclose(mine, reference(IDS))  # it did fine-tune
    assert (mine - hf_logits(out, IDS)).abs().max() <= 1e-5


def test_welore_compression_reports_perplexity_before_and_after(tmp_path, capsys):
    """The compression CLI on our own small run, and a fine-tuning run's summary."""
    from llm_pretrain.welore import main as welore_main

    base = tmp_path / "base"
    train(compose_cfg([*TINY, *SHORT]), base)
    out = tmp_path / "welore.json"
    welore_main([f"trainer.init_from={base}", *TINY, "eval.tokens=300", "--err", "0.3,0.6",
                 "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    text = capsys.readouterr().out
    assert f"validation ppl {result['before']['ppl']:.2f} before compression" in text
    rows = {(r["err"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(0.3, "welore"), (0.3, "uniform"), (0.6, "welore"), (0.6, "uniform")}
    for r in rows.values():
        assert abs(r["rank_reduction_attempted"] - r["err"]) < 0.05  # (small matrices)
        assert r["targeted_params"]["after"] <= r["targeted_params"]["before"]
    assert rows[(0.6, "welore")]["ppl"] != result["before"]["ppl"]  # it did truncate
    s = train(
        compose_cfg(
            [
                *TINY,
                *SHORT,
                f"trainer.init_from={base}",
                "optimizer=welore",
                "optimizer.err=0.6",
                "trainer.eval_at_start=true",
            ]
        ),  # fmt: skip
        tmp_path / "tune",
    )
    w = s["welore"]
    assert w["low_rank_components"] > 0 and abs(w["rank_reduction_attempted"] - 0.6) < 0.05
    assert w["ppl_before_compression"] == pytest.approx(result["before"]["ppl"])
    assert s["eval"]["initial_ppl"] != w["ppl_before_compression"]
    with pytest.raises(SystemExit, match="trainer.init_from is unset"):
        welore_main([*TINY])


@pytest.mark.parametrize(
    "optimizer",
    [
        ["optimizer=owlore", "optimizer.rank=4", "optimizer.active_layers=1"],
        ["optimizer=lisa", "optimizer.active_layers=1"],
        ["optimizer=badam"],
        ["optimizer=galore", "optimizer.rank=4"],
        ["optimizer=apollo", "optimizer.rank=4"],
    ],
)
def test_existing_methods_fine_tune_a_loaded_model(tmp_path, optimizer, caplog):
    """From a LlamaForCausalLM directory; OwLore's first layers come from the loaded weights'
    outlier ratios (calibration on held-out rows), the others as in pretraining."""
    src = tmp_path / "src"
    hf_llama(src)
    overrides = ["model=hf", f"trainer.init_from={src}", "data.seq_len=32", *SHORT, *optimizer]
    with caplog.at_level("INFO", logger="llm_pretrain"):
        s = train(compose_cfg(overrides), tmp_path / "run")
    mem = s["memory"]
    for key in ("weights", "gradients", "optimizer_state"):
        assert mem["predicted"][key] == mem[key], key
    tuned = checkpoint.load(checkpoint.checkpoint_path(tmp_path / "run", 2))["model"]
    reference = build_model(build_model(compose_cfg(overrides).model).cfg)
    load_initial_weights(reference, str(src))
    moved = [k for k, v in reference.state_dict().items() if not torch.equal(v, tuned[k])]
    assert moved  # it trained from the loaded weights
    calibrated = "layer probabilities from the loaded weights' outliers" in caplog.text
    assert calibrated == (optimizer[0] == "optimizer=owlore")
