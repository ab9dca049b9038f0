"""Error feedback for a projected step: what the subspace drops is carried into the next
gradient (DCT-AdamW's ``use_ef``, spec projection-family.md section 5b steps 2 and 5; its
quantized form follows MicroAdam's Algorithm 1 steps 4 and 8).

Per matrix, at each step: A = G + E (E dequantized when stored in 4 or 8 bits); the projector
refreshes and projects A instead of G; then E <- A - back(project(A)), the part of A outside
the subspace. ``bits=0`` keeps E in full in the parameter's dtype (state ``error_feedback``);
``bits=4`` or ``8`` keeps it as groupwise codes (``kernels.quant_blockwise``: bf16 scale and zero
point per group, one group per row by default, the reference's bucket) in ``error_codes``,
``error_scale`` and ``error_zero``.

Unlike the reference, which adds E into ``p.grad`` in place, the gradient is read, not written:
gradient clipping, logging and ``zero_grad`` see the gradient alone.
"""

from __future__ import annotations

import math

import torch

from llmpt.kernels.quant_blockwise import QuantizedTensor, dequantize, quantize, quantized_nbytes

BITS = (0, 4, 8)
SCALE_DTYPE = torch.bfloat16


class ErrorFeedback:
    def __init__(self, bits: int = 0, group_size: int = 0) -> None:
        if bits not in BITS:
            raise ValueError(f"ef_bits={bits}: use 0 (the error in full), 4 or 8 (quantized)")
        if group_size < 0:
            raise ValueError(f"ef_group_size={group_size}: use 0 (one group per row) or more")
        self.bits, self.group_size = bits, group_size

    def describe(self) -> str:
        if not self.bits:
            return "error feedback in full"
        groups = f"groups of {self.group_size}" if self.group_size else "one group per row"
        return f"error feedback in {self.bits} bits ({groups})"

    def _group(self, shape: tuple[int, ...]) -> int:
        return self.group_size or shape[-1]

    def corrected(self, state: dict, grad: torch.Tensor) -> torch.Tensor:
        """A = G + E, a new tensor (G itself at the first step, when there is no error yet)."""
        if not self.bits:
            error = state.get("error_feedback")
            return grad if error is None else grad + error
        if "error_codes" not in state:
            return grad
        q = QuantizedTensor(
            state["error_codes"],
            state["error_scale"],
            state["error_zero"],
            tuple(grad.shape),
            self.bits,
            self._group(tuple(grad.shape)),
        )
        return grad + dequantize(q, grad.dtype)

    def record(self, state: dict, a: torch.Tensor, projector, low: torch.Tensor) -> None:
        """E <- A - back(low), with low = project(A): one accumulating back-projection."""
        residual = a.clone()
        projector.add_back(state, residual, low, -1.0)
        if not self.bits:
            state["error_feedback"] = residual
            return
        q = quantize(residual, self.bits, self._group(tuple(a.shape)), scale_dtype=SCALE_DTYPE)
        state["error_codes"], state["error_scale"], state["error_zero"] = q.codes, q.scale, q.zero

    def memory(self, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, int]:
        if not self.bits:
            return {"error": math.prod(shape) * torch.empty((), dtype=dtype).element_size()}
        q = quantized_nbytes(shape, self.bits, self._group(shape), SCALE_DTYPE)
        return {"error": q["codes"], "quantization": q["scale"] + q["zero"]}
