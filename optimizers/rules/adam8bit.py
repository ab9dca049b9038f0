"""Adam with blockwise 8-bit moments (Dettmers et al. 2022), for 8-bit GaLore (Zhao et al. 2024,
Sec. 4.3), using bitsandbytes' own update kernels, which run on CPU and CUDA.

Tensors with at least ``min_8bit_size`` values keep M and V as uint8 codes with one fp32 absmax
per 256-value block (``state1``/``state2``, ``absmax1``/``absmax2``); smaller ones keep fp32 M and
V, as bitsandbytes does. The two 256-entry code maps are constants of the rule, shared by every
tensor (2 KiB per optimizer), not per-parameter state. The kernel applies Adam's bias
correction itself, so the direction comes back with a correction factor of 1.
"""

from __future__ import annotations

import math

import torch

from llmpt.optimizers.optional import missing_extra
from llmpt.optimizers.rules.adam import AdamRule

BLOCK = 256
CODE_MAP_BYTES = 2 * 256 * 4  # the signed and unsigned 256-entry fp32 code maps


def blockwise_state_nbytes(shape: tuple[int, ...], min_8bit_size: int) -> dict[str, int]:
    """Closed-form bytes of 8-bit Adam state for one tensor of ``shape`` (bitsandbytes' layout,
    shared code maps excluded): uint8 M and V plus an fp32 absmax per block each, or fp32 M and V
    below ``min_8bit_size`` values."""
    n = math.prod(shape)
    if n < min_8bit_size:
        return {"moments": 2 * 4 * n}
    return {"moments": 2 * n, "quantization": 2 * 4 * math.ceil(n / BLOCK)}


class BlockwiseAdam8bitRule:
    """bitsandbytes' blockwise 8-bit Adam; ``betas`` and ``eps`` come from the parameter's group
    at every step, as ``AdamRule``'s."""

    def __init__(self, min_8bit_size: int = 4096) -> None:
        try:
            import bitsandbytes.functional as bnbf
        except ImportError as e:
            raise missing_extra("bitsandbytes", "bnb", "8-bit optimizer states") from e
        self.F = bnbf
        self.min_8bit_size = min_8bit_size
        self.qmap1 = bnbf.create_dynamic_map(signed=True)
        self.qmap2 = bnbf.create_dynamic_map(signed=False)

    def quantized(self, numel: int) -> bool:
        return numel >= self.min_8bit_size

    state_keys = ("state1", "state2", "absmax1", "absmax2")

    def memory(self, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, int]:
        """Codes and block scales (or fp32 moments for small tensors), whatever ``dtype``."""
        return blockwise_state_nbytes(shape, self.min_8bit_size)

    check_group = staticmethod(AdamRule.check_group)

    def direction(
        self, state: dict, grad: torch.Tensor, step: int, group: dict
    ) -> tuple[torch.Tensor, float]:
        (beta1, beta2), eps = group["betas"], group["eps"]
        grad = grad.contiguous()
        if "state1" not in state:
            self._init(state, grad)
        if self.qmap1.device != grad.device:
            self.qmap1, self.qmap2 = self.qmap1.to(grad.device), self.qmap2.to(grad.device)
        out = torch.zeros_like(grad)  # the kernel writes -1.0 x (corrected Adam update) here
        if state["state1"].dtype == torch.uint8:
            self.F.optimizer_update_8bit_blockwise(
                "adam",
                grad,
                out,
                state["state1"],
                state["state2"],
                beta1,
                beta2,
                0.0,
                0.0,
                eps,
                step,
                1.0,
                self.qmap1,
                self.qmap2,
                state["absmax1"],
                state["absmax2"],
                0.0,
            )
        else:
            self.F.optimizer_update_32bit(
                "adam",
                grad,
                out,
                state["state1"],
                beta1,
                eps,
                step,
                1.0,
                state["state2"],
                beta2,
                0.0,
                0.0,
                0.0,
                1.0,
            )
        return out.neg_(), 1.0

    def first_moment(self, state: dict) -> torch.Tensor | None:
        """M, dequantized (COAP's projector update reads it)."""
        if "state1" not in state:
            return None
        if state["state1"].dtype != torch.uint8:
            return state["state1"]
        m = self.F.dequantize_blockwise(
            state["state1"].flatten(),
            absmax=state["absmax1"],
            code=self.qmap1.to(state["state1"].device),
            blocksize=BLOCK,
        )
        return m.view(state["state1"].shape)

    def _init(self, state: dict, grad: torch.Tensor) -> None:
        n = grad.numel()
        if not self.quantized(n):
            state["state1"] = torch.zeros_like(grad, dtype=torch.float32)
            state["state2"] = torch.zeros_like(grad, dtype=torch.float32)
            return
        blocks = math.ceil(n / BLOCK)
        state["state1"] = torch.zeros_like(grad, dtype=torch.uint8)
        state["state2"] = torch.zeros_like(grad, dtype=torch.uint8)
        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=grad.device)
        state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=grad.device)

    def shared_tensors(self) -> dict[str, list[torch.Tensor]]:
        """State held once for all tensors, by category."""
        return {"quantization": [self.qmap1, self.qmap2]}
