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


def check_rank_fits(rank: int | None, shape: tuple[int, int], name: str) -> None:
    """A rank-r projection of ``name`` needs r <= min(shape)."""
    if rank is not None and rank > min(shape):
        raise ValueError(
            f"rank={rank} exceeds min(shape)={min(shape)} of {name} "
            f"{tuple(shape)}; lower rank or leave this matrix out of "
            "target_modules"
        )


def check_one_sided(rank: int, update_gap: int, proj_type: str, what: str) -> None:
    """The arguments every one-sided projector shares, refused with the key to fix."""
    if rank <= 0:
        raise ValueError(f"rank={rank} must be a positive integer")
    if update_gap <= 0:
        raise ValueError(f"update_gap={update_gap} must be a positive integer")
    if proj_type not in SIDES or proj_type == "full":
        raise ValueError(
            f"proj_type={proj_type!r}: {what} is one-sided; use std, reverse_std, left or right"
        )


def side_for(proj_type: str, shape: tuple[int, ...]) -> int:
    """Which side ``proj_type`` projects for a matrix of ``shape``: ``std`` reduces the shorter
    dimension (RIGHT for a tall or square matrix, LEFT for a wide one), ``reverse_std`` the
    longer one."""
    tall = shape[0] >= shape[1]
    return {
        "std": RIGHT if tall else LEFT,
        "reverse_std": LEFT if tall else RIGHT,
        "left": LEFT,
        "right": RIGHT,
        "full": FULL,
    }[proj_type]


