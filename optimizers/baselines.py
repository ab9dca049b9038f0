"""The baselines: torch's AdamW, Adafactor and Muon, bitsandbytes' AdamW8bit, pytorch-optimizer's
CAME and the official Adam-mini, with the closed form of each one's state memory.

The third-party classes are used as they are (``adamw8bit`` and ``came`` import their optional
package when called and name the extra that brings it); ours are ``Muon`` (torch's, with the
Newton-Schulz dtype as a setting) and ``MuonWithAdamW``, Muon on the projected matrices with
AdamW on everything else, as one ``torch.optim.Optimizer``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from llmpt.optimizers.composite import CompositeOptimizer
from llmpt.optimizers.optional import missing_extra
from llmpt.optimizers.per_parameter import closure_loss
from llmpt.optimizers.rules.adam8bit import BLOCK, CODE_MAP_BYTES, blockwise_state_nbytes
from llmpt.optimizers.rules.muon import muon_lr_factor, newton_schulz, resolve_ns_dtype
from llmpt.optimizers.subspace import as_groups, tensor_of

Betas = tuple[float, float]


def adamw8bit(
    params: Iterable,
    lr: float = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    min_8bit_size: int = 4096,
    block_size: int = BLOCK,
) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit (CPU and CUDA since 0.45): blockwise 8-bit moments."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise missing_extra("bitsandbytes", "bnb", "8-bit AdamW") from e
    if block_size != BLOCK:
        raise ValueError(
            "block_size: bitsandbytes' 8-bit optimizers use 256-value blocks on every device; "
            f"got {block_size}"
        )
    return bnb.optim.AdamW8bit(
        params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size
    )


def came(
    params: Iterable,
    lr: float = 2e-4,
    betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
    weight_decay: float = 0.0,
    eps1: float = 1e-30,
    eps2: float = 1e-16,
    clip_threshold: float = 1.0,
) -> torch.optim.Optimizer:
    """pytorch-optimizer's CAME (Luo et al. 2023): Adafactor with a confidence-guided update."""
    try:
        from pytorch_optimizer import CAME
    except ImportError as e:
        raise missing_extra("pytorch-optimizer", "came", "CAME") from e
    if len(betas) != 3:
        raise ValueError(f"betas={list(betas)}: CAME takes three betas")
    return CAME(
        params,
        lr=lr,
        betas=tuple(betas),
        weight_decay=weight_decay,
        clip_threshold=clip_threshold,
        eps1=eps1,
        eps2=eps2,
    )


class Muon(torch.optim.Muon):
    """torch.optim.Muon with the Newton-Schulz dtype as a setting (``ns_dtype``, see
    ``optimizers.rules.muon.resolve_ns_dtype``): in bf16 the step is torch's own; in another
    dtype it is the same arithmetic (momentum lerp, Nesterov, decoupled decay, lr adjustment)
    with the iteration in that dtype."""

    def __init__(self, params, *, ns_dtype: str = "auto", **kwargs) -> None:
        super().__init__(params, **kwargs)
        resolve_ns_dtype(ns_dtype, torch.device("cpu"))  # refuse a wrong name now
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = params[0].device if params else torch.device("cpu")
        dtype = resolve_ns_dtype(self.ns_dtype, device)
        if dtype == torch.bfloat16:
            return super().step(closure)
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, wd, mu = float(group["lr"]), group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - mu)
                update = grad.lerp(buf, mu) if group["nesterov"] else buf
                ortho = newton_schulz(update, group["ns_steps"], dtype, group["eps"])
                p.mul_(1 - lr * wd)
                p.add_(ortho, alpha=-lr * muon_lr_factor(group["adjust_lr_fn"], p.shape))
        return loss


