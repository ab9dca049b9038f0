"""The optimizer registry: ``build(cfg, model)`` turns ``conf/optimizer/<name>.yaml`` into a
``torch.optim.Optimizer``; ``state_nbytes`` reports its state memory by category and
``memory_formula`` the closed form of it. The methods register themselves from
``optimizers.baselines``, ``optimizers.low_rank`` and ``optimizers.layerwise``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from llmpt.optimizers import accounting
from llmpt.optimizers.int8_linear import Int8Linear
from llmpt.optimizers.sampling import trainable

# A method's settings: any object with the attributes its builder reads (the app passes its
# Hydra config, a script may pass a SimpleNamespace); the library imports no config schema.
Settings = Any
Builder = Callable[[Settings, nn.Module], torch.optim.Optimizer]
# (shape, projected?, config, dtype) -> state bytes by category, after the first step
Formula = Callable[[tuple[int, ...], bool, Settings, torch.dtype], dict[str, int]]
# (all parameter shapes, config) -> bytes held once per optimizer (e.g. shared code maps)
Shared = Callable[[list[tuple[int, ...]], Settings], dict[str, int]]
# (model, config, optimizer steps taken) -> state bytes by category, for methods whose state
# depends on parameter names or on which layers a sampler has active
ModelFormula = Callable[[nn.Module, Settings, int], dict[str, int]]
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


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def memory_formula(name: str, model: nn.Module, cfg, steps: int = 1) -> dict[str, int]:
    """Closed-form optimizer-state bytes of ``model`` under ``cfg`` after ``steps`` optimizer
    steps (>= 1), by category; works on the ``meta`` device, so any model size can be estimated
    without memory. ``steps`` matters only to methods that sample layers."""
    if steps < 1:
        raise ValueError(f"memory_formula: steps={steps} must be >= 1 (state exists after a step)")
    if name in MODEL_LEVEL:
        return FORMULAS[name](model, cfg, steps)
    projected = set()
    if hasattr(cfg, "target_modules"):
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


def trainable_params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if trainable(p)]


def adam_kwargs(cfg) -> dict:
    if len(cfg.betas) != 2:
        raise ValueError(f"optimizer.betas={list(cfg.betas)} must have two values")
    return dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def targeted_linears(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) of the linears (``nn.Linear``, or Q-GaLore's ``Int8Linear``) whose
    qualified name contains one of ``targets``."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Int8Linear)) and any(t in name for t in targets)
    ]


def split_targets(model: nn.Module, targets: list[str]) -> tuple[list, list]:
    """(projected, plain) named parameters: the weights of ``nn.Linear`` modules whose qualified
    name contains one of ``targets`` (the papers' rule: "attn", "mlp"), and everything else."""
    if not targets:
        raise ValueError("optimizer.target_modules is empty: name the modules to project")
    chosen = {f"{name}.weight" for name, _ in targeted_linears(model, targets)}
    if not chosen:
        raise ValueError(
            f"optimizer.target_modules={list(targets)} matches no nn.Linear of the model; "
            "use substrings of its module names (e.g. attn, mlp)"
        )
    named = [(n, p) for n, p in model.named_parameters() if trainable(p)]
    return [(n, p) for n, p in named if n in chosen], [(n, p) for n, p in named if n not in chosen]


def built_formula(name: str) -> ModelFormula:
    """The formula of a SubspaceOptimizer method: its components' declared sizes under the
    sampler's schedule (building it allocates no state and leaves the model untouched)."""

    def formula(model, cfg, steps) -> dict[str, int]:
        return REGISTRY[name](cfg, model).memory_formula(steps)

    return formula


def with_values(cfg: Settings, **values) -> Settings:
    """``cfg`` with some attributes replaced, leaving ``cfg`` itself as it is."""
    return _Overridden(cfg, values)


class _Overridden:
    def __init__(self, base, values: dict) -> None:
        self._base, self._values = base, values

    def __getattr__(self, key: str):
        if key.startswith("_"):
            raise AttributeError(key)
        return self._values[key] if key in self._values else getattr(self._base, key)


def build(cfg: Settings, model: nn.Module) -> torch.optim.Optimizer:
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


def param_groups(
    targeted: list, plain: list, targeted_opts: dict, plain_opts: dict | None = None
) -> list[dict]:
    """The targeted matrices' group (with ``targeted_opts``, e.g. ``projected=True``) and, if
    any, the group of everything else, which is never projected."""
    groups = [{"params": targeted, **targeted_opts}]
    if plain:
        groups.append({"params": plain, "projected": False, **(plain_opts or {})})
    return groups
