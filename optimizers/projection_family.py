"""The projection family (spec projection-family.md), each a composition in
``SubspaceOptimizer``: APOLLO, APOLLO-Mini, Flora, GRASS, COAP (and its 8-bit variant),
DCT-AdamW, Online Subspace Descent and I3S.

As in ``low_rank``: torch.optim's ``params`` with ``projected=True`` groups, paper defaults,
lr, betas, eps, weight_decay, scale and the projection settings per group, everything else the
optimizer's, ``refresh`` (synchronous or staggered basis refreshes) included.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from llmpt.optimizers.error_feedback import ErrorFeedback
from llmpt.optimizers.low_rank import COMPAT, projection_settings, svd_engine
from llmpt.optimizers.projectors import CoordinateProjector
from llmpt.optimizers.projectors.coap import CoapProjector
from llmpt.optimizers.projectors.dct import DctProjector
from llmpt.optimizers.projectors.gaussian import GaussianProjector
from llmpt.optimizers.projectors.online_pca import OnlinePcaProjector
from llmpt.optimizers.refresh import check_reference_schedule
from llmpt.optimizers.residuals.scaled_gradient import ScaledGradient
from llmpt.optimizers.rules import AdamRule, BlockwiseAdam8bitRule
from llmpt.optimizers.rules.flora import FloraRule
from llmpt.optimizers.subspace import SubspaceOptimizer, as_groups
from llmpt.optimizers.transitions import MomentTransition

Betas = tuple[float, float]


def check_compat(compat: str) -> bool:
    if compat not in COMPAT:
        raise ValueError(f"compat={compat!r}: use none or reference")
    return compat == "reference"


class Apollo(SubspaceOptimizer):
    """APOLLO (Zhu et al., MLSys 2025): Adam moments on a seeded Gaussian projection R of the
    gradient give the factor ||N|| / ||R|| per channel (``scale_type="tensor"``: per tensor) by
    which the raw gradient is scaled, through Fira's norm-growth limiter. P is regenerated from
    its seed (``store_projection`` keeps it); ``projection_rng="philox"`` draws the same P on
    every device. ``compat="reference"`` reproduces apollo-torch (ordinal seeds, stored P, the
    scale applied as its square root: the groups' ``scale`` is then stored as sqrt(scale))."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int = 128,
        update_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        scale_type: str = "channel",
        scale_front: bool = False,
        limiter: bool = True,
        limiter_gamma: float = 1.01,
        store_projection: bool = False,
        projection_rng: str = "torch",
        compat: str = "none",
        seed: int = 0,
        refresh: str = "staggered",
    ) -> None:
        reference = check_compat(compat)
        check_reference_schedule(reference, refresh, "apollo-torch")
        groups = as_groups(params)
        for group in groups:
            if "scale" in group and not group["scale"] > 0:
                raise ValueError(f"scale={group['scale']} must be positive")
            if reference and "scale" in group:
                group["scale"] = math.sqrt(group["scale"])
        if not scale > 0:
            raise ValueError(f"scale={scale} must be positive")

        def make_projector(s: dict) -> GaussianProjector:
            return GaussianProjector(
                s["rank"],
                s["update_gap"],
                s["proj_type"],
                store=store_projection,
                seeding="reference" if reference else "paper",
                rng=projection_rng,
            )

        super().__init__(
            groups,
            lr,
            betas,
            eps,
            weight_decay,
            scale=math.sqrt(scale) if reference else scale,
            projection=projection_settings(rank, update_gap, proj_type),
            make_projector=make_projector,
            residual=ScaledGradient(scale_type, limiter, limiter_gamma, scale_front),
            rule=AdamRule("hf"),
            seed=seed,
            refresh=refresh,
        )
        self.check_fixed(
            dict(
                refresh=refresh,
                scale_type=scale_type,
                scale_front=scale_front,
                limiter=limiter,
                limiter_gamma=limiter_gamma,
                store_projection=store_projection,
                projection_rng=projection_rng,
                seed=seed,
            )
        )


