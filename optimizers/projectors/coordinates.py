"""FRUGAL's coordinate projector (Zmushko et al. 2025, Sec. 3): the subspace is a random set of
round-down(density x n) columns (or rows), so projecting is a gather and projecting back a
scatter, and the state is an index vector instead of a basis.

State per matrix: ``side`` (LEFT: rows are kept, RIGHT: columns are kept), ``full_dim`` and
``indices`` (int64, sorted). Indices are drawn from a generator seeded by the matrix's ``seed``
and how many sets it has drawn, so every DDP rank and every resume draws the same set.
"""

from __future__ import annotations

import math

import torch

from optimizers.projectors.svd import LEFT, RIGHT

CHOICES = ("columns", "rows")


class CoordinateProjector:
    proj_type = "coordinates"

    def __init__(self, density: float, update_gap: int, choice: str = "columns") -> None:
        if not 0.0 < density < 1.0:
            raise ValueError(f"optimizer.density={density} must lie in (0, 1)")
        if update_gap <= 0:
            raise ValueError(f"optimizer.update_gap={update_gap} must be a positive integer")
        if choice not in CHOICES:
            raise ValueError(f"optimizer.projection={choice!r}: use columns or rows")
        self.density, self.update_gap, self.choice = density, update_gap, choice
        self.rank = None

    def describe(self) -> str:
        return f"random {self.choice} at density {self.density}"

    def side(self, shape: tuple[int, int]) -> int:
        return RIGHT if self.choice == "columns" else LEFT

    def count(self, shape: tuple[int, int]) -> int:
        dim = shape[1] if self.choice == "columns" else shape[0]
        return max(1, math.floor(self.density * dim))

    def check(self, shape: tuple[int, int], name: str) -> None:
        """Every shape works: at least one coordinate is kept."""

    def reduced_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        m, n = shape
        k = self.count(shape)
        return (m, k) if self.choice == "columns" else (k, n)

    def memory(self, shape: tuple[int, int], dtype: torch.dtype) -> dict[str, int]:
        return {"indices": self.count(shape) * 8}

    def due(self, state: dict, step: int) -> bool:
        return "indices" not in state or step % self.update_gap == 0

    def refresh(self, state: dict, grad: torch.Tensor) -> None:
        shape = tuple(grad.shape)
        draw = state.get("draws", 0)
        state["draws"] = draw + 1
        g = torch.Generator().manual_seed(state.get("seed", 0) * 1_000_003 + draw)
        dim = shape[1] if self.choice == "columns" else shape[0]
        chosen = torch.randperm(dim, generator=g)[: self.count(shape)].sort().values
        state["side"], state["full_dim"] = self.side(shape), dim
        state["indices"] = chosen.to(grad.device)

    @staticmethod
    def project(state: dict, grad: torch.Tensor) -> torch.Tensor:
        idx = state["indices"]
        return grad[:, idx] if state["side"] == RIGHT else grad[idx]

    @staticmethod
    def add_back(state: dict, out: torch.Tensor, low: torch.Tensor, alpha: float) -> None:
        dim = 1 if state["side"] == RIGHT else 0
        out.index_add_(dim, state["indices"], low, alpha=alpha)

    @staticmethod
    def project_back(state: dict, low: torch.Tensor) -> torch.Tensor:
        if state["side"] == RIGHT:
            out = low.new_zeros(low.shape[0], state["full_dim"])
        else:
            out = low.new_zeros(state["full_dim"], low.shape[1])
        CoordinateProjector.add_back(state, out, low, 1.0)
        return out
