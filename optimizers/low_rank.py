"""The GaLore family, each a composition in ``SubspaceOptimizer``: GaLore, 8-bit GaLore,
Q-GaLore, Fira, FRUGAL, GUM, GORP and GradNormLoRP (GaLore on a weight-normalized model).

Every class takes torch.optim's ``params`` (groups from ``llmpt.optimizers.groups.param_groups``:
a group with ``projected=True`` is projected, the rest take plain Adam) and plain keyword
arguments whose defaults are the paper's LLaMA-on-C4 settings. lr, betas, eps, weight_decay,
scale and the projection settings (rank, update_gap, proj_type) may differ per group; every other
argument is the optimizer's, and a group that sets one is refused. ``refresh`` is when the
matrices refresh their bases: ``synchronous`` (all at the same steps, as the references) or
``staggered`` (spread over the interval, ``llmpt.optimizers.refresh``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from llmpt.optimizers.distributed import replicated_world
from llmpt.optimizers.int8_linear import Int8Linear
from llmpt.optimizers.projectors import CoordinateProjector, SvdProjector
from llmpt.optimizers.projectors.quantized import QuantizedSvdProjector
from llmpt.optimizers.refresh import check_reference_schedule
from llmpt.optimizers.residuals import NormScaledResidual, StateFreeResidual
from llmpt.optimizers.rules import AdamRule, BlockwiseAdam8bitRule, MuonRule
from llmpt.optimizers.sampling import LayerSampler
from llmpt.optimizers.subspace import (
    Sampling,
    SubspaceOptimizer,
    as_groups,
    layer_units,
    tensor_of,
)
from llmpt.optimizers.task_subspace import KEY as TASK_BASIS
from llmpt.optimizers.task_subspace import TaskSubspaceFilter
from llmpt.optimizers.weight_norm import WeightNormLinear
from llmpt.optimizers.weight_quant import Int8Storage, Int8Weights

Betas = tuple[float, float]
COMPAT = ("none", "reference")


def projection_settings(rank: int, update_gap: int, proj_type: str) -> dict:
    """The projection settings a group may set for itself (``SubspaceOptimizer``'s
    ``projection``)."""
    return dict(rank=rank, update_gap=update_gap, proj_type=proj_type)


def svd_engine(
    rank: int,
    update_gap: int,
    proj_type: str,
    svd_backend: str,
    svd_power_iters: int,
    refresh_phase: int = 0,
    **extra,
) -> dict:
    """The engine arguments of GaLore's SVD basis: the per-group projection settings and the
    factory that builds a projector from them (``extra``: ``SvdProjector``'s other options)."""
    return dict(
        projection=projection_settings(rank, update_gap, proj_type),
        make_projector=lambda s: SvdProjector(
            s["rank"],
            s["update_gap"],
            s["proj_type"],
            svd_backend,
            niter=svd_power_iters,
            refresh_phase=refresh_phase,
            **extra,
        ),
    )


class GaLore(SubspaceOptimizer):
    """GaLore (Zhao et al. 2024, Alg. 1): Adam on R = P^T G for the top-r singular vectors P of
    each projected matrix's gradient, recomputed every ``update_gap`` steps; the weight takes
    ``scale`` times the back-projected Adam direction. Defaults: the paper's 60M setting (lr
    0.01, rank 128, gap 200, scale 0.25; eps 1e-8, the reference code has 1e-6)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 128,
        update_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        svd_backend: str = "exact",
        svd_power_iters: int = 1,
        refresh_phase: int = 0,
        refresh: str = "staggered",
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            scale=scale,
            **svd_engine(rank, update_gap, proj_type, svd_backend, svd_power_iters, refresh_phase),
            refresh=refresh,
        )
        self.check_fixed(
            dict(
                refresh=refresh,
                svd_backend=svd_backend,
                svd_power_iters=svd_power_iters,
                refresh_phase=refresh_phase,
            )
        )


class GaLore8bit(SubspaceOptimizer):
    """8-bit GaLore (Zhao et al. 2024, Sec. 4.3): GaLore whose subspace moments are blockwise
    8-bit (bitsandbytes' kernels; tensors under ``min_8bit_size`` values keep fp32 moments)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 128,
        update_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        svd_backend: str = "exact",
        svd_power_iters: int = 1,
        refresh_phase: int = 0,
        min_8bit_size: int = 4096,
        refresh: str = "staggered",
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            scale=scale,
            **svd_engine(rank, update_gap, proj_type, svd_backend, svd_power_iters, refresh_phase),
            rule=BlockwiseAdam8bitRule(min_8bit_size),
            refresh=refresh,
        )
        self.check_fixed(
            dict(
                refresh=refresh,
                svd_backend=svd_backend,
                svd_power_iters=svd_power_iters,
                refresh_phase=refresh_phase,
                min_8bit_size=min_8bit_size,
            )
        )


class QGaLore(SubspaceOptimizer):
    """Q-GaLore (Zhang et al. 2024): 8-bit GaLore whose projector is stored in ``proj_bits``
    bits and refreshed lazily (the gap grows by ``growth`` once the mean cosine of the top
    singular vectors over ``queue_size`` refreshes reaches ``cos_threshold``), with the projected
    weights kept on an INT8 grid (``weight_quant``).

    The weights are simulated INT8 (they keep their dtype, their values on the grid) unless
    ``int8_linears`` is given: the ``Int8Linear`` modules from
    ``llmpt.optimizers.int8_linear.wrap_int8(model, ...)``, an explicit model surgery that
    stores them as codes (one process only). ``compat="reference"`` reproduces
    q-galore-torch's integer zero points and signed cosine."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.015,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 128,
        update_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        svd_backend: str = "exact",
        svd_power_iters: int = 1,
        min_8bit_size: int = 4096,
        proj_bits: int = 4,
        proj_group_size: int = 256,
        cos_threshold: float = 0.4,
        queue_size: int = 5,
        growth: float = 2.0,
        abs_cos: bool = True,
        weight_quant: bool = True,
        stochastic_round: bool = True,
        weight_group_size: int = 256,
        compat: str = "none",
        int8_linears: Sequence[Int8Linear] | None = None,
        refresh: str = "staggered",
    ) -> None:
        if compat not in COMPAT:
            raise ValueError(f"compat={compat!r}: use none or reference")
        reference = compat == "reference"
        check_reference_schedule(reference, refresh, "q-galore-torch")
        zero_point = "integer" if reference else "exact"

        def make_projector(s: dict) -> QuantizedSvdProjector:
            return QuantizedSvdProjector(
                s["rank"],
                s["update_gap"],
                s["proj_type"],
                svd_backend,
                niter=svd_power_iters,
                proj_bits=proj_bits,
                proj_group_size=proj_group_size,
                cos_threshold=cos_threshold,
                queue_size=queue_size,
                growth=growth,
                abs_cos=abs_cos and not reference,
                zero_point=zero_point,
            )

        if int8_linears is not None and not weight_quant:
            raise ValueError(
                "int8_linears stores INT8 weights, which weight_quant=False turns off: drop one"
            )
        if int8_linears is not None:
            weights = Int8Storage(
                {lin.weight: lin for lin in int8_linears},
                weight_group_size,
                stochastic_round,
                zero_point,
            )
        elif weight_quant:
            weights = Int8Weights(weight_group_size, stochastic_round, zero_point)
        else:
            weights = None
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            scale=scale,
            projection=projection_settings(rank, update_gap, proj_type),
            make_projector=make_projector,
            rule=BlockwiseAdam8bitRule(min_8bit_size),
            weight_quant=weights,
            refresh=refresh,
        )
        self.check_fixed(
            dict(
                refresh=refresh,
                svd_backend=svd_backend,
                min_8bit_size=min_8bit_size,
                proj_bits=proj_bits,
            )
        )


class Fira(SubspaceOptimizer):
    """Fira (Chen et al. 2024): GaLore plus the gradient's residual G - P P^T G, scaled per
    column by the ratio of Adam's update norm to the projected gradient's norm and passed
    through a norm-growth limiter (``limiter_gamma``). ``mode="code"`` reproduces pip fira
    1.0.2's arithmetic."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 128,
        update_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        svd_backend: str = "exact",
        svd_power_iters: int = 1,
        refresh_phase: int = 0,
        mode: str = "paper",
        limiter_gamma: float = 1.01,
        refresh: str = "staggered",
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            scale=scale,
            **svd_engine(rank, update_gap, proj_type, svd_backend, svd_power_iters, refresh_phase),
            residual=NormScaledResidual(mode, limiter_gamma),
            refresh=refresh,
        )
        self.check_fixed(
            dict(
                refresh=refresh,
                svd_backend=svd_backend,
                svd_power_iters=svd_power_iters,
                refresh_phase=refresh_phase,
                mode=mode,
                limiter_gamma=limiter_gamma,
            )
        )


