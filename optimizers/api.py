"""The library in one import: every method class, the group helper, the model surgeries and the
memory accounting.

    from llmpt.optimizers.api import GaLore, param_groups
    opt = GaLore(param_groups(model, ["attn", "mlp"]), lr=1e-2, rank=128)

Each class is a ``torch.optim.Optimizer`` with torch's constructor convention and the paper's
defaults as keyword defaults; lr, betas, eps and weight_decay (and, for projection methods, rank,
update_gap, scale and proj_type) are read from each param group, so groups may differ. Model
surgery is explicit and reversible: ``rso_wrap`` / ``rso_unwrap`` (RSO's W0 + P B),
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
from llmpt.optimizers.groups import decoder_layers, param_groups, split_targets, trainable
from llmpt.optimizers.int8_linear import unwrap_int8, wrap_int8
from llmpt.optimizers.layerwise import BAdam, Lisa, OwLore
from llmpt.optimizers.ldadam import LDAdam
from llmpt.optimizers.low_rank import Fira, Frugal, GaLore, GaLore8bit, Gum, QGaLore
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
    "adamw8bit",
    "came",
    "decoder_layers",
    "memory_formula",
    "param_groups",
    "rso_unwrap",
    "rso_wrap",
    "split_targets",
    "state_nbytes",
    "trainable",
    "unwrap_int8",
    "wrap_int8",
]


def state_nbytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state by category (``accounting.CATEGORIES``), each storage once."""
    if hasattr(optimizer, "state_nbytes"):
        return dict(optimizer.state_nbytes())
    return accounting.state_nbytes(optimizer.state.values())


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
