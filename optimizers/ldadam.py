"""LDAdam (Robert et al., ICLR 2025): Adam in a rank-r subspace that moves every step, with the
moments carried into each new basis and generalized error feedback.

For a targeted matrix, in the orientation where the projected side is the rows (the shorter
side: the matrix itself when m <= n, its transpose otherwise), with G the gradient, E the error
buffer, P_{t-1} the previous basis (m x r, orthonormal columns), M, V the r x n moments, step t
(1-based) and k = t - 1:

1. A = G + E;
2. subspace: at t = 1 the top-r left singular vectors of A (fp32 SVD); later one block power
   iteration warm-started at P_{t-1} on B = rho P_{t-1} M / (1 - beta1^k) + (1 - rho) A:
   P_t = Q of the QR of B (B^T P_{t-1}) (``proj_method=svd``: a full SVD of B instead);
3. g = P_t^T A, and the projection's loss E' = A - P_t g;
4. C = P_t^T P_{t-1}: M' = C M; with the bias-corrected variance
   S = V / (1 - beta2^k) - (M / (1 - beta1^k))^2, S' = (C o C) S and
   V' = (1 - beta2^k) |S' + (M' / (1 - beta1^k))^2|;
5. E = E' + beta1 / (1 - beta1) (P_{t-1} M - P_t M'): the momentum the change of basis lost,
   in gradient units, is fed back too;
6. M = beta1 M' + (1 - beta1) g, V = beta2 V' + (1 - beta2) g^2;
   W <- (1 - lr wd) W - lr P_t [M / (1 - beta1^t)] / (sqrt(V / (1 - beta2^t)) + eps).

Every other parameter takes AdamW with the same betas and eps (as the reference, which does not
say so: the start-up report does).

Unlike the reference: E lives in the optimizer state (``error_feedback``, in ``error_dtype``),
not in ``p.grad``, so zeroing gradients cannot wipe it, gradient clipping never sees it, it is
in every checkpoint, and the logged gradient norm is the gradient's; the basis is a tensor, not
a pickled projector object (``torch.load(weights_only=True)`` works).

Not a ``SubspaceOptimizer`` composition: its subspace depends on the moments, its transition
changes the error buffer, and it refreshes every step; the parts would have to pass most of
their state to each other, so the algorithm is written out in one place.
"""

from __future__ import annotations

import math

import torch

from llmpt.optimizers.per_parameter import PerParameterOptimizer
from llmpt.optimizers.projectors.svd import check_rank_fits
from llmpt.optimizers.rules.adam import AdamRule

