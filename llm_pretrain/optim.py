"""The application's side of the optimizer library: ``conf/optimizer/<name>.yaml`` -> an
optimizer of ``llmpt.optimizers``.

Each method is one row of ``METHODS``: the library class (or factory) whose signature is the
method's config schema (``config.py`` derives the Hydra dataclass from it, so the defaults live
in one place, the class), how its parameters are grouped, and which explicit model surgery it
needs (RSO's reparametrization, Q-GaLore's stored INT8 weights, GradNormLoRP's weight
normalization, the layer samplers' freezing).
``build`` performs that surgery, builds the groups, passes every other config key to the class
by name, and turns the library's argument names in error messages into config keys
(``rank=`` -> ``optimizer.rank=``).
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from omegaconf import ListConfig
from torch import nn

from llmpt.optimizers import api

# the app's one import for its optimizers (train.py, memory*.py and the tests use these here)
from llmpt.optimizers.api import (  # noqa: F401
    restart_state,
    split_targets,
    state_nbytes,
    trainable,
)
from llmpt.optimizers.distributed import replicated_world
from llmpt.optimizers.groups import decoder_layers, param_groups, targeted_linears
from llmpt.optimizers.int8_linear import wrap_int8
from llmpt.optimizers.rso import check_outer_loop
from llmpt.optimizers.rso import wrap as rso_wrap
from llmpt.optimizers.welore import compress as welore_compress

# constructor arguments the app fills itself, never from the config
STRUCTURAL = {
    "params", "layers", "linears", "int8_linears", "named_parameters", "dim", "n_heads", "targets"
}  # fmt: skip


def _adamw(
    params,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    implementation: str = "auto",
) -> torch.optim.Optimizer:
    """torch.optim.AdamW at the papers' full-rank baseline (lr 1e-3, no weight decay);
    ``implementation`` picks torch's kernel."""
    impl = {"auto": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    impl["for_loop"] = {"foreach": False}
    if implementation not in impl:
        raise ValueError(f"implementation={implementation!r}: use auto, foreach, fused or for_loop")
    return torch.optim.AdamW(
        params,
        lr=lr,
        betas=tuple(betas),
        eps=eps,
        weight_decay=weight_decay,
        **impl[implementation],
    )


def _adafactor(
    params,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    beta2_decay: float = -0.8,
    eps1: float | None = None,
    eps2: float = 1e-3,
    clip_threshold: float = 1.0,
) -> torch.optim.Optimizer:
    """torch.optim.Adafactor with torch's defaults; ``eps1`` None: the dtype's epsilon."""
    return torch.optim.Adafactor(
        params,
        lr=lr,
        beta2_decay=beta2_decay,
        eps=(eps1, eps2),
        d=clip_threshold,
        weight_decay=weight_decay,
    )


@dataclass(frozen=True)
class Method:
    """``factory``: the library class or function; ``params``: ``projected`` (the papers' groups
    from ``target_modules``), ``named`` (every trainable parameter with its name), ``tensors``
    (every trainable parameter, for third-party classes that take no names); ``heads``: pass the
    model's hidden size and attention heads (Adam-mini); ``layers``: pass the decoder layers;
    ``surgery``: the model change made before the groups (``rso``, ``int8``, ``weight_norm``,
    ``welore``: the compression, whose ranks are written back to the config as ``ranks``);
    ``schema_sources``: other functions whose arguments are config keys too (RSO's ``wrap``);
    ``pretraining``: False for fine-tuning-only methods (GORP is GaLore until a task ends; WeLore
    compresses trained weights), which the pretraining benchmark leaves out."""

    factory: Callable
    params: str = "projected"
    heads: bool = False
    layers: bool = False
    surgery: str | None = None
    schema_sources: tuple[Callable, ...] = field(default_factory=tuple)
    pretraining: bool = True

    def sources(self) -> tuple[Callable, ...]:
        return (self.factory, *self.schema_sources)


METHODS: dict[str, Method] = {
    "adamw": Method(_adamw, params="tensors"),
    "adamw8bit": Method(api.adamw8bit, params="tensors"),
    "adafactor": Method(_adafactor, params="tensors"),
    "came": Method(api.came, params="tensors"),
    "adam_mini": Method(api.AdamMini, params="named", heads=True),
    "muon": Method(api.MuonWithAdamW),
    "galore": Method(api.GaLore),
    "galore_8bit": Method(api.GaLore8bit),
    "q_galore": Method(api.QGaLore, surgery="int8"),
    "fira": Method(api.Fira),
    "frugal": Method(api.Frugal),
    "gum": Method(api.Gum, layers=True),
    "lisa": Method(api.Lisa, params="named", layers=True),
    "badam": Method(api.BAdam, params="named", layers=True),
    "owlore": Method(api.OwLore, layers=True),
    "ldadam": Method(api.LDAdam),
    "microadam": Method(api.MicroAdam, params="named"),
    "apollo": Method(api.Apollo),
    "apollo_mini": Method(api.ApolloMini),
    "grass": Method(api.Grass),
    "i3s": Method(api.I3S),
    "dct_adamw": Method(api.DctAdamW),
    "coap": Method(api.Coap),
    "coap_8bit": Method(api.Coap8bit),
    "osd": Method(api.OnlineSubspaceDescent),
    "flora": Method(api.Flora),
    "gorp": Method(api.Gorp, pretraining=False),
    "welore": Method(
        api.WeLore,
        params="tensors",
        surgery="welore",
        schema_sources=(welore_compress,),
        pretraining=False,
    ),
    "gradnorm_lorp": Method(api.GradNormLoRP, surgery="weight_norm"),
    "gradnorm_lorp_8bit": Method(api.GradNormLoRP8bit, surgery="weight_norm"),
    "rso": Method(api.Rso, params="named", surgery="rso", schema_sources=(rso_wrap,)),
}
WEIGHT_STORAGES = ("simulated", "int8")


def signature_defaults(fn: Callable) -> dict[str, inspect.Parameter]:
    """The configurable arguments of a factory: every parameter but the structural ones."""
    return {
        name: p
        for name, p in inspect.signature(fn).parameters.items()
        if name not in STRUCTURAL and name != "model" and p.kind is not p.VAR_KEYWORD
    }


def _value(v):
    """Config values as the library takes them: lists (betas) as tuples."""
    if isinstance(v, (list, tuple, ListConfig)):
        return tuple(_value(x) for x in v)
    return v


def kwargs_for(fn: Callable, cfg) -> dict:
    return {k: _value(getattr(cfg, k)) for k in signature_defaults(fn) if hasattr(cfg, k)}


def _config_keys(message: str, cfg) -> str:
    """The library names constructor arguments (``rank=4096``); the app's messages name the
    config key (``optimizer.rank=4096``)."""
    keys = sorted(_keys(cfg), key=len, reverse=True)
    if not keys:
        return message
    pattern = r"(?<![\w.])(" + "|".join(map(re.escape, keys)) + r")(?==)"
    return re.sub(pattern, r"optimizer.\1", message)


def _keys(cfg) -> list[str]:
    if hasattr(cfg, "keys"):
        return [str(k) for k in cfg.keys()]  # noqa: SIM118  (a DictConfig or a proxy)
    return list(vars(cfg))


def build(cfg, model: nn.Module, attach: bool = True) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` (``conf/optimizer/<name>.yaml``) describes for ``model``, after the
    method's model surgery; a layer sampler is attached (its inactive layers frozen) unless
    ``attach=False`` (a memory formula must not touch a model that is training)."""
    if cfg.name not in METHODS:
        raise ValueError(f"optimizer.name={cfg.name!r} is not registered; known: {sorted(METHODS)}")
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"optimizer.lr={cfg.lr} must be a positive, finite number")
    try:
        optimizer = _build(METHODS[cfg.name], cfg, model)
    except (ValueError, TypeError) as e:
        raise type(e)(_config_keys(str(e), cfg)) from e
    if attach and getattr(optimizer, "sampling", None) is not None:
        optimizer.attach()  # freeze inactive layers, hook OwLore's statistics
    return optimizer


def _targets(cfg) -> list[str]:
    return list(cfg.target_modules)


def _build(method: Method, cfg, model: nn.Module) -> torch.optim.Optimizer:
    kwargs = kwargs_for(method.factory, cfg)
    if method.surgery == "rso":  # the optimizer's own checks first: a refusal changes nothing
        check_outer_loop(cfg.update_gap, cfg.proximal)
        kwargs["linears"] = rso_wrap(model, _targets(cfg), **kwargs_for(rso_wrap, cfg))
    if method.surgery == "int8":
        kwargs["int8_linears"] = _int8_surgery(cfg, model)
    if method.surgery == "weight_norm":
        kwargs["linears"] = api.weight_norm_wrap(model, _targets(cfg))
    plan = None
    if method.surgery == "welore":
        kwargs["linears"], plan = welore_compress(
            model, _targets(cfg), **kwargs_for(welore_compress, cfg)
        )
        if plan is not None:  # record it: a resume, an export or an estimate rebuilds it
            cfg.ranks = dict(plan.ranks)
    if method.layers:
        kwargs["layers"] = [layer for _, layer in decoder_layers(model)]
    if method.heads:
        kv = getattr(model.cfg, "num_kv_heads", None) or model.cfg.num_heads
        if kv != model.cfg.num_heads:
            raise ValueError(
                f"{cfg.name} splits k and v by query head, but this model has grouped-query "
                f"attention ({kv} k/v heads for {model.cfg.num_heads}); use "
                "another optimizer"
            )
        kwargs.update(dim=model.cfg.hidden_size, n_heads=model.cfg.num_heads)
    if method.params == "projected":
        params = param_groups(model, _targets(cfg))
    else:
        params = [(n, p) for n, p in model.named_parameters() if trainable(p)]
        if method.params == "tensors":
            params = [p for _, p in params]
    optimizer = method.factory(params, **kwargs)
    if plan is not None:
        optimizer.plan = plan
    return optimizer


def _int8_surgery(cfg, model: nn.Module):
    """Q-GaLore's ``weight_storage=int8``: the targeted linears become ``Int8Linear`` (codes,
    one process); ``simulated`` leaves the model as it is."""
    if cfg.weight_storage not in WEIGHT_STORAGES:
        raise ValueError(f"weight_storage={cfg.weight_storage!r}: use one of {WEIGHT_STORAGES}")
    if cfg.weight_storage == "simulated":
        return None
    if not cfg.weight_quant:
        raise ValueError(
            "weight_storage=int8 stores INT8 weights, which weight_quant=false turns off: drop "
            "one of the two"
        )
    if replicated_world():
        raise ValueError(
            "weight_storage=int8 is single-process (as the reference's real INT8): DDP "
            "broadcasts into each weight, which is stored as codes here. Use "
            "weight_storage=simulated for multi-GPU runs (the same arithmetic)"
        )
    zero_point = "integer" if cfg.compat == "reference" else "exact"
    found = targeted_linears(model, _targets(cfg))
    return wrap_int8(model, found, cfg.weight_group_size, zero_point)


def memory_formula(name: str, model: nn.Module, cfg, steps: int = 1) -> dict[str, int]:
    """Closed-form optimizer-state bytes of ``model`` under ``cfg`` after ``steps`` steps, by
    category: the library's formula of the optimizer built on ``model`` (a ``meta`` model
    allocates nothing). A method with model surgery (RSO, Q-GaLore's stored INT8 weights) is
    built on a copy: the formula leaves the model as it is."""
    if METHODS[name].surgery is not None:
        model = copy.deepcopy(model)
    return api.memory_formula(build(cfg, model, attach=False), steps)