class ApolloMini(Apollo):
    """APOLLO-Mini: APOLLO at rank 1 with one tensor-wise factor and the heuristic scale
    alpha = sqrt(128), applied before the limiter (the 60M and 130M scripts)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int = 1,
        update_gap: int = 200,
        scale: float = math.sqrt(128),
        proj_type: str = "std",
        scale_type: str = "tensor",
        scale_front: bool = True,
        limiter: bool = True,
        limiter_gamma: float = 1.01,
        store_projection: bool = False,
        projection_rng: str = "torch",
        compat: str = "none",
        seed: int = 0,
        refresh: str = "staggered",
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            rank,
            update_gap,
            scale,
            proj_type,
            scale_type,
            scale_front,
            limiter,
            limiter_gamma,
            store_projection,
            projection_rng,
            compat,
            seed,
            refresh,
        )


class Grass(SubspaceOptimizer):
    """GRASS (Muhamed et al. 2024): Adam on r rows (or columns) of each projected matrix's
    gradient, selected by norm (``selection``: top, norm-proportional sampling or uniform);
    projecting is a gather, projecting back a scatter-add, the state r indices."""

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
        selection: str = "norm",
        replacement: bool = False,
        reset_on_refresh: bool = True,
        seed: int = 0,
        refresh: str = "staggered",
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            scale=scale,
            projection=projection_settings(rank, update_gap, proj_type),
            make_projector=lambda s: CoordinateProjector(
                None,
                s["update_gap"],
                s["proj_type"],
                rank=s["rank"],
                selection=selection,
                replacement=replacement,
            ),
            rule=AdamRule("hf"),
            reset_on_refresh=reset_on_refresh,
            seed=seed,
            refresh=refresh,
        )
        self.check_fixed(
            dict(
                refresh=refresh,
                selection=selection,
                replacement=replacement,
                reset_on_refresh=reset_on_refresh,
                seed=seed,
            )
        )


class I3S(SubspaceOptimizer):
    """I3S (Zhang et al. 2025): GaLore whose r singular vectors are sampled in proportion to the
    singular values (seeded by matrix and refresh: the same on every rank)."""

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
        seed: int = 0,
        refresh: str = "staggered",
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            scale=scale,
            **svd_engine(
                rank,
                update_gap,
                proj_type,
                svd_backend,
                svd_power_iters,
                refresh_phase,
                selection="sample",
            ),
            rule=AdamRule("hf"),
            seed=seed,
            refresh=refresh,
        )
        self.check_fixed(dict(refresh=refresh, svd_backend=svd_backend, seed=seed))


class DctAdamW(SubspaceOptimizer):
    """DCT-AdamW (Modoranu et al. 2025): Adam on the r DCT columns most aligned with the
    gradient (re-selected every ``update_gap`` steps; indices only), torch-style eps and weight
    decay first, as the reference ``DCTAdamW``. ``rotate_subspace`` carries the moments to the
    new columns; ``use_ef`` feeds what the columns drop into the next gradient (in full, or as
    ``ef_bits``-bit codes per ``ef_group_size`` values)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 128,
        update_gap: int = 1,
        refresh_phase: int = 0,
        scale: float = 1.0,
        proj_type: str = "std",
        selection_norm: float = 1.0,
        transform: str = "matmul",
        rotate_subspace: bool = False,
        use_ef: bool = False,
        ef_bits: int = 0,
        ef_group_size: int = 0,
        refresh: str = "staggered",
    ) -> None:
        if not use_ef and (ef_bits or ef_group_size):
            raise ValueError(
                f"ef_bits={ef_bits} / ef_group_size={ef_group_size} shape the error feedback, "
                "which is off: set use_ef=True, or leave them at 0"
            )
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            scale=scale,
            projection=projection_settings(rank, update_gap, proj_type),
            make_projector=lambda s: DctProjector(
                s["rank"], s["update_gap"], s["proj_type"], selection_norm, transform, refresh_phase
            ),
            rule=AdamRule("torch"),
            decay_first=True,
            transition=MomentTransition("abs") if rotate_subspace else None,
            error_feedback=ErrorFeedback(ef_bits, ef_group_size) if use_ef else None,
            refresh=refresh,
        )
        self.check_fixed(
            dict(
                refresh=refresh,
                selection_norm=selection_norm,
                transform=transform,
                rotate_subspace=rotate_subspace,
                use_ef=use_ef,
            )
        )


