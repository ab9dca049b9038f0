"""The layer-sampling methods: LISA, BAdam and OwLore (GUM, which also samples layers, is a
low-rank method in ``low_rank``).

``layers`` are the decoder blocks (``groups.decoder_layers(model)``), each a module or a list of
its parameters; parameters outside them (embeddings, lm_head, the final norm) always train.
Freezing the inactive layers is model surgery, so it is an explicit call: ``opt.attach()`` once
before training (``opt.detach()`` undoes it); these methods refuse to step without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from llmpt.optimizers.distributed import replicated_world
from llmpt.optimizers.low_rank import svd_engine
from llmpt.optimizers.rules import AdamRule
from llmpt.optimizers.sampling import LayerSampler, OutlierWeights
from llmpt.optimizers.subspace import Sampling, SubspaceOptimizer, as_groups, layer_units

Betas = tuple[float, float]


def layer_sampler(
    n_layers: int, active_layers: int, interval: int, order: str, seed: int
) -> LayerSampler:
    if not 1 <= active_layers <= n_layers:
        raise ValueError(
            f"active_layers={active_layers} must lie in [1, {n_layers}] (the model has "
            f"{n_layers} decoder layers)"
        )
    return LayerSampler(n_layers, active_layers, interval, order, seed)


def _all_params(groups: list[dict]) -> list:
    return [p for g in groups for p in g["params"]]


class Lisa(SubspaceOptimizer):
    """LISA (Pan et al. 2024): full AdamW (torch's arithmetic) on ``active_layers`` decoder
    layers drawn every ``interval`` steps (``sampling_order``), the others frozen and their
    state freed. LMFlow's defaults (2 layers, 20 steps); LISA has no C4 recipe, so lr is our
    AdamW baseline's."""

    reset_active = False

    def __init__(
        self,
        params: Iterable,
        layers: Sequence[nn.Module | Iterable],
        lr: float = 3e-3,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        active_layers: int = 2,
        interval: int = 20,
        sampling_order: str = "uniform",
        seed: int = 0,
    ) -> None:
        if sampling_order == "weighted":
            raise ValueError("sampling_order=weighted needs OwLore's outlier scores: use OwLore")
        groups = as_groups(params)
        units = layer_units(layers, _all_params(groups))
        sampling = Sampling(
            layer_sampler(len(units), active_layers, interval, sampling_order, seed),
            units,
            inactive_mode="frozen",
            reset_active=self.reset_active,
            freeze_grads=not replicated_world(),
        )
        super().__init__(
            groups,
            lr,
            betas,
            eps,
            weight_decay,
            rule=AdamRule("torch"),
            decay_first=True,
            sampling=sampling,
            seed=seed,
        )
        self.check_fixed(dict(active_layers=active_layers, interval=interval, seed=seed))


class BAdam(Lisa):
    """BAdam (Luo et al. 2024): block coordinate Adam, ``active_layers`` layers at a time for
    ``interval`` steps, every state cleared at a switch (``shuffled``: BAdam's random order, a new
    permutation each epoch)."""

    reset_active = True

    def __init__(
        self,
        params: Iterable,
        layers: Sequence[nn.Module | Iterable],
        lr: float = 3e-3,
        betas: Betas = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        active_layers: int = 1,
        interval: int = 50,
        sampling_order: str = "shuffled",
        seed: int = 0,
    ) -> None:
        super().__init__(
            params,
            layers,
            lr,
            betas,
            eps,
            weight_decay,
            active_layers,
            interval,
            sampling_order,
            seed,
        )


class OwLore(SubspaceOptimizer):
    """OwLore (Li et al. 2024): GaLore on the active decoder layers, drawn with probabilities
    from their outlier ratio (``sampling_order="weighted"``; ``uniform``: LISA's draw); inactive
    layers are frozen and their state freed. ``layers`` must be modules here: the outlier
    statistics hook their linears (``attach``)."""

    def __init__(
        self,
        params: Iterable,
        layers: Sequence[nn.Module],
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
        active_layers: int = 2,
        interval: int = 200,
        outlier_ratio: float = 13.0,
        sampling_order: str = "weighted",
        seed: int = 0,
    ) -> None:
        if sampling_order not in ("weighted", "uniform"):
            raise ValueError(f"sampling_order={sampling_order!r}: use weighted or uniform")
        layers = list(layers)
        if not all(isinstance(layer, nn.Module) for layer in layers):
            raise TypeError("OwLore's layers must be modules: its statistics hook their linears")
        groups = as_groups(params)
        outliers = OutlierWeights(layers, outlier_ratio)
        weighted = sampling_order == "weighted"
        units = layer_units(layers, _all_params(groups))
        sampling = Sampling(
            layer_sampler(len(units), active_layers, interval, sampling_order, seed),
            units,
            inactive_mode="frozen",
            freeze_grads=not replicated_world(),
            weights=outliers.weights if weighted else None,
            collect=outliers.collect if weighted else None,
            attach=outliers.attach if weighted else None,
            detach=outliers.detach if weighted else None,
        )
        super().__init__(
            groups,
            lr,
            betas,
            eps,
            weight_decay,
            scale=scale,
            **svd_engine(rank, update_gap, proj_type, svd_backend, svd_power_iters, refresh_phase),
            sampling=sampling,
            seed=seed,
        )
        self.check_fixed(dict(active_layers=active_layers, interval=interval, seed=seed))
        self.outliers = outliers if weighted else None

    @torch.no_grad()
    def calibrate(self, forward: Callable[[], object]) -> torch.Tensor | None:
        """OWL's calibration, for fine-tuning a trained model: ``forward()`` runs the model on
        calibration rows (every rank, the same number of times); the outlier ratios of the
        loaded weights with those inputs replace the uniform draw of the first period. Call
        after ``attach()`` and before the first step. Returns the layer probabilities (None
        for ``sampling_order="uniform"``)."""
        if self.outliers is None:
            return None
        if not self._attached:
            raise RuntimeError("call optimizer.attach() before calibrate(): it hooks the linears")
        if self._steps:
            raise RuntimeError("calibrate() draws the first period's layers: call it before step")
        self.outliers.calibrating = True
        try:
            forward()
        finally:
            self.outliers.calibrating = False
        weights = self.outliers.weights()
        self._active = set(self.sampling.sampler.choose(0, weights))
        self.apply_freeze()
        return weights
