"""Param groups the papers use, built from any ``nn.Module``: the weights of the targeted linears
are projected, everything else takes the method's plain (full-rank) rule.

    from llmpt.optimizers.api import GaLore, param_groups
    opt = GaLore(param_groups(model, ["attn", "mlp"]), lr=1e-2, rank=128)

Targets are substrings of qualified module names, so ``["attn", "mlp"]`` matches our ``Llama``
(``model.layers.0.attn.q_proj``) and transformers' ``LlamaForCausalLM``
(``model.layers.0.self_attn.q_proj``, ``model.layers.0.mlp.gate_proj``) alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from llmpt.optimizers.int8_linear import Int8Linear

DEFAULT_TARGETS = ("attn", "mlp")


def trainable(p: torch.Tensor) -> bool:
    """Trained by the optimizer: requires grad, or is only frozen for now by a layer sampler
    (so an optimizer rebuilt on a model mid-run, e.g. for a memory estimate, sees it)."""
    return p.requires_grad or getattr(p, "frozen_by_sampler", False)


def targeted_linears(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) of the linears (``nn.Linear``, or Q-GaLore's ``Int8Linear``) whose
    qualified name contains one of ``targets``."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Int8Linear)) and any(t in name for t in targets)
    ]


def split_targets(model: nn.Module, targets: Sequence[str]) -> tuple[list, list]:
    """(projected, plain) named trainable parameters: the weights of the linears whose qualified
    name contains one of ``targets`` (the papers' rule: "attn", "mlp"), and everything else."""
    if not targets:
        raise ValueError("target_modules is empty: name the modules to project")
    chosen = {f"{name}.weight" for name, _ in targeted_linears(model, targets)}
    if not chosen:
        raise ValueError(
            f"target_modules={list(targets)} matches no nn.Linear of the model; use substrings "
            "of its module names (e.g. attn, mlp)"
        )
    named = [(n, p) for n, p in model.named_parameters() if trainable(p)]
    return [(n, p) for n, p in named if n in chosen], [(n, p) for n, p in named if n not in chosen]


def param_groups(
    model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, **projected_options
) -> list[dict]:
    """Two groups of named parameters: the targeted matrices (``projected=True`` plus
    ``projected_options``, e.g. another ``lr``) and, if any, everything else (never
    projected). Names make errors name the matrix."""
    projected, plain = split_targets(model, targets)
    groups = [{"params": projected, "projected": True, **projected_options}]
    if plain:
        groups.append({"params": plain, "projected": False})
    return groups


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks, in depth order: modules named ``...layers.<i>`` (ours and
    transformers' LLaMA both name them so); the units that layer samplers switch."""
    found = [(name, m) for name, m in model.named_modules() if re.search(r"layers\.\d+$", name)]
    if not found:
        raise ValueError(
            "layer sampling needs decoder layers named '...layers.<i>'; this model has none"
        )
    return sorted(found, key=lambda item: int(item[0].rsplit(".", 1)[1]))
