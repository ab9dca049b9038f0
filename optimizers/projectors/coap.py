"""COAP's projector (Xiao et al., CVPR 2025; spec projection-family.md section 4): a GaLore-style
basis kept up to date incrementally instead of by a full SVD.

- First step: a randomized range finder on G with a fixed Gaussian test matrix (seed 3407, as
  the reference): Y = G Omega, Q = qr(Y), B = Q^T G, P = the top-r right singular vectors of B.
- Every ``update_gap`` (T_u) steps: one correlation-aware gradient step on P, minimizing
  L(P) = MSE(G P^T P, G) x (1 - mean_i cos(row_i(M P), row_i(G))), M the rule's current
  low-rank first moment lifted by P; the gradient is clipped to norm 1 and the step is
  ``sgd_lr`` (0.1). P is not re-orthonormalized (as the reference).
- Every ``reproject_factor`` x T_u steps instead: the range finder warm-started from the
  previous basis (Omega = P^T), one block power iteration plus an r x n SVD, no full SVD.
- Staggered (``refresh.py``): the steps are those of the matrix's counter minus its offset.

On the LEFT side (wide matrices) the same runs on G^T, P being m x r. State: ``side`` and
``basis``, as the SVD projector (r x short side).
"""

from __future__ import annotations

import torch

from llmpt.optimizers.projectors.svd import LEFT, SvdProjector

OMEGA_SEED = 3407


def range_finder(matrix: torch.Tensor, rank: int, omega: torch.Tensor | None) -> torch.Tensor:
    """The top-``rank`` right singular vectors (rows, rank x n) of ``matrix`` (m x n) within the
    range of ``matrix @ omega``."""
    if omega is None:
        g = torch.Generator(device=matrix.device).manual_seed(OMEGA_SEED)
        omega = torch.randn(matrix.shape[1], rank, generator=g, device=matrix.device)
    q, _ = torch.linalg.qr(matrix @ omega.float(), mode="reduced")
    return torch.linalg.svd(q.T @ matrix, full_matrices=False)[2]


class CoapProjector(SvdProjector):
    uses_context = True  # the correlation step reads the rule's first moment

    def __init__(
        self,
        rank: int,
        update_gap: int,
        reproject_factor: int,
        proj_type: str = "std",
        sgd_lr: float = 0.1,
    ) -> None:
        if proj_type == "full":
            raise ValueError("proj_type=full: COAP keeps a one-sided projector")
        if reproject_factor <= 0:
            raise ValueError(f"reproject_factor={reproject_factor} must be >= 1")
        if sgd_lr <= 0:
            raise ValueError(f"proj_lr={sgd_lr} must be positive")
        super().__init__(rank, update_gap, proj_type)
        self.reproject_factor, self.sgd_lr = reproject_factor, sgd_lr

    def describe(self) -> str:
        return (
            f"COAP basis at rank {self.rank} ({self.proj_type}): correlation step every "
            f"{self.update_gap}, warm-started range finder every "
            f"{self.update_gap * self.reproject_factor}"
        )

    @property
    def cycle(self) -> int:
        """A staggered schedule spreads the offsets over k T_u steps: both kinds of refresh."""
        return self.update_gap * self.reproject_factor

    def refresh(self, state: dict, grad: torch.Tensor, ctx=None) -> None:
        side = self.side(tuple(grad.shape))
        g = grad.float()
        step = state.get("step", 0) - (ctx.offset if ctx is not None else 0)  # (staggered)
        first = "basis" not in state
        moment = None if first else ctx.rule.first_moment(state)
        if first or step % self.cycle == 0 or moment is None:
            old = None if first else state["basis"].float()
            if side == LEFT:  # P is m x r: the range finder on G^T, warm-started from P
                basis = range_finder(g.T, self.rank, old).T
            else:  # P is r x n, Omega = P^T
                basis = range_finder(g, self.rank, None if old is None else old.T)
        else:
            basis = self.correlation_step(state["basis"].float(), moment.float(), g, side)
        state["side"] = side
        state["basis"] = basis.to(grad.dtype).contiguous()

    def correlation_step(
        self, basis: torch.Tensor, moment: torch.Tensor, grad: torch.Tensor, side: int
    ) -> torch.Tensor:
        """One clipped gradient step on COAP's correlation-aware reconstruction loss."""
        p = basis.clone().requires_grad_(True)
        with torch.enable_grad():
            if side == LEFT:
                lifted = p @ moment
                loss = torch.nn.functional.mse_loss(p @ (p.T @ grad), grad)
            else:
                lifted = moment @ p
                loss = torch.nn.functional.mse_loss((grad @ p.T) @ p, grad)
            cos = torch.nn.functional.cosine_similarity(lifted, grad, dim=1)
            (loss * (1 - cos.mean())).backward()
        g = p.grad
        g = g * torch.clamp(1.0 / (g.norm() + 1e-6), max=1.0)  # clip_grad_norm_(max_norm=1)
        return (basis - self.sgd_lr * g).detach()
