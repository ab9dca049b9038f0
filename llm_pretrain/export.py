"""``python -m llm_pretrain.export RUN_DIR_OR_CHECKPOINT OUT_DIR``: a trained model as a Hugging
Face ``LlamaForCausalLM`` directory (``config.json``, ``model.safetensors``, tokenizer files).

The model is rebuilt from the run's ``config.yaml`` with its optimizer's model surgery (RSO's
W0 + B P^T, Q-GaLore's INT8 weights, GradNormLoRP's g V / ||V||, WeLore's factors B A, with the
ranks its config.yaml recorded), loaded from the checkpoint (a
single file or a sharded DCP directory) and folded back into plain linears, so the export is the
model the run trained.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llm_pretrain import checkpoint, data, hf, sharded_checkpoint
from llm_pretrain.config import ModelConfig
from llm_pretrain.model import Llama, build_model
from llm_pretrain.tokenizer import load_tokenizer

USAGE = """python -m llm_pretrain.export RUN_DIR_OR_CHECKPOINT OUT_DIR

RUN_DIR_OR_CHECKPOINT: a run directory (its latest checkpoint), a checkpoint file
(checkpoints/step_XXXXXXXX.pt) or a sharded checkpoint directory (checkpoints/step_XXXXXXXX/);
the run's config.yaml must sit beside its checkpoints/ folder. OUT_DIR must not hold files yet.
"""


def locate(source: Path) -> tuple[Path, Path]:
    """(the checkpoint, the run's config.yaml) for a run directory or a checkpoint path."""
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such run directory or checkpoint")
    if (source / "config.yaml").is_file():  # a run directory
        found = checkpoint.resolve(str(source), source)
        return found, source / "config.yaml"
    run_dir = source.parent.parent  # run/checkpoints/step_X(.pt)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(
            f"{source}: no config.yaml at {config}; export needs the run's config.yaml beside "
            "its checkpoints/ folder (pass the run directory or a checkpoint inside it)"
        )
    return source, config


def load_trained_model(ckpt: Path, cfg: DictConfig) -> Llama:
    """The model ``ckpt`` holds, as a plain ``Llama`` (surgery folded back)."""
    from llm_pretrain import optim as optimizers
    from llmpt.optimizers.int8_linear import unwrap_int8
    from llmpt.optimizers.rso import unwrap
    from llmpt.optimizers.weight_norm import unwrap as unwrap_weight_norm
    from llmpt.optimizers.welore import uncompress

    model = build_model(cfg.model)
    if optimizers.METHODS[cfg.optimizer.name].surgery:  # the checkpoint holds the wrapped model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizers.build(cfg.optimizer, model, attach=False)
    if sharded_checkpoint.is_sharded_checkpoint(ckpt):
        sharded_checkpoint.load_meta(ckpt)  # refuses another format before anything is read
        state = sharded_checkpoint.consolidate_model(ckpt)
    else:
        state = checkpoint.load(ckpt, keys=("model",))["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise checkpoint.CheckpointError(
            f"{ckpt}: its model does not match the run's config.yaml ({e})"
        ) from e
    uncompress(unwrap_weight_norm(unwrap_int8(unwrap(model))))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def export(source: Path, out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty directory; choose a new one")
    ckpt, config = locate(source)
    cfg = OmegaConf.load(config)
    # (a run written before a model key existed gets its default)
    cfg.model = OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.model)
    tokenizer = load_tokenizer(cfg.data.tokenizer, data.builtin_spec(cfg.data))
    model = load_trained_model(ckpt, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf.hf_config(cfg.model, tokenizer).save_pretrained(tmp)
        hf.write_weights(model.state_dict(), tmp, model.cfg.tie_embeddings)
        hf.write_tokenizer(cfg.data.tokenizer, tokenizer, tmp)
        if out.exists():
            out.rmdir()  # (empty, checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ckpt


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] in ("-h", "--help"):
        raise SystemExit(USAGE)
    source, out = Path(args[0]).expanduser(), Path(args[1]).expanduser()
    try:
        ckpt = export(source, out)
    except (FileNotFoundError, FileExistsError, ValueError, checkpoint.CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"exported {ckpt} to {out} (LlamaForCausalLM: config.json, model.safetensors, tokenizer)")


if __name__ == "__main__":
    main()
