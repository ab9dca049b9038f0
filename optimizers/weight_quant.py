"""Q-GaLore's INT8 weights (Zhang et al. 2024, Sec. 3.4): after every update a projected weight
is requantized to 8-bit groupwise codes (groups of 256, per-group scale and zero recomputed from
the group's min and max) with stochastic rounding, which keeps the small updates that
round-to-nearest would erase (the paper: without it, perplexity rises by 2-8 points).

The weights are *simulated* INT8, as the reference's ``--simulation`` mode and its multi-GPU
scripts do: the parameter keeps its dtype, but after every step its values lie exactly on the
INT8 grid, so training numerics are those of real INT8 storage; the memory of the weights is
not reduced. The initial weights are quantized at the first step, after its update.

Rounding draws from a generator seeded by the matrix's seed and step: the same on every DDP rank
and after a resume.
"""

from __future__ import annotations

import torch

from kernels.quant_blockwise import dequantize, quantize


class Int8Weights:
    def __init__(
        self, group_size: int = 256, stochastic: bool = True, zero_point: str = "exact"
    ) -> None:
        if group_size < 1:
            raise ValueError(f"optimizer.weight_group_size={group_size} must be positive")
        self.group_size, self.stochastic, self.zero_point = group_size, stochastic, zero_point

    def describe(self) -> str:
        rounding = "stochastic" if self.stochastic else "nearest"
        return f"INT8 weights (simulated, groups of {self.group_size}, {rounding} rounding)"

    @torch.no_grad()
    def apply(self, p: torch.Tensor, state: dict) -> None:
        generator = None
        if self.stochastic:
            generator = torch.Generator(device=p.device)
            generator.manual_seed(state["seed"] * 1_000_003 + state["step"])
        q = quantize(p, 8, self.group_size, self.stochastic, generator, zero_point=self.zero_point)
        p.copy_(dequantize(q, p.dtype))
