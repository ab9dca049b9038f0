"""Backward Lens (Katz et al., EMNLP 2024) on our LLaMA: a linear layer's gradient as the sum of
per-token outer products, each piece read in the vocabulary, and the forward-pass-shift edit.

    python -m llm_pretrain.lens --prompt "..." --target "..." [training overrides] \\
        [--checkpoint RUN_OR_CHECKPOINT] [--loss last_token|teacher_forced] \\
        [--modules gate,up,down] [--top-k 5] [--dtype float64|float32] [--out DIR] \\
        [--shift-layer L|auto] [--shift-lr 0.24] [--val-tokens 4096]

For a linear z_i = W x_i at token i with VJP delta_i = dL/dz_i, dL/dW = sum_i delta_i x_i^T, so
its rank is at most the token count n: the premise of every low-rank method here. The tool
collects x_i (a forward hook) and delta_i (a hook on the output tensor) for every chosen linear,
checks the sum against autograd's gradient, and projects the residual-space vector of each token
through the final norm and ``lm_head`` (the untied decoding matrix, not the input embedding):
x for gate, up, q, k and v (their inputs are the normed residual stream), delta for down and o
(they write into it). For delta the *bottom* tokens matter: an SGD step adds -lr * delta.

The model: ``--checkpoint`` (a run directory or one of its checkpoints, whose config.yaml gives
the model and tokenizer, or a Hugging Face ``LlamaForCausalLM`` directory with its tokenizer),
or the overrides' ``model=`` and ``data.tokenizer=`` with ``trainer.init_from``, or a freshly
initialised model. Outputs in ``--out`` (default ``outputs/lens/<time>``):
``summary.json``, ``vectors.csv`` (one row per layer, module, token and projection),
``grad_rank.csv`` and PNG tables (layers x tokens, the paper's Figures 4 and 6).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llm_pretrain.loggers import json_safe
from llm_pretrain.model import Llama

log = logging.getLogger("llm_pretrain")

# short name -> the linear inside a decoder block
MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
DEFAULT_MODULES = ("gate", "up", "down")
READS_INPUT = frozenset({"q", "k", "v", "gate", "up"})  # x is in the residual space; else delta
PROJECTIONS = ("raw", "ln_f", "unit_ln_f")
LOSSES = ("last_token", "teacher_forced")
ZERO = 1e-12  # a vector this small relative to its module's largest has no ranks


def module_names(spec: str | Sequence[str]) -> list[str]:
    """The short names in ``spec`` (comma-separated or a list); full names such as ``down_proj``
    or ``mlp.down_proj`` are accepted too. A name that matches no linear is refused."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out = []
    for name in names:
        short = next(
            (k for k, v in MODULES.items() if name in (k, v, v.split(".")[1], f"{k}_proj")), None
        )
        if short is None:
            raise ValueError(
                f"--modules: {name!r} matches no linear of a decoder block; use any of "
                f"{', '.join(MODULES)} (or their names: {', '.join(MODULES.values())})"
            )
        if short not in out:
            out.append(short)
    if not out:
        raise ValueError("--modules is empty; use any of " + ", ".join(MODULES))
    return out


@dataclass
class Captured:
    """One linear's per-token inputs X (n x in), VJPs Delta (n x out) and autograd's gradient."""

    layer: int
    module: str
    x: torch.Tensor
    delta: torch.Tensor
    grad: torch.Tensor

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.{MODULES[self.module]}"

    def residual_vectors(self) -> torch.Tensor:
        """The per-token vectors that live in the residual space (module docstring)."""
        return self.x if self.module in READS_INPUT else self.delta

    def decomposition_error(self) -> float:
        """|| sum_i delta_i x_i^T - dL/dW || / || dL/dW || (0 in exact arithmetic)."""
        rebuilt = self.delta.T @ self.x
        scale = self.grad.norm().item()
        return (rebuilt - self.grad).norm().item() / scale if scale > 0 else rebuilt.norm().item()

    def rank(self) -> int:
        """Numerical rank of the gradient at its dtype's default tolerance."""
        return int(torch.linalg.matrix_rank(self.grad))


