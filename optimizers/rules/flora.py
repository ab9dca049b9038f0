"""Flora (Hao, Cao & Mou, ICML 2024; spec projection-family.md section 2): Adafactor whose
first moment is kept compressed by a seeded Gaussian projection and resampled every ``kappa``
steps, the old momentum carried into the new basis.

Per matrix, at (1-based) step t, with down/up the projector's project/project_back:

1. beta2_t = 1 - t^decay_rate; row and column statistics of G^2 + eps1 (Adafactor's factored
   second moment), U = G / sqrt(V_hat);
2. U_bar = (1 - beta1) U + beta1 up(M_c): the current step uncompressed, only the history
   compressed;
3. if t is a multiple of kappa (staggered: t - the matrix's offset, ``refresh.py``):
   M_c <- down_new(up_old(M_c)) (momentum transfer);
4. M_c <- beta1 M_c + (1 - beta1) down(U);
5. U_bar /= max(1, RMS(U_bar) / clip_threshold); lr_eff = lr * max(eps2, RMS(W));
6. W <- W - lr_eff * weight_decay * W, then W <- W - lr_eff * U_bar.

Without a projector (embeddings, lm_head, norms, as the reference's uncompressed path) the
momentum is full-size; 1-D tensors keep an unfactored second moment. Arithmetic in fp32 for
half-precision parameters, as the reference. State: ``exp_avg`` (r x long side, or full),
``exp_avg_sq_row`` / ``exp_avg_sq_col`` (or ``exp_avg_sq``), ``step``.
"""

from __future__ import annotations

import math

import torch


def rms(t: torch.Tensor) -> torch.Tensor:
    return t.norm(2) / math.sqrt(t.numel())


class FloraRule:
    full_space = True  # works on the full gradient; the projector only compresses its momentum
    state_keys = ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq")

    def __init__(
        self,
        beta1: float,
        kappa: int,
        decay_rate: float = -0.8,
        eps1: float = 1e-30,
        eps2: float = 1e-3,
        clip_threshold: float = 1.0,
        scale_parameter: bool = True,
        weight_decay: float = 0.0,
    ) -> None:
        if not 0.0 < beta1 < 1.0:
            raise ValueError(f"beta1={beta1} must lie in (0, 1): Flora compresses it")
        if kappa <= 0:
            raise ValueError(f"kappa={kappa} must be a positive integer")
        if decay_rate >= 0:
            raise ValueError(f"decay_rate={decay_rate} must be negative")
        if clip_threshold <= 0:
            raise ValueError(f"clip_threshold={clip_threshold} must be positive")
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay} must be >= 0")
        self.beta1, self.kappa, self.decay_rate = beta1, kappa, decay_rate
        self.eps1, self.eps2, self.clip = eps1, eps2, clip_threshold
        self.scale_parameter, self.weight_decay = scale_parameter, weight_decay

    def step(self, p: torch.Tensor, state: dict, grad: torch.Tensor, lr: float, projector, ctx):
        """One Flora step of ``p`` (``projector`` None: full momentum)."""
        half = p.dtype in (torch.float16, torch.bfloat16)
        g = grad.float() if half else grad
        w = p.float() if half else p
        t = state["step"]
        beta2t = 1.0 - math.pow(t, self.decay_rate)
        sq = g.square().add_(self.eps1)
        if g.dim() == 2:
            if "exp_avg_sq_row" not in state:
                state["exp_avg_sq_row"] = g.new_zeros(g.shape[0])
                state["exp_avg_sq_col"] = g.new_zeros(g.shape[1])
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(sq.mean(dim=1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(sq.mean(dim=0), alpha=1.0 - beta2t)
            r_factor = (row / row.mean()).rsqrt_().unsqueeze(1)
            update = g * r_factor * col.rsqrt().unsqueeze(0)
        else:
            if "exp_avg_sq" not in state:
                state["exp_avg_sq"] = torch.zeros_like(g)
            v = state["exp_avg_sq"]
            v.mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
            update = v.rsqrt().mul_(g)
        del sq
        b1 = self.beta1
        if projector is None:
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(g)
            m = state["exp_avg"]
            m.mul_(b1).add_(update, alpha=1.0 - b1)
            update = m.clone()
        else:
            if "side" not in state:
                projector.refresh(state, g, ctx)
            raw = update
            m = state.get("exp_avg")
            view = self._with_basis(state, projector, g)  # draw P once, not per use
            history = projector.project_back(view, m) if m is not None else None
            update = raw * (1.0 - b1)
            if history is not None:
                update.add_(history, alpha=b1)
            if (t - ctx.offset) % self.kappa == 0:  # resample; carry the momentum over
                projector.refresh(state, g, ctx)
                view = self._with_basis(state, projector, g)
                if history is not None:
                    m = projector.project(view, history)
            low = projector.project(view, raw)
            state["exp_avg"] = (
                low.mul_(1.0 - b1) if m is None else m.mul_(b1).add_(low, alpha=1.0 - b1)
            )
            del history, raw
        update.div_((rms(update) / self.clip).clamp_(min=1.0))
        step = lr * (max(self.eps2, float(rms(w))) if self.scale_parameter else 1.0)
        if self.weight_decay:
            w.add_(w, alpha=-self.weight_decay * step)
        w.add_(update, alpha=-step)
        if half:
            p.copy_(w)

    @staticmethod
    def _with_basis(state: dict, projector, like: torch.Tensor) -> dict:
        """The state with P drawn into it for this step only (a seeded projector regenerates P
        at every use; the view is dropped after the step, so nothing is stored)."""
        if not hasattr(projector, "basis"):
            return state
        return {**state, "basis": projector.basis(state, like)}

    def memory(self, shape: tuple[int, ...], dtype: torch.dtype, low_shape=None) -> dict[str, int]:
        """fp32 statistics for half-precision parameters, as the arithmetic."""
        size = (
            4
            if dtype in (torch.float16, torch.bfloat16)
            else torch.empty((), dtype=dtype).element_size()
        )
        second = (shape[0] + shape[1]) if len(shape) == 2 else math.prod(shape)
        first = math.prod(low_shape) if low_shape is not None else math.prod(shape)
        return {"moments": (first + second) * size}
