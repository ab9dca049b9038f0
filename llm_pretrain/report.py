"""A sweep's results as one table and one plot: perplexity against memory, with the ratios to
AdamW that answer "how much does X save, at what cost".

    python -m llm_pretrain.report <sweep dir, results.jsonl or run dir> [--plot report.png]

Reads the ``results.jsonl`` that every job of a multirun appends to (one JSON row per job, a
failed job included), prints a markdown table per model (val ppl, ppl gap to AdamW of the same
model (its best AdamW run), optimizer-state MiB and its ratio to AdamW's, peak memory, tokens/s
and its ratio; runs are labelled by optimizer and the overrides that vary in the sweep) and
writes a PNG of val ppl against optimizer-state memory with the Pareto front marked (the points
no other run beats on both). A failed job, an empty row, or a line that is not valid JSON (a run
that crashed while writing) is listed as failed, a run a non-finite loss stopped as diverged;
none is dropped. The peak is the CUDA allocator's
peak when the run had one, else the sum of the measured categories (weights + gradients + state
+ activations of one micro-batch), marked as such. A run of a paper recipe
(``experiment=galore_c4``, ...) with the recipe's own optimizer gets the paper's perplexity for
its model size in a column of its own, with the source under the table.

Runs on ``data=tasks`` also get a task table: the final exact-match accuracy per task and, for a
continual-learning run (``experiment=cl_order1``, ...), average accuracy (AA) and backward
transfer (BWT) beside optimizer-state memory and tokens/s; their accuracy matrices (task i after
phase j) are drawn as heatmaps (``<plot>_tasks.png``). A single run directory (its
``summary.json``) is reported the same way.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

BASELINE = "adamw"


@dataclass
class Run:
    label: str
    model: str
    optimizer: str
    ok: bool
    ppl: float | None = None
    state_bytes: int | None = None
    peak_bytes: int | None = None
    peak_is_cuda: bool = False
    tokens_per_s: float | None = None
    error: str | None = None
    paper_ppl: float | None = None
    paper: str | None = None
    tasks: dict | None = None  # a data=tasks run's summary["tasks"]
    status: str = "ok"  # ok, or why not: failed | diverged (a non-finite loss stopped it)


def paper_value(row: dict) -> tuple[float | None, str | None]:
    """The paper's perplexity for this row's model size, if its experiment is a paper recipe for
    this row's optimizer (a recipe run with another optimizer has no paper figure)."""
    exp = (row.get("config") or {}).get("experiment") or {}
    if not exp.get("optimizer") or exp["optimizer"] != row.get("optimizer"):
        return None, None
    ppl = ((exp.get("sizes") or {}).get(row.get("model")) or {}).get("paper_ppl")
    return (float(ppl), exp.get("paper")) if ppl is not None else (None, None)


def results_file(path: Path) -> Path:
    path = Path(path)
    found = path / "results.jsonl" if path.is_dir() else path
    if not found.is_file():
        raise FileNotFoundError(
            f"no results.jsonl at {path}: give a multirun sweep directory "
            "(python -m llm_pretrain.train -m ...), the file itself, or a run directory "
            "(its summary.json)"
        )
    return found


def summary_row(summary: dict) -> dict:
    """A run directory's ``summary.json`` as a sweep row (the keys ``sweep_row`` writes)."""
    row = {k: summary.get(k) for k in ("status", "model", "optimizer", "tokens_per_s", "tasks")}
    ev = summary.get("eval") or {}
    return row | {
        "run_dir": summary.get("run_dir"),
        "final_val_ppl": ev.get("final_ppl"),
        "memory": summary.get("memory"),
    }


def load_runs(path: Path) -> list[Run]:
    """Every line of the sweep's results, a readable row or not; or the one run of a run
    directory."""
    path = Path(path)
    single = path / "summary.json"
    if path.is_dir() and not (path / "results.jsonl").is_file() and single.is_file():
        try:
            return [_run(summary_row(json.loads(single.read_text())), 1)]
        except json.JSONDecodeError as e:
            return [Run(str(single), "?", "?", False, error=f"unreadable summary.json: {e}")]
    runs, rows = [], []
    for n, line in enumerate(results_file(path).read_text().splitlines(), start=1):
        if not line.strip():
            runs.append(Run(f"line {n}", "?", "?", False, error="empty row (crashed run?)"))
            rows.append(None)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            runs.append(
                Run(f"line {n}", "?", "?", False, error=f"unreadable row (crashed run?): {e}")
            )
            rows.append(None)
            continue
        runs.append(_run(row, n))
        rows.append(row)
    _label_by_varying_overrides(runs, rows)
    return runs


