"""SVD-free column selection from a fixed DCT basis (Modoranu et al. 2025, "SVD-Free Low-Rank
Adaptive Gradient Optimization" / "FFT-based Dynamic Subspace Selection", DCT-AdamW; spec
projection-family.md section 5).

The basis of an n-dimensional side is the orthonormal DCT-II matrix: its columns are the cosine
vectors c_k(j) = a_k cos(pi k (2j + 1) / (2n)), a_0 = sqrt(1/n), a_k = sqrt(2/n). It is built
once per distinct dimension (shared by every matrix with that side, held by the projector and
counted once as shared projector memory). At a selection step S = G C (the DCT-II of every row of
G; on the left side of every column), the r columns with the largest l1 norm ||S_:,k||_1 are
kept and only their indices are stored; the projected gradient at that step is S[:, I], with no
second product. Between selections R = G C[:, I] and the back-projection is N C[:, I]^T.

``transform="fft"`` computes the same S with Makhoul's FFT algorithm in O(m n log n) and
projects between selections by transforming G and gathering, so no dense basis exists at all;
``transform="matmul"`` uses the stored basis and GEMMs. (The reference's ``matmul`` mode uses
the DCT-III columns, its ``makhoul`` mode the DCT-II ones: both orthonormal; we use DCT-II for
both, so the two transforms select the same columns.)

State per matrix: ``side``, ``full_dim``, ``indices`` (int64, the r selected frequencies).
"""

from __future__ import annotations

import math

import torch

from llmpt.optimizers.projectors.svd import LEFT, RIGHT, check_one_sided, side_for

TRANSFORMS = ("matmul", "fft")


def dct_basis(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The n x n orthonormal DCT-II basis, one cosine vector per column, built in fp64."""
    j = torch.arange(n, dtype=torch.float64)
    k = torch.arange(n, dtype=torch.float64)
    c = torch.cos(math.pi * (2 * j[:, None] + 1) * k[None, :] / (2 * n)) * math.sqrt(2.0 / n)
    c[:, 0] = math.sqrt(1.0 / n)
    return c.to(device=device, dtype=dtype)


def dct_rows(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II of every row (last dimension) by Makhoul's FFT: equals x @ dct_basis."""
    n = x.shape[-1]
    xf = x.float()
    v = torch.cat([xf[..., ::2], xf[..., 1::2].flip(-1)], dim=-1)
    spec = torch.fft.fft(v, dim=-1)
    k = torch.arange(n, device=x.device, dtype=torch.float32)
    twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))
    out = (spec * twiddle).real
    out[..., 0] *= math.sqrt(1.0 / n)
    out[..., 1:] *= math.sqrt(2.0 / n)
    return out.to(x.dtype)


def idct_rows(y: torch.Tensor) -> torch.Tensor:
    """The inverse of ``dct_rows`` (a DCT-III): equals y @ dct_basis.T."""
    n = y.shape[-1]
    yf = y.float().clone()
    yf[..., 0] *= math.sqrt(n)
    yf[..., 1:] *= math.sqrt(n / 2.0)
    k = torch.arange(n, device=y.device, dtype=torch.float32)
    shifted = torch.zeros_like(yf)
    shifted[..., 1:] = yf[..., 1:].flip(-1)  # y_{n-k}, with y_n = 0
    spec = torch.complex(yf, -shifted) * torch.polar(torch.ones_like(k), math.pi * k / (2 * n))
    v = torch.fft.ifft(spec, dim=-1).real
    out = torch.empty_like(v)
    half = (n + 1) // 2
    out[..., ::2] = v[..., :half]
    out[..., 1::2] = v[..., half:].flip(-1)
    return out.to(y.dtype)


