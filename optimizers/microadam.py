"""MicroAdam (Modoranu et al., NeurIPS 2024): Adam whose moments are rebuilt at every step from a
window of the last m Top-K selections of the error-corrected gradient, with the unselected rest
carried to the next step as 4-bit error feedback.

One step for a tensor with gradient g (flattened to d values, t counted from 1):

1. a = g + Q^-1(E): the error feedback of the last step, dequantized;
2. in each Top-K block of ``block_size`` values keep the ceil(density x block) largest |a|: their
   block-relative int16 indices and bf16 values go into window row (t - 1) mod m;
3. E = Q(a minus what the window kept): 4-bit codes (two per byte) with a bf16 scale and zero
   point per group of ``quant_group_size`` values (``kernels.quant_blockwise``, round to
   nearest); the bf16 rounding of the kept values stays in the error, so nothing is dropped;
4. u = Adam's bias-corrected M / (sqrt(V) + eps) with M, V rebuilt from the window
   (``kernels.microadam_update``): zero outside the window's coordinates;
5. with ``alpha`` > 0 (the reference's densified variant for pretraining): u += alpha Q^-1(E),
   E = Q((1 - alpha) Q^-1(E));
6. W <- (1 - lr wd) W - lr u.

State per tensor: window indices int16 [m, k] and values bf16 [m, k], error codes uint8
[ceil(d / 2)], error scale and zero point bf16 [ceil(d / q)] each: 0.5 + 4 m k / d + 4 / q bytes
per value (about 0.9 at m = 10, 1% density), for every tensor, as in the reference.

Unlike the reference (ISTA-DASLab-Optimizers, CUDA and bf16 only): it runs on CPU (the PyTorch
references) and CUDA (Triton), in fp32 and bf16; the Top-K block size is a setting, not a
property of the GPU (the reference reads shared memory per SM, so its indices, and its
checkpoints, do not move between an A100 and an H100); the state is plain tensors and ints
(``torch.load(weights_only=True)``); the gradient is read, never modified in place.
"""

from __future__ import annotations

import math

import torch

from llmpt.kernels.microadam_update import TopKLayout, microadam_update
from llmpt.kernels.quant_blockwise import QuantizedTensor, dequantize, quantize, quantized_nbytes
from llmpt.optimizers.per_parameter import PerParameterOptimizer
from llmpt.optimizers.rules.adam import AdamRule

ERROR_BITS = 4