def _run(row: dict, n: int) -> Run:
    model, optimizer = row.get("model", "?"), row.get("optimizer", "?")
    label = optimizer
    if row.get("status") != "ok":
        status = "diverged" if row.get("status") == "diverged" else "failed"
        error = row.get("error") or "no status"
        return Run(label, model, optimizer, False, error=error, status=status)
    try:
        paper_ppl, paper = paper_value(row)
        mem = row["memory"]
        cuda = mem.get("cuda_peak_allocated")
        measured = sum(mem[k] for k in ("weights", "gradients", "optimizer_state", "activations"))
        return Run(
            label,
            model,
            optimizer,
            True,
            ppl=float(row["final_val_ppl"]),
            state_bytes=int(mem["optimizer_state"]),
            peak_bytes=int(cuda) if cuda is not None else int(measured),
            peak_is_cuda=cuda is not None,
            tokens_per_s=float(row["tokens_per_s"]),
            paper_ppl=paper_ppl,
            paper=paper,
            tasks=row.get("tasks"),
        )
    except (KeyError, TypeError, ValueError) as e:
        return Run(label, model, optimizer, False, error=f"row {n} lacks {e}")


def _label_by_varying_overrides(runs: list[Run], rows: list[dict | None]) -> None:
    """A run's label is its optimizer plus the sweep's overrides that vary between jobs (e.g.
    ``trainer.lr=0.003``), so every point of a sweep is told apart."""
    parsed = [
        dict(o.split("=", 1) for o in (row or {}).get("overrides", []) if "=" in o) for row in rows
    ]
    keys = {k for p in parsed for k in p} - {"optimizer"}
    varying = sorted(k for k in keys if len({p.get(k) for p in parsed if p}) > 1)
    for run, p in zip(runs, parsed, strict=True):
        extra = " ".join(f"{k}={p[k]}" for k in varying if k in p)
        if extra:
            run.label = f"{run.label} {extra}"
    seen: dict[tuple[str, str], int] = {}
    for run in runs:  # still alike (e.g. two runs with the same overrides): number them
        key = (run.model, run.label)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            run.label = f"{run.label} #{seen[key]}"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (memory, ppl) that no other point beats on both (lower is better),
    in order of memory."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.3f}"


def table(runs: list[Run]) -> str:
    out = []
    for model in sorted({r.model for r in runs if r.ok}):
        ok = sorted((r for r in runs if r.ok and r.model == model), key=lambda r: r.ppl)
        base = next((r for r in ok if r.optimizer == BASELINE), None)
        front = {ok[i].label for i in pareto_front([(r.state_bytes, r.ppl) for r in ok])}
        papers = any(r.paper_ppl is not None for r in ok)
        out.append(f"### {model}\n")
        out.append(
            "| run | val ppl |"
            + (" paper ppl |" if papers else "")
            + " ppl gap to AdamW | state MiB | state / AdamW | peak MiB | "
            "tokens/s | tokens/s / AdamW | Pareto |"
        )
        out.append(
            "| --- | ---: |"
            + (" ---: |" if papers else "")
            + " ---: | ---: | ---: | ---: | ---: | ---: | :---: |"
        )
        for r in ok:
            gap = "-" if base is None else f"{r.ppl - base.ppl:+.2f}"
            peak = _mib(r.peak_bytes) + ("" if r.peak_is_cuda else " (sum)")
            paper = (
                (f" {r.paper_ppl:.2f} |" if r.paper_ppl is not None else " - |") if papers else ""
            )
            out.append(
                f"| {r.label} | {r.ppl:.2f} |{paper} {gap} | {_mib(r.state_bytes)} | "
                f"{_ratio(r.state_bytes, base.state_bytes if base else None)} | {peak} | "
                f"{r.tokens_per_s:,.0f} | "
                f"{_ratio(r.tokens_per_s, base.tokens_per_s if base else None)} | "
                f"{'yes' if r.label in front else ''} |"
            )
        if base is None:
            out.append(f"\n(no `{BASELINE}` run for {model}: no ratios)")
        sources = sorted({r.paper for r in ok if r.paper_ppl is not None and r.paper})
        if sources:
            out.append(
                f"\npaper ppl: {'; '.join(sources)} (the papers' estimator, eval.compat=galore)"
            )
        out.append("")
    for status in ("diverged", "failed"):
        listed = [
            r for r in runs if not r.ok and (r.status == "diverged") == (status == "diverged")
        ]
        if listed:
            out.append(f"### {status}\n")
            out += [f"- {r.model} / {r.label}: {r.error}" for r in listed]
            out.append("")
    out.append(
        "peak MiB: the CUDA allocator's peak; '(sum)': weights + gradients + optimizer state + "
        "activations of one micro-batch, measured (no CUDA)."
    )
    return "\n".join(out)


