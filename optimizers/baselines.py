"""The baselines: torch's AdamW, Adafactor and Muon, bitsandbytes' AdamW8bit, pytorch-optimizer's
CAME and the official Adam-mini, each with the closed form of its state memory."""

from __future__ import annotations

import math

import torch
from torch import nn

from llmpt.optimizers.adam_mini import AdamMini, second_moment_numel
from llmpt.optimizers.composite import CompositeOptimizer
from llmpt.optimizers.optional import missing_extra
from llmpt.optimizers.per_parameter import closure_loss
from llmpt.optimizers.registry import (
    adam_kwargs,
    dtype_bytes,
    register,
    split_targets,
    trainable_params,
)
from llmpt.optimizers.rules.adam8bit import BLOCK, CODE_MAP_BYTES, blockwise_state_nbytes
from llmpt.optimizers.rules.muon import muon_lr_factor, newton_schulz, resolve_ns_dtype
from llmpt.optimizers.sampling import trainable


def _adamw_formula(shape, projected, cfg, dtype) -> dict[str, int]:
    # torch.optim.AdamW: two moments in the parameter's dtype and a float32 step tensor.
    return {"moments": 2 * math.prod(shape) * dtype_bytes(dtype), "other": 4}


def _adam8bit_formula(shape, projected, cfg, dtype) -> dict[str, int]:
    # bitsandbytes: uint8 codes for M and V and one fp32 absmax per block each; tensors under
    # min_8bit_size keep fp32 M and V. The step count is a Python int. The two 256-entry code
    # maps are shared by all parameters: see _adam8bit_shared.
    return blockwise_state_nbytes(shape, cfg.min_8bit_size)


def _adam8bit_shared(shapes, cfg) -> dict[str, int]:
    # bitsandbytes creates its code maps only once some tensor is quantised
    quantized = any(math.prod(s) >= cfg.min_8bit_size for s in shapes)
    return {"quantization": CODE_MAP_BYTES} if quantized else {}


def _adafactor_formula(shape, projected, cfg, dtype) -> dict[str, int]:
    # torch.optim.Adafactor: row and column statistics of a matrix (its full variance for a
    # vector), in the parameter's dtype, and a float32 step tensor.
    stats = shape[-2] * math.prod(shape[:-2]) + shape[-1] if len(shape) >= 2 else math.prod(shape)
    return {"moments": stats * dtype_bytes(dtype), "other": 4}


def _adam_mini_formula(model, cfg, steps) -> dict[str, int]:
    # the full first moment and one second-moment value per block (head, row or tensor), both
    # in the parameter's dtype; step counts and flags are Python numbers
    dim, heads = model.cfg.hidden_size, model.cfg.num_heads
    total = 0
    for name, p in model.named_parameters():
        if trainable(p):
            v = second_moment_numel(name, tuple(p.shape), dim, heads)
            total += (p.numel() + v) * dtype_bytes(p.dtype)
    return {"moments": total}


@register("adam_mini", _adam_mini_formula, model_level=True)
def build_adam_mini(cfg, model: nn.Module) -> torch.optim.Optimizer:
    return AdamMini(model, **adam_kwargs(cfg))


@register("adamw", _adamw_formula)
def build_adamw(cfg, model: nn.Module) -> torch.optim.Optimizer:
    impl = {
        "auto": {},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
        "for_loop": {"foreach": False},
    }
    if cfg.implementation not in impl:
        raise ValueError(
            f"optimizer.implementation={cfg.implementation!r}: use auto, foreach, fused or for_loop"
        )
    return torch.optim.AdamW(
        trainable_params(model), **adam_kwargs(cfg), **impl[cfg.implementation]
    )


@register("adamw8bit", _adam8bit_formula, _adam8bit_shared)
def build_adamw8bit(cfg, model: nn.Module) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb  # runs on CPU and CUDA since 0.45
    except ImportError as e:
        raise missing_extra("bitsandbytes", "bnb", "8-bit AdamW (optimizer=adamw8bit)") from e

    if cfg.block_size != BLOCK:
        raise ValueError(
            "optimizer.block_size: bitsandbytes' 8-bit optimizers use 256-value "
            f"blocks on every device; got {cfg.block_size}"
        )
    return bnb.optim.AdamW8bit(
        trainable_params(model), **adam_kwargs(cfg), min_8bit_size=cfg.min_8bit_size
    )


@register("adafactor", _adafactor_formula)
def build_adafactor(cfg, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(
        trainable_params(model),
        lr=cfg.lr,
        beta2_decay=cfg.beta2_decay,
        eps=(cfg.eps1, cfg.eps2),
        d=cfg.clip_threshold,
        weight_decay=cfg.weight_decay,
    )


def _came_formula(shape, projected, cfg, dtype) -> dict[str, int]:
    # pytorch-optimizer's CAME: the full first moment; for tensors of 2+ dims, row and column
    # statistics of the second moment and of the confidence residual; a vector keeps its full
    # second moment. Plus one RMS scalar; all in the parameter's dtype.
    n = math.prod(shape)
    if len(shape) < 2:
        return {"moments": 2 * n * dtype_bytes(dtype), "other": dtype_bytes(dtype)}
    rows, cols = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
    return {"moments": (n + 2 * rows + 2 * cols) * dtype_bytes(dtype), "other": dtype_bytes(dtype)}


@register("came", _came_formula)
def build_came(cfg, model: nn.Module) -> torch.optim.Optimizer:
    try:
        from pytorch_optimizer import CAME
    except ImportError as e:
        raise missing_extra("pytorch-optimizer", "came", "CAME (optimizer=came)") from e

    if len(cfg.betas) != 3:
        raise ValueError(f"optimizer.betas={list(cfg.betas)}: CAME takes three betas")
    return CAME(
        trainable_params(model),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
        clip_threshold=cfg.clip_threshold,
        eps1=cfg.eps1,
        eps2=cfg.eps2,
    )


def _muon_formula(shape, projected, cfg, dtype) -> dict[str, int]:
    # torch.optim.Muon keeps one momentum buffer per matrix; the AdamW part two moments and a
    # float32 step tensor per tensor.
    if projected:
        return {"moments": math.prod(shape) * dtype_bytes(dtype)}
    return _adamw_formula(shape, projected, cfg, dtype)


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


@register("muon", _muon_formula)
def build_muon(cfg, model: nn.Module) -> torch.optim.Optimizer:
    matrices, rest = split_targets(model, list(cfg.target_modules))
    if cfg.adjust_lr_fn not in ("original", "match_rms_adamw"):
        raise ValueError(
            f"optimizer.adjust_lr_fn={cfg.adjust_lr_fn!r}: use original or match_rms_adamw"
        )
    if len(cfg.adamw_betas) != 2:
        raise ValueError(f"optimizer.adamw_betas={list(cfg.adamw_betas)} must have two values")
    muon = Muon(
        matrices,
        ns_dtype=cfg.ns_dtype,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        ns_steps=cfg.ns_steps,
        adjust_lr_fn=cfg.adjust_lr_fn,
    )
    parts = {"muon": muon}
    if rest:
        parts["adamw"] = torch.optim.AdamW(
            rest,
            lr=cfg.adamw_lr if cfg.adamw_lr is not None else cfg.lr,
            betas=tuple(cfg.adamw_betas),
            eps=cfg.adamw_eps,
            weight_decay=cfg.weight_decay,
        )
    return CompositeOptimizer(parts)
