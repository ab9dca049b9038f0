"""``python -m llm_pretrain.welore``: WeLore's compression alone, perplexity before and after.

    python -m llm_pretrain.welore trainer.init_from=<run | HF dir> [model=... data=...] \\
        [--err 0.1,0.3,0.5] [--min-ratio 0] [--out welore.json]

The overrides are the training config's (the model, its trained weights, the validation data and
``eval.tokens``). The model's singular values are computed once; for each ERR (the share of all
targeted singular values to drop) it truncates each matrix to the rank WeLore's one global
threshold leaves it, and, as the paper's baseline, drops the same share from every matrix
(uniform), and prints validation perplexity, the threshold, the matrices truncated and the
targeted parameters a WeLore model would keep (factors where they save memory). ``--min-ratio``
is the share a matrix must lose to be truncated: 0 (the default) is the paper's compression
table, which truncates every matrix; the fine-tuning runs (``optimizer=welore``) use 0.5, and
keep dense a matrix whose factors would not save memory.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from llm_pretrain import data
from llm_pretrain.evaluate import evaluate
from llm_pretrain.model import build_model
from llm_pretrain.pretrained import load_initial_weights
from llm_pretrain.tokenizer import load_tokenizer
from llmpt.optimizers.welore import compress, parameter_count, plan, spectra

USAGE = __doc__.split("\n\n")[1]


def _option(args: list[str], flag: str, default: str) -> str:
    if flag not in args:
        return default
    i = args.index(flag)
    if i + 1 >= len(args):
        raise SystemExit(f"{flag} needs a value\n{USAGE}")
    value = args[i + 1]
    del args[i : i + 2]
    return value


def compression_table(cfg, errs: list[float], min_ratio: float) -> dict:
    """Validation loss and ppl of the loaded model and of each compression (see the module)."""
    if not cfg.trainer.init_from:
        raise ValueError("trainer.init_from is unset: compress trained weights (a run or HF dir)")
    tokenizer = load_tokenizer(cfg.data.tokenizer, data.builtin_spec(cfg.data))
    val = data.validation_rows(cfg.data, tokenizer, cfg.model.vocab_size, cfg.eval.tokens)
    model = build_model(cfg.model)
    loaded = load_initial_weights(model, cfg.trainer.init_from)
    device = torch.device("cpu")
    targets = list(cfg.optimizer.get("target_modules", ["attn", "mlp"]))

    def ppl(m) -> dict:
        return evaluate(m, val, cfg.eval.batch_size, device)

    base = ppl(model)
    found = spectra(model, targets)
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in found}
    rows = []
    for err in errs:
        for uniform in (False, True):
            p = plan(found, shapes, err, min_ratio, uniform=uniform, require_saving=False)
            compressed = copy.deepcopy(model)
            if p.ranks:
                compress(compressed, targets, ranks=p.ranks)
            counts = parameter_count(p, shapes)
            result = ppl(compressed)
            rows.append(
                {
                    "err": err,
                    "mode": "uniform" if uniform else "welore",
                    "tau": p.tau,
                    "ppl": result["ppl"],
                    "loss": result["loss"],
                    "low_rank_components": len(p.ranks),
                    "dense": len(p.dense),
                    "rank_reduction_attempted": p.attempted,
                    "rank_reduction_achieved": p.achieved,
                    "targeted_params": counts,
                    "ranks": p.ranks,
                }
            )
            del compressed
    return {
        "source": loaded,
        "min_ratio": min_ratio,
        "eval_tokens": base["tokens"],
        "before": {"ppl": base["ppl"], "loss": base["loss"]},
        "rows": rows,
    }


def render(result: dict) -> str:
    lines = [
        f"{result['source']}: validation ppl {result['before']['ppl']:.2f} before compression "
        f"({result['eval_tokens']:,} tokens), min_ratio {result['min_ratio']}",
        "",
        "| ERR | mode | tau | val ppl | truncated / whole | rank removed | targeted params kept |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        c = r["targeted_params"]
        tau = "-" if r["tau"] is None else f"{r['tau']:.4f}"
        lines.append(
            f"| {r['err']:.0%} | {r['mode']} | {tau} | {r['ppl']:.2f} | "
            f"{r['low_rank_components']} / {r['dense']} | {r['rank_reduction_achieved']:.1%} | "
            f"{c['after'] / c['before']:.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from llm_pretrain.memory import _compose

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    try:
        errs = [float(x) for x in _option(args, "--err", "0.1,0.3,0.5").split(",") if x]
        min_ratio = float(_option(args, "--min-ratio", "0"))
    except ValueError as e:
        raise SystemExit(f"--err and --min-ratio take numbers ({e})") from None
    out = _option(args, "--out", "")
    unknown = [a for a in args if a.startswith("-")]
    if unknown:
        raise SystemExit(f"unknown option(s) {unknown}\n{USAGE}")
    try:
        result = compression_table(_compose(args), errs, min_ratio)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(render(result))
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
        print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
