"""The GPU check (``make gpu-check``): everything a lent GPU should confirm, in one script that
fits in minutes, writing every number to ``docs/gpu.md``.

    python -m llm_pretrain.gpu_check [--out docs/gpu.md] [--budget-s 480] [--dry]

On CUDA, in this order (the cheap and decisive first, so a short lease still answers them):
1. the environment: device, torch, CUDA, Triton and flash-attn versions, the date;
2. every Triton kernel against its PyTorch reference on CUDA tensors (quantize / dequantize,
   the seeded projection, MicroAdam's update, Philox);
3. flash-attn's logits against SDPA's on the same weights, when flash-attn is installed;
4. bf16 training, 30 steps each, of llama_60m and llama_350m with adamw, galore, galore_8bit,
   q_galore (INT8 weights), apollo, apollo_mini, microadam, ldadam, rso and muon: the loss is
   finite and falls (mean of the last 5 logged losses below the first 5's), tokens/s (the steps
   after the first 10, so compilation and warm-up stay out), MFU, the CUDA allocator's peak
   against the estimator's prediction (weights + gradients + state + saved activations; the
   peak also holds transients: the head's chunk, the backward's buffers, workspace);
5. llama_60m with AdamW under ``trainer.compile`` off and on, the dense and the chunked heads
   (Liger-Kernel's and the PyTorch one, when liger-kernel is installed), and each
   ``trainer.activation_checkpointing`` mode: tokens/s and peak, side by side.

Each check that fails is recorded with its error and the script goes on; one past the time budget
(``--budget-s``, 480 s) is recorded as skipped. The exit status is 1 when any check failed.

Without CUDA (or with ``--dry``) it runs a dry mode: the same code end to end on the CPU subset
(the kernels in Triton's interpreter on small tensors, llama_tiny for a few fp32 steps with a
few methods, the variants that run on CPU) and lists what it skipped; it writes to
``outputs/gpu_check/dry.md`` unless ``--out`` says otherwise (``tests/test_gpu_check.py`` runs
it).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

METHODS = [
    ("adamw", []),
    ("galore", []),
    ("galore_8bit", []),
    ("q_galore", ["optimizer.weight_storage=int8"]),
    ("apollo", []),
    ("apollo_mini", []),
    ("microadam", []),
    ("ldadam", []),
    ("rso", []),
    ("muon", []),
]
DRY_METHODS = ("adamw", "q_galore")
MODELS = ("llama_60m", "llama_350m")


@dataclass
class Check:
    section: str
    name: str
    status: str = "ok"  # ok | failed | skipped
    numbers: dict[str, object] = field(default_factory=dict)
    note: str = ""


@dataclass
class Plan:
    """What one mode (CUDA or dry) runs."""

    dry: bool
    device: str
    models: tuple[str, ...]
    methods: list[tuple[str, list[str]]]
    steps: int
    log_every: int
    micro_batch: dict[str, int]
    seq_len: int
    precision: str
    kernel_size: int  # elements of the kernels' test tensors


def make_plan(dry: bool) -> Plan:
    if dry:
        return Plan(True, "cpu", ("llama_tiny",), [m for m in METHODS if m[0] in DRY_METHODS],
                    steps=4, log_every=1, micro_batch={"llama_tiny": 4}, seq_len=64,
                    precision="fp32", kernel_size=3000)  # fmt: skip
    return Plan(False, "cuda", MODELS, METHODS, steps=30, log_every=1,
                micro_batch={"llama_60m": 32, "llama_350m": 16}, seq_len=256,
                precision="bf16", kernel_size=1 << 22)  # fmt: skip


class Runner:
    """Runs checks in order against a time budget, keeping every result."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.checks: list[Check] = []

    def run(self, section: str, name: str, fn: Callable[[], dict], skip: str = "") -> Check:
        check = Check(section, name)
        if skip:
            check.status, check.note = "skipped", skip
        elif time.perf_counter() - self.start > self.budget_s:
            check.status, check.note = "skipped", f"past the {self.budget_s:.0f} s budget"
        else:
            t0 = time.perf_counter()
            try:
                check.numbers = fn()
                if check.numbers.pop("_failed", False):
                    check.status = "failed"
                check.note = str(check.numbers.pop("_note", ""))
            except Exception as e:  # a failed check is a result: keep going
                check.status = "failed"
                check.note = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                traceback.print_exc()
            check.numbers["seconds"] = round(time.perf_counter() - t0, 1)
        self.checks.append(check)
        print(f"gpu_check: [{check.status}] {section}: {name} {check.numbers} {check.note}")
        return check