class DctProjector:
    def __init__(
        self,
        rank: int,
        update_gap: int,
        proj_type: str = "std",
        norm: float = 1.0,
        transform: str = "matmul",
        refresh_phase: int = 0,
    ) -> None:
        check_one_sided(rank, update_gap, proj_type, "DCT selection")
        if transform not in TRANSFORMS:
            raise ValueError(f"transform={transform!r}: use matmul or fft")
        if norm <= 0:
            raise ValueError(f"selection_norm={norm} must be positive")
        if not 0 <= refresh_phase < update_gap:
            raise ValueError(f"refresh_phase={refresh_phase} must lie in [0, update_gap)")
        self.rank, self.update_gap, self.proj_type = rank, update_gap, proj_type
        self.norm, self.transform, self.refresh_phase = norm, transform, refresh_phase
        self._bases: dict[tuple, torch.Tensor] = {}
        # (state, gradient, S[:, I]) of the last selection, consumed by the next project()
        self._selected: tuple[dict, torch.Tensor, torch.Tensor] | None = None

    def describe(self) -> str:
        return (
            f"DCT columns at rank {self.rank} ({self.proj_type}, {self.transform}, l{self.norm:g})"
        )

    def side(self, shape: tuple[int, int]) -> int:
        return side_for(self.proj_type, shape)

    def _dim(self, shape) -> int:
        return shape[1] if self.side(shape) == RIGHT else shape[0]

    def check(self, shape: tuple[int, int], name: str) -> None:
        if self.rank > self._dim(shape):
            raise ValueError(
                f"rank={self.rank} exceeds the {self._dim(shape)} DCT columns of "
                f"{name} {tuple(shape)}; lower rank"
            )

    def reduced_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        m, n = shape
        return (m, self.rank) if self.side(shape) == RIGHT else (self.rank, n)

    def memory(self, shape: tuple[int, int], dtype: torch.dtype) -> dict[str, int]:
        return {"indices": self.rank * 8}

    # -------------------------------------------------------------- the shared basis
    def basis(self, n: int, like: torch.Tensor) -> torch.Tensor:
        key = (n, like.dtype, like.device)
        if key not in self._bases:
            self._bases[key] = dct_basis(n, like.dtype, like.device)
        return self._bases[key]

    def shared_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"projector": list(self._bases.values())}

    def shared_memory(self, shapes: list[tuple[int, int]], dtype: torch.dtype) -> dict[str, int]:
        """Bytes of the shared bases the given projected shapes need (none with the FFT)."""
        if self.transform == "fft":
            return {}
        size = torch.empty((), dtype=dtype).element_size()
        return {"projector": sum(n * n for n in {self._dim(s) for s in shapes}) * size}

    # -------------------------------------------------------------- the step
    def due(self, state: dict, step: int) -> bool:
        """At the first step and at steps T, 2T, ... shifted back by ``refresh_phase`` (the
        reference selects at its 1-based steps 1, T, 2T, ...: ``refresh_phase=1``)."""
        return "indices" not in state or (step + self.refresh_phase) % self.update_gap == 0

    def _transform(self, grad: torch.Tensor, side: int) -> torch.Tensor:
        """S: the DCT of the rows (right side) or of the columns (left side) of ``grad``."""
        if self.transform == "fft":
            return dct_rows(grad) if side == RIGHT else dct_rows(grad.T).T
        if side == RIGHT:
            return grad @ self.basis(grad.shape[1], grad)
        return self.basis(grad.shape[0], grad).T @ grad

    def refresh(self, state: dict, grad: torch.Tensor) -> None:
        side = self.side(tuple(grad.shape))
        s = self._transform(grad, side)
        scores = s.float().norm(p=self.norm, dim=0 if side == RIGHT else 1)
        indices = scores.topk(self.rank).indices.sort().values
        state["side"], state["full_dim"] = side, grad.shape[1 if side == RIGHT else 0]
        state["indices"] = indices
        self._selected = (state, grad, s[:, indices] if side == RIGHT else s[indices])

    def project(self, state: dict, grad: torch.Tensor) -> torch.Tensor:
        cached = self._selected
        if cached is not None and cached[0] is state and cached[1] is grad:
            self._selected = None
            return cached[2]  # the selection step: S[:, I], no second product
        idx, side = state["indices"], state["side"]
        if self.transform == "fft":
            s = self._transform(grad, side)
            return s[:, idx] if side == RIGHT else s[idx]
        c = self.basis(state["full_dim"], grad)[:, idx]
        return grad @ c if side == RIGHT else c.T @ grad

    def add_back(self, state: dict, out: torch.Tensor, low: torch.Tensor, alpha: float) -> None:
        if self.transform == "fft":
            out.add_(self.project_back(state, low), alpha=alpha)
            return
        c = self.basis(state["full_dim"], out)[:, state["indices"]]
        if state["side"] == RIGHT:
            out.addmm_(low, c.T, alpha=alpha)
        else:
            out.addmm_(c, low, alpha=alpha)

    def project_back(self, state: dict, low: torch.Tensor) -> torch.Tensor:
        idx, side, d = state["indices"], state["side"], state["full_dim"]
        if self.transform == "fft":
            if side == RIGHT:
                full = low.new_zeros(low.shape[0], d)
                full[:, idx] = low
                return idct_rows(full)
            full = low.new_zeros(d, low.shape[1])
            full[idx] = low
            return idct_rows(full.T).T
        c = self.basis(d, low)[:, idx]
        return low @ c.T if side == RIGHT else c @ low


__all__ = ["LEFT", "RIGHT", "DctProjector", "dct_basis", "dct_rows", "idct_rows"]
