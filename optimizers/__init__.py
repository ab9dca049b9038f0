"""Optimizer registry: ``build(cfg, model)`` turns ``conf/optimizer/<name>.yaml`` into a
``torch.optim.Optimizer``, and ``state_nbytes`` reports its state memory by category.

AdamW (torch's own) is the first entry; the memory-efficient methods join the same registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from llm_pretrain.config import (
    AdafactorConfig,
    Adam8bitConfig,
    AdamWConfig,
    CameConfig,
    FiraConfig,
    GaLore8bitConfig,
    GaLoreConfig,
    MuonConfig,
    OptimizerConfig,
)
from optimizers import accounting
from optimizers.composite import CompositeOptimizer
from optimizers.projectors import SvdProjector
from optimizers.residuals import NormScaledResidual
from optimizers.rules import BlockwiseAdam8bitRule
from optimizers.rules.adam8bit import BLOCK, CODE_MAP_BYTES, blockwise_state_nbytes
from optimizers.subspace import SubspaceOptimizer
from optimizers.subspace import memory_formula as subspace_memory

Builder = Callable[[OptimizerConfig, nn.Module], torch.optim.Optimizer]
# (shape, projected?, config, dtype) -> state bytes by category, after the first step
Formula = Callable[[tuple[int, ...], bool, OptimizerConfig, torch.dtype], dict[str, int]]
# (all parameter shapes, config) -> bytes held once per optimizer (e.g. shared code maps)
Shared = Callable[[list[tuple[int, ...]], OptimizerConfig], dict[str, int]]
REGISTRY: dict[str, Builder] = {}
FORMULAS: dict[str, Formula] = {}
SHARED: dict[str, Shared] = {}


def register(name: str, formula: Formula, shared: Shared | None = None):
    def deco(fn: Builder) -> Builder:
        REGISTRY[name], FORMULAS[name] = fn, formula
        if shared is not None:
            SHARED[name] = shared
        return fn

    return deco


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _adamw_formula(shape, projected, cfg, dtype) -> dict[str, int]:
    # torch.optim.AdamW: two moments in the parameter's dtype and a float32 step tensor.
    return {"moments": 2 * math.prod(shape) * _bytes(dtype), "other": 4}


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
    return {"moments": stats * _bytes(dtype), "other": 4}


def _subspace_formula(residual: bool, eight_bit: bool = False) -> Formula:
    def formula(shape, projected, cfg, dtype) -> dict[str, int]:
        projector = _projector(cfg)
        min_8bit = cfg.min_8bit_size if eight_bit else None
        return subspace_memory(shape, projected, projector, residual, dtype, min_8bit)

    return formula


def _projector(cfg: GaLoreConfig) -> SvdProjector:
    return SvdProjector(
        cfg.rank,
        cfg.update_gap,
        cfg.proj_type,
        cfg.svd_backend,
        niter=cfg.svd_power_iters,
        refresh_phase=cfg.refresh_phase,
    )


def _rule_8bit(cfg) -> BlockwiseAdam8bitRule:
    return BlockwiseAdam8bitRule(tuple(cfg.betas), cfg.eps, cfg.min_8bit_size)


def _galore_8bit_shared(shapes, cfg) -> dict[str, int]:
    # our 8-bit rule holds its code maps from construction on
    return {"quantization": CODE_MAP_BYTES}


def memory_formula(name: str, model: nn.Module, cfg: OptimizerConfig) -> dict[str, int]:
    """Closed-form optimizer-state bytes of ``model`` under ``cfg``, by category; works on the
    ``meta`` device, so any model size can be estimated without memory."""
    projected = set()
    if "target_modules" in cfg:
        projected = {id(p) for _, p in split_targets(model, list(cfg.target_modules))[0]}
    params = [p for p in model.parameters() if p.requires_grad]
    parts = [FORMULAS[name](tuple(p.shape), id(p) in projected, cfg, p.dtype) for p in params]
    if name in SHARED:
        parts.append(SHARED[name]([tuple(p.shape) for p in params], cfg))
    total: dict[str, int] = {}
    for part in parts:
        for key, n in part.items():
            total[key] = total.get(key, 0) + n
    return total


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _adam_kwargs(cfg) -> dict:
    if len(cfg.betas) != 2:
        raise ValueError(f"optimizer.betas={list(cfg.betas)} must have two values")
    return dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


@register("adamw", _adamw_formula)
def build_adamw(cfg: AdamWConfig, model: nn.Module) -> torch.optim.Optimizer:
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
    return torch.optim.AdamW(_trainable(model), **_adam_kwargs(cfg), **impl[cfg.implementation])


def split_targets(model: nn.Module, targets: list[str]) -> tuple[list, list]:
    """(projected, plain) named parameters: the weights of ``nn.Linear`` modules whose qualified
    name contains one of ``targets`` (the papers' rule: "attn", "mlp"), and everything else."""
    if not targets:
        raise ValueError("optimizer.target_modules is empty: name the modules to project")
    chosen = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(t in name for t in targets)
    }
    if not chosen:
        raise ValueError(
            f"optimizer.target_modules={list(targets)} matches no nn.Linear of the model; "
            "use substrings of its module names (e.g. attn, mlp)"
        )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [(n, p) for n, p in named if n in chosen], [(n, p) for n, p in named if n not in chosen]


