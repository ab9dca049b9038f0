"""WeLore (Jaiswal et al., ICML 2025; spec finetune-and-lens.md 4, compressed-state.md 4):
one-shot, non-uniform low-rank compression from the heavy tail of each matrix's singular values,
then fine-tuning of the low-rank parts only (WeLore-PEFT).

Compression (``plan`` + ``compress``), per targeted matrix W (m x n):

1. its fp32 singular values s, min-max normalised: s^ = (s - min s) / (max s - min s);
2. one global threshold tau for all matrices; a matrix drops its #{s^ < tau} smallest values.
   The code hard-codes tau per target for 7B/13B (a table that does not transfer to other
   sizes); here tau is searched so that the dropped values are ``err`` (the effective rank
   reduction) of all targeted singular values, to one value;
3. a matrix whose dropped share exceeds ``min_ratio`` becomes a low-rank component (LRC): two
   trainable factors B = U_k sqrt(S_k) (m x k) and A = sqrt(S_k) V_k^T (k x n), y = B (A x),
   provided this stores fewer values than W (k < mn / (m + n); the reference never checks, and
   with its min_ratio 0 a matrix losing 10% of its rank is factorised into more parameters than
   it had); every other targeted matrix stays dense and frozen (N-LRC).

Fine-tuning trains the LRC factors and the 1-D parameters (norms, biases) only; embeddings, the
head and the N-LRCs are frozen (``compress`` freezes them; ``uncompress`` folds B A back into
plain linears and unfreezes, for export). ``WeLore`` is AdamW over what is left trainable.
``plan(..., uniform=True)`` drops the same share of every matrix instead: the paper's uniform
baseline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmpt.optimizers.groups import targeted_linears


# ---------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Which targeted matrices become LRCs, at which rank (``ranks``), and the rest (dense)."""

    err: float  # the target: the share of all targeted singular values to drop
    tau: float | None  # the global threshold on normalised singular values (None: uniform)
    ranks: dict[str, int]  # LRC module name -> k
    dense: list[str]  # N-LRCs: kept dense and frozen
    dropped: dict[str, int]  # per matrix: singular values under tau
    sizes: dict[str, int]  # per matrix: min(m, n)
    no_saving: list[str] = field(default_factory=list)  # over min_ratio, but k(m+n) >= mn

    @property
    def attempted(self) -> float:
        """Dropped values over all targeted singular values (the code's 'attempted' ratio)."""
        return sum(self.dropped.values()) / max(1, sum(self.sizes.values()))

    @property
    def achieved(self) -> float:
        """The rank actually removed: the LRCs' dropped values over all singular values."""
        return sum(self.dropped[n] for n in self.ranks) / max(1, sum(self.sizes.values()))

    def describe(self) -> str:
        tau = "uniform" if self.tau is None else f"tau {self.tau:.4f}"
        return (
            f"WeLore at ERR {self.err:.0%} ({tau}): {len(self.ranks)} low-rank components, "
            f"{len(self.dense)} dense and frozen; rank reduction {self.attempted:.1%} attempted, "
            f"{self.achieved:.1%} achieved"
            + (f"; {len(self.no_saving)} kept dense as no saving" if self.no_saving else "")
        )


def normalized(s: torch.Tensor) -> torch.Tensor:
    """(s - min) / (max - min); a flat spectrum has no tail: all ones (nothing is dropped)."""
    s = s.double()
    span = s.max() - s.min()
    return torch.ones_like(s) if span <= 0 else (s - s.min()) / span


def spectra(model: nn.Module, targets: Sequence[str]) -> dict[str, torch.Tensor]:
    """The fp32 singular values of every targeted linear's weight, descending, by module name."""
    found = [(n, m) for n, m in targeted_linears(model, targets) if type(m) is nn.Linear]
    if not found:
        raise ValueError(
            f"target_modules={list(targets)} matches no nn.Linear of the model; use substrings "
            "of its module names (e.g. attn, mlp)"
        )
    out = {}
    for name, m in found:
        if m.weight.is_meta:
            raise ValueError(
                "ranks=None and the model has no weights (the meta device): WeLore's ranks come "
                "from the weights' singular values; compress a real model first and pass the "
                "ranks it chose (a training run records them in its config.yaml)"
            )
        out[name] = torch.linalg.svdvals(m.weight.detach().float()).cpu()
    return out