class SvdProjector:
    """``rank`` fixes r for every matrix; ``density`` (FRUGAL) instead sets r = round(density x
    the projected dimension). ``selection="sample"`` (I3S, Zhang et al. 2025) keeps r singular
    vectors drawn without replacement with probabilities proportional to their singular values
    instead of the top r, from a generator seeded by the matrix's ``seed`` and refresh count
    (the same draw on every rank); the kept vectors are in ascending index order.
    ``basis="svd"`` takes the top singular vectors of the gradient; ``basis="random"``
    (FRUGAL's random orthogonal projection) draws an orthonormal basis from a generator seeded
    by the matrix's ``seed`` and step, so ranks and resumes draw the same one."""

    def __init__(
        self,
        rank: int | None,
        update_gap: int,
        proj_type: str = "std",
        svd_backend: str = "exact",
        oversample: int = 8,
        niter: int = 1,
        refresh_phase: int = 0,
        density: float | None = None,
        basis: str = "svd",
        selection: str = "top",
    ) -> None:
        if (rank is None) == (density is None):
            raise ValueError("a projector takes either rank or density")
        if rank is not None and rank <= 0:
            raise ValueError(f"rank={rank} must be a positive integer")
        if density is not None and not 0.0 < density < 1.0:
            raise ValueError(f"density={density} must lie in (0, 1)")
        if niter < 0:
            raise ValueError(f"svd_power_iters={niter} must be >= 0")
        if update_gap <= 0:
            raise ValueError(f"update_gap={update_gap} must be a positive integer")
        if proj_type not in SIDES:
            raise ValueError(f"proj_type={proj_type!r}: use one of {', '.join(SIDES)}")
        if svd_backend not in ("exact", "randomized"):
            raise ValueError(f"svd_backend={svd_backend!r}: use exact or randomized")
        if basis not in ("svd", "random"):
            raise ValueError(f"projection={basis!r}: use svd or random")
        if selection not in ("top", "sample"):
            raise ValueError(f"selection={selection!r}: use top or sample")
        if selection == "sample" and (basis != "svd" or proj_type == "full"):
            raise ValueError(
                "sampled singular vectors (I3S) need an SVD basis and a one-sided proj_type"
            )
        self.selection = selection
        self.rank, self.density, self.update_gap, self.proj_type = (
            rank,
            density,
            update_gap,
            proj_type,
        )
        self.svd_backend, self.oversample, self.niter, self.basis = (
            svd_backend,
            oversample,
            niter,
            basis,
        )
        if not 0 <= refresh_phase < update_gap:
            raise ValueError(f"refresh_phase={refresh_phase} must lie in [0, update_gap)")
        self.refresh_phase = refresh_phase

    def describe(self) -> str:
        r = f"rank {self.rank}" if self.rank is not None else f"density {self.density}"
        return f"{self.basis} basis at {r} ({self.proj_type})"

    # -------------------------------------------------------------- shapes and memory
    def side(self, shape: tuple[int, int]) -> int:
        return side_for(self.proj_type, shape)

    def rank_for(self, shape: tuple[int, int]) -> int:
        """r for this matrix: ``rank``, or round(density x the dimension being reduced), the
        dimension FRUGAL's projector scales (n on the right side, m on the left)."""
        if self.rank is not None:
            return self.rank
        m, n = shape
        side = self.side(shape)
        dim = {LEFT: m, RIGHT: n, FULL: min(m, n)}[side]
        return max(1, round(self.density * dim))

    def check(self, shape: tuple[int, int], name: str) -> None:
        if self.rank is None and self.basis == "svd" and self.rank_for(shape) > min(shape):
            raise ValueError(
                f"density={self.density} with proj_type={self.proj_type} "
                f"asks for {self.rank_for(shape)} singular vectors of {name} {tuple(shape)}, "
                f"which has {min(shape)}; use proj_type=std or a lower density"
            )
        check_rank_fits(self.rank, shape, name)

    def reduced_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        m, n = shape
        r = self.rank_for(shape)
        return {LEFT: (r, n), RIGHT: (m, r), FULL: (r, r)}[self.side(shape)]

    def basis_numel(self, shape: tuple[int, int]) -> int:
        m, n = shape
        r = self.rank_for(shape)
        return {LEFT: m * r, RIGHT: r * n, FULL: r * (m + n)}[self.side(shape)]

    def memory(self, shape: tuple[int, int], dtype: torch.dtype) -> dict[str, int]:
        """Bytes this projector stores for one matrix, by category."""
        return {"projector": self.basis_numel(shape) * torch.empty((), dtype=dtype).element_size()}

    # -------------------------------------------------------------- the step
    def due(self, state: dict, step: int) -> bool:
        """Refresh at steps 0, T, 2T, ... of this matrix's own counter (GaLore Alg. 1 and
        galore-torch), shifted back by ``refresh_phase``; the first step always computes a basis.
        pytorch-optimizer's GaLore refreshes at T-1, 2T-1, ...: ``refresh_phase=1``.
        ``state`` lets a subclass keep a per-matrix schedule (Q-GaLore's lazy refresh)."""
        return "basis" not in state or (step + self.refresh_phase) % self.update_gap == 0

    def refresh(self, state: dict, grad: torch.Tensor) -> None:
        shape = tuple(grad.shape)
        side, r = self.side(shape), self.rank_for(shape)
        if self.basis == "random":
            u, vh = self._random(shape, r, state, grad.device)
        else:
            u, sigma, vh = self._svd(grad.float(), r)
            if self.selection == "sample":
                keep = self._sample(sigma, r, state).to(u.device)
                u, vh = u[:, keep], vh[keep]
        state["side"] = side
        if side == LEFT:
            state["basis"] = u[:, :r].to(grad.dtype).contiguous()
        elif side == RIGHT:
            state["basis"] = vh[:r, :].to(grad.dtype).contiguous()
        else:
            state["basis"] = u[:, :r].to(grad.dtype).contiguous()
            state["basis_right"] = vh[:r, :].to(grad.dtype).contiguous()

    def _svd(self, g: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.svd_backend == "exact":
            return torch.linalg.svd(g, full_matrices=False)
        q = min(r + self.oversample, *g.shape)
        u, sigma, v = torch.svd_lowrank(g, q=q, niter=self.niter)
        return u, sigma, v.T

    @staticmethod
    def _sample(sigma: torch.Tensor, r: int, state: dict) -> torch.Tensor:
        """I3S: r indices drawn without replacement, P(i) proportional to sigma_i. A zero
        spectrum (a zero gradient) falls back to the top r."""
        draw = state.get("draws", 0)
        state["draws"] = draw + 1
        weights = sigma.double().cpu().clamp_min(0)
        if r > weights.numel() or weights.sum() <= 0 or (weights > 0).sum() < r:
            return torch.arange(r)
        g = torch.Generator().manual_seed(state.get("seed", 0) * 1_000_003 + draw)
        return torch.multinomial(weights, r, replacement=False, generator=g).sort().values

    @staticmethod
    def _random(shape, r, state, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Orthonormal (m x r) and (r x n) factors from Gaussian draws, seeded by the matrix's
        seed and how many bases it has drawn: the same on every rank and after a resume."""
        draw = state.get("draws", 0)
        state["draws"] = draw + 1
        g = torch.Generator().manual_seed(state.get("seed", 0) * 1_000_003 + draw)
        m, n = shape
        u = torch.linalg.qr(torch.randn(m, r, generator=g))[0]
        v = torch.linalg.qr(torch.randn(n, r, generator=g))[0]
        return u.to(device), v.T.to(device)

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
