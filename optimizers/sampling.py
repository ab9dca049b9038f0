"""Layer sampling: which units (decoder layers, or single matrices) are active in each period
of ``interval`` optimizer steps. One component for LISA (uniform), OwLore (outlier-weighted),
BAdam and FRUGAL's block mode (ordered cycling) and GUM (uniform, with importance weights).

The choice for a period is a pure function of (seed, period) for every order but ``weighted``,
so every DDP rank draws the same set and a resumed run redraws it; ``weighted`` depends on the
model's weights and activations at the end of the previous period, so the optimizer stores the
active set in its state dict.

What an optimizer does with active and inactive units is its own policy (see
``optimizers.subspace.Sampling``); unlike the LISA and OwLore references, the state of a unit is
freed when it is deactivated, so state memory stays bounded by the active units.
"""

from __future__ import annotations

import torch
from torch import nn

from llmpt.optimizers.distributed import all_reduce_sum, full_tensor

ORDERS = ("uniform", "weighted", "shuffled", "ascending", "descending", "mirror")


class LayerSampler:
    def __init__(
        self,
        n_units: int,
        n_active: int,
        interval: int,
        order: str,
        seed: int,
        keys: tuple[str, str] = ("interval", "sampling_order"),
    ) -> None:
        """``keys``: the config keys of ``interval`` and ``order`` in the caller's method, for
        error messages."""
        interval_key, order_key = keys
        if order not in ORDERS:
            raise ValueError(f"{order_key}={order!r}: use one of {', '.join(ORDERS)}")
        if not 0 <= n_active <= n_units:
            raise ValueError(
                f"optimizer: {n_active} active units out of {n_units}; choose between 0 and "
                f"{n_units} (active_layers or density)"
            )
        if order == "shuffled" and n_active and n_units % n_active:
            raise ValueError(
                f"{order_key}=shuffled visits every unit once per epoch in blocks of "
                f"{n_active}: {n_units} units do not split into such blocks"
            )
        if interval <= 0:
            raise ValueError(f"{interval_key}={interval} must be a positive integer")
        if order == "mirror" and (n_active % 2 or n_units % 2):
            raise ValueError(
                f"{order_key}=mirror takes units in pairs from both ends: needs an "
                f"even number of units and of active units, got {n_active} of {n_units}"
            )
        self.n_units, self.n_active, self.interval = n_units, n_active, interval
        self.order, self.seed = order, seed

    def describe(self) -> str:
        return (
            f"{self.n_active} of {self.n_units} units active, {self.order} order, "
            f"switched every {self.interval} steps"
        )

    def choose(self, period: int, weights: torch.Tensor | None = None) -> list[int]:
        """Active unit indices (sorted) for ``period``; ``weights``: sampling probabilities for
        the ``weighted`` order (uniform when None, e.g. before any statistics exist)."""
        n, k = self.n_units, self.n_active
        if k == 0:
            return []
        if self.order in ("uniform", "weighted"):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + period)
            if self.order == "weighted" and weights is not None:
                w = weights.double().cpu()
                heavy = int((w > 0).sum())
                chosen = torch.multinomial(w, min(k, heavy), generator=g).tolist() if heavy else []
                if len(chosen) < k:  # too few layers with outliers: fill the rest uniformly
                    rest = [u for u in torch.randperm(n, generator=g).tolist() if u not in chosen]
                    chosen += rest[: k - len(chosen)]
            else:
                chosen = torch.randperm(n, generator=g)[:k].tolist()
        elif self.order == "shuffled":  # BAdam's "random": a new permutation every epoch
            per_epoch = n // k if k else 1
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + period // per_epoch)
            j = period % per_epoch
            chosen = torch.randperm(n, generator=g)[j * k : (j + 1) * k].tolist()
        elif self.order == "ascending":  # FRUGAL's and BAdam's cycling, from the first unit
            chosen = [(period * k + j) % n for j in range(k)]
        elif self.order == "descending":  # from the last unit down (FRUGAL's scripts)
            start = (n - 1 - period * k) % n
            chosen = [(start - j) % n for j in range(k)]
        else:  # mirror: pairs (i, n-1-i) walking in from both ends
            half = n // 2
            start = period * (k // 2) % half
            chosen = []
            for j in range(k // 2):
                i = (start + j) % half
                chosen += [i, n - 1 - i]
        return sorted(chosen)


class OutlierWeights:
    """OwLore's sampling probabilities (Li et al. 2024, after OWL): for layer l, the fraction of
    its scores A_ij = ||X_j||_2 |W_ij| over all its linears that exceed ``ratio`` times the
    layer's mean score, normalised over layers.

    OWL measures X on calibration data from a pretrained model (``OwLore.calibrate``: the
    first draw of a fine-tuning run). In pretraining there is none, so the input norms ||X_j||
    are also accumulated by forward hooks during the last optimizer step of each period (on the
    current weights) and summed over DDP ranks. When no score exceeds the threshold anywhere
    (typical early in pretraining), the probabilities are uniform.
    """

    def __init__(self, layers: list[nn.Module], ratio: float = 13.0) -> None:
        if ratio <= 0:
            raise ValueError(f"outlier_ratio={ratio} must be positive")
        self.ratio = ratio
        self.collecting = False
        self.calibrating = False  # OwLore.calibrate(): any forward counts
        self.sq: dict[nn.Linear, torch.Tensor] = {}
        self.linears = [
            [m for m in layer.modules() if isinstance(m, nn.Linear)] for layer in layers
        ]
        self.handles: list = []

    def attach(self) -> None:
        """Hook every linear of the sampled layers (once)."""
        if not self.handles:
            for m in (m for layer in self.linears for m in layer):
                self.handles.append(m.register_forward_pre_hook(self._record))

    def detach(self) -> None:
        """Remove the hooks and forget the statistics."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.sq.clear()

    def collect(self, on: bool) -> None:
        self.collecting = on

    def _record(self, module: nn.Linear, args) -> None:
        training = self.collecting and module.training and torch.is_grad_enabled()
        if not (training or self.calibrating):
            return  # only training forwards: not evaluation or memory probes
        x = args[0].detach().float()
        sq = x.pow(2).reshape(-1, x.shape[-1]).sum(0)
        self.sq[module] = self.sq[module] + sq if module in self.sq else sq

    def weights(self) -> torch.Tensor | None:
        """Probabilities per layer from the statistics collected since the last call, or None
        if nothing was collected."""
        if not self.sq:
            return None
        mods = [m for layer in self.linears for m in layer]
        stats = [
            self.sq.get(m, m.weight.new_zeros(m.in_features, dtype=torch.float32)) for m in mods
        ]
        flat = torch.cat(stats)
        all_reduce_sum(flat)  # the same probabilities on every rank
        norms = iter(torch.split(flat.sqrt(), [m.in_features for m in mods]))
        lod = []
        for layer in self.linears:
            scores = torch.cat(
                [
                    (full_tensor(m.weight.detach()).float().abs() * next(norms)).flatten()
                    for m in layer
                ]
            )
            lod.append((scores > self.ratio * scores.mean()).double().mean())
        self.sq.clear()
        lod = torch.stack(lod)
        total = lod.sum()
        return lod / total if total > 0 else torch.full_like(lod, 1.0 / len(lod))