def collect(
    model: Llama,
    input_ids: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    modules: Sequence[str],
) -> tuple[torch.Tensor, torch.Tensor, list[Captured]]:
    """One forward and backward of a single sequence (1, n) with ``loss_fn(logits)``; returns
    (loss, logits, what every chosen linear saw). Parameter gradients are left in place."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"the lens reads one sequence at a time, shape (1, n), not {input_ids.shape}"
        )
    seen: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    handles = []

    def hook(key):
        def forward_hook(_module, inputs, output):
            seen[key] = {"x": inputs[0][0].detach()}
            if output.requires_grad:
                output.register_hook(lambda g: seen[key].__setitem__("delta", g[0].detach()))

        return forward_hook

    linears = {}
    for layer, block in enumerate(model.model.layers):
        for short in modules:
            linear = block.get_submodule(MODULES[short])
            linears[(layer, short)] = linear
            handles.append(linear.register_forward_hook(hook((layer, short))))
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        logits = model(input_ids)
        loss = loss_fn(logits)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    out = []
    for (layer, short), linear in linears.items():
        got = seen[(layer, short)]
        delta = got.get("delta")
        if delta is None:  # (an output the loss never reached)
            delta = torch.zeros(got["x"].shape[0], linear.out_features, dtype=got["x"].dtype)
        grad = linear.weight.grad
        grad = torch.zeros_like(linear.weight) if grad is None else grad.detach().clone()
        out.append(Captured(layer, short, got["x"], delta, grad))
    return loss.detach(), logits.detach(), out


def last_token_loss(target: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The paper's protocol: -log p(target) at the last position only."""
    return lambda logits: -F.log_softmax(logits[0, -1].float(), dim=-1)[target]


def teacher_forced_loss(prompt_len: int, targets: Sequence[int]) -> Callable:
    """The target's pieces appended to the prompt; the summed NLL of each piece given what
    precedes it (the input is prompt + targets[:-1])."""
    ids = torch.tensor(list(targets))

    def loss(logits: torch.Tensor) -> torch.Tensor:
        rows = logits[0, prompt_len - 1 : prompt_len - 1 + len(ids)].float()
        return -F.log_softmax(rows, dim=-1).gather(1, ids[:, None].to(rows.device)).sum()

    return loss


def vocabulary_logits(model: Llama, v: torch.Tensor, how: str) -> torch.Tensor:
    """The logit lens of residual-space vectors v (..., d): raw (D v), through the final norm
    (the paper's and its code's default), or normalised to unit length first (App. H)."""
    D = model.lm_head.weight.detach()
    v = v.to(D.dtype)
    with torch.no_grad():
        if how == "raw":
            return v @ D.T
        if how == "unit_ln_f":
            v = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
        elif how != "ln_f":
            raise ValueError(f"projection {how!r}: use one of {', '.join(PROJECTIONS)}")
        return model.model.norm(v) @ D.T


def rank_of(logits: torch.Tensor, token: int) -> int:
    """How many tokens score strictly higher (0: the top)."""
    return int((logits > logits[token]).sum())


@dataclass
class Tokens:
    """The prompt's ids, the target's pieces, and how each id reads."""

    prompt: list[int]
    target: int  # the one piece a last-token loss aims at
    target_pieces: list[int]  # from that piece on (teacher forcing uses them all)
    decode: Callable[[list[int]], str]

    def piece(self, i: int) -> str:
        return self.decode([i])


def is_unknown(text: str) -> bool:
    """The unknown piece as the built-in, SentencePiece and most HF tokenizers decode it."""
    return text.strip() in ("<unk>", "\u2047", "[UNK]")


def tokenize(tokenizer, prompt: str, target: str, max_positions: int, loss: str) -> Tokens:
    """The prompt's and target's ids, with the refusals the CLI promises (empty prompt, a target
    with no piece, too long for the model)."""
    eos = tokenizer.eos_id

    def ids(text: str) -> list[int]:
        out = tokenizer.encode_batch([text])[0]
        return out[:-1] if out and out[-1] == eos else out

    prompt_ids = ids(prompt) if prompt.strip() else []
    if not prompt_ids:
        raise ValueError("--prompt is empty (it gives no tokens); give the text to complete")
    unknown = [i for i, t in enumerate(prompt_ids) if is_unknown(tokenizer.decode([t]))]
    if unknown:
        log.warning(
            f"prompt tokens {unknown} are the tokenizer's unknown piece: the words are not in "
            "its vocabulary"
        )
    pieces = ids(target) if target.strip() else []
    first = next(
        (
            i
            for i, t in enumerate(pieces)
            if tokenizer.decode([t]).strip() and not is_unknown(tokenizer.decode([t]))
        ),
        None,
    )
    if first is None:
        raise ValueError(
            f"--target {target!r} tokenizes to nothing (no piece with visible text the "
            "tokenizer knows); give a word in its vocabulary"
        )
    if len(pieces) > 1 or first > 0:
        log.info(
            f"target {target!r} is {len(pieces)} pieces "
            f"{[tokenizer.decode([t]) for t in pieces]}; the first with text, "
            f"{tokenizer.decode([pieces[first]])!r} (id {pieces[first]}), is the target"
            + (" (teacher forcing reads them all from there)" if loss == "teacher_forced" else "")
        )
    chosen = pieces[first:]
    n = len(prompt_ids) + (len(chosen) - 1 if loss == "teacher_forced" else 0)
    if n > max_positions:
        raise ValueError(
            f"the prompt is {n} tokens, more than the model's {max_positions} positions "
            "(model.max_position_embeddings); shorten it"
        )
    return Tokens(prompt_ids, chosen[0], chosen, tokenizer.decode)