class MicroAdam(PerParameterOptimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        window: int = 10,
        density: float = 0.01,
        block_size: int = 16384,
        quant_group_size: int = 100_000,
        alpha: float = 0.0,
    ) -> None:
        if window < 1:
            raise ValueError(f"window={window} must be at least 1")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density={density} must lie in (0, 1]")
        if quant_group_size < 1:
            raise ValueError(f"quant_group_size={quant_group_size} must be positive")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha={alpha} must lie in [0, 1)")
        TopKLayout(1, block_size, density)  # refuses a block size int16 cannot index
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:  # the defaults and each group's own values
            AdamRule.check_group(group)
        self.check_fixed(dict(window=window, density=density, block_size=block_size))
        self.window, self.density, self.block_size = window, density, block_size
        self.quant_group_size, self.alpha = quant_group_size, alpha

    def layout(self, numel: int) -> TopKLayout:
        return TopKLayout(numel, self.block_size, self.density)

    def _error(self, state: dict, numel: int) -> QuantizedTensor:
        return QuantizedTensor(
            state["error_codes"],
            state["error_scale"],
            state["error_zero"],
            (numel,),
            ERROR_BITS,
            self.quant_group_size,
        )

    def _store_error(self, state: dict, residual: torch.Tensor) -> None:
        q = quantize(residual, ERROR_BITS, self.quant_group_size, scale_dtype=torch.bfloat16)
        state["error_codes"], state["error_scale"], state["error_zero"] = q.codes, q.scale, q.zero

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        d = p.numel()
        k = self.layout(d).k
        state["step"] = 0
        state["block_size"], state["density"] = (
            self.block_size,
            self.density,
        )  # what the indices mean
        state["window_indices"] = torch.zeros(self.window, k, device=p.device, dtype=torch.int16)
        state["window_values"] = torch.zeros(self.window, k, device=p.device, dtype=torch.bfloat16)
        self._store_error(state, torch.zeros(d, device=p.device, dtype=torch.float32))

    def _topk(self, a: torch.Tensor, layout: TopKLayout) -> torch.Tensor:
        """Block-relative indices (int64, k of them, block by block) of the largest |a|."""
        full = (layout.blocks - 1) * layout.block_size
        parts = []
        if layout.blocks > 1:
            blocks = a[:full].abs().view(layout.blocks - 1, layout.block_size)
            parts.append(torch.topk(blocks, layout.k_block, dim=1, sorted=False).indices.ravel())
        parts.append(torch.topk(a[full:].abs(), layout.k_last, sorted=False).indices)
        return torch.cat(parts)

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("MicroAdam does not support sparse gradients")
        state = self.state[p]
        if not state:
            self._init_state(p, state)
        d = p.numel()
        layout = self.layout(d)
        t = state["step"] + 1
        slot = (t - 1) % self.window
        a = p.grad.detach().reshape(-1).float() + dequantize(self._error(state, d), torch.float32)
        local = self._topk(a, layout)
        where = local + layout.block_starts(p.device)
        kept = a[where].to(torch.bfloat16)
        state["window_indices"][slot] = local.to(torch.int16)
        state["window_values"][slot] = kept
        a[where] -= kept.float()  # the kept values leave the error, their bf16 rounding stays
        b1, b2 = group["betas"]
        filled = torch.arange(self.window, device=p.device) < t
        ages = (t - 1 - torch.arange(self.window, device=p.device)) % self.window
        coef1 = torch.where(filled, b1 ** ages.double(), 0.0).float()
        coef2 = torch.where(filled, b2 ** ages.double(), 0.0).float()
        c1 = (1.0 - b1) / (1.0 - b1**t)
        c2 = (1.0 - b2) / (1.0 - b2**t)
        u = microadam_update(
            state["window_indices"], state["window_values"], coef1, coef2, layout, c1, c2,
            group["eps"],
        )  # fmt: skip
        if self.alpha > 0:
            self._store_error(state, a)
            e = dequantize(self._error(state, d), torch.float32)
            u.add_(e, alpha=self.alpha)
            self._store_error(state, e.mul_(1.0 - self.alpha))
        else:
            self._store_error(state, a)
        lr, wd = group["lr"], group["weight_decay"]
        if wd > 0:
            p.mul_(1.0 - lr * wd)
        p.add_(u.view_as(p).to(p.dtype), alpha=-lr)
        state["step"] = t

    def end_step(self) -> None:
        """Nothing to count: each tensor keeps its own step (its window position)."""

    def load_state_dict(self, state_dict: dict) -> None:
        """The base class's (saved dtypes kept), after checking the state means the same."""
        for saved in state_dict["state"].values():
            written = (saved["window_values"].shape[0], saved["density"], saved["block_size"])
            if written != (self.window, self.density, self.block_size):
                raise ValueError(
                    "the checkpoint's MicroAdam state was written with window, density, "
                    f"block_size = {written}, this optimizer has {self.window}, {self.density}, "
                    f"{self.block_size}: resume with the settings it was written with (the "
                    "window's indices are relative to Top-K blocks of that size)"
                )
        super().load_state_dict(state_dict)

    def memory_formula(self, steps: int = 1) -> dict[str, int]:
        """The closed form of every tensor's state (``state_bytes``)."""
        total: dict[str, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                shape = tuple(p.shape)
                parts = state_bytes(
                    shape, self.window, self.density, self.block_size, self.quant_group_size
                )
                for key, n in parts.items():
                    total[key] = total.get(key, 0) + n
        return total

    def projection_report(self) -> str:
        """The start-up line: what every tensor keeps."""
        n = sum(p.numel() for g in self.param_groups for p in g["params"])
        return (
            f"every tensor ({n / 1e6:.2f}M params): a window of {self.window} Top-"
            f"{self.density:.2%} selections per {self.block_size}-value block (int16 indices, "
            f"bf16 values), 4-bit error feedback in groups of {self.quant_group_size}"
            + (f", densified with alpha {self.alpha}" if self.alpha else "")
        )


def state_bytes(
    shape: tuple[int, ...], window: int, density: float, block_size: int, quant_group_size: int
) -> dict[str, int]:
    """Closed-form state of one tensor: 2 m k (indices) + 2 m k (values) + ceil(d / 2) (error
    codes) + 4 ceil(d / q) (bf16 scale and zero point)."""
    d = math.prod(shape)
    k = TopKLayout(d, block_size, density).k
    q = quantized_nbytes((d,), ERROR_BITS, quant_group_size, torch.bfloat16)
    return {
        "indices": 2 * window * k,
        "moments": 2 * window * k,
        "error": q["codes"],
        "quantization": q["scale"] + q["zero"],
    }
