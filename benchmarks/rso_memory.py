"""RSO against AdamW on a whole training step of one model (``make bench-optim``).

RSO's savings are outside the optimizer step, so this measures what it changes: the activations
saved for backward (counted with ``torch.autograd.graph.saved_tensors_hooks``) for the whole
model and for the targeted linears alone (every saved tensor created inside their forward, each
storage once: the plain model's q, k and v share one saved input, gate and up another), the
gradient bytes after backward, the optimizer-state bytes, and the forward + backward + step time
as a ratio to AdamW, both in this process, alternating.

    python benchmarks/rso_memory.py [--model llama_60m] [--rank 128] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from registry_table import compose_optimizer
from torch import nn

from llm_pretrain import optim as optimizers
from llm_pretrain.memory import SavedTensorCounter, activation_bytes, grad_bytes
from llm_pretrain.model import build_model
from llmpt.optimizers.rso import RsoLinear, rso_targets


def linear_activation_bytes(model: nn.Module, targets: list[str], batch: torch.Tensor) -> int:
    """Bytes saved for backward inside the targeted linears' forwards (distinct storages)."""
    counter = SavedTensorCounter(model)
    modules = [m for _, m in rso_targets(model, targets)]

    def start(*_) -> None:  # (a pre-hook's return value would replace the input)
        counter.__enter__()

    def stop(*_) -> None:
        counter.__exit__(None, None, None)

    hooks = []
    for m in modules:
        hooks += [m.register_forward_pre_hook(start), m.register_forward_hook(stop)]
    model(batch, batch).backward()
    model.zero_grad(set_to_none=True)
    for h in hooks:
        h.remove()
    return counter.bytes


def setup(name: str, model_name: str, rank: int):
    model_cfg, cfg = compose_optimizer(name, model_name)
    if "rank" in cfg:
        cfg.rank = rank
    torch.manual_seed(0)
    model = build_model(model_cfg)
    return model, optimizers.build(cfg, model), cfg


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_60m")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    runs = {name: setup(name, args.model, args.rank) for name in ("adamw", "rso")}
    vocab = runs["adamw"][0].cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    targets = list(runs["rso"][2].target_modules)

    rows = {}
    for name, (model, opt, _) in runs.items():
        rows[name] = {
            "activations": activation_bytes(model, batch, batch),
            "linears": linear_activation_bytes(model, targets, batch),
        }
        model(batch, batch).backward()
        rows[name]["gradients"] = grad_bytes(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rows[name]["state"] = sum(optimizers.state_nbytes(opt).values())
        rows[name]["times"] = []
    for _ in range(args.steps):  # alternate, so drifts in the machine hit both alike
        for name, (model, opt, _) in runs.items():
            start = time.perf_counter()
            model(batch, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            rows[name]["times"].append(time.perf_counter() - start)

    rso_model = runs["rso"][0]
    wrapped = [m for m in rso_model.modules() if isinstance(m, RsoLinear)]
    shapes = sorted({(m.out_features, m.in_features) for m in wrapped})
    print(
        f"{args.model} fp32, batch {args.batch} x {args.seq} tokens, RSO rank {args.rank} on "
        f"{len(wrapped)} linears of shapes (out, in) {shapes}; median of {args.steps} "
        f"alternating steps; torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| quantity | AdamW | RSO | RSO / AdamW |")
    print("| --- | ---: | ---: | ---: |")
    a, r = rows["adamw"], rows["rso"]
    for key, label in [
        ("linears", "activations saved by the targeted linears (MiB)"),
        ("activations", "activations saved by the whole model (MiB)"),
        ("gradients", "gradients (MiB)"),
        ("state", "optimizer state (MiB)"),
    ]:
        print(f"| {label} | {a[key] / 2**20:.1f} | {r[key] / 2**20:.1f} | {r[key] / a[key]:.3f} |")
    ta, tr = statistics.median(a["times"]), statistics.median(r["times"])
    print(f"| forward + backward + step (s) | {ta:.3f} | {tr:.3f} | {tr / ta:.2f}x |")
    per_linear = ", ".join(f"{args.rank}/{d_in} = {args.rank / d_in:.3f}" for _, d_in in shapes)
    print(f"\nper wrapped linear, x P instead of x keeps r / d_in of its input: {per_linear}")


if __name__ == "__main__":
    main()