FRUGAL_PROJECTIONS = ("block", "svd", "random", "columns", "rows")
# FRUGAL's block_order names -> our sampler orders ("random" is a fresh randperm each time)
FRUGAL_BLOCK_ORDERS = {
    "random": "uniform",
    "ascending": "ascending",
    "descending": "descending",
    "mirror": "mirror",
}


class Frugal(SubspaceOptimizer):
    """FRUGAL (Zmushko et al. 2025): torch-style Adam on a state-full part of each projectable
    matrix (``projected=True`` groups), a state-free step (``inactive_rule``: signSGD, SGD or
    none) on the rest, weight decay first; the other parameters take full Adam.

    ``projection="block"`` makes whole matrices state-full, ``round(density x matrices)`` at a
    time, switched every ``update_gap`` steps in ``block_order``; ``svd``, ``random``,
    ``columns`` and ``rows`` project each matrix to ``density`` of its dimension.
    ``proj_lr_scale`` multiplies the steps (not the weight decay) of the projectable
    matrices. ``refresh`` schedules the per-matrix projections; the block switches of
    ``projection="block"`` stay on the sampler's schedule (there is no basis to stagger)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        projection: str = "block",
        density: float = 0.25,
        update_gap: int = 200,
        proj_type: str = "std",
        block_order: str = "descending",
        inactive_rule: str = "sign",
        inactive_lr_scale: float = 1.0,
        proj_lr_scale: float = 1.0,
        reset_statistics: bool = True,
        seed: int = 0,
        refresh: str = "staggered",
    ) -> None:
        if projection not in FRUGAL_PROJECTIONS:
            raise ValueError(
                f"projection={projection!r}: use one of {', '.join(FRUGAL_PROJECTIONS)}"
            )
        if proj_lr_scale < 0:
            raise ValueError(f"proj_lr_scale={proj_lr_scale} must be >= 0")
        state_free = StateFreeResidual(inactive_rule, inactive_lr_scale)
        groups = as_groups(params)
        for group in groups:  # the steps' lr; weight decay keeps the base lr
            if group.get("projected"):
                group.setdefault("lr_scale", proj_lr_scale)
        engine: dict = {}
        if projection == "block":
            if not 0.0 <= density <= 1.0:
                raise ValueError(f"density={density} must lie in [0, 1]")
            if block_order not in FRUGAL_BLOCK_ORDERS:
                raise ValueError(
                    f"block_order={block_order!r}: use one of {', '.join(FRUGAL_BLOCK_ORDERS)}"
                )
            projectable = [p for g in groups if g.get("projected") for p in g["params"]]
            for group in groups:
                group["projected"] = False
            n = len(projectable)
            sampler = LayerSampler(
                n,
                round(n * density),
                update_gap,
                FRUGAL_BLOCK_ORDERS[block_order],
                seed,
                keys=("update_gap", "block_order"),
            )
            engine["sampling"] = Sampling(
                sampler,
                [[tensor_of(p)] for p in projectable],
                # inactive_rule=none: a zero step, but FRUGAL still decays (and computes) them
                inactive_mode="state_free",
                reset_active=True,
                freeze_grads=not replicated_world(),
            )
        else:
            if projection in ("columns", "rows"):
                engine["make_projector"] = lambda s: CoordinateProjector(
                    density, s["update_gap"], projection
                )
                engine["projection"] = dict(update_gap=update_gap)
            else:
                engine["make_projector"] = lambda s: SvdProjector(
                    None, s["update_gap"], s["proj_type"], density=density, basis=projection
                )
                engine["projection"] = dict(update_gap=update_gap, proj_type=proj_type)
            engine["residual"] = state_free if inactive_rule != "none" else None
        super().__init__(
            groups,
            lr,
            betas,
            eps,
            weight_decay,
            scale=1.0,
            rule=AdamRule("torch"),
            reset_on_refresh=reset_statistics,
            decay_first=True,
            seed=seed,
            state_free=state_free,
            **engine,
            refresh=refresh,
        )
        self.check_fixed(
            dict(refresh=refresh, density=density, inactive_rule=inactive_rule, seed=seed)
        )


class Gum(SubspaceOptimizer):
    """GUM (Pan et al. 2025): Muon on the GaLore projection of every projected matrix, except
    in ``active_layers`` sampled decoder layers per period, which take Muon on the full-rank
    complement G - P P^T G; the importance weights 1/(1-q) and 1/q make the momentum's input
    unbiased. ``layers``: the decoder blocks (``groups.decoder_layers(model)`` gives them), each
    a module or a list of parameters. The other parameters take AdamW (``adamw_*``)."""

    def __init__(
        self,
        params: Iterable,
        layers: Sequence[nn.Module | Iterable],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        ns_steps: int = 5,
        adjust_lr_fn: str = "match_rms_adamw",
        ns_dtype: str = "auto",
        adamw_lr: float | None = None,
        adamw_betas: Betas = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        rank: int = 128,
        update_gap: int = 200,
        proj_type: str = "left",
        svd_backend: str = "exact",
        svd_power_iters: int = 1,
        active_layers: int = 2,
        seed: int = 0,
        refresh: str = "staggered",
    ) -> None:
        groups = as_groups(params)
        projected = [p for g in groups if g.get("projected") for p in g["params"]]
        units = layer_units(layers, projected)
        n = len(units)
        if not 1 <= active_layers < n:
            raise ValueError(
                f"active_layers={active_layers}: GUM samples q = active_layers / layers in "
                f"(0, 1), so it must lie in [1, {n - 1}] for {n} decoder layers"
            )
        if sum(len(u) for u in units) != len(projected):
            raise ValueError("GUM: every projected matrix must belong to one of the layers")
        for group in groups:
            if not group.get("projected"):
                group.setdefault("lr", adamw_lr if adamw_lr is not None else lr)
        q = active_layers / n
        sampling = Sampling(
            LayerSampler(n, active_layers, update_gap, "uniform", seed, keys=("update_gap", "")),
            units,
            active_mode="complement",
            inactive_mode="inherit",
            active_weight=1.0 / q,
            inactive_weight=1.0 / (1.0 - q),
        )
        super().__init__(
            groups,
            lr,
            adamw_betas,
            adamw_eps,
            weight_decay,
            scale=1.0,
            **svd_engine(rank, update_gap, proj_type, svd_backend, svd_power_iters),
            rule=MuonRule(momentum, ns_steps, adjust_lr_fn, ns_dtype),
            plain_rule=AdamRule("torch"),
            decay_first=True,
            sampling=sampling,
            seed=seed,
            refresh=refresh,
        )
        # the layer sample switches every K = update_gap steps, when the projectors refresh
        # (staggered: each projector at its own offset within those K steps)
        self.check_fixed(
            dict(
                refresh=refresh,
                momentum=momentum,
                ns_steps=ns_steps,
                seed=seed,
                update_gap=update_gap,
            )
        )


class Gorp(SubspaceOptimizer):
    """GORP (Wang et al., ACL 2025; spec finetune-and-lens.md section 2), its full-rank part:
    GaLore (one-sided SVD basis, Adam on R, ``scale``) on the projected matrices, with R's
    component in the subspace of earlier tasks removed before the moments are updated
    (``llmpt.optimizers.task_subspace``). Call ``end_task()`` after each task: it grows each
    matrix's subspace from Adam's first moment (``threshold`` of its energy) and, with
    ``reset_between_tasks`` (the released code builds a new optimizer per task), clears every
    other state so the next task starts with fresh moments and bases. Until the first
    ``end_task()`` it is GaLore, step for step.

    Defaults: the released scripts (rank 8, update_gap 20 and scale 0.25 of the LLaMA-2 runs,
    eps 1e-6, lr 1e-3 of the T5 runs' LoRA and regular groups; the LLaMA-2 runs use 2e-4 there,
    and both run their full-rank group far lower, 1e-5 (T5) or 1e-6: a group may set its own).
    The other parameters take plain Adam, unfiltered (the paper freezes them and trains LoRA
    adapters, which our model does not have)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int = 8,
        update_gap: int = 20,
        scale: float = 0.25,
        proj_type: str = "std",
        svd_backend: str = "exact",
        svd_power_iters: int = 1,
        threshold: float = 0.9,
        reset_between_tasks: bool = True,
        compat: str = "none",
        refresh: str = "staggered",
    ) -> None:
        task_filter = TaskSubspaceFilter(threshold, compat)
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            scale=scale,
            **svd_engine(rank, update_gap, proj_type, svd_backend, svd_power_iters),
            task_filter=task_filter,
            refresh=refresh,
        )
        for _, p in self.projected_matrices():
            task_filter.check_side(self.projector_for(p).side(tuple(p.shape)))
        self.check_fixed(
            dict(
                refresh=refresh,
                svd_backend=svd_backend,
                svd_power_iters=svd_power_iters,
                threshold=threshold,
                reset_between_tasks=reset_between_tasks,
                compat=compat,
            )
        )
        self.reset_between_tasks = reset_between_tasks
        self._restarted = False  # state cleared by end_task(), no step taken since

    def end_step(self) -> None:
        super().end_step()
        self._restarted = False

    def end_task(self) -> dict[str, int]:
        """The task is over: grow each projected matrix's subspace from its first moment and
        (``reset_between_tasks``) clear the rest of the state. Returns the subspace widths by
        parameter name (or index). Under ``ShardedOptimizer`` each rank does this for the
        matrices it owns, whose state it holds."""
        widths = {}
        for group in self.param_groups:
            if not group["projected"]:
                continue
            names = group.get("param_names") or [None] * len(group["params"])
            for name, p in zip(names, group["params"], strict=True):
                state = self.state.get(p)
                moment = self.rule.first_moment(state) if state else None
                if moment is None:
                    continue  # never stepped (or owned by another rank)
                width = self.task_filter.extend(state, moment)
                widths[name or str(self._index[p])] = width
        if self.reset_between_tasks:
            self._restarted = True
            for p in list(self.state):
                kept = {k: v for k, v in self.state[p].items() if k == TASK_BASIS}
                if kept:
                    self.state[p] = kept
                else:
                    del self.state[p]
        return widths

    def memory_formula(self, steps: int = 1) -> dict[str, int]:
        """GaLore's, plus the stored subspaces: k x (the filtered dimension) fp32 values per
        matrix, k being data-dependent (``threshold`` of the energy, at most ``rank`` more per
        task): the widths held now, zero before the first ``end_task()``. Right after
        ``end_task()`` restarted the state, the subspaces are all there is."""
        out = super().memory_formula(steps)
        if self._restarted:
            out = dict.fromkeys(out, 0)
        for group in self.param_groups:
            for p in group["params"]:
                basis = (self.state.get(p) or {}).get(TASK_BASIS)
                if basis is not None:
                    out["projector"] += basis.shape[0] * basis.shape[1] * 4
        return out


