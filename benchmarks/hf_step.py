"""Our LLaMA against ``transformers.LlamaForCausalLM`` with identical weights and batches: a whole
training step's time on CPU, and the activation bytes of the LM head.

Four models with the same weights: ours with each head (``model.loss_impl``: chunked, the
default; chunked_recompute; dense) and HF's (SDPA attention, its own loss). Times: a training
step (forward, backward, AdamW), medians of ``--reps`` rounds in which the four take turns, the
order rotating each round. Bytes: what autograd saves for backward
(``llm_pretrain.memory.SavedTensorCounter``), for the whole forward and for the trunk alone
(embeddings, blocks, final norm); the head's share is the difference, measured at
``--head-batch`` sequences of llama_60m (the papers' micro-batch of 128 scales the per-token
parts by 128 / batch; a weight-sized part, the chunked head's dW, stays).

    python benchmarks/hf_step.py [--model llama_20m] [--batch 8] [--seq 256] [--reps 10]
        [--head-model llama_60m] [--head-batch 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from transformers import LlamaForCausalLM

from llm_pretrain.cpu_bench import compose
from llm_pretrain.hf import hf_config
from llm_pretrain.memory import SavedTensorCounter
from llm_pretrain.model import build_model


def hf_twin(ours) -> LlamaForCausalLM:
    """HF's model with our weights, configured as our HF export configures it (``hf.hf_config``;
    the special ids do not matter to a loss over given labels)."""
    config = hf_config(ours.cfg, SimpleNamespace(pad_id=0, eos_id=1))
    config._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(config)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights do not line up: missing {missing}, unexpected {unexpected}")
    return hf


def ours_model(name: str, loss_impl: str):
    torch.manual_seed(0)
    cfg = compose([f"model={name}", f"model.loss_impl={loss_impl}"]).model
    return build_model(cfg, torch.device("cpu"))


def losses(models: dict, ids: torch.Tensor) -> dict[str, float]:
    out = {}
    for name, m in models.items():
        with torch.no_grad():
            out[name] = float(m(input_ids=ids, labels=ids).loss if name == "hf" else m(ids, ids))
    return out


def saved_bytes(name: str, model, ids: torch.Tensor, trunk: bool) -> int:
    counter = SavedTensorCounter(model)
    with counter:
        if name == "hf":
            out = (model.model(input_ids=ids).last_hidden_state.sum() if trunk
                   else model(input_ids=ids, labels=ids).loss)  # fmt: skip
        elif trunk:
            x = model.model.embed_tokens(ids)
            for layer in model.model.layers:
                x = layer(x, model.rope_cos, model.rope_sin)
            out = model.model.norm(x).sum()
        else:
            out = model(ids, ids)
    out.backward()
    model.zero_grad(set_to_none=True)
    return counter.bytes


IMPLS = ("chunked", "chunked_recompute", "dense")


def twins(name: str) -> dict:
    """Ours with each head, and HF's, all with the same weights."""
    models = {f"ours, {impl}": ours_model(name, impl) for impl in IMPLS}
    models["hf"] = hf_twin(models["ours, chunked"])
    return models


def head_table(name: str, batch: int, seq: int) -> None:
    models = twins(name)
    vocab = models["hf"].config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(2))
    print(f"\n{name}, {batch} x {seq} tokens, fp32: bytes saved for backward\n")
    print("| model | whole forward (MiB) | trunk (MiB) | head (MiB) | head / HF's head |")
    print("| --- | ---: | ---: | ---: | ---: |")
    heads = {}
    rows = []
    for label, m in models.items():
        key = "hf" if label == "hf" else label
        whole = saved_bytes(key, m, ids, trunk=False)
        trunk = saved_bytes(key, m, ids, trunk=True)
        heads[label] = whole - trunk
        rows.append((label, whole, trunk))
    for label, whole, trunk in rows:
        print(f"| {label} | {whole / 2**20:.1f} | {trunk / 2**20:.1f} | "
              f"{heads[label] / 2**20:.1f} | {heads[label] / heads['hf']:.3f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_20m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--head-model", default="llama_60m")
    ap.add_argument("--head-batch", type=int, default=4)
    args = ap.parse_args(argv)
    models = twins(args.model)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, models["hf"].config.vocab_size, (args.batch, args.seq), generator=g)
    start = losses(models, ids)

    def step(name: str) -> float:
        m, opt = models[name], opts[name]
        t0 = time.perf_counter()
        loss = m(input_ids=ids, labels=ids).loss if name == "hf" else m(ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in models:  # one untimed step each (allocator, first-call costs)
        step(name)
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for r in range(args.reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(step(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{args.model}, {args.batch} x {args.seq} tokens, fp32, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.reps} interleaved rounds of a training step "
        f"(forward, backward, AdamW); initial losses "
        + ", ".join(f"{k} {v:.6f}" for k, v in start.items())
        + "\n"
    )
    print("| model | median step (s) | step / HF's |")
    print("| --- | ---: | ---: |")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / med['hf']:.3f} |")
    head_table(args.head_model, args.head_batch, args.seq)


if __name__ == "__main__":
    main()