def read_vectors(
    model: Llama, captured: Captured, tokens: Tokens, ids: list[int], answer: int, top_k: int
) -> list[dict]:
    """Per token and projection: the vector's norm, top-k and bottom-k tokens, and the ranks of
    the target and of the model's original answer (None where the vector is ~0: under RMSNorm a
    zero vector scores every token alike)."""
    vectors = captured.residual_vectors()
    norms = vectors.norm(dim=-1)
    biggest = float(norms.max()) if norms.numel() else 0.0
    rows = []
    for how in PROJECTIONS:
        logits = vocabulary_logits(model, vectors, how)
        for i in range(vectors.shape[0]):
            norm = float(norms[i])
            row = {
                "layer": captured.layer,
                "module": captured.module,
                "vector": "x" if captured.module in READS_INPUT else "delta",
                "token_index": i,
                "token": tokens.piece(ids[i]),
                "x_norm": float(captured.x[i].norm()),
                "delta_norm": float(captured.delta[i].norm()),
                "projection": how,
                "norm": norm,
            }
            if norm <= ZERO * biggest or norm == 0.0:
                row.update(top=[], bottom=[], target_rank=None, answer_rank=None)
            else:
                li = logits[i]
                k = min(top_k, li.numel())
                row["top"] = [tokens.piece(int(t)) for t in li.topk(k).indices]
                row["bottom"] = [tokens.piece(int(t)) for t in (-li).topk(k).indices]
                row["target_rank"] = rank_of(li, tokens.target)
                row["answer_rank"] = rank_of(li, answer)
            rows.append(row)
    return rows


def input_ids_for(tokens: Tokens, loss: str) -> list[int]:
    return tokens.prompt + (tokens.target_pieces[:-1] if loss == "teacher_forced" else [])