def _pct(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else f"{100 * x:{'+' if signed else ''}.1f}"


def task_table(runs: list[Run]) -> str:
    """Final accuracy per task (%), and AA and BWT (points) for continual-learning runs."""
    ok = [r for r in runs if r.ok and r.tasks]
    if not ok:
        return ""
    names = list(dict.fromkeys(n for r in ok for n in r.tasks["names"]))
    base = next((r for r in ok if r.optimizer == BASELINE), None)
    out = [
        "### tasks (exact-match accuracy, %)\n",
        "| run | model | metric | AA | BWT | " + " | ".join(names) + " | state MiB | "
        "state / AdamW | tokens/s |",
        "| --- | --- | --- | ---: | ---: | " + " | ".join("---:" for _ in names) + " | ---: | "
        "---: | ---: |",
    ]
    for r in sorted(ok, key=lambda r: -(_aa(r) if _aa(r) is not None else -1.0)):
        cl = r.tasks.get("continual") or {}
        accs = [_pct(r.tasks["accuracy"].get(n)) for n in names]
        state = _state(r)
        out.append(
            f"| {r.label} | {r.model} | {r.tasks.get('metric', '?')} | {_pct(cl.get('aa'))} | "
            f"{_pct(cl.get('bwt'), signed=True)} | " + " | ".join(accs) + f" | "
            f"{_mib(state)} | {_ratio(state, _state(base) if base else None)}"
            f" | {r.tokens_per_s:,.0f} |"
        )
    out.append(
        "\nstate MiB: the largest optimizer state at the end of a phase (continual runs), else "
        "at the first step. AA: mean accuracy over the tasks after the last phase; BWT: mean over "
        "all tasks but the last of (final accuracy - accuracy right after learning it), in "
        "points; '-': not a sequential (continual-learning) run, or it did not finish every phase."
    )
    return "\n".join(out) + "\n"


def _state(r: Run) -> int:
    """A task run's optimizer-state bytes: the largest at a phase's end (GORP's subspace of
    earlier tasks grows), else the first step's."""
    per_phase = ((r.tasks or {}).get("continual") or {}).get("optimizer_state_per_phase")
    return max(per_phase) if per_phase else r.state_bytes


def _aa(r: Run) -> float | None:
    return ((r.tasks or {}).get("continual") or {}).get("aa")


def plot_accuracy_matrices(runs: list[Run], path: Path) -> Path | None:
    """One heatmap per continual-learning run: accuracy of task i (columns) after phase j
    (rows), the diagonal being each task right after it was learned."""
    cl = [r for r in runs if r.ok and r.tasks and (r.tasks.get("continual") or {}).get("matrix")]
    if not cl:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(cl))
    rows = -(-len(cl) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(cl) :]:
        ax.axis("off")
    for ax, r in zip(axes.flat, cl, strict=False):
        matrix, names = r.tasks["continual"]["matrix"], r.tasks["names"]
        ax.imshow([[100 * v for v in row] for row in matrix], vmin=0, vmax=100, cmap="viridis")
        for j, row in enumerate(matrix):
            for i, v in enumerate(row):
                ax.text(i, j, f"{100 * v:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if v < 0.6 else "black")  # fmt: skip
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(matrix)), [f"after {names[j]}" for j in range(len(matrix))],
                      fontsize=8)  # fmt: skip
        aa, bwt = r.tasks["continual"].get("aa"), r.tasks["continual"].get("bwt")
        ax.set_title(f"{r.label}\nAA {_pct(aa)}  BWT {_pct(bwt, signed=True)}", fontsize=9)
    fig.suptitle("accuracy (%) of each task (columns) after each phase (rows)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(runs: list[Run], path: Path) -> Path:
    """Val ppl against optimizer-state memory, one marker per run, the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in runs if r.ok]
    if not ok:
        raise ValueError("no successful run to plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in sorted({r.model for r in ok}):
        mine = [r for r in ok if r.model == model]
        xs = [r.state_bytes / 2**20 for r in mine]
        ys = [r.ppl for r in mine]
        ax.scatter(xs, ys, label=model, zorder=3)
        for r, x, y in zip(mine, xs, ys, strict=True):
            ax.annotate(r.label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
        front = pareto_front(list(zip(xs, ys, strict=True)))
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", alpha=0.6, zorder=2)
    ax.set_xlabel("optimizer state (MiB)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("perplexity vs optimizer-state memory (dashed: Pareto front)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path, help="a multirun directory or its results.jsonl")
    ap.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to it)")
    args = ap.parse_args(argv)
    try:
        runs = load_runs(args.sweep)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    print(table(runs))
    tasks = task_table(runs)
    if tasks:
        print(tasks)
    if any(r.ok for r in runs):
        where = args.sweep if args.sweep.is_dir() else args.sweep.parent
        target = args.plot or where / "report.png"
        print(f"\nplot: {plot(runs, target)}")
        heat = plot_accuracy_matrices(runs, target.with_name(f"{target.stem}_tasks.png"))
        if heat is not None:
            print(f"accuracy matrices: {heat}")


if __name__ == "__main__":
    main()
