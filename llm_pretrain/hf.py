"""Hugging Face ``LlamaForCausalLM`` directories, in and out: ``config.json``, safetensors weights
and the tokenizer files.

Our parameter names are HF's, so weights move without renaming. Reading accepts what our model
can compute exactly (grouped-query attention, a tied head, any ``rope_theta``) and refuses by name
everything else (another architecture, biases, RoPE scaling, unknown tensors), because a silently
dropped tensor or setting is a different model. Only safetensors are read: a pickled
``pytorch_model.bin`` can run code when loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

ARCHITECTURE = "LlamaForCausalLM"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# buffers some older checkpoints store; ours are computed from rope_theta
RECOMPUTED_SUFFIXES = ("rotary_emb.inv_freq",)


def is_hf_directory(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def model_source(init_from: str | None) -> Path:
    """The directory ``model=hf`` takes its shapes from: ``trainer.init_from``, which must be a
    Hugging Face model directory."""
    if not init_from or not is_hf_directory(Path(init_from).expanduser()):
        raise ValueError(
            f"model=hf takes its shapes from trainer.init_from's config.json, but "
            f"trainer.init_from={init_from!r} is not a Hugging Face model directory; set it to "
            "one (a folder with config.json and model.safetensors) or pick a model=llama_*"
        )
    return Path(init_from).expanduser()


def _rope(cfg: dict[str, Any]) -> tuple[float, str]:
    """(theta, type) from either config layout: transformers 4's ``rope_theta`` and
    ``rope_scaling``, or transformers 5's ``rope_parameters``."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type") or "default"
    return float(theta), kind


def read_config(path: str | Path) -> dict[str, Any]:
    """Our ``model.*`` fields for the checkpoint at ``path``, refusing what ``Llama`` cannot
    compute exactly."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no config.json; not a Hugging Face model directory")
    cfg = json.loads(file.read_text())
    archs = cfg.get("architectures") or [ARCHITECTURE]
    if cfg.get("model_type") != "llama" or archs != [ARCHITECTURE]:
        raise ValueError(
            f"{file}: model_type={cfg.get('model_type')!r}, architectures={archs}: only "
            f"{ARCHITECTURE} (model_type llama) checkpoints can be loaded"
        )
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    theta, rope_type = _rope(cfg)
    refused = {
        "hidden_act": (cfg.get("hidden_act", "silu"), "silu"),
        "attention_bias": (cfg.get("attention_bias", False), False),
        "mlp_bias": (cfg.get("mlp_bias", False), False),
        "rope type": (rope_type, "default"),
        "head_dim": (cfg.get("head_dim") or hidden // heads, hidden // heads),
        "pretraining_tp": (cfg.get("pretraining_tp", 1), 1),
    }
    bad = [f"{k}={v!r} (supported: {ok!r})" for k, (v, ok) in refused.items() if v != ok]
    if bad:
        raise ValueError(f"{file}: not supported by our Llama: {'; '.join(bad)}")
    kv = cfg.get("num_key_value_heads") or heads
    return {
        "hidden_size": hidden,
        "intermediate_size": cfg["intermediate_size"],
        "num_heads": heads,
        "num_layers": cfg["num_hidden_layers"],
        "vocab_size": cfg["vocab_size"],
        "max_position_embeddings": cfg.get("max_position_embeddings", 2048),
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "num_kv_heads": None if kv == heads else kv,
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def check_shapes(model_cfg, path: str | Path) -> None:
    """Refuse a run whose ``model.*`` differs from the checkpoint's config, naming each key."""
    theirs = read_config(path)
    diffs = [
        f"model.{k}={getattr(model_cfg, k, None)!r} vs {v!r}"
        for k, v in theirs.items()
        if getattr(model_cfg, k, None) != v
    ]
    if diffs:
        raise ValueError(
            f"trainer.init_from={path} holds another model than model={model_cfg.name} ("
            + "; ".join(diffs)
            + "): use model=hf, which takes every shape from the checkpoint's config.json"
        )


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint (one safetensors file or a sharded index)."""
    from safetensors.torch import load_file

    path = Path(path)
    if (path / WEIGHTS).is_file():
        files = [path / WEIGHTS]
    elif (path / INDEX).is_file():
        index = json.loads((path / INDEX).read_text())
        files = [path / f for f in sorted(set(index.get("weight_map", {}).values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing or not files:
            raise FileNotFoundError(f"{path / INDEX} names missing shard files {missing[:3]}")
    else:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
        hint = (
            f" (it has {pickled[:2]}: pickled weights, which we do not load because loading "
            "them can run code; convert them with transformers' save_pretrained"
            "(safe_serialization=True))"
            if pickled
            else ""
        )
        raise FileNotFoundError(f"{path}: no {WEIGHTS} or {INDEX}{hint}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Copy the checkpoint's tensors into ``model`` (a plain ``Llama`` of the same shapes),
    refusing unknown, missing or misshapen tensors by name."""
    theirs = {k: v for k, v in read_weights(path).items() if not k.endswith(RECOMPUTED_SUFFIXES)}
    ours = model.state_dict()
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    if tied and "lm_head.weight" in theirs:
        if not torch.equal(theirs["lm_head.weight"], theirs.get("model.embed_tokens.weight")):
            raise ValueError(
                f"{path}: config.json ties the embeddings, but lm_head.weight differs from "
                "model.embed_tokens.weight; fix tie_word_embeddings in config.json"
            )
        del theirs["lm_head.weight"]
    expected = set(ours) - ({"lm_head.weight"} if tied else set())
    unknown, missing = sorted(set(theirs) - expected), sorted(expected - set(theirs))
    if unknown or missing:
        raise ValueError(
            f"{path}: tensors our Llama does not have: {unknown[:5]}"
            + (f" (+{len(unknown) - 5})" if len(unknown) > 5 else "")
            + f"; tensors it lacks: {missing[:5]}"
            + (f" (+{len(missing) - 5})" if len(missing) > 5 else "")
        )
    wrong = [
        f"{k} {tuple(theirs[k].shape)} vs {tuple(ours[k].shape)}"
        for k in sorted(expected)
        if theirs[k].shape != ours[k].shape
    ]
    if wrong:
        raise ValueError(f"{path}: tensor shapes differ from the model's: {wrong[:5]}")
    with torch.no_grad():
        for k in expected:
            ours[k].copy_(theirs[k])