def one_token_step_shift(
    weight: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lemma 5.2 as a measurement: (how W x moves after the SGD step W -= lr delta x^T, the
    lemma's -lr ||x||^2 delta)."""
    stepped = weight - lr * torch.outer(delta, x)
    return stepped @ x - weight @ x, -lr * x.dot(x) * delta


def last_position_report(model: Llama, ids: list[int], target: int) -> dict:
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, -1].float()
    logp = F.log_softmax(logits, dim=-1)
    return {
        "log_p_target": float(logp[target]),
        "target_rank": rank_of(logits, target),
        "answer": int(logits.argmax()),
    }


def forward_pass_shift(model: Llama, prompt: list[int], target: int, layer: int, lr: float) -> None:
    """The paper's edit without a backward pass (Sec. 7): W_down += lr * e_t a_n^T, where a_n is
    the last prompt token's down_proj input and e_t the target's row of ``lm_head`` (the
    decoding matrix; GPT-2's code reads the tied input embedding, wrong for an untied LLaMA)."""
    down = model.model.layers[layer].mlp.down_proj
    got = {}
    handle = down.register_forward_hook(lambda _m, i, _o: got.__setitem__("a", i[0][0, -1]))
    try:
        with torch.no_grad():
            model(torch.tensor([prompt]))
    finally:
        handle.remove()
    with torch.no_grad():
        down.weight.add_(torch.outer(model.lm_head.weight[target], got["a"]), alpha=lr)


# ---------------------------------------------------------------------------------- the run
def analyse(
    model: Llama,
    tokens: Tokens,
    loss: str = "last_token",
    modules: Sequence[str] = DEFAULT_MODULES,
    top_k: int = 5,
) -> dict:
    """Everything the CLI reports, as plain data: the model's answer, per-module decomposition
    error, gradient rank and bound, and the per-token vocabulary readings."""
    if loss not in LOSSES:
        raise ValueError(f"--loss {loss!r}: use one of {', '.join(LOSSES)}")
    model.eval()
    before = last_position_report(model, tokens.prompt, tokens.target)
    ids = input_ids_for(tokens, loss)
    loss_fn = (
        last_token_loss(tokens.target)
        if loss == "last_token"
        else teacher_forced_loss(len(tokens.prompt), tokens.target_pieces)
    )
    value, _, captured = collect(model, torch.tensor([ids]), loss_fn, modules)
    n = len(ids)
    matrices, vectors = [], []
    for c in captured:
        x_n, d_n = c.x[-1], c.delta[-1]
        measured, predicted = one_token_step_shift(c_weight(model, c), x_n, d_n, 1.0)
        scale = predicted.norm().item()
        matrices.append(
            {
                "layer": c.layer,
                "module": c.module,
                "name": c.name,
                "shape": list(c.grad.shape),
                "decomposition_error": c.decomposition_error(),
                "rank": c.rank(),
                "bound": min(n, *c.grad.shape),
                "tokens": n,
                "lemma_5_2_error": (measured - predicted).norm().item() / scale if scale else 0.0,
            }
        )
        vectors += read_vectors(model, c, tokens, ids, before["answer"], top_k)
    return {
        "prompt_tokens": [tokens.piece(i) for i in tokens.prompt],
        "input_tokens": [tokens.piece(i) for i in ids],
        "target": {"id": tokens.target, "piece": tokens.piece(tokens.target)},
        "loss_kind": loss,
        "loss": float(value),
        "answer": {"id": before["answer"], "piece": tokens.piece(before["answer"])},
        "log_p_target": before["log_p_target"],
        "target_rank": before["target_rank"],
        "matrices": matrices,
        "vectors": vectors,
    }


def c_weight(model: Llama, c: Captured) -> torch.Tensor:
    return model.model.layers[c.layer].get_submodule(MODULES[c.module]).weight.detach()


def shift_edit(
    model: Llama, tokens: Tokens, layer: int, lr: float, held_out_loss: Callable[[], float] | None
) -> dict:
    """The forward-pass shift on ``layer``: log p(target), its rank and the held-out loss,
    before and after. Skipped, as in the paper's code, when the target is already the answer."""
    if not 0 <= layer < len(model.model.layers):
        raise ValueError(
            f"--shift-layer {layer}: the model has layers 0..{len(model.model.layers) - 1}"
        )
    before = last_position_report(model, tokens.prompt, tokens.target)
    out = {"layer": layer, "lr": lr, "before": before}
    if held_out_loss is not None:
        before["held_out_loss"] = held_out_loss()
    if before["target_rank"] == 0:
        out["skipped"] = "the target is already the model's answer"
        return out
    forward_pass_shift(model, tokens.prompt, tokens.target, layer, lr)
    after = last_position_report(model, tokens.prompt, tokens.target)
    if held_out_loss is not None:
        after["held_out_loss"] = held_out_loss()
    out["after"] = after
    for rec in (before, after):
        rec["answer_piece"] = tokens.piece(rec["answer"])
    return out


# ---------------------------------------------------------------------------------- outputs
CSV_FIELDS = (
    "layer",
    "module",
    "vector",
    "token_index",
    "token",
    "projection",
    "norm",
    "x_norm",
    "delta_norm",
    "target_rank",
    "answer_rank",
    "top",
    "bottom",
)


def write_outputs(result: dict, out: Path, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "summary.json", out / "vectors.csv", out / "grad_rank.csv"]
    summary = {k: v for k, v in result.items() if k != "vectors"}
    written[0].write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False) + "\n")
    with written[1].open("w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        for row in result["vectors"]:
            w.writerow(
                {
                    **{k: row[k] for k in CSV_FIELDS if k not in ("top", "bottom")},
                    "top": " ".join(row["top"]),
                    "bottom": " ".join(row["bottom"]),
                }
            )
    with written[2].open("w", newline="") as f:
        fields = ["layer", "module", "name", "rank", "bound", "tokens", "decomposition_error"]
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(result["matrices"])
    if plots:
        written += plot_tables(result, out)
    return written


def plot_tables(result: dict, out: Path) -> list[Path]:
    """Layers x tokens: the top-1 token of x for an input-side module, the bottom-1 token of
    delta for an output-side one, coloured by ||delta|| (Figure 4), and the target's rank in
    each token's vector per layer (Figure 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["vectors"] if r["projection"] == "ln_f"]
    tokens = result["input_tokens"]
    layers = sorted({r["layer"] for r in rows})
    paths = []
    for module in dict.fromkeys(r["module"] for r in rows):
        cells = {(r["layer"], r["token_index"]): r for r in rows if r["module"] == module}
        grid = [[cells[(layer, i)]["delta_norm"] for i in range(len(tokens))] for layer in layers]
        reads_x = module in READS_INPUT
        fig, axes = plt.subplots(
            1,
            2,
            figsize=(max(10.0, 2.6 * len(tokens) + 3), 1.2 + 0.45 * len(layers)),
            squeeze=False,
        )
        ax = axes[0][0]
        im = ax.imshow(grid, cmap="Blues", aspect="auto", origin="lower")
        for (layer, i), r in cells.items():
            pick = r["top"] if reads_x else r["bottom"]
            ax.text(
                i,
                layers.index(layer),
                pick[0] if pick else "·",
                ha="center",
                va="center",
                fontsize=7,
            )
        ax.set_xticks(range(len(tokens)), tokens, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(layers)), layers)
        ax.set_ylabel("layer")
        what = "top-1 of x" if reads_x else "bottom-1 of delta"
        ax.set_title(f"{module}: {what} (through the final norm), colour ||delta||", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.03)
        ax = axes[0][1]
        ranks = [
            [
                cells[(layer, i)]["target_rank"]
                if cells[(layer, i)]["target_rank"] is not None
                else math.nan
                for i in range(len(tokens))
            ]
            for layer in layers
        ]
        im = ax.imshow(ranks, cmap="viridis_r", aspect="auto", origin="lower")
        ax.set_xticks(range(len(tokens)), tokens, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(layers)), layers)
        ax.set_title(
            f"rank of target {result['target']['piece']!r} in {'x' if reads_x else 'delta'} "
            "(blank: ~0 vector)",
            fontsize=8,
        )
        fig.colorbar(im, ax=ax, fraction=0.03)
        fig.tight_layout()
        path = out / f"lens_{module}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def render(result: dict) -> str:
    """A short text report: the answer, then one line per matrix."""
    lines = [
        f"prompt {' '.join(result['prompt_tokens'])!r}: answer {result['answer']['piece']!r} "
        f"(id {result['answer']['id']}), "
        f"target {result['target']['piece']!r} (rank {result['target_rank']}, log p "
        f"{result['log_p_target']:.3f}); {result['loss_kind']} loss {result['loss']:.4f}",
        "",
        "| matrix | rank / bound | decomposition error | Lemma 5.2 error |",
        "| --- | ---: | ---: | ---: |",
    ]
    for m in result["matrices"]:
        lines.append(
            f"| {m['name']} | {m['rank']} / {m['bound']} | {m['decomposition_error']:.2e} | "
            f"{m['lemma_5_2_error']:.2e} |"
        )
    shift = result.get("shift")
    if shift:
        b = shift["before"]
        if "after" in shift:
            a = shift["after"]
            held = (
                f", held-out loss {b['held_out_loss']:.4f} -> {a['held_out_loss']:.4f}"
                if "held_out_loss" in a
                else ""
            )
            lines += [
                "",
                f"forward-pass shift on layer {shift['layer']} (lr {shift['lr']}): log p(target) "
                f"{b['log_p_target']:.4f} -> {a['log_p_target']:.4f}, rank {b['target_rank']} -> "
                f"{a['target_rank']}{held}",
            ]
        else:
            lines += ["", f"forward-pass shift skipped: {shift['skipped']}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- the CLI
OPTIONS = {
    "--prompt": None,
    "--target": None,
    "--checkpoint": "",
    "--loss": "last_token",
    "--modules": ",".join(DEFAULT_MODULES),
    "--top-k": "5",
    "--dtype": "float64",
    "--out": "",
    "--shift-layer": "",
    "--shift-lr": "0.24",
    "--val-tokens": "4096",
}
USAGE = __doc__.split("\n\n")[1]


def parse(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """The lens's options and the training overrides left over."""
    opts, rest, i = {}, [], 0
    while i < len(args):
        a = args[i]
        key, _, value = a.partition("=") if a.startswith("--") else (a, "", "")
        if key in OPTIONS:
            if not value:
                if i + 1 >= len(args):
                    raise SystemExit(f"{key} needs a value\n{USAGE}")
                value, i = args[i + 1], i + 1
            opts[key] = value
        elif a.startswith("-"):
            raise SystemExit(f"unknown option {a}; the options are {', '.join(OPTIONS)}\n{USAGE}")
        else:
            rest.append(a)
        i += 1
    for key, default in OPTIONS.items():
        if key not in opts:
            if default is None:
                raise SystemExit(f"{key} is required\n{USAGE}")
            opts[key] = default
    return opts, rest


def load(opts: dict[str, str], overrides: list[str]):
    """(config, model, tokenizer): from --checkpoint's run, or from the overrides."""
    from omegaconf import OmegaConf

    from llm_pretrain import data, hf
    from llm_pretrain.config import ModelConfig
    from llm_pretrain.memory import _compose
    from llm_pretrain.model import build_model
    from llm_pretrain.pretrained import load_initial_weights
    from llm_pretrain.tokenizer import load_tokenizer

    spec = opts["--checkpoint"]
    if spec and hf.is_hf_directory(Path(spec).expanduser()):  # its config.json and tokenizer
        path = Path(spec).expanduser()
        overrides = [*overrides, "model=hf", f"trainer.init_from={path}", f"data.tokenizer={path}"]
        spec = ""
    cfg = _compose(overrides)
    if spec:
        from llm_pretrain.export import load_trained_model, locate

        ckpt, config = locate(Path(spec).expanduser())
        run = OmegaConf.load(config)
        run.model = OmegaConf.merge(OmegaConf.structured(ModelConfig), run.model)
        model = load_trained_model(ckpt, run)
        cfg.model, cfg.data = run.model, OmegaConf.merge(cfg.data, run.data)
        where = str(ckpt)
    else:
        model = build_model(cfg.model)
        where = (
            load_initial_weights(model, cfg.trainer.init_from)
            if cfg.trainer.init_from
            else "a freshly initialised model"
        )
    tokenizer = load_tokenizer(cfg.data.tokenizer, data.builtin_spec(cfg.data))
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids, the model only "
            f"{cfg.model.vocab_size}: set model.vocab_size or use the model's tokenizer"
        )
    return cfg, model, tokenizer, where


