"""Coordinate projectors: the subspace is a set of rows or columns of the gradient, so projecting
is a gather and projecting back a scatter-add, and the state is an index vector, not a basis.

- FRUGAL (Zmushko et al. 2025, Sec. 3): round-down(density x dim) coordinates drawn uniformly
  without replacement, ``choice`` columns or rows.
- GRASS (Muhamed et al. 2024, Sec. 3): r coordinates of the side ``proj_type`` reduces (the
  shorter dimension under ``std``), chosen by ``selection``: ``top`` (the r largest norms),
  ``norm`` (multinomial with probabilities q_i proportional to the squared norms) or ``uniform``.
  With ``replacement=True`` a coordinate can be drawn twice and each draw j carries the scale
  rho_j = 1 / sqrt(r q_j), so P = B^T rho with E[P P^T] = I (the paper's unbiased estimator);
  without replacement rho = 1 and nothing but the indices is stored.

State per matrix: ``side`` (LEFT: rows are kept, RIGHT: columns are kept), ``full_dim``,
``indices`` (int64; sorted when drawn without replacement) and, with replacement, ``scales``
(one per draw, in the gradient's dtype). Random draws come from a generator seeded by the
matrix's ``seed`` and how many sets it has drawn, so every DDP rank and every resume draws the
same set.
"""

from __future__ import annotations

import math

import torch

from llmpt.optimizers.projectors.svd import LEFT, RIGHT, SIDES, side_for

CHOICES = ("columns", "rows")
SELECTIONS = ("uniform", "top", "norm")


class CoordinateProjector:
    def __init__(
        self,
        density: float | None = None,
        update_gap: int = 200,
        choice: str = "columns",
        rank: int | None = None,
        selection: str = "uniform",
        replacement: bool = False,
    ) -> None:
        if (rank is None) == (density is None):
            raise ValueError("a coordinate projector takes either rank or density")
        if density is not None and not 0.0 < density < 1.0:
            raise ValueError(f"density={density} must lie in (0, 1)")
        if rank is not None and rank <= 0:
            raise ValueError(f"rank={rank} must be a positive integer")
        if update_gap <= 0:
            raise ValueError(f"update_gap={update_gap} must be a positive integer")
        if choice not in CHOICES and (choice not in SIDES or choice == "full"):
            raise ValueError(
                f"coordinate side {choice!r}: use columns, rows, std, reverse_std, left or right"
            )
        if selection not in SELECTIONS:
            raise ValueError(f"selection={selection!r}: use one of {SELECTIONS}")
        if replacement and selection == "top":
            raise ValueError("replacement=true needs a random selection (norm, uniform)")
        self.density, self.update_gap, self.choice, self.rank = density, update_gap, choice, rank
        self.selection, self.replacement = selection, replacement
        self.proj_type = choice

    def describe(self) -> str:
        size = f"rank {self.rank}" if self.rank is not None else f"density {self.density}"
        how = {"uniform": "random", "top": "top-norm", "norm": "norm-sampled"}[self.selection]
        kept = {"columns": "columns", "rows": "rows"}.get(self.choice, f"{self.choice} side")
        again = ", with replacement" if self.replacement else ""
        return f"{how} {kept} at {size}{again}"

    def side(self, shape: tuple[int, int]) -> int:
        if self.choice in CHOICES:
            return RIGHT if self.choice == "columns" else LEFT
        return side_for(self.choice, shape)

    def _dim(self, shape: tuple[int, int]) -> int:
        return shape[1] if self.side(shape) == RIGHT else shape[0]

    def count(self, shape: tuple[int, int]) -> int:
        if self.rank is not None:
            return self.rank
        return max(1, math.floor(self.density * self._dim(shape)))

    def check(self, shape: tuple[int, int], name: str) -> None:
        if self.rank is not None and not self.replacement and self.rank > self._dim(shape):
            raise ValueError(
                f"rank={self.rank} exceeds the {self._dim(shape)} coordinates of "
                f"{name} {tuple(shape)} on the side it selects; lower rank"
            )

    def reduced_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        m, n = shape
        k = self.count(shape)
        return (m, k) if self.side(shape) == RIGHT else (k, n)

    def memory(self, shape: tuple[int, int], dtype: torch.dtype) -> dict[str, int]:
        out = {"indices": self.count(shape) * 8}
        if self.replacement:
            out["projector"] = self.count(shape) * torch.empty((), dtype=dtype).element_size()
        return out

    def due(self, state: dict, step: int) -> bool:
        return "indices" not in state or step % self.update_gap == 0

    def refresh(self, state: dict, grad: torch.Tensor) -> None:
        shape = tuple(grad.shape)
        side, dim, k = self.side(shape), self._dim(shape), self.count(shape)
        state["side"], state["full_dim"] = side, dim
        if self.selection == "top":
            chosen = self._norms(grad, side).topk(k).indices.sort().values
            state["indices"] = chosen
            return
        draw = state.get("draws", 0)
        state["draws"] = draw + 1
        g = torch.Generator().manual_seed(state.get("seed", 0) * 1_000_003 + draw)
        if self.selection == "uniform":
            q = torch.full((dim,), 1.0 / dim, dtype=torch.float64)
        else:
            sq = self._norms(grad, side).double().pow(2).cpu()
            total = sq.sum()
            q = sq / total if total > 0 else torch.full((dim,), 1.0 / dim, dtype=torch.float64)
        if self.selection == "uniform" and not self.replacement:
            chosen = torch.randperm(dim, generator=g)[:k]
        else:
            chosen = torch.multinomial(q, k, replacement=self.replacement, generator=g)
        if self.replacement:
            state["indices"] = chosen.to(grad.device)
            state["scales"] = (1.0 / (k * q[chosen]).sqrt()).to(grad.device, grad.dtype)
        else:
            state["indices"] = chosen.sort().values.to(grad.device)

    @staticmethod
    def _norms(grad: torch.Tensor, side: int) -> torch.Tensor:
        """Norm of each candidate coordinate: columns on the right side, rows on the left."""
        return grad.float().norm(dim=0 if side == RIGHT else 1)

    @staticmethod
    def project(state: dict, grad: torch.Tensor) -> torch.Tensor:
        idx, right = state["indices"], state["side"] == RIGHT
        low = grad[:, idx] if right else grad[idx]
        if "scales" in state:
            low.mul_(state["scales"] if right else state["scales"].unsqueeze(1))
        return low

    @staticmethod
    def add_back(state: dict, out: torch.Tensor, low: torch.Tensor, alpha: float) -> None:
        right = state["side"] == RIGHT
        if "scales" in state:
            low = low * (state["scales"] if right else state["scales"].unsqueeze(1))
        out.index_add_(1 if right else 0, state["indices"], low, alpha=alpha)

    @staticmethod
    def project_back(state: dict, low: torch.Tensor) -> torch.Tensor:
        if state["side"] == RIGHT:
            out = low.new_zeros(low.shape[0], state["full_dim"])
        else:
            out = low.new_zeros(state["full_dim"], low.shape[1])
        CoordinateProjector.add_back(state, out, low, 1.0)
        return out
