"""The generic low-rank optimizer: projector x rule x residual, one ``torch.optim.Optimizer``.

For a targeted 2-D weight W with gradient G, one step is (GaLore Alg. 1 with Fira's residual):

1. the projector refreshes its basis when due (its own per-matrix step counter);
2. R = project(G); the rule turns R into a low-rank direction N (Adam: M / (sqrt(V) + eps));
3. the residual combines them: ``drop`` gives scale * back(N) (GaLore); ``norm_scaled`` adds
   Fira's scaled, limited G - back(R);
4. W <- W - lr * correction * update, then decoupled weight decay W <- W - lr * wd * W.

Every other parameter (embeddings, lm_head, norms) sits in a plain group of the same optimizer
and takes the same Adam rule on its full gradient, as in the reference optimizers. All state is
tensors, ints and strings, so ``state_dict()`` survives ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from optimizers.accounting import CATEGORIES, state_nbytes
from optimizers.projectors import SvdProjector
from optimizers.residuals import NormScaledResidual
from optimizers.rules import AdamRule, BlockwiseAdam8bitRule
from optimizers.rules.adam8bit import blockwise_state_nbytes


class SubspaceOptimizer(torch.optim.Optimizer):
    """``params``: param groups (named parameters welcome: errors then name the matrix); a group
    with ``projected=True`` is projected, the others take plain Adam.

    Components are shared by all projected matrices; per-matrix state lives in ``self.state``.
    """

    def __init__(
        self,
        params: Iterable[dict],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        projector: SvdProjector,
        scale: float,
        residual: NormScaledResidual | None = None,
        rule: AdamRule | BlockwiseAdam8bitRule | None = None,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"optimizer.lr={lr} must be positive")
        if weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay={weight_decay} must be >= 0")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, projected=False
        )
        super().__init__(params, defaults)
        if residual is not None and projector.proj_type == "full":
            raise ValueError(
                "optimizer.proj_type=full: Fira's residual needs a one-sided projection; "
                "use std, reverse_std, left or right"
            )
        self.projector, self.scale, self.residual = projector, scale, residual
        self.rule = rule if rule is not None else AdamRule(tuple(betas), eps)
        for group in self.param_groups:
            if group["projected"]:
                names = group.get("param_names") or ["a matrix"] * len(group["params"])
                for name, p in zip(names, group["params"], strict=True):
                    if p.dim() != 2:
                        raise ValueError(
                            f"{name}: a projected parameter must be a 2-D matrix, got shape "
                            f"{tuple(p.shape)}; leave it out of optimizer.target_modules"
                        )
                    projector.check(tuple(p.shape), name)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("sparse gradients are not supported")
                self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        step = state.get("step", 0)
        grad = p.grad
        if group["projected"]:
            if self.projector.due(state, step):
                self.projector.refresh(state, grad)
            low = self.projector.project(state, grad)
        else:
            low = grad
        step += 1
        state["step"] = step
        direction, correction = self.rule.direction(state, low, step)
        step_size = -group["lr"] * correction
        if not group["projected"]:
            p.add_(direction, alpha=step_size)
        elif self.residual is None:  # GaLore: W += step_size * scale * back(N), in one GEMM
            self.projector.add_back(state, p, direction, step_size * self.scale)
        else:
            update = self.residual.combine(state, grad, low, direction, self.projector, self.scale)
            p.add_(update, alpha=step_size)
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    # ------------------------------------------------------------------ memory
    def shared_state(self) -> dict[str, list[torch.Tensor]]:
        """Tensors the components hold once for every parameter (e.g. 8-bit code maps)."""
        if not self.state or not hasattr(self.rule, "shared_tensors"):
            return {}
        return self.rule.shared_tensors()

    def state_nbytes(self) -> dict[str, int]:
        out = state_nbytes(self.state.values())
        for key, tensors in self.shared_state().items():
            out[key] += sum(t.nbytes for t in tensors)
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but every state tensor keeps the dtype it was saved with: torch casts
        floating-point state to the parameter's dtype, which would turn fp32 block scales or
        fp32 moments of a bf16 model into bf16 and break an exact resume."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            live = self.state[params[index]]
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and live[key].dtype != value.dtype:
                    live[key] = value.to(device=params[index].device)

    def projection_report(self) -> str:
        """One line for the start-up log: what is projected, at what rank."""
        projected = [p for g in self.param_groups if g["projected"] for p in g["params"]]
        plain = [p for g in self.param_groups if not g["projected"] for p in g["params"]]
        n_proj = sum(p.numel() for p in projected)
        n_plain = sum(p.numel() for p in plain)
        return (
            f"{len(projected)} matrices ({n_proj / 1e6:.2f}M params) projected at rank "
            f"{self.projector.rank} ({self.projector.proj_type}, refresh every "
            f"{self.projector.update_gap} steps); {len(plain)} tensors "
            f"({n_plain / 1e6:.2f}M params) take plain Adam"
        )


def memory_formula(
    shape: tuple[int, ...],
    projected: bool,
    projector: SvdProjector,
    residual: bool,
    dtype: torch.dtype,
    min_8bit_size: int | None = None,
) -> dict[str, int]:
    """Closed-form state bytes of one parameter after its first step (GaLore Sec. 4.1:
    moments 2 x reduced numel, basis r x (side dim); Fira adds one scalar; with
    ``min_8bit_size`` the moments are 8-bit codes plus block scales)."""
    size = torch.empty((), dtype=dtype).element_size()
    out = dict.fromkeys(CATEGORIES, 0)
    moment_shape = projector.reduced_shape(shape) if projected else shape
    if min_8bit_size is None:
        out["moments"] = 2 * math.prod(moment_shape) * size
    else:
        out.update(blockwise_state_nbytes(moment_shape, min_8bit_size))
    if projected:
        out["projector"] = projector.basis_numel(shape) * size
        if residual:
            out["other"] = size  # the limiter's previous residual norm
    return out
