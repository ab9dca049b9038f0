"""Adam-mini (Zhang et al. 2024) from the official ``adam-mini`` package (v1.1.1), which assigns
one second-moment value per block, classifying parameters by name substrings.

The official class decides everything from names, and a wrong name silently changes the
algorithm; so ``classify`` mirrors its rules, the start-up report says how many tensors fell in
each block kind, and a LLaMA whose names are not recognised is refused instead of warned about.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch

from llmpt.optimizers.optional import missing_extra

# v1.1.1's name substrings, in the order its step() tests them
BIAS = ("bias",)
QUERY_KEY = ("k_proj", "q_proj", "wq", "wk", "query", "key")
PER_ROW = (
    ("embed", "embd", "wte"),  # embeddings: one v per token
    ("lm_head", "output", "final_layer"),  # output layer: one v per token
    ("v_proj", "wv", "value"),  # values: one v per neuron
    ("mlp", "feed_forward", "linear"),  # MLP: one v per neuron
    ("o_proj", "wo", "attn.proj"),  # attention output: one v per neuron
)
KINDS = ("bias", "query_key", "per_row", "per_tensor")


def classify(name: str) -> str:
    """The block kind Adam-mini v1.1.1 gives the parameter called ``name``."""
    name = name.lower()
    if any(s in name for s in BIAS):
        return "bias"
    if any(s in name for s in QUERY_KEY):
        return "query_key"
    if any(s in name for group in PER_ROW for s in group):
        return "per_row"
    return "per_tensor"


def second_moment_numel(name: str, shape: tuple[int, ...], dim: int, n_heads: int) -> int:
    """Values of ``vmean`` (or of the full ``v`` for biases) Adam-mini keeps for one tensor."""
    kind = classify(name)
    if kind == "bias":
        return math.prod(shape)
    if kind == "query_key":
        return math.prod(shape) // (dim * dim // n_heads)
    if kind == "per_row":
        return shape[0]
    return 1


def AdamMini(  # noqa: N802  (a class to its callers, built on the optional package)
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    dim: int,
    n_heads: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The official optimizer (adam-mini 1.1.1, an optional package) on ``named_parameters``
    (its blocks are chosen by name: ``model.named_parameters()``), with the model's hidden size
    ``dim`` and attention heads ``n_heads``; unrecognised names are refused, and the block split
    is reported at start-up. lr, betas (kept as ``beta1``, ``beta2``), eps and weight_decay are
    read per group."""
    return _adam_mini_class()(list(named_parameters), dim, n_heads, lr, betas, eps, weight_decay)


@functools.cache
def _adam_mini_class() -> type:
    """The checked subclass of the official class, defined when an Adam-mini is first built:
    the official package is optional, and the library imports nothing but torch."""
    try:
        from adam_mini import Adam_mini
    except ImportError as e:
        raise missing_extra("adam-mini", "adam_mini", "Adam-mini") from e

    class CheckedAdamMini(Adam_mini):
        def __init__(self, named, dim, n_heads, lr, betas, eps, weight_decay) -> None:
            named = [(n, p) for n, p in named if p.requires_grad]
            self.kinds = dict.fromkeys(KINDS, 0)
            for name, p in named:
                kind = classify(name)
                self.kinds[kind] += 1
                if kind in ("query_key", "per_row") and p.dim() != 2:
                    raise ValueError(
                        f"{name}: Adam-mini gives a {kind} block one v per row or head, which "
                        "needs "
                        f"a 2-D matrix; got shape {tuple(p.shape)}"
                    )
            if not self.kinds["query_key"] or not self.kinds["per_row"]:
                raise ValueError(
                    f"optimizer=adam_mini recognises no query/key or MLP matrices by name "
                    f"({self.kinds}); it needs LLaMA names such as q_proj, k_proj, v_proj, o_proj, "
                    "mlp, embed_tokens, lm_head"
                )
            super().__init__(
                named,
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                dim=dim,
                n_heads=n_heads,
                verbose=False,
            )
            # v1.1.1 takes torch.cuda.device_count() as its shard count and all-reduces per-tensor
            # statistics over it; parameters here are replicated (single process or DDP), never
            # sharded, so its statistics are already complete on every rank.
            self.world_size = 1
            self.check_block_name = False  # its name check only prints; ours above refuses
            self._formula = {
                "moments": sum(
                    (p.numel() + second_moment_numel(n, tuple(p.shape), dim, n_heads))
                    * p.element_size()
                    for n, p in named
                )
            }

        def memory_formula(self, steps: int = 1) -> dict[str, int]:
            """The full first moment and one second-moment value per block (head, row or
            tensor), both in the parameter's dtype; step counts and flags are Python numbers."""
            return dict(self._formula)

        def projection_report(self) -> str:
            split = ", ".join(f"{n} {k.replace('_', '/')}" for k, n in self.kinds.items() if n)
            return f"Adam-mini blocks: {split} tensors (one v per head / row / tensor; biases Adam)"

    return CheckedAdamMini