def plan(
    spectra: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, int]],
    err: float,
    min_ratio: float = 0.5,
    uniform: bool = False,
    require_saving: bool = True,
) -> Plan:
    """Choose tau (or, ``uniform``, one share for all) so that ``err`` of the singular values
    are dropped, and each matrix's fate (LRC at rank k, or dense). ``require_saving=False``
    keeps as LRCs the matrices whose factors would not save memory too (still listed in
    ``no_saving``): the paper's compression-only evaluation, which truncates them all."""
    if not 0.0 < err < 1.0:
        raise ValueError(f"err={err} must lie in (0, 1): the share of singular values to drop")
    if not 0.0 <= min_ratio < 1.0:
        raise ValueError(f"min_ratio={min_ratio} must lie in [0, 1)")
    sizes = {n: s.numel() for n, s in spectra.items()}
    tau = None
    if uniform:
        dropped = {n: min(size - 1, round(err * size)) for n, size in sizes.items()}
    else:
        values = torch.cat([normalized(s) for s in spectra.values()]).sort().values
        cut = min(len(values) - 1, round(err * len(values)))
        # the smallest tau with exactly `cut` values under it (ties move it by one value)
        tau = float(values[cut])
        dropped = {n: int((normalized(s) < tau).sum()) for n, s in spectra.items()}
    ranks, dense, no_saving = {}, [], []
    for name, size in sizes.items():
        m, n = shapes[name]
        k = size - dropped[name]
        if dropped[name] / size > min_ratio and k >= 1:
            saves = k * (m + n) < m * n
            if not saves:
                no_saving.append(name)
            if saves or not require_saving:
                ranks[name] = k
                continue
        dense.append(name)
    return Plan(err, tau, ranks, dense, dropped, sizes, no_saving)


# ---------------------------------------------------------------------------------- modules
class LowRankLinear(nn.Module):
    """y = B (A x) + bias: a compressed linear, A (``weight_a``, k x in) and B (``weight_b``,
    out x k), both trainable."""

    def __init__(self, linear: nn.Linear, rank: int) -> None:
        super().__init__()
        w = linear.weight
        self.in_features, self.out_features, self.rank = w.shape[1], w.shape[0], rank
        if not 1 <= rank <= min(w.shape):
            raise ValueError(f"rank {rank} for a {tuple(w.shape)} matrix: must lie in [1, min]")
        a = torch.empty(rank, w.shape[1], dtype=w.dtype, device=w.device)
        b = torch.empty(w.shape[0], rank, dtype=w.dtype, device=w.device)
        if not w.is_meta:  # the truncated SVD, sqrt(S) on each side
            with torch.no_grad():
                u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
                root = s[:rank].sqrt()
                a.copy_(root[:, None] * vh[:rank])
                b.copy_(u[:, :rank] * root)
        self.weight_a, self.weight_b = nn.Parameter(a), nn.Parameter(b)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_a), self.weight_b, self.bias)

    def folded(self) -> nn.Linear:
        out = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight_a.device,
            dtype=self.weight_a.dtype,
        )
        with torch.no_grad():
            out.weight.copy_((self.weight_b.float() @ self.weight_a.float()).to(out.weight.dtype))
        if self.bias is not None:
            out.bias = self.bias
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def compress(
    model: nn.Module,
    targets: Sequence[str],
    err: float = 0.5,
    min_ratio: float = 0.5,
    ranks: dict[str, int] | None = None,
) -> tuple[list[LowRankLinear], Plan | None]:
    """WeLore's surgery, in place: the plan's LRCs become ``LowRankLinear`` (from the truncated
    SVD of their weights), every other 2-D parameter is frozen (the N-LRCs, embeddings, head),
    1-D ones (norms, biases) stay trainable. ``ranks`` (module name -> k) gives the LRCs and
    their ranks instead of a new plan (a resumed or exported run, or a ``meta`` model); then
    the returned plan is None. Linears already compressed are kept. Returns the LRCs in module
    order and the plan."""
    done = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    chosen = None
    if ranks is None:
        if done:
            raise ValueError(
                "the model is already compressed: pass the ranks it was compressed with"
            )
        found = spectra(model, targets)
        shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in found}
        chosen = plan(found, shapes, err, min_ratio)
        ranks = chosen.ranks
    else:
        ranks = {str(n): int(k) for n, k in ranks.items()}
        plain = {n: m for n, m in targeted_linears(model, targets) if type(m) is nn.Linear}
        unknown = sorted(set(ranks) - set(plain) - set(done))
        if unknown:
            raise ValueError(
                f"ranks names {unknown[:3]}, which are not targeted linears of this model "
                "(target_modules, or a model of other shapes)"
            )
    for name, k in ranks.items():
        if name not in done:
            _set(model, name, LowRankLinear(model.get_submodule(name), k))
    lrcs = [m for _, m in model.named_modules() if isinstance(m, LowRankLinear)]
    factors = {id(p) for m in lrcs for p in (m.weight_a, m.weight_b)}
    for p in model.parameters():
        if p.dim() >= 2 and id(p) not in factors and p.requires_grad:
            p.requires_grad_(False)
            p.frozen_by_welore = True
    return lrcs, chosen


