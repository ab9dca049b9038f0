"""Q-GaLore's INT8 weights (Zhang et al. 2024, Sec. 3.4): after every update a projected weight
is requantized to 8-bit groupwise codes (groups of 256, per-group scale and zero recomputed from
the group's min and max) with stochastic rounding, which keeps the small updates that
round-to-nearest would erase (the paper: without it, perplexity rises by 2-8 points).

``Int8Weights`` simulates INT8 (``weight_storage=simulated``), as the reference's
``--simulation`` mode and its multi-GPU scripts do: the parameter keeps its dtype, but after
every step its values lie exactly on the INT8 grid, so training numerics are those of real INT8
storage; the memory of the weights is not reduced. The initial weights are quantized at the
first step, after its update. ``Int8Storage`` (``weight_storage=int8``) keeps the weights as
codes in ``optimizers.int8_linear.Int8Linear`` modules: one byte per weight.

Rounding draws from a generator seeded by the matrix's seed and step: the same on every DDP rank
and after a resume.
"""

from __future__ import annotations

import torch

from llmpt.kernels.quant_blockwise import dequantize, quantize


class Int8Weights:
    def __init__(
        self, group_size: int = 256, stochastic: bool = True, zero_point: str = "exact"
    ) -> None:
        if group_size < 1:
            raise ValueError(f"weight_group_size={group_size} must be positive")
        self.group_size, self.stochastic, self.zero_point = group_size, stochastic, zero_point

    def describe(self) -> str:
        rounding = "stochastic" if self.stochastic else "nearest"
        return f"INT8 weights (simulated, groups of {self.group_size}, {rounding} rounding)"

    def generator(self, state: dict, device: torch.device) -> torch.Generator | None:
        """Stochastic rounding's generator, seeded by the matrix's seed and step."""
        if not self.stochastic:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(state["seed"] * 1_000_003 + state["step"])
        return generator

    def begin(self, p: torch.Tensor) -> torch.Tensor:
        """The float weight the step updates: the parameter itself."""
        return p

    @torch.no_grad()
    def end(self, p: torch.Tensor, w: torch.Tensor, state: dict) -> None:
        """Put the updated weight back onto its INT8 grid."""
        generator = self.generator(state, w.device)
        q = quantize(w, 8, self.group_size, self.stochastic, generator, zero_point=self.zero_point)
        w.copy_(dequantize(q, w.dtype))


class Int8Storage(Int8Weights):
    """Real INT8 storage (``optimizers.int8_linear``): the weight is held as codes by its
    ``Int8Linear``; a step dequantizes it into a temporary, updates that, and requantizes it
    with the simulated weights' rounding: from the same grid values and gradients the two give
    the same weights bit for bit."""

    def __init__(self, modules: dict, group_size: int, stochastic: bool, zero_point: str) -> None:
        super().__init__(group_size, stochastic, zero_point)
        self.modules = modules  # placeholder parameter -> its Int8Linear

    def describe(self) -> str:
        rounding = "stochastic" if self.stochastic else "nearest"
        return f"INT8 weights (stored as codes, groups of {self.group_size}, {rounding} rounding)"

    def begin(self, p: torch.Tensor) -> torch.Tensor:
        return self.modules[p].dequantized()

    @torch.no_grad()
    def end(self, p: torch.Tensor, w: torch.Tensor, state: dict) -> None:
        self.modules[p].store(w, self.generator(state, w.device))
