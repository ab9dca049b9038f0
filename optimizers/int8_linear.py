"""Q-GaLore's real INT8 weights (``weight_storage=int8``; spec galore-family.md 2a-b):
each targeted ``nn.Linear`` becomes an ``Int8Linear`` that stores its weight as 8-bit groupwise
codes (uint8, one byte per weight) with a scale and zero point per group of 256 in the model's
dtype, instead of 2 (bf16) or 4 (fp32) bytes per weight.

Forward dequantizes the weight into a temporary and runs the linear; backward recomputes it
for the input gradient (nothing extra is saved). The weight gradient needs a float home, since
an integer tensor cannot take ``.grad``: the module's ``weight`` is a parameter of the full
shape whose storage is a single element (a zero-stride view), so autograd, gradient
accumulation, clipping and per-layer hooks all see a normal gradient (m x n, as the reference's
``float_grad``) while the weight's own storage is one value. The optimizer dequantizes the codes,
takes its step on that temporary and stores it back with stochastic rounding
(``optimizers.weight_quant.Int8Storage``).

As the reference's real-INT8 mode, this is single-process: DDP would broadcast into the
one-element weight. The state dict holds the codes, scales and zero points (``weight_codes``,
``weight_scale``, ``weight_zero``), not the placeholder; ``unwrap_int8`` gives plain linears with
the dequantized weights back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmpt.kernels.quant_blockwise import QuantizedTensor, dequantize, quantize


class Int8LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantized from ``q`` in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, carrier, bias, codes, scale, zero, group_size):
        q = QuantizedTensor(codes, scale, zero, tuple(carrier.shape), 8, group_size)
        w = dequantize(q, x.dtype)
        ctx.save_for_backward(x, codes, scale, zero)
        ctx.group_size, ctx.shape = group_size, tuple(carrier.shape)
        ctx.carrier_dtype, ctx.has_bias = carrier.dtype, bias is not None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, codes, scale, zero = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = grad_bias = None
        if ctx.needs_input_grad[0]:
            q = QuantizedTensor(codes, scale, zero, ctx.shape, 8, ctx.group_size)
            grad_x = grad_y @ dequantize(q, grad_y.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g.t() @ x.reshape(-1, x.shape[-1]).to(g.dtype)).to(ctx.carrier_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        return grad_x, grad_w, grad_bias, None, None, None, None


class Int8Linear(nn.Module):
    """An ``nn.Linear`` whose weight lives as INT8 codes (see the module docstring)."""

    def __init__(self, linear: nn.Linear, group_size: int = 256, zero_point: str = "exact") -> None:
        super().__init__()
        w = linear.weight
        self.out_features, self.in_features = w.shape
        self.group_size, self.zero_point = group_size, zero_point
        placeholder = torch.zeros((), dtype=w.dtype, device=w.device).expand(w.shape)
        self.weight = nn.Parameter(placeholder, requires_grad=w.requires_grad)
        self.bias = linear.bias
        if w.device.type == "meta":  # a model built for a memory estimate: sizes only
            groups = -(-w.numel() // group_size)
            q = QuantizedTensor(
                torch.empty(w.numel(), dtype=torch.uint8, device="meta"),
                torch.empty(groups, dtype=w.dtype, device="meta"),
                torch.empty(groups, dtype=w.dtype, device="meta"),
                tuple(w.shape),
                8,
                group_size,
            )
        else:  # round to nearest at the start, as the reference
            q = self._quantize(w.detach(), None)
        self.register_buffer("weight_codes", q.codes)
        self.register_buffer("weight_scale", q.scale)
        self.register_buffer("weight_zero", q.zero)

    def _quantize(self, w: torch.Tensor, generator: torch.Generator | None) -> QuantizedTensor:
        return quantize(
            w,
            8,
            self.group_size,
            stochastic=generator is not None,
            generator=generator,
            zero_point=self.zero_point,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Int8LinearFunction.apply(
            x,
            self.weight,
            self.bias,
            self.weight_codes,
            self.weight_scale,
            self.weight_zero,
            self.group_size,
        )

    @torch.no_grad()
    def dequantized(self) -> torch.Tensor:
        """The weight as a temporary float tensor in the placeholder's dtype."""
        q = QuantizedTensor(
            self.weight_codes,
            self.weight_scale,
            self.weight_zero,
            tuple(self.weight.shape),
            8,
            self.group_size,
        )
        return dequantize(q, self.weight.dtype)

    @torch.no_grad()
    def store(self, w: torch.Tensor, generator: torch.Generator | None) -> None:
        """Requantize ``w`` into the codes (stochastic rounding with ``generator``)."""
        q = self._quantize(w, generator)
        self.weight_codes.copy_(q.codes)
        self.weight_scale.copy_(q.scale)
        self.weight_zero.copy_(q.zero)

    def weight_nbytes(self) -> int:
        """Bytes of the stored weight: codes, scales and zero points (and the placeholder)."""
        tensors = (self.weight_codes, self.weight_scale, self.weight_zero, self.weight)
        return sum(t.untyped_storage().nbytes() for t in tensors)

    # -------------------------------------------------------------- checkpoints
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight", None)  # the placeholder: nothing to save

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        state_dict = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
        if prefix + "weight" in missing_keys:
            missing_keys.remove(prefix + "weight")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, int8 groups of {self.group_size}"
        )


def stored_weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The buffers that hold INT8-stored weights (codes, scales, zero points)."""
    out = []
    for module in model.modules():
        if isinstance(module, Int8Linear):
            out += [module.weight_codes, module.weight_scale, module.weight_zero]
    return out


def wrap_int8(
    model: nn.Module, found: list[tuple[str, nn.Module]], group_size: int, zero_point: str
) -> list[Int8Linear]:
    """Replace the given linears of ``model`` by ``Int8Linear`` in place, in that order."""
    wrapped = []
    for name, module in found:
        if isinstance(module, Int8Linear):
            wrapped.append(module)
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name} is a {type(module).__name__}: INT8 storage takes nn.Linear")
        new = Int8Linear(module, group_size, zero_point)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        wrapped.append(new)
    return wrapped


def unwrap_int8(model: nn.Module) -> nn.Module:
    """Plain ``nn.Linear`` modules with the dequantized weights, in place (export, or training
    on with another optimizer)."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, Int8Linear):
            continue
        w = module.dequantized()
        linear = nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(w)
        if module.bias is not None:
            linear.bias = module.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model
