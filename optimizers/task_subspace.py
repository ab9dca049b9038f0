"""GORP's shared gradient subspace of past tasks (Wang et al., ACL 2025; spec finetune-and-lens.md
section 2): after each task, a basis S of the directions that task's Adam first moment used; in
later tasks, the projected gradient's component in S is removed before the moments see it, so
new tasks interfere less with old ones.

The filter acts on the dimension of the projected gradient R that belongs to the weight itself,
never to the projector's coordinates (which a refresh replaces): for a tall or square matrix
(GaLore's right projection, R = G Q^T, m x r) the output space, R <- R - S S^T R with S m x k;
for a wide one (left projection, R = P^T G, r x n) the input space, R <- R - R S S^T with S
n x k. The released code filters the rows of R in both cases, which for a wide matrix are
projector coordinates with no fixed meaning from one task to the next (spec 2.7, pitfall 3);
for the matrices its scripts target (LLaMA's gate_proj, T5's q and v: tall or square) the two
agree.

Building S (spec 2.3): the first task keeps the fewest leading singular vectors of M whose
energy reaches ``threshold`` (0.9), at least one when M is not zero (``compat="reference"``:
the released code's count of those strictly below the threshold, which may be none, pitfall 4).
A later task measures how much of M's energy S already captures and, while that is below the
threshold, appends the leading singular vectors of the residual M - S S^T M, orthonormalised
against S, up to the dimension's size. S is a plain fp32 tensor in the optimizer state
(``task_basis``), saved with ``weights_only`` checkpoints; the released code pickles the dense
S S^T (m x m: 485 MB per LLaMA-7B gate_proj) instead.
"""

from __future__ import annotations

import torch

from llmpt.optimizers.projectors.svd import FULL, RIGHT

COMPAT = ("none", "reference")
KEY = "task_basis"


class TaskSubspaceFilter:
    def __init__(self, threshold: float = 0.9, compat: str = "none") -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold={threshold} must lie in (0, 1]")
        if compat not in COMPAT:
            raise ValueError(f"compat={compat!r}: use none or reference")
        self.threshold, self.reference = threshold, compat == "reference"

    @staticmethod
    def check_side(side: int) -> None:
        if side == FULL:
            raise ValueError(
                "proj_type=full: the task subspace filters one dimension of the weight, which "
                "a two-sided projection does not keep; use std, reverse_std, left or right"
            )

    @staticmethod
    def dim(shape: tuple[int, int], side: int) -> int:
        """The weight dimension the filter acts on: m for a right projection, n for a left."""
        return shape[0] if side == RIGHT else shape[1]

    @staticmethod
    def apply(state: dict, low: torch.Tensor) -> torch.Tensor:
        """R without its component in the stored subspace (R itself when there is none)."""
        s = state.get(KEY)
        if s is None or s.shape[1] == 0:
            return low
        s = s.to(low.dtype)
        if state["side"] == RIGHT:  # R: m x r, S: m x k
            return low - s @ (s.T @ low)
        return low - (low @ s) @ s.T  # R: r x n, S: n x k

    def extend(self, state: dict, moment: torch.Tensor) -> int:
        """Grow the stored subspace from a finished task's first moment (in R's shape); return
        its new width."""
        m = moment.float()
        if state["side"] != RIGHT:
            m = m.T  # (n, r): the weight's input space in the rows
        old = state.get(KEY)
        dim = m.shape[0]
        total = float(m.square().sum())
        if total == 0.0:
            return 0 if old is None else old.shape[1]
        if old is None or old.shape[1] == 0:
            u, sigma, _ = torch.linalg.svd(m, full_matrices=False)
            energy = torch.cumsum(sigma.double().square(), 0) / total
            below = int((energy < self.threshold).sum())
            k = below if self.reference else min(below + 1, sigma.numel())
            # (a copy, not .contiguous(): LAPACK's U is column-major, so a one-column slice
            # already counts as contiguous and would keep all of U's storage alive)
            state[KEY] = u[:, :k].clone(memory_format=torch.contiguous_format)
            return k
        residual = m - old @ (old.T @ m)
        captured = (total - float(residual.square().sum())) / total
        room = dim - old.shape[1]
        if captured >= self.threshold or room == 0:
            return old.shape[1]
        u, sigma, _ = torch.linalg.svd(residual, full_matrices=False)
        gains = sigma.double().square() / total
        k = 0
        while k < min(room, gains.numel()) and captured < self.threshold:
            captured += float(gains[k])
            k += 1
        new = u[:, :k]
        new = new - old @ (old.T @ new)  # (orthogonal to S up to rounding: make it exact)
        new = torch.linalg.qr(new)[0]
        state[KEY] = torch.cat([old, new], dim=1).contiguous()
        return state[KEY].shape[1]
