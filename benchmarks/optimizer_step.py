"""Optimizer step cost on LLaMA-60M shapes, side by side (``make bench-optim``).

The 56 projected matrices of llama_60m (8 layers x q, k, v, o of 512 x 512, gate and up of
1376 x 512, down of 512 x 1376) get fixed random gradients; every method steps them in the same
process. Reported per method: the mean time of a step without a subspace refresh, as a ratio to
``torch.optim.AdamW``; the extra time of a refresh step (all 56 bases at once, as in the
references); the step time with that refresh amortised over ``--gap`` steps; and the state bytes.

    python benchmarks/optimizer_step.py [--family galore|projection|refresh] [--steps 15]
        [--rank 128] [--gap 200]

``--family projection`` times the projection family (APOLLO, APOLLO-Mini, Flora, GRASS, COAP,
DCT-AdamW, OSD, I3S) beside ``apollo-torch``'s APOLLOAdamW; every method keeps its own refresh
schedule there (DCT re-selects at every step, OSD moves its basis at every step, COAP steps it
every 40), so "refresh" is the extra time of step 0 only.

``--family refresh`` (``--steps`` 400 by default) times the steps that follow step 0 (where
every method computes all its first bases), through several refresh intervals, with the
refreshes synchronous (all 56 bases at one step, the references) and staggered (spread over the
interval, ``optimizer.refresh``): the median, 99th percentile and slowest step, each against
AdamW's, and the mean (what throughput sees).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from llm_pretrain import optim as optimizers
from llm_pretrain.config import optimizer_settings

SHAPES = [(512, 512)] * 4 + [(1376, 512)] * 2 + [(512, 1376)]
LAYERS = 8


class Matrices(torch.nn.Module):
    """llama_60m's targeted linears, named so the papers' target rule selects all of them."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mlp = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(s, generator=g) * 0.02)
            for _ in range(LAYERS)
            for s in SHAPES
        )


def _as_linears(model: Matrices) -> torch.nn.Module:
    """Wrap the matrices as nn.Linear modules so ``split_targets`` sees them."""
    root = torch.nn.Module()
    root.mlp = torch.nn.ModuleList()
    for p in model.mlp:
        lin = torch.nn.Linear(p.shape[1], p.shape[0], bias=False, device="meta")
        lin.weight = p
        root.mlp.append(lin)
    return root