class MuonWithAdamW(CompositeOptimizer):
    """Muon (Jordan et al. 2024; torch's arithmetic) on the ``projected=True`` groups, which must
    hold 2-D matrices, and AdamW on every other group (embeddings, lm_head, norms), as one
    optimizer: the training loop, an LR scheduler and checkpoints see a single object. The
    AdamW part takes ``adamw_lr`` (default: ``lr``), ``adamw_betas`` and ``adamw_eps``; every
    group's own lr, weight_decay (and Muon's momentum, AdamW's betas) are honoured."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str = "match_rms_adamw",
        ns_dtype: str = "auto",
        adamw_lr: float | None = None,
        adamw_betas: Betas = (0.9, 0.999),
        adamw_eps: float = 1e-8,
    ) -> None:
        if adjust_lr_fn not in ("original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r}: use original or match_rms_adamw")
        if len(adamw_betas) != 2:
            raise ValueError(f"adamw_betas={list(adamw_betas)} must have two values")
        groups = as_groups(params)
        matrices = [
            {k: v for k, v in g.items() if k != "projected"} for g in groups if g.get("projected")
        ]
        rest = [
            {k: v for k, v in g.items() if k != "projected"}
            for g in groups
            if not g.get("projected")
        ]
        if not matrices:
            raise ValueError(
                "MuonWithAdamW: no param group has projected=True; mark the matrices Muon "
                "should take (groups.param_groups(model, targets) does)"
            )
        for group in matrices:
            for q in map(tensor_of, group["params"]):
                if q.dim() != 2:
                    raise ValueError(
                        f"Muon takes 2-D matrices; a projected group holds shape {tuple(q.shape)}"
                    )
        parts = {
            "muon": Muon(
                matrices,
                ns_dtype=ns_dtype,
                lr=lr,
                weight_decay=weight_decay,
                momentum=momentum,
                nesterov=nesterov,
                ns_steps=ns_steps,
                adjust_lr_fn=adjust_lr_fn,
            )
        }
        if rest:
            parts["adamw"] = torch.optim.AdamW(
                rest,
                lr=adamw_lr if adamw_lr is not None else lr,
                betas=tuple(adamw_betas),
                eps=adamw_eps,
                weight_decay=weight_decay,
            )
        super().__init__(parts)


# ---------------------------------------------------------------------- state formulas
def _size(p: torch.Tensor) -> int:
    return p.element_size()


def adamw_bytes(p: torch.Tensor) -> dict[str, int]:
    """torch.optim.AdamW: two moments in the parameter's dtype and a float32 step tensor."""
    return {"moments": 2 * p.numel() * _size(p), "other": 4}


def adafactor_bytes(p: torch.Tensor) -> dict[str, int]:
    """torch.optim.Adafactor: row and column statistics of a matrix (its full variance for a
    vector), in the parameter's dtype, and a float32 step tensor."""
    shape = tuple(p.shape)
    stats = shape[-2] * math.prod(shape[:-2]) + shape[-1] if len(shape) >= 2 else p.numel()
    return {"moments": stats * _size(p), "other": 4}


def came_bytes(p: torch.Tensor) -> dict[str, int]:
    """pytorch-optimizer's CAME: the full first moment; for tensors of 2+ dims, row and column
    statistics of the second moment and of the confidence residual; a vector keeps its full
    second moment. Plus one RMS scalar; all in the parameter's dtype."""
    shape, n = tuple(p.shape), p.numel()
    if len(shape) < 2:
        return {"moments": 2 * n * _size(p), "other": _size(p)}
    rows, cols = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
    return {"moments": (n + 2 * rows + 2 * cols) * _size(p), "other": _size(p)}


def muon_bytes(p: torch.Tensor) -> dict[str, int]:
    """torch.optim.Muon: one momentum buffer per matrix."""
    return {"moments": p.numel() * _size(p)}


def _add(total: dict[str, int], part: dict[str, int]) -> None:
    for key, n in part.items():
        total[key] = total.get(key, 0) + n


def baseline_state_formula(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Closed-form state bytes of a third-party baseline (after its first step), from its
    parameters; refuses a class it has no formula for."""
    total: dict[str, int] = {}
    if isinstance(optimizer, CompositeOptimizer):
        for part in optimizer.parts.values():
            _add(total, baseline_state_formula(part))
        return total
    params = [p for g in optimizer.param_groups for p in g["params"]]
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.Muon):
        per_param = muon_bytes
    elif isinstance(optimizer, torch.optim.Adafactor):
        per_param = adafactor_bytes
    elif isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)):
        per_param = adamw_bytes
    elif name == "AdamW8bit":
        min_size = optimizer.args.min_8bit_size
        for p in params:
            _add(total, blockwise_state_nbytes(tuple(p.shape), min_size))
        if any(p.numel() >= min_size for p in params):  # code maps, made once some is quantised
            _add(total, {"quantization": CODE_MAP_BYTES})
        return total
    elif name == "CAME":
        per_param = came_bytes
    else:
        raise TypeError(f"no state formula for {name}")
    for p in params:
        _add(total, per_param(p))
    return total
