"""Every registered optimizer on the whole llama_60m model, side by side (``make bench-optim``).

Each method runs with its own ``conf/optimizer/<name>.yaml`` defaults (the paper's recipe) on the
same fp32 llama_60m and the same fixed random gradients for every parameter. Reported: the
optimizer-state bytes (exact, after the timed steps; with the closed-form formula as a check),
per parameter, their ratio to AdamW's, the median step time as a ratio to AdamW's, and the
first step (which computes every initial basis and state) as a ratio too. The memory column
answers "how much does X save"; the time column is this machine's CPU cost of the update
alone, not of training (RSO's costs and savings are in the forward and backward:
``benchmarks/rso_memory.py`` measures them).

    python benchmarks/registry_table.py [--steps 5] [--model llama_60m] [--only a,b]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from llm_pretrain import optim as optimizers
from llm_pretrain.config import register_configs
from llm_pretrain.model import build_model

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_optimizer(name: str, model: str):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"optimizer={name}", f"model={model}"])
    return cfg.model, cfg.optimizer


def run(name: str, model_name: str, steps: int) -> dict:
    model_cfg, cfg = compose_optimizer(name, model_name)
    torch.manual_seed(0)
    model = build_model(model_cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimizers.build(cfg, model)
    # after building: RSO replaces the targeted weights' gradients by its B matrices'
    g = torch.Generator().manual_seed(1)
    grads = {p: torch.randn(p.shape, generator=g) * 1e-3 for p in model.parameters()}
    times = []
    for _ in range(steps + 1):
        for p in model.parameters():
            p.grad = grads[p].clone() if p.requires_grad else None
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    real = sum(optimizers.state_nbytes(opt).values())
    formula = sum(optimizers.memory_formula(name, model, cfg, steps=steps + 1).values())
    n = sum(p.numel() for p in model.parameters())
    return {
        "first": times[0],
        "step": statistics.median(times[1:]),
        "bytes": real,
        "formula": formula,
        "params": n,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--model", default="llama_60m")
    ap.add_argument("--only", default="", help="comma-separated methods (default: all)")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or sorted(optimizers.METHODS)
    names = ["adamw"] + [n for n in names if n != "adamw"]
    run("adamw", args.model, args.steps)  # warm-up: allocator, thread pool, kernels
    rows = {name: run(name, args.model, args.steps) for name in names}
    base = rows["adamw"]
    print(
        f"{args.model} ({base['params'] / 1e6:.1f}M params, fp32), each method at its config's "
        f"defaults, median of {args.steps} steps after the first; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(
        "| method | state MiB | bytes / param | state / AdamW | formula = real | step / AdamW "
        "| first step / AdamW |"
    )
    print("| --- | ---: | ---: | ---: | :---: | ---: | ---: |")
    for name, r in rows.items():
        print(
            f"| {name} | {r['bytes'] / 2**20:.1f} | {r['bytes'] / r['params']:.3f} | "
            f"{r['bytes'] / base['bytes']:.3f} | "
            f"{'yes' if r['formula'] == r['bytes'] else 'NO'} | {r['step'] / base['step']:.2f}x | "
            f"{r['first'] / base['step']:.1f}x |"
        )


if __name__ == "__main__":
    main()