PROJ_METHODS = ("power_iteration", "svd")
ERROR_DTYPES = {"param": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def left_side(shape: tuple[int, int]) -> bool:
    """The rows are projected when they are the shorter side (m <= n), else the columns."""
    return shape[0] <= shape[1]


class LDAdam(PerParameterOptimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.908, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 16,
        rho: float = 0.908,
        proj_method: str = "power_iteration",
        error_feedback: bool = True,
        error_dtype: str = "param",
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank={rank} must be a positive integer")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho={rho} must lie in [0, 1]")
        if proj_method not in PROJ_METHODS:
            raise ValueError(f"proj_method={proj_method!r}: use {PROJ_METHODS}")
        if error_dtype not in ERROR_DTYPES:
            raise ValueError(f"error_dtype={error_dtype!r}: use {list(ERROR_DTYPES)}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, projected=False
        )
        super().__init__(params, defaults)
        for group in self.param_groups:  # the defaults and each group's own values
            AdamRule.check_group(group)
        self.check_fixed(
            dict(rank=rank, rho=rho, proj_method=proj_method, error_feedback=error_feedback)
        )
        self.rank, self.rho, self.proj_method = rank, rho, proj_method
        self.error_feedback, self.error_dtype = error_feedback, error_dtype
        for name, p in self.projected_matrices():
            check_rank_fits(rank, tuple(p.shape), name)

    # ------------------------------------------------------------------ stepping
    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("LDAdam does not support sparse gradients")
        lr, wd = group["lr"], group["weight_decay"]
        if wd > 0:
            p.mul_(1.0 - lr * wd)
        if group["projected"]:
            self._low_rank_update(p, group)
        else:
            self._adam_update(p, group)

    def end_step(self) -> None:
        """Nothing to count: each tensor keeps its own step."""

    def _adam_update(self, p: torch.Tensor, group: dict) -> None:
        state, (b1, b2) = self.state[p], group["betas"]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] = t = state["step"] + 1
        m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
        m.mul_(b1).add_(g, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        denom = v.sqrt().div_(math.sqrt(1.0 - b2**t)).add_(group["eps"])
        p.addcdiv_(m, denom, value=-group["lr"] / (1.0 - b1**t))

    def _low_rank_update(self, p: torch.Tensor, group: dict) -> None:
        state, (b1, b2), eps = self.state[p], group["betas"], group["eps"]
        left = left_side(tuple(p.shape))
        grad = p.grad.float() if left else p.grad.float().T  # rows are projected
        rows, cols = grad.shape
        r = self.rank
        if "basis" not in state:
            state["step"] = 0
            state["side"] = "left" if left else "right"
            state["basis"] = torch.zeros(rows, r, device=p.device, dtype=p.dtype)
            state["exp_avg"] = torch.zeros(r, cols, device=p.device, dtype=p.dtype)
            state["exp_avg_sq"] = torch.zeros(r, cols, device=p.device, dtype=p.dtype)
            if self.error_feedback:
                dtype = ERROR_DTYPES[self.error_dtype] or p.dtype
                state["error_feedback"] = torch.zeros(rows, cols, device=p.device, dtype=dtype)
        t = state["step"] + 1
        k = t - 1
        a = grad + state["error_feedback"].float() if self.error_feedback else grad
        p_old = state["basis"].float()
        m_old, v_old = state["exp_avg"].float(), state["exp_avg_sq"].float()
        if t == 1:
            p_new = self._top_left(a, r)
        else:
            back = p_old @ m_old  # rows x cols: the momentum in the full space
            mixed = back.mul(self.rho / (1.0 - b1**k)).add_(a, alpha=1.0 - self.rho)
            if self.proj_method == "svd":
                p_new = self._top_left(mixed, r)
            else:
                p_new = torch.linalg.qr(mixed @ (mixed.T @ p_old)).Q
        low = p_new.T @ a  # r x cols
        if t == 1:
            m_moved, v_moved = torch.zeros_like(low), torch.zeros_like(low)
        else:
            c = p_new.T @ p_old  # r x r
            m_moved = c @ m_old
            bc1, bc2 = 1.0 - b1**k, 1.0 - b2**k
            variance = v_old / bc2 - (m_old / bc1).square()
            v_moved = ((c * c) @ variance + (m_moved / bc1).square()).abs_().mul_(bc2)
        if self.error_feedback:
            error = a - p_new @ low
            if t > 1:
                error.add_(back - p_new @ m_moved, alpha=b1 / (1.0 - b1))
            state["error_feedback"].copy_(error)
        m_new = m_moved.mul_(b1).add_(low, alpha=1.0 - b1)
        v_new = v_moved.mul_(b2).addcmul_(low, low, value=1.0 - b2)
        direction = (m_new / (1.0 - b1**t)) / ((v_new / (1.0 - b2**t)).sqrt_().add_(eps))
        full = p_new @ direction
        p.add_((full if left else full.T).to(p.dtype), alpha=-group["lr"])
        state["basis"].copy_(p_new)
        state["exp_avg"].copy_(m_new)
        state["exp_avg_sq"].copy_(v_new)
        state["step"] = t

    @staticmethod
    def _top_left(a: torch.Tensor, r: int) -> torch.Tensor:
        return torch.linalg.svd(a, full_matrices=False).U[:, :r]

    # ------------------------------------------------------------------ checkpoints, memory
    def memory_formula(self, steps: int = 1) -> dict[str, int]:
        """Closed form: a projected m x n matrix (a = its shorter side, b the longer) holds the
        basis a x r and M, V of r x b in the parameter's dtype, and the a x b error buffer in
        ``error_dtype``; anything else holds AdamW's M and V."""
        total: dict[str, int] = {}

        def add(key: str, n: int) -> None:
            total[key] = total.get(key, 0) + n

        for group in self.param_groups:
            for p in group["params"]:
                size, shape = p.element_size(), tuple(p.shape)
                if not group["projected"]:
                    add("moments", 2 * p.numel() * size)
                    continue
                short, long_ = min(shape), max(shape)
                add("projector", short * self.rank * size)
                add("moments", 2 * self.rank * long_ * size)
                if self.error_feedback:
                    err = ERROR_DTYPES[self.error_dtype] or p.dtype
                    add("error", p.numel() * torch.empty((), dtype=err).element_size())
        return total

    def projection_report(self) -> str:
        projected = [p for g in self.param_groups if g["projected"] for p in g["params"]]
        plain = [p for g in self.param_groups if not g["projected"] for p in g["params"]]
        ef = (
            f"error feedback in {self.error_dtype} (state, not p.grad)"
            if self.error_feedback
            else "no error feedback"
        )
        b1, b2 = self.defaults["betas"]
        return (
            f"{len(projected)} matrices ({sum(p.numel() for p in projected) / 1e6:.2f}M params) "
            f"projected: rank {self.rank}, subspace moved every step by "
            f"{'a warm-started power iteration' if self.proj_method != 'svd' else 'an SVD'} "
            f"(rho {self.rho}), {ef}; {len(plain)} tensors "
            f"({sum(p.numel() for p in plain) / 1e6:.2f}M params) take plain AdamW with the same "
            f"betas ({b1}, {b2})"
        )
