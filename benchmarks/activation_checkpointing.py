"""``trainer.activation_checkpointing`` none, blocks and selective side by side on CPU: the step
time each pays for the activations it does not keep.

Three models with the same weights, one per mode (``llm_pretrain.checkpointing``), each with its
own AdamW; one fixed batch. Each first runs one warm-up step; then for ``--steps`` rounds each
takes a whole training step (forward, backward, AdamW), the order rotating each round so that a
drift of the shared machine hits all alike. Reported: the median step of each and its ratio to
``none``, the activations each keeps for backward (measured with
``llm_pretrain.memory.activation_bytes``) beside the estimator's formula, the predicted
transient of recomputing one block in backward, and the largest loss difference to ``none`` over
the timed steps (checkpointing must not change the training).

    python benchmarks/activation_checkpointing.py [--model llama_20m] [--batch 8] [--seq 256] \\
        [--steps 10] [--precision fp32] [--loss-impl chunked]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from step_timing import cpu_autocast, rotating, timed_step

from llm_pretrain.checkpointing import MODES, apply_activation_checkpointing
from llm_pretrain.cpu_bench import compose
from llm_pretrain.memory import activation_bytes
from llm_pretrain.memory_estimate import activation_bytes_formula, recompute_bytes_formula
from llm_pretrain.model import build_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_20m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (one step of each mode)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16_autocast"])
    ap.add_argument("--loss-impl", default="chunked", choices=["chunked", "dense"])
    args = ap.parse_args(argv)
    if args.steps < 1:
        raise SystemExit(f"--steps={args.steps}: need at least one timed round")
    cfg = compose([f"model={args.model}", f"model.loss_impl={args.loss_impl}"]).model
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    autocast = cpu_autocast(args.precision)
    setups, saved = {}, {}
    for mode in MODES:
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu"))
        apply_activation_checkpointing(model, mode, args.precision)
        saved[mode] = activation_bytes(model, ids, ids, autocast)
        setups[mode] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))

    def step(mode: str) -> tuple[float, float]:
        return timed_step(*setups[mode], ids, autocast)

    for mode in MODES:  # warm-up: every model advances alike, so their weights stay equal
        step(mode)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    losses: dict[str, list[float]] = {m: [] for m in MODES}
    order = list(MODES)
    for mode in rotating(order, args.steps):
        t, loss = step(mode)
        times[mode].append(t)
        losses[mode].append(loss)

    shape = (cfg, args.precision, args.batch, args.seq)
    recompute = recompute_bytes_formula(*shape)
    print(
        f"{args.model}, {args.batch} x {args.seq} tokens, {args.precision}, "
        f"model.loss_impl={args.loss_impl}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; medians of {args.steps} interleaved rounds after "
        "one warm-up step each\n"
    )
    print(
        "| trainer.activation_checkpointing | median step (s) | / none "
        "| saved activations (MiB) | predicted (MiB) | recompute transient, predicted (MiB) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    base = statistics.median(times["none"])
    for mode in MODES:
        t = statistics.median(times[mode])
        predicted = activation_bytes_formula(*shape, checkpointing=mode)
        transient = f"{recompute / 2**20:.1f}" if mode != "none" else "-"
        print(
            f"| {mode} | {t:.3f} | {t / base:.3f} | {saved[mode] / 2**20:.1f} | "
            f"{predicted / 2**20:.1f} | {transient} |"
        )
    diff = max(
        abs(a - b) for mode in MODES for a, b in zip(losses[mode], losses["none"], strict=True)
    )
    print(f"\nlargest loss difference to none over the timed steps: {diff:.2e}")


if __name__ == "__main__":
    main()
