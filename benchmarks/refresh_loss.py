"""Does staggering the subspace refreshes cost loss? (``make bench-refresh``)

The default job (llama_tiny on the built-in corpus) trained ``--steps`` steps with each method,
its bases refreshed synchronously (every matrix at once, as the references) and staggered
(``optimizer.refresh=staggered``), for each seed; reported: the final validation loss of each
run and the staggered-minus-synchronous difference next to the spread between seeds.

    python benchmarks/refresh_loss.py [--methods galore] [--steps 300] [--gap 50] [--rank 32]
        [--seeds 0,1] [--out outputs/bench/refresh_loss]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from llm_pretrain.config import CONF_DIR, register_configs
from llm_pretrain.train import train

MODES = ("synchronous", "staggered")


def final_loss(overrides: list[str], run_dir: Path) -> float:
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    shutil.rmtree(run_dir, ignore_errors=True)
    return train(cfg, run_dir)["eval"]["final_loss"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="galore", help="comma list of optimizers")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--gap", type=int, default=50, help="optimizer.update_gap (flora: kappa)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default="outputs/bench/refresh_loss")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for method in args.methods.split(","):
        gap_key = "kappa" if method == "flora" else "update_gap"
        losses = {}
        for mode in MODES:
            for seed in seeds:
                overrides = [
                    f"optimizer={method}",
                    f"optimizer.rank={args.rank}",
                    f"optimizer.{gap_key}={args.gap}",
                    f"optimizer.refresh={mode}",
                    f"trainer.seed={seed}",
                    f"trainer.max_steps={args.steps}",
                    "trainer.eval_every=0",
                    "trainer.progress=false",
                    "eval.tokens=50000",
                ]
                run_dir = Path(args.out) / f"{method}_{mode}_seed{seed}"
                losses[mode, seed] = final_loss(overrides, run_dir)
        rows.append((method, losses))
    print(
        f"\nllama_tiny on the built-in corpus, {args.steps} steps, rank {args.rank}, refresh every "
        f"{args.gap} steps; final validation loss on 50,000 held-out tokens\n"
    )
    print("| method | refresh | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
    print("| --- | --- | " + " | ".join("---:" for _ in seeds) + " | ---: |")
    for method, losses in rows:
        for mode in MODES:
            values = [losses[mode, s] for s in seeds]
            cells = " | ".join(f"{v:.4f}" for v in values)
            print(f"| {method} | {mode} | {cells} | {statistics.fmean(values):.4f} |")
    for method, losses in rows:
        diffs = [losses["staggered", s] - losses["synchronous", s] for s in seeds]
        spread = [losses[m, s] - losses[m, seeds[0]] for m in MODES for s in seeds[1:]]
        print(
            f"\n{method}: staggered - synchronous = "
            + ", ".join(f"{d:+.4f}" for d in diffs)
            + (" (seed - seed within a mode: " + ", ".join(f"{d:+.4f}" for d in spread) + ")")
        )


if __name__ == "__main__":
    main()