def build_subspace(
    cfg: GaLoreConfig, model: nn.Module, residual=None, rule=None
) -> SubspaceOptimizer:
    projected, plain = split_targets(model, list(cfg.target_modules))
    projector = _projector(cfg)
    groups = [{"params": projected, "projected": True}]
    if plain:
        groups.append({"params": plain, "projected": False})
    return SubspaceOptimizer(
        groups,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        projector=projector,
        scale=cfg.scale,
        residual=residual,
        rule=rule,
    )


@register("adamw8bit", _adam8bit_formula, _adam8bit_shared)
def build_adamw8bit(cfg: Adam8bitConfig, model: nn.Module) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb  # runs on CPU and CUDA since 0.45
    except ImportError as e:
        raise ImportError("optimizer=adamw8bit needs bitsandbytes: pip install -e '.[bnb]'") from e

    if cfg.block_size != BLOCK:
        raise ValueError(
            "optimizer.block_size: bitsandbytes' 8-bit optimizers use 256-value "
            f"blocks on every device; got {cfg.block_size}"
        )
    return bnb.optim.AdamW8bit(
        _trainable(model), **_adam_kwargs(cfg), min_8bit_size=cfg.min_8bit_size
    )


@register("adafactor", _adafactor_formula)
def build_adafactor(cfg: AdafactorConfig, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(
        _trainable(model),
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
        return {"moments": 2 * n * _bytes(dtype), "other": _bytes(dtype)}
    rows, cols = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
    return {"moments": (n + 2 * rows + 2 * cols) * _bytes(dtype), "other": _bytes(dtype)}


@register("came", _came_formula)
def build_came(cfg: CameConfig, model: nn.Module) -> torch.optim.Optimizer:
    from pytorch_optimizer import CAME

    if len(cfg.betas) != 3:
        raise ValueError(f"optimizer.betas={list(cfg.betas)}: CAME takes three betas")
    return CAME(
        _trainable(model),
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
        return {"moments": math.prod(shape) * _bytes(dtype)}
    return _adamw_formula(shape, projected, cfg, dtype)


@register("muon", _muon_formula)
def build_muon(cfg: MuonConfig, model: nn.Module) -> torch.optim.Optimizer:
    matrices, rest = split_targets(model, list(cfg.target_modules))
    if cfg.adjust_lr_fn not in ("original", "match_rms_adamw"):
        raise ValueError(
            f"optimizer.adjust_lr_fn={cfg.adjust_lr_fn!r}: use original or match_rms_adamw"
        )
    if len(cfg.adamw_betas) != 2:
        raise ValueError(f"optimizer.adamw_betas={list(cfg.adamw_betas)} must have two values")
    muon = torch.optim.Muon(
        matrices,
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


@register("galore", _subspace_formula(residual=False))
def build_galore(cfg: GaLoreConfig, model: nn.Module) -> torch.optim.Optimizer:
    return build_subspace(cfg, model)


@register("galore_8bit", _subspace_formula(residual=False, eight_bit=True), _galore_8bit_shared)
def build_galore_8bit(cfg: GaLore8bitConfig, model: nn.Module) -> torch.optim.Optimizer:
    return build_subspace(cfg, model, rule=_rule_8bit(cfg))


@register("fira", _subspace_formula(residual=True))
def build_fira(cfg: FiraConfig, model: nn.Module) -> torch.optim.Optimizer:
    return build_subspace(cfg, model, NormScaledResidual(cfg.mode, cfg.limiter_gamma))


def build(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.name not in REGISTRY:
        raise ValueError(
            f"optimizer.name={cfg.name!r} is not registered; known: {sorted(REGISTRY)}"
        )
    if cfg.lr <= 0:
        raise ValueError(f"optimizer.lr={cfg.lr} must be positive")
    return REGISTRY[cfg.name](cfg, model)


def state_nbytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state by category (see ``optimizers.accounting``)."""
    if hasattr(optimizer, "state_nbytes"):
        return dict(optimizer.state_nbytes())
    return accounting.state_nbytes(optimizer.state.values())