# ---------------------------------------------------------------- environment


def environment() -> dict[str, object]:
    cuda = torch.cuda.is_available()
    out: dict[str, object] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({_cpu_name()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "threads": torch.get_num_threads(),
    }
    for name in ("triton", "flash_attn", "liger_kernel", "bitsandbytes"):
        if importlib.util.find_spec(name) is None:
            out[name] = "not installed"
        else:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "installed")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        out["memory_gib"] = round(props.total_memory / 2**30, 1)
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------- kernels


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def kernel_checks(plan: Plan) -> dict[str, Callable[[], dict]]:
    """Each Triton kernel against its reference, on ``plan.device`` tensors (CPU: Triton's
    interpreter, which the caller turns on)."""
    from llmpt.kernels import microadam_update as mu
    from llmpt.kernels import philox, seeded_projection
    from llmpt.kernels import quant_blockwise as qb
    from llmpt.kernels.dispatch import triton_kernels

    dev, n = plan.device, plan.kernel_size

    def quantize() -> dict:
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(n + 1, generator=g) * torch.logspace(-3, 2, n + 1)).to(dev)
        out: dict[str, object] = {}
        for bits in (4, 8):
            ref = qb.quantize_reference(x, bits, 256)
            ours = qb.quantize_triton(x, bits, 256)
            same = torch.equal(ours.codes, ref.codes) and torch.equal(ours.scale, ref.scale)
            deq = _max_diff(qb.dequantize_triton(ref, torch.float32),
                            qb.dequantize_reference(ref, torch.float32))  # fmt: skip
            out[f"{bits}-bit codes equal"] = same
            out[f"{bits}-bit dequantize max diff"] = deq
            if not same or deq != 0.0:
                out["_failed"] = True
        return out

    def projection() -> dict:
        rows = max(64, min(4096, n // 1024))
        shape = (rows, rows // 2 + 7)
        out: dict[str, object] = {}
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            x = torch.randn(128, shape[0], generator=torch.Generator().manual_seed(1))
            x = x.to(dev, dtype)
            ours = seeded_projection.triton_impl(x, 99, shape, 0.125)
            ref = seeded_projection.reference(x, 99, shape, 0.125)
            rel = _max_diff(ours, ref) / max(float(ref.float().abs().max()), 1e-12)
            out[f"{str(dtype)[6:]} max rel diff"] = rel
            if rel > tol:
                out["_failed"] = True
        return out

    def microadam() -> dict:
        layout = mu.TopKLayout(max(1000, n // 16), 4096, 0.02)
        g = torch.Generator().manual_seed(2)
        rows = 6
        indices = torch.empty(rows, layout.k, dtype=torch.int16)
        for s in range(rows):
            cols = []
            for b in range(layout.blocks):
                size = layout.block_size if b < layout.blocks - 1 else layout.last_size
                keep = layout.k_block if b < layout.blocks - 1 else layout.k_last
                cols.append(torch.randperm(size, generator=g)[:keep])
            indices[s] = torch.cat(cols).to(torch.int16)
        values = torch.randn(rows, layout.k, generator=g).to(torch.bfloat16)
        ages = torch.tensor([2, 1, 0, 5, 4, 3])
        c1, c2 = (0.9**ages).float(), (0.999**ages).float()
        args = [t.to(dev) for t in (indices, values, c1, c2)]
        ref = mu.reference(*args, layout, 0.1, 0.01, 1e-8)
        ours = mu.triton_impl(*args, layout, 0.1, 0.01, 1e-8)
        rel = _max_diff(ours, ref) / max(float(ref.abs().max()), 1e-12)
        return {"numel": layout.numel, "max rel diff": rel, "_failed": rel > 1e-6}

    def philox_check() -> dict:
        count = min(n, 1 << 20)
        offsets = torch.arange(count, dtype=torch.int64).to(dev)
        ints = torch.zeros(count, 4, dtype=torch.int64, device=dev)
        normal = torch.empty(count, device=dev)
        triton_kernels("philox").draws[(-(-count // 128),)](
            ints, normal, offsets, 12345, count, BLOCK=128
        )
        ours = torch.stack(philox.philox(12345, offsets), dim=1)
        same = torch.equal(ours, ints)
        diff = _max_diff(philox.randn(12345, offsets), normal)
        return {"draws": count, "integers equal": same, "normal max diff": diff,
                "_failed": not same or diff > 1e-5}  # fmt: skip

    return {
        "quantize / dequantize (4 and 8 bits)": quantize,
        "seeded projection x @ P": projection,
        "MicroAdam update": microadam,
        "Philox-4x32-10": philox_check,
    }


# ---------------------------------------------------------------- flash-attn


def flash_vs_sdpa() -> dict:
    from llm_pretrain.model import build_model

    cfg = _model_cfg("llama_60m")
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cuda")).to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (4, 256), device="cuda")
    out = {}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.backend = "sdpa"
        sdpa = model(ids).float()
        for layer in model.model.layers:
            layer.self_attn.backend = "flash"
        flash = model(ids).float()
    rel = _max_diff(flash, sdpa) / float(sdpa.abs().max())
    out["logits max rel diff"] = rel
    out["argmax agreement"] = float((flash.argmax(-1) == sdpa.argmax(-1)).float().mean())
    out["_failed"] = rel > 2e-2
    return out


def _model_cfg(name: str):
    from llm_pretrain.cpu_bench import compose

    return compose([f"model={name}"]).model


# ---------------------------------------------------------------- training


def train_run(plan: Plan, work: Path, model: str, optimizer: str, extra: list[str]) -> dict:
    """One short run in this process; its loss trend, throughput and memory."""
    from llm_pretrain.cpu_bench import compose
    from llm_pretrain.train import train

    tag = "_".join([model, optimizer, *(e.replace("=", "-").replace(".", "-") for e in extra)])
    run_dir = work / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        f"model={model}",
        f"optimizer={optimizer}",
        "data=builtin",
        f"data.seq_len={plan.seq_len}",
        f"trainer.device={plan.device}",
        f"trainer.precision={plan.precision}",
        f"trainer.max_steps={plan.steps}",
        f"trainer.warmup_steps={max(1, plan.steps // 10)}",
        f"trainer.micro_batch_size={plan.micro_batch[model]}",
        f"trainer.global_batch_size={plan.micro_batch[model]}",
        f"trainer.log_every={plan.log_every}",
        "trainer.eval_every=0",
        "trainer.eval_at_start=false",
        "trainer.progress=false",
        f"eval.tokens={4 * plan.seq_len}",
        *extra,
    ]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    summary = train(compose(overrides), run_dir)
    losses, rates = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            losses.append(rec["train/loss"])
            if rec["step"] > plan.steps // 3:  # past compilation and warm-up
                rates.append(rec["train/tokens_per_s"])
    mem = summary["memory"]
    predicted = (mem.get("predicted") or {}).get("total")
    peak = mem.get("cuda_peak_allocated")
    k = min(5, len(losses) // 2)
    first, last = statistics.fmean(losses[:k]), statistics.fmean(losses[-k:])
    finite = all(x == x and abs(x) != float("inf") for x in losses)
    out: dict[str, object] = {
        "loss first": round(first, 4),
        "loss last": round(last, 4),
        "tokens/s": round(statistics.median(rates)) if rates else None,
        "MFU": round(summary["mfu"], 4) if summary.get("mfu") is not None else None,
        "peak MiB": round(peak / 2**20, 1) if peak else None,
        "predicted MiB": round(predicted / 2**20, 1) if predicted else None,
        "peak / predicted": round(peak / predicted, 3) if peak and predicted else None,
    }
    if not finite or not last < first:
        out["_failed"] = True
        out["_note"] = "loss not finite" if not finite else "loss did not fall"
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def variants(plan: Plan) -> list[tuple[str, list[str], str]]:
    """(name, overrides, why skipped) of the llama_60m AdamW comparisons."""
    from llm_pretrain.checkpointing import MODES

    out: list[tuple[str, list[str], str]] = []
    compile_skip = "dry run: CPU compile is measured in docs/benchmarks.md" if plan.dry else ""
    out.append(("compile off", ["trainer.compile=false"], compile_skip))
    out.append(("compile on", ["trainer.compile=true"], compile_skip))
    out.append(("dense head", ["model.loss_impl=dense"], ""))
    out.append(("chunked head", ["model.loss_impl=chunked"], ""))
    out.append(("chunked head, recomputing", ["model.loss_impl=chunked_recompute"], ""))
    liger = importlib.util.find_spec("liger_kernel") is not None
    liger_skip = (
        "dry run: no CUDA" if plan.dry else "" if liger else "liger-kernel is not installed"
    )
    for kernel in ("liger", "torch"):
        head = ["model.loss_impl=chunked", f"model.loss_kernel={kernel}"]
        out.append((f"chunked head, model.loss_kernel={kernel}", head, liger_skip))
    for mode in MODES:
        out.append((f"activation checkpointing {mode}",
                    [f"trainer.activation_checkpointing={mode}"], ""))  # fmt: skip
    return out


# ---------------------------------------------------------------- the page


def render(env: dict, checks: list[Check], command: str, wall_s: float, dry: bool) -> str:
    lines = [
        "# GPU check" + (" (dry run on CPU)" if dry else ""),
        "",
        f"Written by `{command}` ({__name__}), {env['date']}, in {wall_s:.0f} s.",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in env.items()),
        "",
    ]
    failed = [c for c in checks if c.status == "failed"]
    skipped = [c for c in checks if c.status == "skipped"]
    lines.append(
        f"{len(checks)} checks: {len(checks) - len(failed) - len(skipped)} ok, "
        f"{len(failed)} failed, {len(skipped)} skipped."
    )
    for section in dict.fromkeys(c.section for c in checks):
        mine = [c for c in checks if c.section == section]
        keys = list(dict.fromkeys(k for c in mine for k in c.numbers))
        lines += ["", f"## {section}", "",
                  "| " + " | ".join(["check", "status", *keys, "note"]) + " |",
                  "| --- | --- |" + " ---: |" * len(keys) + " --- |"]  # fmt: skip
        for c in mine:
            cells = [c.name, c.status, *(_cell(c.numbers.get(k)) for k in keys), c.note]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:,.4g}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="docs/gpu.md (dry: outputs/gpu_check/dry.md)")
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--dry", action="store_true", help="the CPU subset, even with CUDA")
    ap.add_argument("--work", type=Path, default=Path("outputs/gpu_check"))
    args = ap.parse_args(argv)
    dry = args.dry or not torch.cuda.is_available()
    out = args.out or (args.work / "dry.md" if dry else Path("docs/gpu.md"))
    plan = make_plan(dry)
    triton = importlib.util.find_spec("triton") is not None
    if dry and triton:
        # Triton's interpreter for CPU tensors. It must be on before triton is first imported:
        # triton.language's own jit helpers (tl.randn's Philox) are decorated at import time
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("gpu_check --dry: run it in a fresh process (triton is imported)")
        os.environ["TRITON_INTERPRET"] = "1"
    runner = Runner(args.budget_s)
    t0 = time.perf_counter()
    env = environment()
    for name, fn in kernel_checks(plan).items():
        runner.run("Triton kernels against their PyTorch references", name, fn,
                   "" if triton else "triton is not installed")  # fmt: skip
    flash_skip = (
        "no CUDA" if dry else "" if importlib.util.find_spec("flash_attn") else
        "flash-attn is not installed"
    )  # fmt: skip
    runner.run("flash-attn against SDPA", "llama_60m bf16 logits, 4 x 256", flash_vs_sdpa,
               flash_skip)  # fmt: skip
    work = args.work / "runs"
    section = f"{plan.precision} training, {plan.steps} steps"
    for model in plan.models:
        for optimizer, extra in plan.methods:
            runner.run(
                section,
                f"{model} {optimizer} {' '.join(extra)}".strip(),
                lambda m=model, o=optimizer, e=extra: train_run(plan, work, m, o, e),
            )
    if dry:
        skipped = [m for m, _ in METHODS if m not in DRY_METHODS]
        runner.run(
            section,
            f"{', '.join(skipped)}; llama_60m, llama_350m",
            dict,
            "dry run: the CPU subset trains llama_tiny with " + ", ".join(DRY_METHODS),
        )
    base = plan.models[0]
    for name, extra, skip in variants(plan):
        runner.run(f"{base} AdamW: variants", name,
                   lambda e=extra: train_run(plan, work, base, "adamw", e), skip)  # fmt: skip
    wall = time.perf_counter() - t0
    command = "python -m llm_pretrain.gpu_check" + (" --dry" if dry else "")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(env, runner.checks, command, wall, dry))
    print(f"gpu_check: wrote {out}")
    return 1 if any(c.status == "failed" for c in runner.checks) else 0


if __name__ == "__main__":
    raise SystemExit(main())
