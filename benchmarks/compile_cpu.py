"""``trainer.compile`` against eager on CPU: a whole training step (forward, backward, AdamW).

Two models with the same weights, one with every decoder block compiled as the trainer does it
(``block.compile()``), one eager; one fixed batch. The compiled model first runs ``--warmup``
steps (compilation, and recompilation for the backward, happen there, timed apart); then the
two take turns for ``--reps`` rounds, the order rotating each round so that a drift of the
shared machine hits both alike. Reported: the median step of each, their ratio, the compile
time, and the largest loss difference over the timed steps (the compiled step must compute the
same training).

    python benchmarks/compile_cpu.py [--model llama_20m] [--batch 8] [--seq 256] [--reps 10]
        [--precision fp32] [--loss-impl chunked]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from step_timing import cpu_autocast, rotating, timed_step

from llm_pretrain.cpu_bench import compose
from llm_pretrain.model import build_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_20m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--loss-impl", default="chunked", choices=["chunked", "dense"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16_autocast"])
    args = ap.parse_args(argv)
    cfg = compose([f"model={args.model}", f"model.loss_impl={args.loss_impl}"]).model
    setups = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu"))
        if name == "compiled":
            for block in model.model.layers:
                block.compile()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        setups[name] = (model, opt)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    autocast = cpu_autocast(args.precision)

    def step(name: str) -> tuple[float, float]:
        return timed_step(*setups[name], ids, autocast)

    compile_s = 0.0
    for _ in range(args.warmup):  # both advance alike, so their weights stay comparable
        compile_s += step("compiled")[0]
        step("eager")
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    losses: dict[str, list[float]] = {"eager": [], "compiled": []}
    order = ["eager", "compiled"]
    for name in rotating(order, args.reps):
        t, loss = step(name)
        times[name].append(t)
        losses[name].append(loss)
    eager, compiled = (statistics.median(times[n]) for n in ("eager", "compiled"))
    diff = max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"], strict=True))
    print(
        f"{args.model}, {args.batch} x {args.seq} tokens, {args.precision}, "
        f"model.loss_impl={args.loss_impl}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.reps} interleaved rounds after "
        f"{args.warmup} warm-up steps\n"
    )
    print("| setting | median step (s) | step / eager |")
    print("| --- | ---: | ---: |")
    print(f"| eager | {eager:.3f} | 1.000 |")
    print(f"| trainer.compile=true | {compiled:.3f} | {compiled / eager:.3f} |")
    print(
        f"\ncompile (the {args.warmup} warm-up steps of the compiled model): {compile_s:.1f} s; "
        f"largest loss difference over the timed steps: {diff:.2e}"
    )


if __name__ == "__main__":
    main()