class Coap(SubspaceOptimizer):
    """COAP (Xiao et al. 2025): GaLore whose basis takes a correlation-aware gradient step
    (``proj_lr``) every ``update_gap`` steps and a warm-started range finder every
    ``reproject_factor`` x ``update_gap``; ``restore_state`` carries M and V into the new
    basis."""

    eight_bit = False

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int = 128,
        update_gap: int = 40,
        reproject_factor: int = 5,
        scale: float = 0.25,
        proj_type: str = "std",
        proj_lr: float = 0.1,
        restore_state: bool = False,
        min_8bit_size: int = 4096,
        refresh: str = "staggered",
    ) -> None:
        if restore_state and self.eight_bit:
            raise ValueError(
                "restore_state=True carries dense moments into the new basis; the 8-bit variant "
                "keeps them quantized: use Coap for restore_state"
            )
        rule = BlockwiseAdam8bitRule(min_8bit_size) if self.eight_bit else AdamRule("hf")
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            scale=scale,
            projection=projection_settings(rank, update_gap, proj_type),
            make_projector=lambda s: CoapProjector(
                s["rank"], s["update_gap"], reproject_factor, s["proj_type"], proj_lr
            ),
            rule=rule,
            transition=MomentTransition("sqrt") if restore_state else None,
            refresh=refresh,
        )
        self.check_fixed(
            dict(
                refresh=refresh,
                reproject_factor=reproject_factor,
                proj_lr=proj_lr,
                restore_state=restore_state,
                min_8bit_size=min_8bit_size,
            )
        )


class Coap8bit(Coap):
    """COAP with blockwise 8-bit subspace moments (the reference's CoapAdamW8bit;
    ``min_8bit_size`` is only read here)."""

    eight_bit = True


class OnlineSubspaceDescent(SubspaceOptimizer):
    """Online Subspace Descent (Liang et al. 2024): one SVD, then an online-PCA AdamW step on the
    basis at every step (``mode="paper"``: penalty 0.1, lr ``proj_lr_ratio`` x lr_t; ``code``:
    the repository's form, whose projector lr is 1 / update_gap)."""

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
        mode: str = "paper",
        proj_lr_ratio: float = 5.0,
        ortho_penalty: float = 0.1,
        proj_weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            scale=scale,
            projection=projection_settings(rank, update_gap, proj_type),
            make_projector=lambda s: OnlinePcaProjector(
                s["rank"],
                s["update_gap"],
                s["proj_type"],
                mode,
                proj_lr_ratio,
                ortho_penalty,
                proj_weight_decay,
            ),
            rule=AdamRule("hf"),
        )
        self.check_fixed(
            dict(
                mode=mode,
                proj_lr_ratio=proj_lr_ratio,
                ortho_penalty=ortho_penalty,
                proj_weight_decay=proj_weight_decay,
            )
        )


class Flora(SubspaceOptimizer):
    """Flora (Hao et al. 2024): Adafactor whose momentum of each projected matrix lives in a
    seeded Gaussian projection resampled every ``kappa`` steps; the other tensors keep a full
    momentum, as the reference's uncompressed path. Flora keeps one beta (``beta1``) and decays
    with its RMS-scaled step, so these are the optimizer's, not per group; lr is per group."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        rank: int = 128,
        kappa: int = 1000,
        beta1: float = 0.9,
        decay_rate: float = -0.8,
        eps1: float = 1e-30,
        eps2: float = 1e-3,
        clip_threshold: float = 1.0,
        scale_parameter: bool = True,
        weight_decay: float = 0.0,
        proj_type: str = "std",
        compat: str = "none",
        projection_rng: str = "torch",
        seed: int = 0,
        refresh: str = "staggered",
    ) -> None:
        reference = check_compat(compat)
        check_reference_schedule(reference, refresh, "flora-opt")
        rule = FloraRule(
            beta1, kappa, decay_rate, eps1, eps2, clip_threshold, scale_parameter, weight_decay
        )
        # the projector's own schedule is unused: the rule resamples every kappa steps
        projector = GaussianProjector(
            rank,
            kappa,
            proj_type,
            seeding="flora" if reference else "paper",
            rng=projection_rng,
        )
        super().__init__(
            params,
            lr,
            (beta1, 0.999),  # unused: the rule keeps its own
            eps2,
            0.0,  # the rule decays with its RMS-scaled step, as the reference
            projector=projector,
            scale=1.0,
            rule=rule,
            plain_rule=rule,
            seed=seed,
            refresh=refresh,
        )
        self.check_fixed(
            dict(
                refresh=refresh,
                rank=rank,
                kappa=kappa,
                beta1=beta1,
                proj_type=proj_type,
                weight_decay=0.0,
                projection_rng=projection_rng,
                seed=seed,
            )
        )