def run(argv: list[str]) -> dict:
    opts, overrides = parse(argv)
    dtype = {"float64": torch.float64, "float32": torch.float32}.get(opts["--dtype"])
    if dtype is None:
        raise ValueError(f"--dtype {opts['--dtype']!r}: use float64 or float32")
    top_k = int(opts["--top-k"])
    if top_k < 1:
        raise ValueError(f"--top-k {top_k}: must be at least 1")
    modules = module_names(opts["--modules"])
    cfg, model, tokenizer, where = load(opts, overrides)
    model = model.to(dtype)
    tokens = tokenize(
        tokenizer,
        opts["--prompt"],
        opts["--target"],
        cfg.model.max_position_embeddings,
        opts["--loss"],
    )
    result = analyse(model, tokens, opts["--loss"], modules, top_k)
    result["model"] = {"source": where, "name": cfg.model.name, "dtype": opts["--dtype"]}
    if opts["--shift-layer"]:
        layers = len(model.model.layers)
        spec = opts["--shift-layer"]
        # the paper's GPT2-xl layer 35 of 48: about 70% of the depth
        layer = round(0.7 * (layers - 1)) if spec == "auto" else int(spec)
        held_out = None
        val_tokens = int(opts["--val-tokens"])
        if val_tokens > 0:
            from llm_pretrain import data
            from llm_pretrain.evaluate import evaluate

            val = data.validation_rows(cfg.data, tokenizer, cfg.model.vocab_size, val_tokens)

            def held_out() -> float:
                return evaluate(model, val, cfg.eval.batch_size, torch.device("cpu"))["loss"]

        result["shift"] = shift_edit(model, tokens, layer, float(opts["--shift-lr"]), held_out)
    out = Path(opts["--out"] or f"outputs/lens/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    result["written"] = [str(p) for p in write_outputs(result, out)]
    return result


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(render(result))
    print("\nwritten: " + ", ".join(result["written"]))


if __name__ == "__main__":
    main()