def check_weight_normalized(optimizer: SubspaceOptimizer, linears: Sequence[WeightNormLinear]):
    """GradNormLoRP steps a reparametrized model: every projected matrix must be the direction
    of one of ``linears`` and every magnitude a parameter of the optimizer."""
    if not linears:
        raise ValueError(
            "linears is empty: GradNormLoRP trains a weight-normalized model; pass the modules "
            "llmpt.optimizers.weight_norm.wrap(model, targets) returned"
        )
    directions = {id(lin.weight) for lin in linears}
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, p in optimizer.projected_matrices():
        if id(p) not in directions:
            raise ValueError(
                f"{name} is projected but is not the direction of a WeightNormLinear: wrap the "
                "model first (weight_norm.wrap) and project the wrapped linears' weights"
            )
    if any(id(lin.magnitude) not in held for lin in linears if lin.magnitude.requires_grad):
        raise ValueError(
            "a WeightNormLinear's magnitude is not in the optimizer: build the param groups "
            "after wrapping (param_groups(model, targets) puts magnitudes in the plain group)"
        )


class GradNormLoRP(SubspaceOptimizer):
    """GradNormLoRP (Huang et al., AAAI 2025; spec finetune-and-lens.md 3.2), the clean
    version: GaLore on the gradient of each targeted linear's direction V, and Adam on its
    per-row magnitude g (plain group), for a model reparametrized as W = g V / ||V||_row by
    ``llmpt.optimizers.weight_norm.wrap`` (``linears``: the modules it returned). The state is
    GaLore's plus 2 x out per matrix for g; there is no copy of the weight. Defaults: the
    README's LLaMA-60M pretraining (lr 0.01, rank 128, update_gap 250, scale 0.25)."""

    def __init__(
        self,
        params: Iterable,
        linears: Sequence[WeightNormLinear],
        lr: float = 1e-2,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 128,
        update_gap: int = 250,
        scale: float = 0.25,
        proj_type: str = "std",
        svd_backend: str = "exact",
        svd_power_iters: int = 1,
        refresh: str = "staggered",
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            scale=scale,
            **svd_engine(rank, update_gap, proj_type, svd_backend, svd_power_iters),
            refresh=refresh,
        )
        check_weight_normalized(self, linears)
        self.check_fixed(
            dict(refresh=refresh, svd_backend=svd_backend, svd_power_iters=svd_power_iters)
        )


