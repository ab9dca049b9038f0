"""Online Subspace Descent's projector (Liang et al., NeurIPS 2024; spec projection-family.md
section 6): one SVD at the first step, then the basis moves by one optimizer step per training
step on the online-PCA loss of the normalized gradient, never another SVD.

With G~ = G / ||G||_F and P the basis (r x n on the RIGHT side, m x r on the LEFT):

    L(P) = ||G~ P^T P - G~||_F^2 (+ lam ||P P^T - I||_F^2)      (right side; left: P P^T G~)

The projection of step t uses P_t; P_{t+1} = AdamW step on grad L(P_t; G_t) afterwards
(``post_step``). ``mode="paper"`` (Alg. 1, Eq. 6): the orthogonality penalty lam = 0.1, the
projector's lr alpha x the weights' scheduled lr (alpha = 5), its weight decay the weights'
(0 here). ``mode="code"`` (the reference repository): no penalty, lr (1 / update_gap) x
(scheduled / initial lr), and torch AdamW's default weight decay 0.01 on P. The gradient of L is
analytic (no autograd in the step). State: ``side``, ``basis`` and the projector's own Adam
moments ``basis_exp_avg`` / ``basis_exp_avg_sq`` and ``basis_step`` (projector memory).
"""

from __future__ import annotations

import math

import torch

from llmpt.optimizers.projectors.svd import LEFT, SvdProjector

MODES = ("paper", "code")


class OnlinePcaProjector(SvdProjector):
    uses_context = True  # the projector's step follows the weights' learning-rate schedule

    def __init__(
        self,
        rank: int,
        update_gap: int,
        proj_type: str = "std",
        mode: str = "paper",
        lr_ratio: float = 5.0,
        ortho_penalty: float = 0.1,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if proj_type == "full":
            raise ValueError("proj_type=full: OSD keeps a one-sided projector")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use paper or code")
        if lr_ratio <= 0:
            raise ValueError(f"proj_lr_ratio={lr_ratio} must be positive")
        if ortho_penalty < 0 or weight_decay < 0:
            raise ValueError("ortho_penalty and proj_weight_decay must be >= 0")
        super().__init__(rank, update_gap, proj_type)
        self.mode, self.lr_ratio, self.penalty = mode, lr_ratio, ortho_penalty
        self.proj_wd, self.betas, self.proj_eps = weight_decay, tuple(betas), eps
        if mode == "code":
            self.penalty, self.proj_wd = 0.0, 0.01

    def describe(self) -> str:
        return f"online-PCA basis at rank {self.rank} ({self.proj_type}, {self.mode} form)"

    def memory(self, shape: tuple[int, int], dtype: torch.dtype) -> dict[str, int]:
        """P and its Adam moments: 3 x r x (the projected side)."""
        size = torch.empty((), dtype=dtype).element_size()
        return {"projector": 3 * self.basis_numel(shape) * size}

    def due(self, state: dict, step: int) -> bool:
        return "basis" not in state  # the only SVD

    def refresh(self, state: dict, grad: torch.Tensor, ctx=None) -> None:
        super().refresh(state, grad)
        state["basis_exp_avg"] = torch.zeros_like(state["basis"])
        state["basis_exp_avg_sq"] = torch.zeros_like(state["basis"])
        state["basis_step"] = 0

    def loss_grad(self, basis: torch.Tensor, grad: torch.Tensor, side: int) -> torch.Tensor:
        """d L / d P at the normalized gradient, in closed form."""
        g = grad / (grad.norm() + 1e-30)
        if side == LEFT:  # P m x r: E = P P^T G~ - G~; dL/dP = 2 (E G~^T P + G~ E^T P)
            e = basis @ (basis.T @ g) - g
            out = 2 * (e @ (g.T @ basis) + g @ (e.T @ basis))
            gram = basis.T @ basis
            if self.penalty:
                out += 4 * self.penalty * basis @ (gram - torch.eye(gram.shape[0], device=g.device))
            return out
        # P r x n: E = G~ P^T P - G~; dL/dP = 2 (P E^T G~ + P G~^T E)
        e = (g @ basis.T) @ basis - g
        out = 2 * ((basis @ e.T) @ g + (basis @ g.T) @ e)
        gram = basis @ basis.T
        if self.penalty:
            out += 4 * self.penalty * (gram - torch.eye(gram.shape[0], device=g.device)) @ basis
        return out

    def post_step(self, state: dict, grad: torch.Tensor, ctx) -> None:
        """P <- one AdamW step on L(P; G_t), after P_t has served this step's projection."""
        basis = state["basis"]
        d = self.loss_grad(basis.float(), grad.float(), state["side"]).to(basis.dtype)
        if self.mode == "code":
            lr = (ctx.lr / ctx.initial_lr if ctx.initial_lr else 1.0) / self.update_gap
        else:
            lr = self.lr_ratio * ctx.lr
        t = state["basis_step"] = state["basis_step"] + 1
        b1, b2 = self.betas
        if self.proj_wd:
            basis.mul_(1 - lr * self.proj_wd)
        m, v = state["basis_exp_avg"], state["basis_exp_avg_sq"]
        m.mul_(b1).add_(d, alpha=1 - b1)
        v.mul_(b2).addcmul_(d, d, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(self.proj_eps)
        basis.addcdiv_(m, denom, value=-lr / (1 - b1**t))
