"""The dense head against the chunked ones (``model.loss_impl``: ``chunked``, the gradient formed
in forward, and ``chunked_recompute``) on a whole forward + backward (``make bench-head``).

One model per setting, the same weights, one fixed batch; the forward + backward times are
medians of ``--reps`` rounds in which the settings take turns (the order rotates each round, so a
drift of the machine hits all alike). The saved activations are counted with
``torch.autograd.graph.saved_tensors_hooks`` (``llm_pretrain.memory.activation_bytes``) and
printed beside the estimator's formula.

    python benchmarks/head_loss.py [--model llama_20m] [--batch 8] [--seq 256] \
        [--chunks 256,512,1024] [--precision fp32] [--reps 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from llm_pretrain.config import register_configs
from llm_pretrain.memory import activation_bytes
from llm_pretrain.memory_estimate import activation_bytes_formula
from llm_pretrain.model import build_model

CONF = Path(__file__).resolve().parents[1] / "conf"


def model_config(model: str, loss_impl: str, chunk: int):
    register_configs()
    GlobalHydra.instance().clear()
    overrides = [
        f"model={model}",
        f"model.loss_impl={loss_impl}",
        f"model.loss_chunk_tokens={chunk}",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides).model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_20m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument(
        "--chunks", default="256,512,1024", help="chunk sizes (tokens), comma-separated"
    )
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16_autocast"])
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    settings = [("dense", 1024)] + [
        (impl, int(c)) for impl in ("chunked", "chunked_recompute") for c in args.chunks.split(",")
    ]
    models = {}
    for impl, chunk in settings:
        torch.manual_seed(0)
        models[(impl, chunk)] = build_model(model_config(args.model, impl, chunk))
    vocab = models[settings[0]].cfg.vocab_size
    batch = torch.randint(
        0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)
    )
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16_autocast" else None
    )

    def step(model) -> float:
        start = time.perf_counter()
        with autocast if autocast is not None else nullcontext():
            loss = model(batch, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    rows = {}
    for key, model in models.items():
        rows[key] = {
            "saved": activation_bytes(model, batch, batch, autocast),  # (also the warm-up)
            "predicted": activation_bytes_formula(model.cfg, args.precision, args.batch, args.seq),
            "times": [],
        }
    order = list(models)
    for r in range(args.reps):
        for key in order[r % len(order) :] + order[: r % len(order)]:
            rows[key]["times"].append(step(models[key]))

    print(
        f"{args.model} {args.precision}, batch {args.batch} x {args.seq} tokens "
        f"({args.batch * (args.seq - 1)} predicted), vocabulary {vocab}; forward + backward, "
        f"median of {args.reps} rotating rounds; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(
        "| model.loss_impl | chunk (tokens) | forward + backward (s) | / dense "
        "| saved activations (MiB) | predicted (MiB) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    base = statistics.median(rows[settings[0]]["times"])
    for (impl, chunk), row in rows.items():
        t = statistics.median(row["times"])
        chunk_cell = chunk if impl != "dense" else "-"
        print(
            f"| {impl} | {chunk_cell} | {t:.3f} | {t / base:.2f}x | {row['saved'] / 2**20:.1f} | "
            f"{row['predicted'] / 2**20:.1f} |"
        )


if __name__ == "__main__":
    main()