class GradNormLoRP8bit(SubspaceOptimizer):
    """8-bit GradNormLoRP: ``GradNormLoRP`` whose moments (projected and plain, magnitudes
    included) are blockwise 8-bit, as 8-bit GaLore's (tensors under ``min_8bit_size`` values
    keep fp32 moments). The paper's "up to 89.5%" optimizer-memory saving for LLaMA-7B is this
    state against fp32 AdamW's (docs/memory.md). The released 8-bit class steps every weight
    twice (its own projected Adam, then bitsandbytes' full Adam) and is not reproduced."""

    def __init__(
        self,
        params: Iterable,
        linears: Sequence[WeightNormLinear],
        lr: float = 1e-2,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 128,
        update_gap: int = 250,
        scale: float = 0.25,
        proj_type: str = "std",
        svd_backend: str = "exact",
        svd_power_iters: int = 1,
        min_8bit_size: int = 4096,
        refresh: str = "staggered",
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            scale=scale,
            **svd_engine(rank, update_gap, proj_type, svd_backend, svd_power_iters),
            rule=BlockwiseAdam8bitRule(min_8bit_size),
            refresh=refresh,
        )
        check_weight_normalized(self, linears)
        self.check_fixed(
            dict(
                refresh=refresh,
                svd_backend=svd_backend,
                svd_power_iters=svd_power_iters,
                min_8bit_size=min_8bit_size,
            )
        )
