"""The library in one import: every method class, the group helper, the model surgeries and the
memory accounting.

    from llmpt.optimizers.api import GaLore, param_groups
    opt = GaLore(param_groups(model, ["attn", "mlp"]), lr=1e-2, rank=128)

Each class is a ``torch.optim.Optimizer`` with torch's constructor convention and the paper's
defaults as keyword defaults; lr, betas, eps and weight_decay (and, for projection methods, rank,
update_gap, scale and proj_type) are read from each param group, so groups may differ. Model
surgery is explicit and reversible: ``rso_wrap`` / ``rso_unwrap`` (RSO's W0 + P B),
``weight_norm_wrap`` / ``weight_norm_unwrap`` (GradNormLoRP's W = g V / ||V||_row),
``welore_compress`` / ``welore_uncompress`` (WeLore's low-rank components, the rest frozen),
``wrap_int8`` / ``unwrap_int8`` (Q-GaLore's stored INT8 weights), and ``opt.attach()`` /
``opt.detach()`` for the layer samplers' freezing.

The library needs torch only: it never imports the application (``llm_pretrain``), Hydra or an
optional package at import time. Its import names live under the ``llmpt`` namespace
(``llmpt.optimizers``, ``llmpt.kernels``) so that neither shadows another distribution's
top-level module (Hugging Face's ``kernels``, PyPI's ``optimizers``).
"""

from __future__ import annotations

import torch

from llmpt.optimizers import accounting
from llmpt.optimizers.adam_mini import AdamMini
from llmpt.optimizers.baselines import Muon, MuonWithAdamW, adamw8bit, baseline_state_formula, came
from llmpt.optimizers.groups import (
    decoder_layers,
    param_groups,
    split_targets,
    targeted_linears,
    trainable,
)
from llmpt.optimizers.int8_linear import unwrap_int8, wrap_int8
from llmpt.optimizers.layerwise import BAdam, Lisa, OwLore
from llmpt.optimizers.ldadam import LDAdam
from llmpt.optimizers.low_rank import (
    Fira,
    Frugal,
    GaLore,
    GaLore8bit,
    Gorp,
    GradNormLoRP,
    GradNormLoRP8bit,
    Gum,
    QGaLore,
)
from llmpt.optimizers.microadam import MicroAdam
from llmpt.optimizers.projection_family import (
    I3S,
    Apollo,
    ApolloMini,
    Coap,
    Coap8bit,
    DctAdamW,
    Flora,
    Grass,
    OnlineSubspaceDescent,
)
from llmpt.optimizers.rso import Rso
from llmpt.optimizers.rso import unwrap as rso_unwrap
from llmpt.optimizers.rso import wrap as rso_wrap
from llmpt.optimizers.weight_norm import unwrap as weight_norm_unwrap
from llmpt.optimizers.weight_norm import wrap as weight_norm_wrap
from llmpt.optimizers.welore import WeLore
from llmpt.optimizers.welore import compress as welore_compress
from llmpt.optimizers.welore import uncompress as welore_uncompress

__all__ = [
    "I3S",
    "AdamMini",
    "Apollo",
    "ApolloMini",
    "BAdam",
    "Coap",
    "Coap8bit",
    "DctAdamW",
    "Fira",
    "Flora",
    "Frugal",
    "GaLore",
    "GaLore8bit",
    "Gorp",
    "GradNormLoRP",
    "GradNormLoRP8bit",
    "Grass",
    "Gum",
    "LDAdam",
    "Lisa",
    "MicroAdam",
    "Muon",
    "MuonWithAdamW",
    "OnlineSubspaceDescent",
    "OwLore",
    "QGaLore",
    "Rso",
    "WeLore",
    "adamw8bit",
    "came",
    "decoder_layers",
    "memory_formula",
    "param_groups",
    "rso_unwrap",
    "restart_state",
    "rso_wrap",
    "split_targets",
    "targeted_linears",
    "state_nbytes",
    "trainable",
    "unwrap_int8",
    "weight_norm_unwrap",
    "weight_norm_wrap",
    "welore_compress",
    "welore_uncompress",
    "wrap_int8",
]


def state_nbytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state by category (``accounting.CATEGORIES``), each storage once."""
    if hasattr(optimizer, "state_nbytes"):
        return dict(optimizer.state_nbytes())
    return accounting.state_nbytes(optimizer.state.values())


def restart_state(optimizer: torch.optim.Optimizer) -> None:
    """Forget every parameter's state (moments, bases, error buffers), keeping the settings, the
    param groups and step-counting schedules: what a new task of a continual-learning run starts
    from when, as in the papers, each task gets a fresh optimizer without rebuilding the model's
    surgery. A composite's parts (and a sharded optimizer's inner one) restart too."""
    parts = getattr(optimizer, "parts", None)
    if parts is not None:
        for part in parts.values():
            restart_state(part)
    else:
        optimizer.state.clear()


def memory_formula(optimizer: torch.optim.Optimizer, steps: int = 1) -> dict[str, int]:
    """Closed-form state bytes of ``optimizer`` after ``steps`` optimizer steps (>= 1), by
    category, from its parameters and settings alone: build it on a ``meta``-device model to
    estimate any size without memory. ``steps`` matters only to methods that sample layers."""
    if steps < 1:
        raise ValueError(f"memory_formula: steps={steps} must be >= 1 (state exists after a step)")
    if hasattr(optimizer, "memory_formula"):
        out = optimizer.memory_formula(steps)
    else:
        out = baseline_state_formula(optimizer)
    return {key: out.get(key, 0) for key in accounting.CATEGORIES}