# ---------------------------------------------------------------------------------- out
def hf_config(model_cfg, tokenizer) -> Any:
    """A transformers ``LlamaConfig`` for our model (and its tokenizer's special ids)."""
    from transformers import LlamaConfig

    from llm_pretrain.model import kv_heads

    return LlamaConfig(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=kv_heads(model_cfg),
        max_position_embeddings=model_cfg.max_position_embeddings,
        rms_norm_eps=model_cfg.rms_norm_eps,
        rope_theta=model_cfg.rope_theta,
        hidden_act="silu",
        tie_word_embeddings=bool(getattr(model_cfg, "tie_embeddings", False)),
        pad_token_id=tokenizer.pad_id,
        eos_token_id=tokenizer.eos_id,
        bos_token_id=None,
        architectures=[ARCHITECTURE],
        torch_dtype="float32",
    )


def write_weights(state: dict[str, torch.Tensor], out: Path, tied: bool) -> None:
    from safetensors.torch import save_file

    tensors = {
        k: v.detach().contiguous().cpu()
        for k, v in state.items()
        if not (tied and k == "lm_head.weight")  # (HF re-ties it from the config)
    }
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})


def write_tokenizer(spec: str, tokenizer, out: Path) -> None:
    """Tokenizer files that ``AutoTokenizer.from_pretrained(out)`` loads with our ids: the T5
    SentencePiece model through transformers' converter, a ``tokenizer.json`` (with its config)
    as it is, the built-in language as a word-level ``tokenizers`` model."""
    from transformers import PreTrainedTokenizerFast

    from llm_pretrain.tokenizer import BuiltinTokenizer

    if isinstance(tokenizer, BuiltinTokenizer):
        fast = PreTrainedTokenizerFast(
            tokenizer_object=_builtin_tokenizer(tokenizer),
            pad_token="<pad>",
            eos_token="</s>",
            unk_token="<unk>",
        )
        fast.save_pretrained(out)
        return
    path = Path(spec).expanduser()
    if path.suffix == ".model":
        import tempfile

        from transformers import T5Tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(path, Path(tmp) / "spiece.model")
            # no sentinel ids: our tokenizer has none (HF's T5 adds 100 by default)
            T5Tokenizer.from_pretrained(tmp, extra_ids=0).save_pretrained(out)
        return
    directory = path if path.is_dir() else path.parent
    source = path if path.suffix == ".json" else directory / "tokenizer.json"
    if not source.is_file():  # (a hub name: the run loaded it from the network)
        raise FileNotFoundError(
            f"data.tokenizer={spec}: no local tokenizer.json to export; point data.tokenizer "
            "at a local file or directory"
        )
    shutil.copy(source, out / "tokenizer.json")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (directory / name).is_file():
            shutil.copy(directory / name, out / name)


def _builtin_tokenizer(tokenizer):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    from llm_pretrain.corpus import _WORD_RE

    words = tokenizer.language.words
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(_WORD_RE.pattern), "isolated"),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.eos_id)]
    )
    return tok
