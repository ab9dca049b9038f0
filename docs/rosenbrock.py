"""MicroAdam's Figure 1 (Modoranu et al. 2024): Adam, Top-K Adam and Top-K Adam with error
feedback on the Rosenbrock function f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 from (-1/2, 1).

Top-K keeps the k = 1 larger of the two coordinates of the (error-corrected) gradient and Adam
runs on that sparse vector: the paper's compress-then-Adam algorithm with dense moments and an
uncompressed error buffer (in 2-D MicroAdam's 4-bit min/max error quantizer is exact anyway).
Without error feedback the dropped coordinate is lost: from the start only y is selected, the
path drops straight down, 0.25 away from Adam's; with error feedback x's dropped gradient
accumulates until it wins the selection, and the path stays within 0.035 of Adam's.
`tests/test_rosenbrock.py` asserts both the distance from Adam's path and the final distance
to the minimum; `docs/optimizers.md` (MicroAdam) states the numbers and their limits.

    python docs/rosenbrock.py      # writes docs/rosenbrock.png, prints the distances
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

START = (-0.5, 1.0)
MINIMUM = (1.0, 1.0)
LR = 0.03
STEPS = 3000
METHODS = ("adam", "topk", "topk_ef")
LABELS = {"adam": "Adam", "topk": "Top-K Adam (k=1)", "topk_ef": "Top-K Adam + error feedback"}


def gradient(x: float, y: float) -> tuple[float, float]:
    return -2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)


def top1(a: tuple[float, float]) -> tuple[float, float]:
    """Keep the coordinate of larger magnitude (the first on a tie), zero the other."""
    return (a[0], 0.0) if abs(a[0]) >= abs(a[1]) else (0.0, a[1])


def run(
    method: str,
    steps: int = STEPS,
    lr: float = LR,
    start: tuple[float, float] = START,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.Tensor:
    """The iterates x_0 .. x_steps, (steps + 1) x 2, float64 (scalar Python arithmetic)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: use one of {METHODS}")
    b1, b2 = betas
    p, m, v, error = list(start), [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
    path = [tuple(p)]
    for t in range(1, steps + 1):
        g = gradient(*p)
        if method == "topk":
            g = top1(g)
        elif method == "topk_ef":
            a = (g[0] + error[0], g[1] + error[1])
            g = top1(a)
            error = [a[0] - g[0], a[1] - g[1]]
        for i in range(2):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
            p[i] -= lr * (m[i] / (1 - b1**t)) / (math.sqrt(v[i] / (1 - b2**t)) + eps)
        path.append(tuple(p))
    return torch.tensor(path, dtype=torch.float64)


def final_distances(paths: dict[str, torch.Tensor]) -> dict[str, float]:
    """Distance of each method's last iterate to the minimum (1, 1)."""
    target = torch.tensor(MINIMUM, dtype=torch.float64)
    return {k: float((path[-1] - target).norm()) for k, path in paths.items()}


def deviation_from_adam(paths: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per iterate, its distance to the nearest point of Adam's path.

    Geometric, not step-matched: a method that follows Adam's path more slowly still tracks it.
    """
    adam = paths["adam"]
    return {k: torch.cdist(p, adam).min(dim=1).values for k, p in paths.items() if k != "adam"}


def plot(paths: dict[str, torch.Tensor], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = torch.linspace(-1.5, 1.5, 300, dtype=torch.float64)
    ys = torch.linspace(-0.5, 1.5, 300, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    f = (1 - gx) ** 2 + 100 * (gy - gx**2) ** 2
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    ax.contour(gx, gy, torch.log10(f + 1e-3), levels=25, cmap="Greys", linewidths=0.6)
    for name, path in paths.items():
        ax.plot(path[:, 0], path[:, 1], lw=1.3, label=LABELS[name])
    ax.plot(*START, "ko", ms=5, label=f"start {START}")
    ax.plot(*MINIMUM, "r*", ms=12, label="minimum (1, 1)")
    ax.set(xlabel="x", ylabel="y", title=f"Rosenbrock, lr {LR}, {len(paths['adam']) - 1} steps")
    ax.legend(fontsize=8, loc="lower right")
    for name, dev in deviation_from_adam(paths).items():
        ax2.semilogy(
            dev.clamp_min(1e-6), lw=1.1, label=LABELS[name], color="C1" if name == "topk" else "C2"
        )
    ax2.set(xlabel="step", ylabel="distance to Adam's path", title="Tracking Adam's path")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("rosenbrock.png"))
    ap.add_argument("--steps", type=int, default=STEPS)
    args = ap.parse_args(argv)
    paths = {name: run(name, args.steps) for name in METHODS}
    final = final_distances(paths)
    deviation = deviation_from_adam(paths)
    for name in METHODS:
        far = f"{float(deviation[name].max()):.3f}" if name in deviation else "-"
        print(f"{LABELS[name]:<28} to (1, 1): {final[name]:.4f}   max from Adam's path: {far}")
    print(f"plot: {plot(paths, args.out)}")


if __name__ == "__main__":
    main()
