"""Step time and bytes communicated per step, DDP against FSDP2, side by side (``make bench-dist``).

Run under torchrun (2 CPU ranks with gloo by default; the Makefile starts it):

    torchrun --standalone --nproc_per_node=2 benchmarks/distributed_step.py \\
        [--methods adamw,galore,apollo_mini,muon] [--steps 8] [--hidden 256] [--layers 4]

Every method trains the same LLaMA (random token batches of ``--micro`` x ``--seq`` per rank,
one micro-batch per step) once under DDP and once under FSDP2 in this one process group, so the
times are comparable as ratios. Bytes: the payload of every collective issued during a step, as
the size of the whole tensor it reduces or assembles (all-reduce: the tensor; all-gather and
reduce-scatter: the unsharded tensor; gather and scatter to an owner: the padded whole matrix),
counted on rank 0, through ``torch.distributed``'s Python functions (DDP's bucketed
all-reduces are routed there by its default comm hook, registered explicitly). Absolute times
here are CPU times, not GPU ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from llm_pretrain import optim as optimizers
from llm_pretrain import parallel
from llm_pretrain.config import ModelConfig, optimizer_settings
from llm_pretrain.model import build_model

COUNTED = (
    "all_reduce",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_gather_single",  # FSDP2's
    "reduce_scatter_single",
    "gather",
    "scatter",
)


class Bytes:
    """Collective payload bytes, counted while ``on``."""

    def __init__(self) -> None:
        self.total, self.on, self.by_name = 0, False, {}
        for name in COUNTED:
            original = getattr(dist, name)
            setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            if self.on:
                n = self._payload(name, args, kwargs)
                self.total += n
                self.by_name[name] = self.by_name.get(name, 0) + n
            return original(*args, **kwargs)

        return counted

    @staticmethod
    def _payload(name, args, kwargs) -> int:
        tensors = [*args, kwargs.get("output"), kwargs.get("input")]
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        if name == "all_reduce":
            return tensors[0].nbytes
        if name in COUNTED[1:5]:  # the unsharded side
            return max(t.nbytes for t in tensors)
        # gather / scatter to an owner: (this rank's padded rows, the owner's list of them)
        return tensors[0].nbytes * dist.get_world_size()

    def ddp_hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        return allreduce_hook(state, bucket)  # (its all_reduce is counted above)


def build(method: str, args, mode: str, counter: Bytes):
    torch.manual_seed(0)
    cfg = ModelConfig(
        name="bench",
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 32 * 32,
        num_heads=args.hidden // 64,
        num_layers=args.layers,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq,
    )
    model = build_model(cfg)
    extra = {"rank": args.rank} if method in ("galore", "apollo") else {}  # (APOLLO-Mini: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimizers.build(optimizer_settings(method, **extra), model)
    if mode == "fsdp":
        from llmpt.optimizers.sharded import shard_model

        opt = shard_model(
            model, opt, lambda m: parallel.fully_shard_model(m, torch.device("cpu"), "fp32")
        )
        return model, model, opt
    ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    ddp.register_comm_hook(None, counter.ddp_hook)
    return model, ddp, opt


def run(method: str, mode: str, args, counter: Bytes) -> dict:
    _, train_model, opt = build(method, args, mode, counter)
    g = torch.Generator().manual_seed(1 + dist.get_rank())
    times, per_step = [], []
    for step in range(args.warmup + args.steps):
        x = torch.randint(0, args.vocab, (args.micro, args.seq), generator=g)
        dist.barrier()
        counter.total, counter.on = 0, True
        t0 = time.perf_counter()
        train_model(x, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        elapsed = time.perf_counter() - t0
        counter.on = False
        if step >= args.warmup:
            times.append(elapsed)
            per_step.append(counter.total)
    kinds = {k: v // (args.warmup + args.steps) for k, v in counter.by_name.items()}
    counter.by_name = {}
    return {"step_s": statistics.median(times), "bytes": max(per_step), "by_kind": kinds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", default="adamw,galore,apollo_mini,muon")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--out", default="outputs/bench/distributed_step.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    counter = Bytes()
    results = {}
    for method in args.methods.split(","):
        results[method] = {mode: run(method, mode, args, counter) for mode in ("ddp", "fsdp")}
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        print(
            f"{world} CPU ranks (gloo), hidden {args.hidden}, {args.layers} layers, vocab "
            f"{args.vocab}, {args.micro} x {args.seq} tokens per rank per step, median of "
            f"{args.steps} steps\n"
        )
        print("| method | DDP step | FSDP2 step / DDP | DDP MiB/step | FSDP2 MiB/step | / DDP |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for method, r in results.items():
            d, f = r["ddp"], r["fsdp"]
            print(
                f"| {method} | {d['step_s'] * 1e3:.0f} ms | {f['step_s'] / d['step_s']:.2f} | "
                f"{d['bytes'] / 2**20:.2f} | {f['bytes'] / 2**20:.2f} | "
                f"{f['bytes'] / d['bytes']:.2f} |"
            )
        print("\nMiB per step by collective (FSDP2):")
        for method, r in results.items():
            kinds = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in r["fsdp"]["by_kind"].items())
            print(f"- {method}: {kinds}")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args), "world": world, "results": results}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
