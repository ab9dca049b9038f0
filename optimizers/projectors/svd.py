"""GaLore's SVD projector (Zhao et al. 2024, Alg. 1 / Sec. 4.1).

The basis is the top-r singular vectors of the gradient, recomputed every ``update_gap`` steps
in fp32 and stored in the gradient's dtype. Which side is projected is decided once, from the
matrix shape and ``proj_type``, and stored in the state as a string: the reference decides the
back-projection side from the low-rank tensor's shape, which picks the wrong side for
``reverse_std`` when r reaches the smaller dimension.

State per matrix (plain tensors, so ``weights_only`` checkpoints hold them):
``side`` (an int: LEFT, P is m x r and R = P^T G; RIGHT, Q is r x n and R = G Q^T; FULL, both;
an int because ``Optimizer.load_state_dict`` mangles strings), ``basis`` (P or Q) and, for FULL,
``basis_right``.
"""

from __future__ import annotations

import torch

SIDES = ("std", "reverse_std", "left", "right", "full")
LEFT, RIGHT, FULL = 0, 1, 2


class SvdProjector:
    def __init__(
        self,
        rank: int,
        update_gap: int,
        proj_type: str = "std",
        svd_backend: str = "exact",
        oversample: int = 8,
        niter: int = 1,
        refresh_phase: int = 0,
    ) -> None:
        if rank <= 0:
            raise ValueError(f"optimizer.rank={rank} must be a positive integer")
        if niter < 0:
            raise ValueError(f"optimizer.svd_power_iters={niter} must be >= 0")
        if update_gap <= 0:
            raise ValueError(f"optimizer.update_gap={update_gap} must be a positive integer")
        if proj_type not in SIDES:
            raise ValueError(f"optimizer.proj_type={proj_type!r}: use one of {', '.join(SIDES)}")
        if svd_backend not in ("exact", "randomized"):
            raise ValueError(f"optimizer.svd_backend={svd_backend!r}: use exact or randomized")
        self.rank, self.update_gap, self.proj_type = rank, update_gap, proj_type
        self.svd_backend, self.oversample, self.niter = svd_backend, oversample, niter
        if not 0 <= refresh_phase < update_gap:
            raise ValueError(f"optimizer.refresh_phase={refresh_phase} must lie in [0, update_gap)")
        self.refresh_phase = refresh_phase

    # -------------------------------------------------------------- shapes and memory
    def side(self, shape: tuple[int, int]) -> int:
        tall = shape[0] >= shape[1]
        return {
            "std": RIGHT if tall else LEFT,
            "reverse_std": LEFT if tall else RIGHT,
            "left": LEFT,
            "right": RIGHT,
            "full": FULL,
        }[self.proj_type]

    def check(self, shape: tuple[int, int], name: str) -> None:
        if self.rank > min(shape):
            raise ValueError(
                f"optimizer.rank={self.rank} exceeds min(shape)={min(shape)} of {name} "
                f"{tuple(shape)}; lower optimizer.rank or leave this matrix out of "
                "optimizer.target_modules"
            )

    def reduced_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        m, n = shape
        r = self.rank
        return {LEFT: (r, n), RIGHT: (m, r), FULL: (r, r)}[self.side(shape)]

    def basis_numel(self, shape: tuple[int, int]) -> int:
        m, n = shape
        r = self.rank
        return {LEFT: m * r, RIGHT: r * n, FULL: r * (m + n)}[self.side(shape)]

    # -------------------------------------------------------------- the step
    def due(self, state: dict, step: int) -> bool:
        """Refresh at steps 0, T, 2T, ... of this matrix's own counter (GaLore Alg. 1 and
        galore-torch), shifted back by ``refresh_phase``; the first step always computes a basis.
        pytorch-optimizer's GaLore refreshes at T-1, 2T-1, ...: ``refresh_phase=1``.
        ``state`` lets a subclass keep a per-matrix schedule (Q-GaLore's lazy refresh)."""
        return "basis" not in state or (step + self.refresh_phase) % self.update_gap == 0

    def refresh(self, state: dict, grad: torch.Tensor) -> None:
        side = self.side(tuple(grad.shape))
        u, vh = self._svd(grad.float())
        r = self.rank
        state["side"] = side
        if side == LEFT:
            state["basis"] = u[:, :r].to(grad.dtype).contiguous()
        elif side == RIGHT:
            state["basis"] = vh[:r, :].to(grad.dtype).contiguous()
        else:
            state["basis"] = u[:, :r].to(grad.dtype).contiguous()
            state["basis_right"] = vh[:r, :].to(grad.dtype).contiguous()

    def _svd(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.svd_backend == "exact":
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            return u, vh
        q = min(self.rank + self.oversample, *g.shape)
        u, _, v = torch.svd_lowrank(g, q=q, niter=self.niter)
        return u, v.T

    @staticmethod
    def project(state: dict, grad: torch.Tensor) -> torch.Tensor:
        side, basis = state["side"], state["basis"]
        if side == LEFT:
            return basis.T @ grad  # (r, n)
        if side == RIGHT:
            return grad @ basis.T  # (m, r)
        return basis.T @ grad @ state["basis_right"].T  # (r, r)

    @staticmethod
    def add_back(state: dict, out: torch.Tensor, low: torch.Tensor, alpha: float) -> None:
        """out += alpha * project_back(low), as one GEMM that accumulates into ``out``: no
        full-size temporary and no separate scale and add passes over the weight."""
        side, basis = state["side"], state["basis"]
        if side == LEFT:
            out.addmm_(basis, low, alpha=alpha)
        elif side == RIGHT:
            out.addmm_(low, basis, alpha=alpha)
        else:
            out.addmm_(basis @ low, state["basis_right"], alpha=alpha)

    @staticmethod
    def project_back(state: dict, low: torch.Tensor) -> torch.Tensor:
        side, basis = state["side"], state["basis"]
        if side == LEFT:
            return basis @ low  # (m, n)
        if side == RIGHT:
            return low @ basis
        return basis @ low @ state["basis_right"]
