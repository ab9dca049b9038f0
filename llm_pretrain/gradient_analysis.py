"""``trainer.gradient_analysis_every=N``: the low-rank structure every method here relies on,
measured on the run's own gradients (Backward Lens's premise, llm_pretrain/lens.py, at batch
scale).

Every N steps, after backward and before the update, for each targeted matrix (the optimizer's
projected ones; every 2-D weight of the decoder blocks for a full-rank optimizer), from the
gradient's singular values:
- ``rank``: its numerical rank (singular values above sigma_max * max(m, n) * fp32 eps), against
  ``bound`` = min(m, n, the step's predicted tokens): a gradient is a sum of one outer product
  per token;
- ``k90``: how many directions hold 90% of its energy (squared Frobenius norm);
- ``energy_best_r``: the share of its energy in the best rank-r subspace (r: the optimizer's
  rank for it), the most any rank-r projection could keep;
- ``energy_subspace``: the share the optimizer's current basis keeps, ||P^T G||^2 / ||G||^2
  (projectors with an orthonormal basis: the GaLore family, COAP, I3S, OSD, GRASS...; the basis
  is the one before this step's refresh, if one is due).
And, whenever a matrix's basis changes (checked after every step, by identity: a refresh
assigns a new tensor), Q-GaLore's statistic |cos(new top-1 vector, previous top-1 vector)| and
the subspace overlap ||P_old^T P_new||_F^2 / r (1: the same subspace), averaged over the
refreshes since the last analysis step.

Logged to ``metrics.jsonl`` (and wandb) as ``grad/<matrix>/<stat>`` and the means over matrices
``grad/<stat>_mean``. The time it takes is the ``gradient_analysis`` phase in the summary's
timing, apart from the step's phases. The gradient must be whole on rank 0: per-layer updates
(consumed in backward) and FSDP2 (sharded) are refused. The previous bases are kept on the CPU,
so the device pays no extra memory.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field

import torch

from llm_pretrain.model import Llama

STATS = ("rank", "bound", "k90", "energy_best_r", "energy_subspace")


def check_supported(every: int, per_layer_update: bool, sharded: bool) -> None:
    if every and per_layer_update:
        raise ValueError(
            "trainer.gradient_analysis_every needs the step's whole gradients, which "
            "trainer.per_layer_update=true consumes during backward; set one of them off"
        )
    if every and sharded:
        raise ValueError(
            "trainer.gradient_analysis_every needs whole gradients on one rank; with "
            "trainer.parallelism=fsdp they are sharded (use ddp for the analysis run)"
        )


def subspace_parts(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers inside ``optimizer`` that hold projectors (a composite's parts too)."""
    parts = getattr(optimizer, "parts", None)
    if isinstance(parts, dict):
        return [q for opt in parts.values() for q in subspace_parts(opt)]
    return [optimizer] if hasattr(optimizer, "projector_for") else []


def singular_values(g: torch.Tensor) -> torch.Tensor:
    """``svdvals``, on the CPU with one thread: LAPACK's threaded SVD of these small matrices
    is no faster on 2 cores and, when other work shares them, 50 to 100 times slower (measured:
    benchmarks/gradient_analysis_cost.py)."""
    if g.device.type != "cpu":
        return torch.linalg.svdvals(g)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.svdvals(g)
    finally:
        torch.set_num_threads(threads)


def spectrum_stats(grad: torch.Tensor, tokens: float, r: int | None) -> dict[str, float]:
    """Rank, bound, k90 and best-rank-r energy of one gradient, from its singular values."""
    g = grad.detach().float()
    sigma = singular_values(g)
    m, n = g.shape
    energy = sigma.square()
    total = float(energy.sum())
    tol = float(sigma[0]) * max(m, n) * torch.finfo(torch.float32).eps if sigma.numel() else 0.0
    out = {
        "rank": int((sigma > tol).sum()),
        "bound": int(min(m, n, tokens)),
    }
    if total > 0:
        cumulative = energy.cumsum(0) / total
        out["k90"] = int((cumulative < 0.9).sum()) + 1
        if r is not None:
            out["energy_best_r"] = float(cumulative[min(r, len(cumulative)) - 1])
    return out


LEFT, RIGHT = 0, 1  # (optimizers/projectors/svd.py's sides)


def basis_matrix(state: dict) -> torch.Tensor | None:
    """A one-sided basis as columns (m x r on the left, n x r on the right), or None (no
    basis yet, a two-sided or coded one)."""
    basis, side = state.get("basis"), state.get("side")
    if not isinstance(basis, torch.Tensor) or basis.dim() != 2 or side not in (LEFT, RIGHT):
        return None
    if not basis.is_floating_point():
        return None
    return basis if side == LEFT else basis.T


def subspace_energy(grad: torch.Tensor, basis: torch.Tensor, side: int) -> float | None:
    """||P^T G||^2 / ||G||^2 for orthonormal columns P (None when P is not orthonormal, e.g.
    Flora's or APOLLO's scaled Gaussian draws, where the ratio is no projection's share)."""
    b = basis.float()
    eye = torch.eye(b.shape[1], device=b.device)
    if (b.T @ b - eye).abs().max() > 1e-3:
        return None
    g = grad.detach().float()
    total = float(g.square().sum())
    if total == 0:
        return None
    low = b.T @ g if side == LEFT else g @ b
    return float(low.square().sum()) / total


