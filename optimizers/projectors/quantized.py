"""Q-GaLore's projector (Zhang et al. 2024, Sec. 3.2-3.3): GaLore's one-sided SVD basis, stored
as group-quantized codes and refreshed lazily.

The basis is quantized right after the fp32 SVD (default 4 bits, groups of 256, codes packed two
per byte) and dequantized on the fly, to the gradient's dtype, whenever it is applied; no dense
copy is kept.

Lazy refresh: each matrix starts with gap T_l = ``update_gap``. At every refresh after the first
the cosine between the new and the previous top-1 singular vector (first row of V^T on the right
side, first column of U on the left) goes into a FIFO of the last ``queue_size`` values. Once the
FIFO is full and its mean is >= ``cos_threshold``, T_l <- floor(T_l * ``growth``); the FIFO is
not cleared, so a stable subspace doubles the gap at every later refresh. Refreshes fall on the
steps that are multiples of the current T_l (the reference's ``iter % T_l == 0``). The
reference uses the signed cosine, which SVD's sign ambiguity can make negative for an unchanged
subspace; ``abs_cos=True`` (default) uses |cos|. The previous top vector is read from the
stored (quantized) basis; the reference keeps an fp32 copy of it.

State per matrix (tensors and ints, so ``weights_only`` checkpoints hold it): ``side`` (LEFT or
RIGHT, as in SvdProjector), ``basis_shape`` (the dense basis shape, a tuple of ints),
``basis_codes`` (uint8), ``basis_scale`` and ``basis_zero`` (one per group, gradient dtype),
``gap`` (T_l; a refresh is due when the matrix's own step counter is a multiple of it, as in the
reference), ``cos_queue`` (fp32, oldest first, the valid values are the last
``min(cos_count, queue_size)``) and ``cos_count`` (cosines seen).
"""

from __future__ import annotations

import math

import torch

from llmpt.kernels.quant_blockwise import (
    BITS,
    QuantizedTensor,
    dequantize,
    quantize,
    quantized_nbytes,
)
from llmpt.optimizers.accounting import CATEGORIES
from llmpt.optimizers.projectors.svd import LEFT, SvdProjector