def uncompress(model: nn.Module) -> nn.Module:
    """Fold every ``LowRankLinear`` into a plain ``nn.Linear`` (W = B A) and unfreeze what
    ``compress`` froze, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            _set(model, name, module.folded())
    for p in model.parameters():
        if getattr(p, "frozen_by_welore", False):
            p.requires_grad_(True)
            p.frozen_by_welore = False
    return model


def low_rank_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters()]


# ---------------------------------------------------------------------------------- optimizer
class WeLore(torch.optim.AdamW):
    """WeLore-PEFT: AdamW on the low-rank components' factors and the 1-D parameters left
    trainable by ``compress`` (``linears``: the LRCs it returned). Defaults: the downstream
    fine-tuning recipe (lr 1e-4; the continual C4 recipe uses 5e-5), no weight decay."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        linears: Sequence[LowRankLinear],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        params = list(params)
        held = {id(p) for p in params if isinstance(p, torch.Tensor)}
        held |= {id(q) for g in params if isinstance(g, dict) for q in g["params"]}
        factors = [p for m in linears for p in (m.weight_a, m.weight_b)]
        if not linears:
            raise ValueError(
                "linears is empty: no matrix became a low-rank component (lower min_ratio, "
                "raise err, or check target_modules); WeLore fine-tunes only those"
            )
        if any(id(p) not in held for p in factors):
            raise ValueError(
                "a low-rank component's factor is not in params: build the optimizer on the "
                "parameters compress() left trainable"
            )
        if any(p.dim() >= 2 and id(p) not in {id(f) for f in factors} for p in params
               if isinstance(p, torch.Tensor)):  # fmt: skip
            raise ValueError(
                "params holds a 2-D tensor that is not a low-rank factor: WeLore trains the "
                "factors and the 1-D parameters only (compress() freezes the rest)"
            )
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.linears = list(linears)
        self.plan: Plan | None = None  # set by whoever compressed (for the start-up log)

    def projection_report(self) -> str:
        ranks = [m.rank for m in self.linears]
        base = (
            f"{len(ranks)} low-rank components (rank {min(ranks)}-{max(ranks)}, "
            f"{sum(p.numel() for m in self.linears for p in m.parameters()) / 1e6:.2f}M values)"
        )
        return f"{self.plan.describe()}; {base}" if self.plan is not None else base


def parameter_count(plan: Plan, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Targeted values before and after compression (LRCs at k(m + n), the rest dense, as is a
    truncated matrix whose factors would not save memory)."""
    before = sum(math.prod(s) for s in shapes.values())
    after = sum(
        min(plan.ranks[n] * sum(shapes[n]), math.prod(shapes[n]))
        if n in plan.ranks
        else math.prod(shapes[n])
        for n in shapes
    )
    return {"before": before, "after": after}