@dataclass
class GradientAnalysis:
    """Measures the targeted matrices' gradients every ``every`` steps (module docstring)."""

    model: Llama
    optimizer: torch.optim.Optimizer
    every: int
    names: dict[torch.Tensor, str] = field(default_factory=dict)
    _last_basis: dict[int, tuple[weakref.ref, torch.Tensor]] = field(default_factory=dict)
    _changes: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        named = {p: n for n, p in self.model.named_parameters()}
        self.parts = subspace_parts(self.optimizer)
        projected = [
            p
            for opt in self.parts
            for g in opt.param_groups
            if g.get("projected")
            for p in g["params"]
        ]
        if not projected:  # a full-rank method: every matrix of the decoder blocks
            projected = [p for p in self.model.model.layers.parameters() if p.dim() == 2]
        self.names = {
            p: named.get(p, f"param{i}").removeprefix("model.") for i, p in enumerate(projected)
        }

    def due(self, step: int) -> bool:
        """Step ``step`` (1-based) is measured."""
        return self.every > 0 and step % self.every == 0

    def _state(self, p: torch.Tensor) -> tuple[dict, object] | None:
        for opt in self.parts:
            if p in opt.state:
                return opt.state[p], opt.projector_for(p)
        return None

    def measure(self, tokens: float) -> dict[str, float]:
        """The statistics of this step's gradients (call after backward, before the update)."""
        record: dict[str, float] = {}
        sums: dict[str, list[float]] = {}
        for p, name in self.names.items():
            if p.grad is None:
                continue
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            found = self._state(p)
            basis = basis_matrix(found[0]) if found else None
            stats = spectrum_stats(grad, tokens, basis.shape[1] if basis is not None else None)
            if basis is not None:
                share = subspace_energy(grad, basis, found[0]["side"])
                if share is not None:
                    stats["energy_subspace"] = share
            for k, v in stats.items():
                record[f"grad/{name}/{k}"] = v
                sums.setdefault(k, []).append(v)
        for k, values in sums.items():
            record[f"grad/{k}_mean"] = sum(values) / len(values)
        if self._changes:
            cos, overlap = zip(*self._changes, strict=True)
            record["grad/basis_top1_cos_mean"] = sum(cos) / len(cos)
            record["grad/basis_overlap_mean"] = sum(overlap) / len(overlap)
            record["grad/basis_changes"] = len(self._changes)
            self._changes = []
        return record

    @torch.no_grad()
    def observe_bases(self) -> None:
        """After each update: a matrix whose basis is a new tensor was refreshed; compare it
        with the previous one (kept on the CPU)."""
        for p in self.names:
            found = self._state(p)
            basis = basis_matrix(found[0]) if found else None
            if basis is None:
                continue
            key, current = id(p), found[0]["basis"]
            last = self._last_basis.get(key)
            if last is not None and last[0]() is current:  # (dead or another: refreshed)
                continue
            if last is not None and last[1].shape == basis.shape:
                old = last[1].to(basis.device, torch.float32)
                new = basis.float()
                top = torch.dot(old[:, 0], new[:, 0]) / (
                    old[:, 0].norm() * new[:, 0].norm()
                ).clamp_min(1e-30)
                overlap = float((old.T @ new).square().sum()) / new.shape[1]
                self._changes.append((abs(float(top)), overlap))
            self._last_basis[key] = (weakref.ref(current), basis.detach().float().cpu())


# ---------------------------------------------------------------------------------- the plot
def read_records(run_dir) -> list[dict]:
    """The analysis rows of a run's ``metrics.jsonl``."""
    from pathlib import Path

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (give a run directory)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "grad/rank_mean" in r]
    if not rows:
        raise ValueError(f"{path} has no grad/* rows: train with trainer.gradient_analysis_every=N")
    return rows


def plot(rows: list[dict], path, title: str = "") -> None:
    """Rank against its bound, the energy shares, k90 and the change of bases over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    ax.plot(steps, [r["grad/rank_mean"] for r in rows], label="numerical rank")
    ax.plot(steps, [r["grad/bound_mean"] for r in rows], "--", label="bound min(m, n, tokens)")
    ax.plot(steps, [r["grad/k90_mean"] for r in rows], label="directions for 90% energy")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("gradient rank (mean over matrices)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    for key, label in (
        ("grad/energy_best_r_mean", "best rank-r subspace"),
        ("grad/energy_subspace_mean", "the optimizer's current subspace"),
    ):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=label)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_title("share of gradient energy (mean)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[2]
    for key, label in (
        ("grad/basis_overlap_mean", "overlap ||P_old^T P_new||^2 / r"),
        ("grad/basis_top1_cos_mean", "|cos| of top-1 vectors (Q-GaLore)"),
    ):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_title("successive bases at refreshes (mean)", fontsize=9)
    ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """``python -m llm_pretrain.gradient_analysis RUN_DIR [--plot PNG]``: the run's analysis
    over steps as a table of means, and a plot."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument(
        "--plot", default=None, help="PNG path (default: RUN_DIR/gradient_analysis.png)"
    )
    args = ap.parse_args(argv)
    try:
        rows = read_records(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    keys = ["rank", "bound", "k90", "energy_best_r", "energy_subspace"]
    print("| step | " + " | ".join(keys) + " | basis overlap | top-1 cos |")
    print("| ---: |" + " ---: |" * (len(keys) + 2))
    for r in rows:
        cells = [r.get(f"grad/{k}_mean") for k in keys]
        cells += [r.get("grad/basis_overlap_mean"), r.get("grad/basis_top1_cos_mean")]
        print(
            f"| {r['step']} | " + " | ".join("" if c is None else f"{c:.3g}" for c in cells) + " |"
        )
    from pathlib import Path

    out = Path(args.plot or Path(args.run_dir) / "gradient_analysis.png")
    plot(rows, out, title=str(args.run_dir))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