class QuantizedSvdProjector(SvdProjector):
    def __init__(
        self,
        rank: int,
        update_gap: int,
        proj_type: str = "std",
        svd_backend: str = "exact",
        oversample: int = 8,
        niter: int = 1,
        proj_bits: int = 4,
        proj_group_size: int = 256,
        cos_threshold: float = 0.4,
        queue_size: int = 5,
        growth: float = 2.0,
        abs_cos: bool = True,
        zero_point: str = "exact",
    ) -> None:
        if proj_type == "full":
            raise ValueError(
                "proj_type=full: Q-GaLore quantizes a one-sided projector; "
                "use std, reverse_std, left or right"
            )
        super().__init__(rank, update_gap, proj_type, svd_backend, oversample, niter)
        if proj_bits not in BITS:
            raise ValueError(f"proj_bits={proj_bits}: use 4 or 8")
        if not isinstance(proj_group_size, int) or proj_group_size < 1:
            raise ValueError(f"proj_group_size={proj_group_size} must be positive")
        if queue_size < 1:
            raise ValueError(f"queue_size={queue_size} must be a positive integer")
        if growth < 1:
            raise ValueError(f"growth={growth} must be >= 1 (the gap never shrinks)")
        self.proj_bits, self.proj_group_size = proj_bits, proj_group_size
        self.cos_threshold, self.queue_size = cos_threshold, queue_size
        self.growth, self.abs_cos, self.zero_point = growth, abs_cos, zero_point

    def describe(self) -> str:
        return (
            f"{super().describe()}, {self.proj_bits}-bit codes in groups of "
            f"{self.proj_group_size}, lazy refresh (cos >= {self.cos_threshold} over "
            f"{self.queue_size} refreshes: gap x {self.growth})"
        )

    # -------------------------------------------------------------- memory
    def _basis_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        m, n = shape
        r = self.rank_for(shape)
        return (m, r) if self.side(shape) == LEFT else (r, n)

    def memory(self, shape: tuple[int, int], dtype: torch.dtype) -> dict[str, int]:
        """Exact bytes this projector keeps for one matrix of ``shape`` and gradient ``dtype``,
        by ``optimizers.accounting`` category: codes, scale + zero, the fp32 cosine FIFO."""
        q = quantized_nbytes(self._basis_shape(shape), self.proj_bits, self.proj_group_size, dtype)
        out = dict.fromkeys(CATEGORIES, 0)
        out["projector"] = q["codes"]
        out["quantization"] = q["scale"] + q["zero"]
        out["other"] = 4 * self.queue_size
        return out

    # -------------------------------------------------------------- refresh
    def due(self, state: dict, step: int) -> bool:
        """The first step, then whenever the matrix's own step counter is a multiple of its
        current gap (Q-GaLore checks s mod T_l = 0, with T_l as grown so far)."""
        return "basis_codes" not in state or step % state["gap"] == 0

    def refresh(self, state: dict, grad: torch.Tensor) -> None:
        """SVD, lazy-schedule bookkeeping, quantized basis. The step is the matrix's counter as
        SubspaceOptimizer keeps it, ``state["step"]`` (absent = 0): the value ``due`` was given."""
        shape = tuple(grad.shape)
        side, r = self.side(shape), self.rank_for(shape)
        u, _, vh = self._svd(grad.float(), r)
        basis = u[:, :r] if side == LEFT else vh[:r, :]
        if "basis_codes" in state:
            self._observe(state, basis)
        else:
            state["gap"] = self.update_gap
            state["cos_queue"] = torch.zeros(
                self.queue_size, dtype=torch.float32, device=grad.device
            )
            state["cos_count"] = 0
        q = quantize(
            basis,
            self.proj_bits,
            self.proj_group_size,
            scale_dtype=grad.dtype,
            zero_point=self.zero_point,
        )
        state["side"], state["basis_shape"] = side, q.shape
        state["basis_codes"], state["basis_scale"], state["basis_zero"] = q.codes, q.scale, q.zero

    def _observe(self, state: dict, basis: torch.Tensor) -> None:
        """Q-GaLore Sec. 3.3: push cos(new top-1, previous top-1) and grow the gap when the
        full FIFO's mean reaches the threshold."""
        old = self.dequantized(state, torch.float32)
        if state["side"] == LEFT:
            new_top, old_top = basis[:, 0], old[:, 0]
        else:
            new_top, old_top = basis[0], old[0]
        cos = torch.dot(new_top, old_top) / (new_top.norm() * old_top.norm()).clamp_min(1e-30)
        queue = state["cos_queue"]
        queue.copy_(queue.roll(-1))
        queue[-1] = cos.abs() if self.abs_cos else cos
        state["cos_count"] += 1
        if state["cos_count"] >= queue.numel() and queue.mean().item() >= self.cos_threshold:
            state["gap"] = math.floor(state["gap"] * self.growth)

    # -------------------------------------------------------------- the step
    def dequantized(self, state: dict, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized basis, P (m x r) or Q (r x n), in ``dtype``; a temporary."""
        q = QuantizedTensor(
            state["basis_codes"],
            state["basis_scale"],
            state["basis_zero"],
            tuple(state["basis_shape"]),
            self.proj_bits,
            self.proj_group_size,
        )
        return dequantize(q, dtype)

    def project(self, state: dict, grad: torch.Tensor) -> torch.Tensor:
        basis = self.dequantized(state, grad.dtype)
        return basis.T @ grad if state["side"] == LEFT else grad @ basis.T  # (r, n) or (m, r)

    def add_back(self, state: dict, out: torch.Tensor, low: torch.Tensor, alpha: float) -> None:
        """out += alpha * project_back(low), as one accumulating GEMM (see SvdProjector)."""
        basis = self.dequantized(state, out.dtype)
        if state["side"] == LEFT:
            out.addmm_(basis, low, alpha=alpha)
        else:
            out.addmm_(low, basis, alpha=alpha)

    def project_back(self, state: dict, low: torch.Tensor) -> torch.Tensor:
        basis = self.dequantized(state, low.dtype)
        return basis @ low if state["side"] == LEFT else low @ basis  # (m, n)
