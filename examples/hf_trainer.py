"""One of our optimizers in Hugging Face's ``Trainer``: a tiny randomly initialised
transformers ``LlamaForCausalLM`` (nothing is downloaded), trained a few steps on local text.

    python examples/hf_trainer.py [--text FILE] [--steps 5] [--out DIR]

``Trainer(..., optimizers=(GaLore(...), scheduler))``: GaLore projects the attention and MLP
matrices (``param_groups(model, ["attn", "mlp"])`` matches transformers' ``self_attn`` and
``mlp`` names); embeddings, norms and lm_head take plain Adam. The text is read as bytes, so the
vocabulary is 256 ids and no tokenizer is needed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from llmpt.optimizers.api import GaLore, param_groups

SEQ_LEN, ROWS = 32, 8
README = Path(__file__).resolve().parents[1] / "README.md"


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ_LEN,
    )
    return LlamaForCausalLM(config)


def byte_rows(path: Path) -> torch.Tensor:
    """The first ROWS x SEQ_LEN bytes of ``path`` as rows of token ids."""
    raw = path.read_bytes()[: ROWS * SEQ_LEN]
    if len(raw) < ROWS * SEQ_LEN:
        raise ValueError(f"{path} has {len(raw)} bytes; the example needs {ROWS * SEQ_LEN}")
    return torch.tensor(list(raw), dtype=torch.long).view(ROWS, SEQ_LEN)


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def optimizer_and_schedule(model, steps: int):
    optimizer = GaLore(param_groups(model, ["attn", "mlp"]), lr=1e-2, rank=8, update_gap=2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 - t / steps)
    return optimizer, scheduler


def train(text: Path = README, steps: int = 5, out: Path | None = None, seed: int = 0):
    """The model after ``steps`` Trainer steps (every step sees all ROWS rows)."""
    from transformers import Trainer, TrainingArguments

    model = tiny_llama(seed)
    optimizer, scheduler = optimizer_and_schedule(model, steps)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=str(out or tmp),
            max_steps=steps,
            per_device_train_batch_size=ROWS,
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=seed,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=Rows(byte_rows(text)),
            optimizers=(optimizer, scheduler),
        )
        trainer.train()
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return model, losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", type=Path, default=README)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    a = parser.parse_args()
    _, losses = train(a.text, a.steps, a.out)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} after {len(losses)} Trainer steps")
