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
    AdamMiniConfig,
    AdamWConfig,
    BAdamConfig,
    CameConfig,
    FiraConfig,
    FrugalConfig,
    GaLore8bitConfig,
    GaLoreConfig,
    GumConfig,
    LisaConfig,
    MuonConfig,
    OptimizerConfig,
    OwLoreConfig,
    QGaLoreConfig,
)
from optimizers import accounting
from optimizers.adam_mini import AdamMini, second_moment_numel
from optimizers.composite import CompositeOptimizer
from optimizers.projectors import CoordinateProjector, SvdProjector
from optimizers.projectors.quantized import QuantizedSvdProjector
from optimizers.residuals import NormScaledResidual, StateFreeResidual
from optimizers.rules import AdamRule, BlockwiseAdam8bitRule, MuonRule
from optimizers.rules.adam8bit import BLOCK, CODE_MAP_BYTES, blockwise_state_nbytes
from optimizers.sampling import LayerSampler, OutlierWeights, decoder_layers, trainable
from optimizers.subspace import Sampling, SubspaceOptimizer
from optimizers.weight_quant import Int8Weights

Builder = Callable[[OptimizerConfig, nn.Module], torch.optim.Optimizer]
# (shape, projected?, config, dtype) -> state bytes by category, after the first step
Formula = Callable[[tuple[int, ...], bool, OptimizerConfig, torch.dtype], dict[str, int]]
# (all parameter shapes, config) -> bytes held once per optimizer (e.g. shared code maps)
Shared = Callable[[list[tuple[int, ...]], OptimizerConfig], dict[str, int]]
# (model, config, optimizer steps taken) -> state bytes by category, for methods whose state
# depends on parameter names or on which layers a sampler has active
ModelFormula = Callable[[nn.Module, OptimizerConfig, int], dict[str, int]]
REGISTRY: dict[str, Builder] = {}
FORMULAS: dict[str, Formula | ModelFormula] = {}
SHARED: dict[str, Shared] = {}
MODEL_LEVEL: set[str] = set()


def register(
    name: str, formula: Formula | ModelFormula, shared: Shared | None = None, model_level=False
):
    def deco(fn: Builder) -> Builder:
        REGISTRY[name], FORMULAS[name] = fn, formula
        if shared is not None:
            SHARED[name] = shared
        if model_level:
            MODEL_LEVEL.add(name)
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


def _adam_mini_formula(model, cfg, steps) -> dict[str, int]:
    # the full first moment and one second-moment value per block (head, row or tensor), both
    # in the parameter's dtype; step counts and flags are Python numbers
    dim, heads = model.cfg.hidden_size, model.cfg.num_heads
    total = 0
    for name, p in model.named_parameters():
        if trainable(p):
            v = second_moment_numel(name, tuple(p.shape), dim, heads)
            total += (p.numel() + v) * _bytes(p.dtype)
    return {"moments": total}


@register("adam_mini", _adam_mini_formula, model_level=True)
def build_adam_mini(cfg: AdamMiniConfig, model: nn.Module) -> torch.optim.Optimizer:
    return AdamMini(model, **_adam_kwargs(cfg))


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


def memory_formula(
    name: str, model: nn.Module, cfg: OptimizerConfig, steps: int = 1
) -> dict[str, int]:
    """Closed-form optimizer-state bytes of ``model`` under ``cfg`` after ``steps`` optimizer
    steps (>= 1), by category; works on the ``meta`` device, so any model size can be estimated
    without memory. ``steps`` matters only to methods that sample layers."""
    if steps < 1:
        raise ValueError(f"memory_formula: steps={steps} must be >= 1 (state exists after a step)")
    if name in MODEL_LEVEL:
        return FORMULAS[name](model, cfg, steps)
    projected = set()
    if "target_modules" in cfg:
        projected = {id(p) for _, p in split_targets(model, list(cfg.target_modules))[0]}
    params = [p for p in model.parameters() if trainable(p)]
    parts = [FORMULAS[name](tuple(p.shape), id(p) in projected, cfg, p.dtype) for p in params]
    if name in SHARED:
        parts.append(SHARED[name]([tuple(p.shape) for p in params], cfg))
    total: dict[str, int] = {}
    for part in parts:
        for key, n in part.items():
            total[key] = total.get(key, 0) + n
    return total


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if trainable(p)]


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
    named = [(n, p) for n, p in model.named_parameters() if trainable(p)]
    return [(n, p) for n, p in named if n in chosen], [(n, p) for n, p in named if n not in chosen]