def _reference_galore(kind: str, rank: int, gap: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import fira
        import galore_torch

    def build(params):
        group = {"params": params, "rank": rank, "update_proj_gap": gap, "proj_type": "std"}
        if kind == "galore":
            return galore_torch.GaLoreAdamW([group | {"scale": 0.25}], lr=0.01)
        if kind == "galore_8bit":
            return galore_torch.GaLoreAdamW8bit(
                [group | {"scale": 0.25}], lr=0.01, weight_decay=0.0
            )
        return fira.FiraAdamW([group | {"alpha": 0.25}], lr=0.01)

    return build


def _reference_apollo(rank: int, gap: int, mini: bool):
    from apollo_torch import APOLLOAdamW

    def build(params):
        group = {
            "params": params,
            "rank": 1 if mini else rank,
            "update_proj_gap": gap,
            "scale": 128.0 if mini else 1.0,
            "proj_type": "std",
            "proj": "random",
            "scale_type": "tensor" if mini else "channel",
        }
        return APOLLOAdamW([group], lr=0.01, scale_front=mini)

    return build


def _reference_bytes(opt: torch.optim.Optimizer) -> int:
    """State bytes of a reference optimizer, including the basis inside its projector object."""
    total, seen = 0, set()
    for state in opt.state.values():
        tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
        proj = state.get("projector")
        if proj is not None:
            basis = proj.ortho_matrix
            tensors += basis if isinstance(basis, list) else [basis]
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.numel() * t.element_size()  # the view, as a contiguous copy would
    return total


def _matrix_by_matrix(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The engine's per-matrix step (what per-layer updates run) instead of its batched one."""
    opt._batched = False
    return opt


def step_times(
    builds: dict[str, tuple[Callable, Callable]], steps: int
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Build every optimizer, time its first step (step 0: every basis computed), then
    ``steps`` more steps round-robin across methods, rotating the order each round, so that the
    machine's drift (a shared VM) falls on every method alike. Returns each method's step times
    (step 0 first) and its state bytes after the last step."""
    setups = {}
    for label, (build, byte_count) in builds.items():
        model = Matrices()
        params = list(model.mlp)
        grads = [torch.randn_like(p) * 1e-3 for p in params]
        setups[label] = (params, grads, build(model), byte_count)
    times: dict[str, list[float]] = {label: [] for label in setups}
    for round_ in range(steps + 1):  # round 0: every basis is computed, the refresh step
        labels = list(setups)
        labels = labels[round_ % len(labels) :] + labels[: round_ % len(labels)]
        for label in labels:
            params, grads, opt, _ = setups[label]
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            start = time.perf_counter()
            opt.step()
            times[label].append(time.perf_counter() - start)
    return times, {label: count(opt) for label, (_, _, opt, count) in setups.items()}


def measure(
    builds: dict[str, tuple[Callable, Callable]], steps: int, gap: int
) -> dict[str, dict[str, float]]:
    """``step_times``, summarised: the median step, the extra time of step 0 (the refresh) and
    the step with that refresh amortised over ``gap`` steps."""
    times, nbytes = step_times(builds, steps)
    out = {}
    for label, ts in times.items():
        plain = statistics.median(ts[1:])
        refresh = max(ts[0] - plain, 0.0)
        out[label] = {
            "step_s": plain,
            "refresh_s": refresh,
            "amortised_s": plain + refresh / gap,
            "bytes": nbytes[label],
        }
    return out


def percentile(ts: list[float], q: int) -> float:
    """The q-th percentile of ``ts`` (linear interpolation between the closest ranks)."""
    return statistics.quantiles(ts, n=100, method="inclusive")[q - 1]


def refresh_table(rank: int, gap: int, steps: int, svd: str) -> None:
    """Synchronous against staggered refreshes, the steps after step 0: p50, p99 and the slowest
    step against AdamW's, and the mean."""
    sub = dict(rank=rank, update_gap=gap, lr=0.01, scale=0.25, target_modules=["mlp"])
    settings = {"adamw (torch default)": optimizer_settings("adamw", lr=0.01)}
    for backend in svd.split(","):
        for refresh in ("synchronous", "staggered"):
            settings[f"galore ({backend} SVD), {refresh}"] = optimizer_settings(
                "galore", svd_backend=backend, refresh=refresh, **sub
            )
    builds = {
        label: (lambda m, c=cfg: optimizers.build(c, _as_linears(m)), lambda o: 0)
        for label, cfg in settings.items()
    }
    times, _ = step_times(builds, steps)
    stats = {}
    for label, ts in times.items():
        after = ts[1:]
        stats[label] = {
            "p50": percentile(after, 50),
            "p99": percentile(after, 99),
            "max": max(after),
            "mean": statistics.fmean(after),
        }
    base = stats["adamw (torch default)"]
    n = LAYERS * len(SHAPES)
    print(
        f"llama_60m projected matrices: {n} matrices; rank {rank}, refresh every {gap} steps; "
        f"steps 1-{steps} (step 0, every first basis, left out); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(
        "| method | p50 (ms) | p50 / AdamW | p99 (ms) | p99 / AdamW | slowest (ms) | "
        "slowest / AdamW | mean / AdamW |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, m in stats.items():
        print(
            f"| {label} | {m['p50'] * 1e3:.1f} | {m['p50'] / base['p50']:.2f}x | "
            f"{m['p99'] * 1e3:.1f} | {m['p99'] / base['p99']:.2f}x | {m['max'] * 1e3:.0f} | "
            f"{m['max'] / base['max']:.2f}x | {m['mean'] / base['mean']:.2f}x |"
        )


def projection_gemm_seconds(rank: int, repeats: int = 5) -> float:
    """The two GEMMs any rank-r GaLore step must do on these shapes (project, back-project),
    timed alone: the floor under a projected step on this machine."""
    g = torch.Generator().manual_seed(1)
    mats = [torch.randn(s, generator=g) for _ in range(LAYERS) for s in SHAPES]
    bases = [
        torch.randn((rank, n) if m >= n else (m, rank), generator=g)
        for m, n in (t.shape for t in mats)
    ]

    outs = [torch.empty_like(w) for w in mats]

    def once() -> None:
        for w, b, out in zip(mats, bases, outs, strict=True):
            if w.shape[0] >= w.shape[1]:
                torch.mm(w @ b.T, b, out=out)
            else:
                torch.mm(b, b.T @ w, out=out)

    once()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--steps", type=int, help="timed steps after the refresh step (15; refresh: 400)"
    )
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--gap", type=int, default=200, help="refresh interval for amortisation")
    ap.add_argument("--family", choices=("galore", "projection", "refresh"), default="galore")
    ap.add_argument(
        "--svd", default="exact,randomized", help="refresh: the SVD backends to time (comma list)"
    )
    args = ap.parse_args(argv)
    r, gap = args.rank, args.gap
    if args.family == "refresh":
        refresh_table(r, gap, args.steps or 400, args.svd)
        return
    args.steps = args.steps or 15
    if args.steps >= gap:
        raise SystemExit("--steps must be below --gap, so that only step 0 refreshes")
    sub = dict(rank=r, update_gap=gap, lr=0.01, scale=0.25, target_modules=["mlp"])
    ours = {"adamw (torch default)": optimizer_settings("adamw", lr=0.01)}
    references = {}
    if args.family == "galore":
        ours |= {
            "adamw8bit (bitsandbytes)": optimizer_settings("adamw8bit", lr=0.01),
            "galore (ours, exact SVD)": optimizer_settings("galore", **sub),
            "galore (ours, randomized SVD)": optimizer_settings(
                "galore",
                svd_backend="randomized",
                **sub,
            ),
            "galore_8bit (ours)": optimizer_settings("galore_8bit", **sub),
            "fira (ours)": optimizer_settings("fira", **sub),
        }
        for kind, label in (
            ("galore", "galore-torch GaLoreAdamW"),
            ("galore_8bit", "galore-torch GaLoreAdamW8bit"),
            ("fira", "fira FiraAdamW"),
        ):
            references[label] = _reference_galore(kind, r, gap)
    else:
        apollo = dict(rank=r, update_gap=gap, lr=0.01, target_modules=["mlp"])
        mini = dict(apollo, rank=1, scale=128**0.5, scale_type="tensor", scale_front=True)
        ours |= {
            "apollo (ours, P regenerated)": optimizer_settings("apollo", **apollo),
            "apollo (ours, P stored)": optimizer_settings(
                "apollo",
                store_projection=True,
                **apollo,
            ),
            "apollo (ours, P regenerated by philox)": optimizer_settings(
                "apollo",
                projection_rng="philox",
                **apollo,
            ),
            "apollo_mini (ours)": optimizer_settings("apollo_mini", **mini),
            "flora (ours, kappa 1000)": optimizer_settings("flora", rank=r, target_modules=["mlp"]),
            "grass (ours, norm sampling)": optimizer_settings("grass", **sub),
            "coap (ours, T_u 40)": optimizer_settings(
                "coap",
                rank=r,
                lr=0.01,
                scale=0.25,
                target_modules=["mlp"],
            ),
            "dct_adamw (ours, matmul, select every step)": optimizer_settings(
                "dct_adamw",
                rank=r,
                lr=0.01,
                target_modules=["mlp"],
            ),
            "dct_adamw (ours, fft, select every step)": optimizer_settings(
                "dct_adamw",
                rank=r,
                lr=0.01,
                transform="fft",
                target_modules=["mlp"],
            ),
            "dct_adamw (ours, matmul, select every 200)": optimizer_settings(
                "dct_adamw",
                rank=r,
                lr=0.01,
                update_gap=gap,
                target_modules=["mlp"],
            ),
            "osd (ours)": optimizer_settings("osd", **sub),
            "i3s (ours)": optimizer_settings("i3s", **sub),
        }
        references["apollo-torch APOLLOAdamW"] = _reference_apollo(r, gap, mini=False)
        references["apollo-torch APOLLOAdamW (Mini)"] = _reference_apollo(r, gap, mini=True)
    builds = {}
    for label, cfg in ours.items():
        builds[label] = (
            lambda m, c=cfg: optimizers.build(c, _as_linears(m)),
            lambda o: sum(optimizers.state_nbytes(o).values()),
        )
    if args.family == "projection":  # the batched APOLLO-Mini step against its per-matrix form
        builds["apollo_mini (ours, matrix by matrix)"] = (
            lambda m, c=ours["apollo_mini (ours)"]: _matrix_by_matrix(
                optimizers.build(c, _as_linears(m))
            ),
            lambda o: sum(optimizers.state_nbytes(o).values()),
        )
    if not torch.cuda.is_available():  # the reference 8-bit GaLore calls it unconditionally
        torch.cuda.synchronize = lambda *a, **k: None
    for label, build in references.items():
        builds[label] = (lambda m, b=build: b(list(m.mlp)), _reference_bytes)
    rows = list(measure(builds, args.steps, gap).items())
    base = rows[0][1]["step_s"]
    n_params = sum(p.numel() for p in Matrices().parameters())
    print(
        f"llama_60m projected matrices: {LAYERS * len(SHAPES)} matrices, {n_params / 1e6:.1f}M "
        f"params; rank {r}, refresh every {gap} steps, median of {args.steps} steps; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print(
        "| method | step (ms) | step / AdamW | refresh (s) | step incl. amortised refresh / AdamW "
        "| state bytes per param |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    gemm = projection_gemm_seconds(r)
    for label, m in rows:
        print(
            f"| {label} | {m['step_s'] * 1e3:.1f} | {m['step_s'] / base:.2f}x | "
            f"{m['refresh_s']:.2f} | {m['amortised_s'] / base:.2f}x | {m['bytes'] / n_params:.3f} |"
        )

    print(
        f"\nthe projection GEMMs alone (project + back-project, rank {r}): "
        f"{gemm * 1e3:.1f} ms = {gemm / base:.2f}x the AdamW step"
    )


if __name__ == "__main__":
    main()
