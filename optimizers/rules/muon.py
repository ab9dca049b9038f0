"""Muon's update as a rule (Jordan et al. 2024; GUM, Pan et al. 2025): heavy-ball momentum of
the (projected) gradient, orthogonalised by five quintic Newton-Schulz iterations (in bf16 on CUDA
as the references; in fp32 on CPU, see ``ns_dtype``).

GUM writes the momentum as R <- beta R + g (not torch.optim.Muon's lerp) and steps
W <- W - lr * NS(R); the learning rate is scaled to the full matrix's shape as torch.optim.Muon
does (``original``: sqrt(max(1, rows / cols)); ``match_rms_adamw``: 0.2 sqrt(max(rows, cols))).
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_ns_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of the Newton-Schulz iteration. ``auto`` is bf16 on CUDA, as Muon's references
    compute it, and fp32 elsewhere: CPUs without bf16 matrix units emulate bf16 matmuls, 60x
    slower than fp32 on this project's 2-core CI machine (an NS iteration on 688 x 256: 556 ms
    against 9 ms), which made Muon the slowest optimizer here by far."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in NS_DTYPES:
        raise ValueError(f"ns_dtype={name!r}: use auto, bfloat16 or float32")
    return NS_DTYPES[name]


def newton_schulz(
    x: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16, eps: float = NS_EPS
) -> torch.Tensor:
    """An approximate polar factor U V^T of ``x`` (singular values pushed into about [0.5, 1.5]),
    with torch.optim.Muon's arithmetic (the same addmm calls, bit for bit in bf16), in ``dtype``;
    returned in that dtype."""
    a, b, c = NS_COEFFICIENTS
    y = x.to(dtype, copy=True)
    tall = y.shape[0] > y.shape[1]
    if tall:
        y = y.T
    y.div_(y.norm().clamp(min=eps))
    for _ in range(steps):
        gram = y @ y.T
        y = torch.addmm(y, torch.addmm(gram, gram, gram, beta=b, alpha=c), y, beta=a)
    return y.T if tall else y


def muon_lr_factor(adjust_lr: str | None, shape: tuple[int, ...]) -> float:
    """torch.optim.Muon's lr adjustment for a rows x cols matrix."""
    rows, cols = shape[:2]
    if adjust_lr is None or adjust_lr == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


class MuonRule:
    state_keys = ("momentum_buffer",)

    def __init__(
        self,
        momentum: float = 0.95,
        ns_steps: int = 5,
        adjust_lr: str = "original",
        ns_dtype: str = "auto",
    ):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum} must lie in [0, 1)")
        if ns_steps <= 0:
            raise ValueError(f"ns_steps={ns_steps} must be positive")
        if adjust_lr not in ("original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn={adjust_lr!r}: use original or match_rms_adamw")
        self.momentum, self.ns_steps, self.adjust_lr = momentum, ns_steps, adjust_lr
        resolve_ns_dtype(ns_dtype, torch.device("cpu"))  # refuse a wrong name now
        self.ns_dtype = ns_dtype

    def lr_factor(self, shape: tuple[int, int]) -> float:
        return muon_lr_factor(self.adjust_lr, shape)

    @staticmethod
    def check_group(group: dict) -> None:
        """Muon's settings are the rule's own (no betas or eps): nothing to check per group."""

    def direction(
        self, state: dict, grad: torch.Tensor, step: int, group: dict
    ) -> tuple[torch.Tensor, float]:
        """R <- momentum R + grad; returns NS(R) and 1 (no bias correction)."""
        buf = state.get("momentum_buffer")
        if buf is None or buf.shape != grad.shape:  # new, or the branch changed shape
            buf = state["momentum_buffer"] = torch.zeros_like(grad)
        buf.mul_(self.momentum).add_(grad)
        dtype = resolve_ns_dtype(self.ns_dtype, buf.device)
        return newton_schulz(buf, self.ns_steps, dtype).to(buf.dtype), 1.0

    @staticmethod
    def memory(shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, int]:
        """One momentum buffer in the dtype of the tensor it follows."""
        return {"moments": math.prod(shape) * torch.empty((), dtype=dtype).element_size()}