def build_subspace(
    cfg: GaLoreConfig,
    model: nn.Module,
    residual=None,
    rule=None,
    sampling=None,
    projector=None,
    weight_quant=None,
) -> SubspaceOptimizer:
    projected, plain = split_targets(model, list(cfg.target_modules))
    projector = projector if projector is not None else _projector(cfg)
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
        sampling=sampling,
        seed=getattr(cfg, "seed", 0),
        weight_quant=weight_quant,
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


def _built(name: str) -> ModelFormula:
    """The formula of a SubspaceOptimizer method: its components' declared sizes under the
    sampler's schedule (building it allocates no state and leaves the model untouched)."""

    def formula(model, cfg, steps) -> dict[str, int]:
        return REGISTRY[name](cfg, model).memory_formula(steps)

    return formula


@register("galore", _built("galore"), model_level=True)
def build_galore(cfg: GaLoreConfig, model: nn.Module) -> torch.optim.Optimizer:
    return build_subspace(cfg, model)


@register("galore_8bit", _built("galore_8bit"), model_level=True)
def build_galore_8bit(cfg: GaLore8bitConfig, model: nn.Module) -> torch.optim.Optimizer:
    return build_subspace(cfg, model, rule=_rule_8bit(cfg))


@register("q_galore", _built("q_galore"), model_level=True)
def build_q_galore(cfg: QGaLoreConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Q-GaLore (Zhang et al. 2024): 8-bit GaLore whose projector is stored in 4 bits and
    refreshed lazily, with the projected weights kept on an INT8 grid."""
    if cfg.refresh_phase:
        raise ValueError("optimizer.refresh_phase: Q-GaLore's lazy refresh keeps its own schedule")
    projector = QuantizedSvdProjector(
        cfg.rank,
        cfg.update_gap,
        cfg.proj_type,
        cfg.svd_backend,
        niter=cfg.svd_power_iters,
        proj_bits=cfg.proj_bits,
        proj_group_size=cfg.proj_group_size,
        cos_threshold=cfg.cos_threshold,
        queue_size=cfg.queue_size,
        growth=cfg.growth,
        abs_cos=cfg.abs_cos,
    )
    weights = Int8Weights(cfg.weight_group_size, cfg.stochastic_round) if cfg.weight_quant else None
    return build_subspace(
        cfg, model, rule=_rule_8bit(cfg), projector=projector, weight_quant=weights
    )


@register("fira", _built("fira"), model_level=True)
def build_fira(cfg: FiraConfig, model: nn.Module) -> torch.optim.Optimizer:
    return build_subspace(cfg, model, NormScaledResidual(cfg.mode, cfg.limiter_gamma))


def _distributed() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


FRUGAL_PROJECTIONS = ("block", "svd", "random", "columns", "rows")
FRUGAL_BLOCK_ORDERS = {"random": "uniform", "ascending": "ascending", "descending": "descending"}
FRUGAL_BLOCK_ORDERS["mirror"] = "mirror"


@register("frugal", _built("frugal"), model_level=True)
def build_frugal(cfg: FrugalConfig, model: nn.Module) -> torch.optim.Optimizer:
    """FRUGAL (Zmushko et al. 2025): torch-style Adam on the state-full part, signSGD (or SGD)
    on the state-free rest, weight decay first; regular parameters take full Adam."""
    if cfg.projection not in FRUGAL_PROJECTIONS:
        raise ValueError(
            f"optimizer.projection={cfg.projection!r}: use one of {', '.join(FRUGAL_PROJECTIONS)}"
        )
    if cfg.inactive_rule not in ("sign", "sgd", "none"):
        raise ValueError(f"optimizer.inactive_rule={cfg.inactive_rule!r}: use sign, sgd or none")
    if cfg.proj_lr_scale < 0:
        raise ValueError(f"optimizer.proj_lr_scale={cfg.proj_lr_scale} must be >= 0")
    projectable, regular = split_targets(model, list(cfg.target_modules))
    state_free = StateFreeResidual(cfg.inactive_rule, cfg.inactive_lr_scale)
    kwargs = dict(
        lr=cfg.lr,
        betas=tuple(_adam_kwargs(cfg)["betas"]),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        scale=1.0,
        rule=AdamRule(tuple(cfg.betas), cfg.eps, "torch"),
        reset_on_refresh=cfg.reset_statistics,
        decay_first=True,
        seed=cfg.seed,
        state_free=state_free,
    )
    scaled = {"lr_scale": cfg.proj_lr_scale}  # the steps' lr; weight decay keeps the base lr
    if cfg.projection == "block":
        if not 0.0 <= cfg.density <= 1.0:
            raise ValueError(f"optimizer.density={cfg.density} must lie in [0, 1]")
        if cfg.block_order not in FRUGAL_BLOCK_ORDERS:
            raise ValueError(
                f"optimizer.block_order={cfg.block_order!r}: use one of "
                f"{', '.join(FRUGAL_BLOCK_ORDERS)}"
            )
        n = len(projectable)
        sampler = LayerSampler(
            n,
            round(n * cfg.density),
            cfg.update_gap,
            FRUGAL_BLOCK_ORDERS[cfg.block_order],
            cfg.seed,
            keys=("optimizer.update_gap", "optimizer.block_order"),
        )
        sampling = Sampling(
            sampler,
            [[p] for _, p in projectable],
            # inactive_rule=none: a zero step, but FRUGAL still decays (and computes) them
            inactive_mode="state_free",
            reset_active=True,
            freeze_grads=not _distributed(),
            unit_names=[name for name, _ in projectable],
        )
        groups = [{"params": projectable, "projected": False, **scaled}]
        projector, residual = None, None
    else:
        if cfg.projection in ("columns", "rows"):
            projector = CoordinateProjector(cfg.density, cfg.update_gap, cfg.projection)
        else:
            projector = SvdProjector(
                None, cfg.update_gap, cfg.proj_type, density=cfg.density, basis=cfg.projection
            )
        groups = [{"params": projectable, "projected": True, **scaled}]
        sampling = None
        residual = state_free if cfg.inactive_rule != "none" else None  # none: GaLore-like
    if regular:
        groups.append({"params": regular, "projected": False})
    return SubspaceOptimizer(
        groups, projector=projector, residual=residual, sampling=sampling, **kwargs
    )


def _layer_sampler(cfg, n_layers: int, order: str | None = None) -> LayerSampler:
    if not 1 <= cfg.active_layers <= n_layers:
        raise ValueError(
            f"optimizer.active_layers={cfg.active_layers} must lie in [1, {n_layers}] "
            f"(the model has {n_layers} decoder layers)"
        )
    return LayerSampler(
        n_layers, cfg.active_layers, cfg.interval, order or cfg.sampling_order, cfg.seed
    )


def _layer_wise(cfg: LisaConfig, model: nn.Module, reset_active: bool) -> SubspaceOptimizer:
    """LISA and BAdam: full Adam (torch's form) on the active decoder layers, the others frozen;
    embeddings, lm_head and the final norm are always trained."""
    if cfg.sampling_order == "weighted":
        raise ValueError(
            "optimizer.sampling_order=weighted needs OwLore's outlier scores: use optimizer=owlore"
        )
    layers = decoder_layers(model)
    units = [[p for p in layer.parameters() if trainable(p)] for _, layer in layers]
    sampling = Sampling(
        _layer_sampler(cfg, len(layers)),
        units,
        inactive_mode="frozen",
        reset_active=reset_active,
        freeze_grads=not _distributed(),
        unit_names=[name for name, _ in layers],
    )
    named = [(n, p) for n, p in model.named_parameters() if trainable(p)]
    return SubspaceOptimizer(
        [{"params": named, "projected": False}],
        **_adam_kwargs(cfg),
        projector=None,
        scale=1.0,
        rule=AdamRule(tuple(cfg.betas), cfg.eps, "torch"),
        decay_first=True,
        sampling=sampling,
        seed=cfg.seed,
    )


@register("lisa", _built("lisa"), model_level=True)
def build_lisa(cfg: LisaConfig, model: nn.Module) -> torch.optim.Optimizer:
    return _layer_wise(cfg, model, reset_active=False)


@register("badam", _built("badam"), model_level=True)
def build_badam(cfg: BAdamConfig, model: nn.Module) -> torch.optim.Optimizer:
    return _layer_wise(cfg, model, reset_active=True)


@register("owlore", _built("owlore"), model_level=True)
def build_owlore(cfg: OwLoreConfig, model: nn.Module) -> torch.optim.Optimizer:
    """OwLore (Li et al. 2024): GaLore on the active decoder layers, which are drawn with
    probabilities from their outlier ratio; inactive layers are frozen and their state freed."""
    if cfg.sampling_order not in ("weighted", "uniform"):
        raise ValueError(
            f"optimizer.sampling_order={cfg.sampling_order!r}: use weighted or uniform"
        )
    layers = decoder_layers(model)
    outliers = OutlierWeights(layers, cfg.outlier_ratio)
    weighted = cfg.sampling_order == "weighted"
    sampling = Sampling(
        _layer_sampler(cfg, len(layers)),
        [[p for p in layer.parameters() if trainable(p)] for _, layer in layers],
        inactive_mode="frozen",
        freeze_grads=not _distributed(),
        weights=outliers.weights if weighted else None,
        collect=outliers.collect if weighted else None,
        attach=outliers.attach if weighted else None,
        unit_names=[name for name, _ in layers],
    )
    opt = build_subspace(cfg, model, sampling=sampling)
    return opt


@register("gum", _built("gum"), model_level=True)
def build_gum(cfg: GumConfig, model: nn.Module) -> torch.optim.Optimizer:
    """GUM (Pan et al. 2025): Muon on the GaLore projection of every targeted matrix, except in
    gamma sampled layers per period, which take Muon on the full-rank complement G - P P^T G;
    the importance weights 1/(1-q) and 1/q make the momentum's input unbiased."""
    if len(cfg.adamw_betas) != 2:
        raise ValueError(f"optimizer.adamw_betas={list(cfg.adamw_betas)} must have two values")
    projected, plain = split_targets(model, list(cfg.target_modules))
    layers = decoder_layers(model)
    n = len(layers)
    if not 1 <= cfg.active_layers < n:
        raise ValueError(
            f"optimizer.active_layers={cfg.active_layers}: GUM samples q = active_layers / "
            f"layers in (0, 1), so it must lie in [1, {n - 1}] for {n} decoder layers"
        )
    units = [[p for name, p in projected if name.startswith(prefix + ".")] for prefix, _ in layers]
    if sum(len(u) for u in units) != len(projected):
        raise ValueError("GUM: every targeted matrix must belong to a decoder layer")
    q = cfg.active_layers / n
    sampling = Sampling(
        LayerSampler(
            n,
            cfg.active_layers,
            cfg.update_gap,
            "uniform",
            cfg.seed,
            keys=("optimizer.update_gap", ""),
        ),
        units,
        active_mode="complement",
        inactive_mode="inherit",
        active_weight=1.0 / q,
        inactive_weight=1.0 / (1.0 - q),
        unit_names=[name for name, _ in layers],
    )
    projector = SvdProjector(
        cfg.rank,
        cfg.update_gap,
        cfg.proj_type,
        cfg.svd_backend,
        niter=cfg.svd_power_iters,
    )
    groups = [{"params": projected, "projected": True}]
    if plain:
        groups.append({"params": plain, "projected": False, "lr": cfg.adamw_lr or cfg.lr})
    return SubspaceOptimizer(
        groups,
        lr=cfg.lr,
        betas=tuple(cfg.adamw_betas),
        eps=cfg.adamw_eps,
        weight_decay=cfg.weight_decay,
        projector=projector,
        scale=1.0,
        rule=MuonRule(cfg.momentum, cfg.ns_steps, cfg.adjust_lr_fn),
        plain_rule=AdamRule(tuple(cfg.adamw_betas), cfg.adamw_eps, "torch"),
        decay_first=True,
        sampling=sampling,
        seed=cfg.seed,
    )


def build(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.name not in REGISTRY:
        raise ValueError(
            f"optimizer.name={cfg.name!r} is not registered; known: {sorted(REGISTRY)}"
        )
    if cfg.lr <= 0:
        raise ValueError(f"optimizer.lr={cfg.lr} must be positive")
    optimizer = REGISTRY[cfg.name](cfg, model)
    if hasattr(optimizer, "start"):  # freeze inactive layers, attach statistics hooks
        optimizer.start()
    return optimizer


def state_nbytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state by category (see ``optimizers.accounting``)."""
    if hasattr(optimizer, "state_nbytes"):
        return dict(optimizer.state_nbytes())
    return accounting.state_nbytes(optimizer.state.values())
