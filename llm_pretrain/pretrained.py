"""``trainer.init_from``: start a run from trained weights (fine-tuning, continued pretraining).

Only the weights move: the optimizer, schedule, data position and step start fresh, unlike
``checkpoint.resume`` (which, when it finds a checkpoint of this run, replaces these weights
with the run's own, so an interrupted fine-tuning run resumes where it stopped).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from llm_pretrain import checkpoint, hf
from llm_pretrain.model import Llama


def load_initial_weights(model: Llama, spec: str) -> str:
    """Fill ``model`` (a plain ``Llama``, before any optimizer surgery) from ``spec``: a Hugging
    Face directory or one of our runs or checkpoints. Returns what was loaded, for the log."""
    path = Path(spec).expanduser()
    if hf.is_hf_directory(path):
        hf.check_shapes(model.cfg, path)
        hf.load_weights(model, path)
        return f"Hugging Face checkpoint {path}"
    from llm_pretrain.export import load_trained_model, locate

    try:
        ckpt, config = locate(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"trainer.init_from={spec}: {e}; give a Hugging Face model directory (config.json "
            "and model.safetensors), a run directory or one of its checkpoints"
        ) from None
    source = load_trained_model(ckpt, OmegaConf.load(config))
    theirs, ours = source.state_dict(), model.state_dict()
    diffs = [
        f"{k}: {tuple(theirs[k].shape) if k in theirs else None} vs {tuple(v.shape)}"
        for k, v in ours.items()
        if k not in theirs or theirs[k].shape != v.shape
    ]
    if diffs or set(theirs) != set(ours):
        raise checkpoint.CheckpointError(
            f"trainer.init_from={spec}: {ckpt} holds another model than this run's (checkpoint "
            f"vs model: {diffs[:4]}); set model=... to the shapes it was trained with"
        )
    model.load_state_dict(theirs)
    return f"{ckpt} (weights only)"
