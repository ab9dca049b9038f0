"""The cost of ``trainer.gradient_analysis_every``: one analysis (every projected matrix's
singular values, its basis's energy share) against one training step (forward, backward,
GaLore's update) of the same model, interleaved in one process (docs/gradient_analysis.md).

    python benchmarks/gradient_analysis_cost.py [--model llama_20m] [--reps 5]

The analysis runs every N steps, so its overhead is (analysis / step) / N.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llm_pretrain import optim
from llm_pretrain.gradient_analysis import GradientAnalysis
from llm_pretrain.memory import _compose as compose_cfg
from llm_pretrain.model import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_20m")
    ap.add_argument("--optimizer", default="galore")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    cfg = compose_cfg([f"model={args.model}", f"optimizer={args.optimizer}", "optimizer.rank=64"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = optim.build(cfg.optimizer, model)
    analysis = GradientAnalysis(model, opt, every=1)
    ids = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq))

    def step() -> None:
        loss = model(ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # (the bases exist from here on)
    step_s, analysis_s = [], []
    for _ in range(args.reps):
        t = time.perf_counter()
        step()
        step_s.append(time.perf_counter() - t)
        model(ids, ids).backward()
        t = time.perf_counter()
        analysis.measure(tokens=args.batch * (args.seq - 1))
        analysis_s.append(time.perf_counter() - t)
        opt.zero_grad(set_to_none=True)
    s, a = statistics.median(step_s), statistics.median(analysis_s)
    print(
        f"{args.model}, {args.optimizer}, {len(analysis.names)} matrices, batch {args.batch} x "
        f"{args.seq}, {torch.get_num_threads()} threads, {args.reps} reps (medians)"
    )
    print(f"step {s:.3f} s, analysis {a:.3f} s: {a / s:.3f} of a step")
    for n in (1, 10, 50, 100):
        print(f"  every {n}: {a / s / n:.2%} overhead")


if __name__ == "__main__":
    main()
