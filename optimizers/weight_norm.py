"""GradNormLoRP's reparametrization (Huang et al., AAAI 2025; spec finetune-and-lens.md 3.2):
each targeted linear's weight becomes W = g * V / ||V||_row, a direction V (out x in, the
parameter ``weight``, so state-dict keys and the projected groups stay those of the plain
model) and one magnitude per output channel g (``magnitude``, out). GaLore then projects V's
gradient and Adam trains g in the plain group (``llmpt.optimizers.low_rank.GradNormLoRP``).

This is a model-side reparametrization, not the released code's optimizer-side copy of the
weight (which keeps a full copy of V, overwrites the learned magnitude every step and drops the
radial term of V's gradient, spec compressed-state.md 3(b)): V *is* the parameter, autograd
produces the exact weight-norm gradients

    dL/dg_i = <dL/dW_i, V_i> / ||V_i||,
    dL/dV_i = (g_i / ||V_i||) (dL/dW_i - <dL/dW_i, v_i> v_i),   v_i = V_i / ||V_i||,

and W is recomputed in backward instead of being saved, so the linear saves for backward what a
plain linear saves (its input, or under autocast its input's low-precision cast), never a copy
of W. ``unwrap`` folds W back into plain ``nn.Linear`` weights for export: no inference cost.
Initialised from a linear with weight W0: V = W0 and g = ||W0||_row, so W = W0 (a zero row gets
g = 1, so that it can still learn; its W row is zero until it does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llmpt.optimizers.groups import targeted_linears


def _acc(v: torch.Tensor) -> torch.dtype:
    """The dtype the reparametrization is computed in: fp32, or V's own if wider."""
    return torch.promote_types(v.dtype, torch.float32)


def _norms(v: torch.Tensor) -> torch.Tensor:
    """Row norms (in ``_acc``); a zero row's norm is taken as 1 (its W row is 0 whatever g is)."""
    n = v.to(_acc(v)).norm(dim=1)
    return torch.where(n > 0, n, torch.ones_like(n))


def folded_weight(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """W = g * V / ||V||_row, computed in fp32 (or wider), in V's dtype."""
    acc = _acc(v)
    return (v.to(acc) * (g.to(acc) / _norms(v))[:, None]).to(v.dtype)


class WeightNormLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W = g * V / ||V||_row, saving x (or its autocast cast) and not W."""

    @staticmethod
    def forward(ctx, x, v, g, bias):
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        with torch.autocast(device, enabled=False):
            xc = x.to(dtype)  # (a cast of its own under autocast, as F.linear's)
            w = folded_weight(v, g).to(dtype)
            y = F.linear(xc, w, bias.to(dtype) if bias is not None else None)
        ctx.save_for_backward(xc, v, g)
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xc, v, g = ctx.saved_tensors
        out_f, in_f = v.shape
        gy = grad_y.reshape(-1, out_f)
        acc, n = _acc(v), _norms(v)
        vhat = v.to(acc) / n[:, None]
        grad_x = grad_v = grad_g = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = (vhat * g.to(acc)[:, None]).to(gy.dtype)
            grad_x = (gy @ w).reshape(*grad_y.shape[:-1], in_f).to(ctx.x_dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_w = (gy.t() @ xc.reshape(-1, in_f).to(gy.dtype)).to(acc)  # dL/dW, (out, in)
            radial = (grad_w * vhat).sum(1)  # <dL/dW_i, v_i>
            grad_g = radial.to(g.dtype)
            grad_v = ((g.to(acc) / n)[:, None] * (grad_w - radial[:, None] * vhat)).to(v.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = gy.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_v, grad_g, grad_bias


class WeightNormLinear(nn.Linear):
    """A linear whose ``weight`` is the direction V and ``magnitude`` the per-row g. It takes over
    the wrapped linear's weight and bias tensors (the state-dict keys do not change, one key is
    added), so an optimizer built on the wrapped model steps the same tensors."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        with torch.no_grad():
            g = _norms(linear.weight).to(linear.weight.dtype)
        self.magnitude = nn.Parameter(g, requires_grad=linear.weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return WeightNormLinearFunction.apply(x, self.weight, self.magnitude, self.bias)

    def folded(self) -> nn.Linear:
        """A plain linear with W = g * V / ||V||_row."""
        out = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            out.weight.copy_(folded_weight(self.weight, self.magnitude))
            if self.bias is not None:
                out.bias = self.bias
        out.weight.requires_grad_(self.weight.requires_grad)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight = magnitude * direction / ||direction||_row"


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def wrap(model: nn.Module, targets: Sequence[str]) -> list[WeightNormLinear]:
    """Reparametrize every ``nn.Linear`` whose qualified name contains one of ``targets``
    (in place; linears already reparametrized are kept) and return them in module order. The
    model computes the same function."""
    found = [(n, m) for n, m in targeted_linears(model, targets) if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(
            f"target_modules={list(targets)} matches no nn.Linear of the model; use "
            "substrings of its module names (e.g. attn, mlp)"
        )
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    for name, linear in found:  # check them all first: a refusal leaves the model untouched
        if counts.get(id(linear.weight), 0) > 1:
            raise ValueError(
                f"{name}.weight is shared with another module (tied weights): its direction "
                "and magnitude would differ between them; leave it out of target_modules"
            )
    out = []
    for name, linear in found:
        if not isinstance(linear, WeightNormLinear):
            linear = WeightNormLinear(linear)
            _set(model, name, linear)
        out.append(linear)
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """Fold every ``WeightNormLinear`` back into a plain ``nn.Linear`` (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, WeightNormLinear):
            _set(model, name, module.folded())
    return model
