"""The CPU benchmark protocol (``make cpu-bench``): rank methods, not learning rates.

    python -m llm_pretrain.cpu_bench [--out outputs/sweeps/cpu_bench] [--methods a,b,...]
        [--corpora builtin,c4_sample] [--seeds 2] [--retry-failed] [--report-only]
        [--archive DIR] [key=value ...]

For each corpus (the ``data`` group: ``builtin``, whose source entropy is an absolute floor, and
``c4_sample``) and each method, every run an ``experiment=cpu_bench`` job (300 steps of
llama_tiny; ``key=value`` overrides apply to every job):

1. seed 0 at lr x {1/3, 1, 3} of the method's config lr (its paper's), a log grid;
2. while the best lr is the smallest or the largest one tried, one more step of the grid
   beyond it (at most ``MAX_EXTENSIONS`` per side): a best lr at the grid's edge is a guess;
3. ``--seeds`` seeds (2) at the best lr; if the seeds move the best to another lr, that lr gets
   its seeds too, until the best has them all.

"Best" is ``llm_pretrain.report``'s ``--best-of optimizer.lr``: the lowest mean ppl over seeds
among the lrs whose every seed finished (a diverged seed rules its lr out). Every job is a
directory ``OUT/<corpus>/<method>/lr<lr>_seed<s>`` and a row of ``OUT/results.jsonl``; a job
with a row is never run again, so a stopped ``make cpu-bench`` resumes where it stopped (a job
cut off mid-run has no row: its directory is cleared and it runs again). SIGTERM stops the
protocol with exit code 75; the job it stopped has a ``preempted`` row, which the next start
drops, so that job runs again too.

The end is the report: ``python -m llm_pretrain.report OUT --best-of optimizer.lr
--no-throughput --by-corpus`` (seed spreads, ties, per-corpus ranks, the Pareto plot; no tokens/s,
as the runs span hours and were not timed side by side), then the ranking along the way: each
method's rank by mean validation loss at each evaluation (every 75 steps) and Kendall's tau
between it and the final ranking, which says whether the runs are long enough for the order to
have settled.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llm_pretrain import report

CORPORA = ("builtin", "c4_sample")
GRID = 3.0  # the lr grid's ratio: x 1/3, 1, 3 around the config's lr
MAX_EXTENSIONS = 2  # per side: down to lr / 27, up to lr x 27
TOKENIZER = Path("outputs/tokenizers/c4_sample_sp2048.model")  # data=c4_sample's


@dataclass(frozen=True)
class Job:
    corpus: str
    method: str
    lr: float
    seed: int

    @property
    def lr_text(self) -> str:
        return lr_text(self.lr)

    def overrides(self, extra: Sequence[str] = ()) -> list[str]:
        return [
            "experiment=cpu_bench",
            f"data={self.corpus}",
            f"optimizer={self.method}",
            f"optimizer.lr={self.lr_text}",
            f"trainer.seed={self.seed}",
            *extra,
        ]

    def run_dir(self, out: Path) -> Path:
        return out / self.corpus / self.method / f"lr{self.lr_text}_seed{self.seed}"


def lr_text(lr: float) -> str:
    """An lr as the override writes it (3 significant digits: the grid's values are exact
    multiples of 3 of the config's lr, rounded the same way every time)."""
    return f"{lr:.3g}"


@dataclass
class Outcome:
    """What the sweep knows about one lr of one method on one corpus."""

    lr: float
    ppl: list[float | None]  # per seed run so far; None: diverged or failed


def best_lr(outcomes: Sequence[Outcome]) -> float | None:
    """The report's pick: the lowest mean ppl among the lrs whose every seed finished."""
    finished = [o for o in outcomes if o.ppl and all(p is not None for p in o.ppl)]
    if not finished:
        return None
    return min(finished, key=lambda o: statistics.fmean(o.ppl)).lr


def next_jobs(
    corpus: str, method: str, base_lr: float, outcomes: Sequence[Outcome], seeds: int
) -> list[Job]:
    """The jobs that the protocol runs next for one method on one corpus, given what has run
    (``outcomes``, one per lr tried); empty when the method is done."""
    grid = [base_lr / GRID, base_lr, base_lr * GRID]
    tried = {lr_text(o.lr): o for o in outcomes}
    missing = [lr for lr in grid if lr_text(lr) not in tried]
    if missing:
        return [Job(corpus, method, lr, 0) for lr in missing]
    best = best_lr(outcomes)
    if best is None:  # every lr diverged or failed: nothing to pick, the report says so
        return []
    lrs = sorted(o.lr for o in outcomes)
    low, high = lrs[0], lrs[-1]
    if best == low and low > base_lr / GRID ** (1 + MAX_EXTENSIONS) * 1.01:
        return [Job(corpus, method, low / GRID, 0)]
    if best == high and high < base_lr * GRID ** (1 + MAX_EXTENSIONS) / 1.01:
        return [Job(corpus, method, high * GRID, 0)]
    done = len(next(o for o in outcomes if o.lr == best).ppl)
    return [Job(corpus, method, best, s) for s in range(done, seeds)]


def outcomes_of(rows: Sequence[dict], corpus: str, method: str) -> list[Outcome]:
    """The sweep's rows of one method on one corpus, by lr (in the order first run)."""
    by_lr: dict[str, Outcome] = {}
    for row in rows:
        o = _overrides(row)
        if o.get("data") != corpus or o.get("optimizer") != method or "optimizer.lr" not in o:
            continue
        out = by_lr.setdefault(o["optimizer.lr"], Outcome(float(o["optimizer.lr"]), []))
        ok = row.get("status") == "ok" and row.get("final_val_ppl") is not None
        out.ppl.append(float(row["final_val_ppl"]) if ok else None)
    return list(by_lr.values())


def _overrides(row: dict) -> dict[str, str]:
    return dict(o.split("=", 1) for o in row.get("overrides") or [] if "=" in o)


def read_rows(out: Path) -> list[dict]:
    """The sweep's rows (a line cut short by a crash is skipped: its job runs again)."""
    path = out / "results.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def config_lr(method: str, extra: Sequence[str] = ()) -> float:
    """The lr ``experiment=cpu_bench optimizer=<method>`` would train with."""
    return float(compose(["experiment=cpu_bench", f"optimizer={method}", *extra]).optimizer.lr)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from llm_pretrain.config import CONF_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def run_job(job: Job, out: Path, extra: Sequence[str]) -> None:
    """Train one job in this process; its row goes to ``out/results.jsonl`` (a failed or
    diverged job's too, with its error)."""
    from llm_pretrain.preemption import REQUEUE_EXIT, Preempted
    from llm_pretrain.summary import sweep_row
    from llm_pretrain.train import _append_row, train

    overrides = job.overrides(extra)
    run_dir = job.run_dir(out)
    clear_stale(job, out)
    cfg = compose(overrides)
    try:
        summary = train(cfg, run_dir, out, overrides)
    except Preempted as e:  # the whole protocol was asked to stop: no further job starts
        print(f"cpu_bench: {' '.join(overrides)}: {e}; stopping the protocol", file=sys.stderr)
        raise SystemExit(REQUEUE_EXIT) from e
    except Exception as e:  # (train wrote the failed or diverged row)
        print(f"cpu_bench: {' '.join(overrides)}: {type(e).__name__}: {e}", file=sys.stderr)
        return
    _append_row(out, sweep_row(cfg, run_dir, summary, overrides))


def clear_stale(job: Job, out: Path) -> bool:
    """Remove the directory of a job that has no row (it was cut off mid-run, so it runs
    again; the protocol never runs a job that has a row). Returns whether there was one."""
    run_dir = job.run_dir(out)
    if not run_dir.exists():
        return False
    print(f"cpu_bench: {run_dir} has no row (stopped mid-run): running it again")
    shutil.rmtree(run_dir)
    return True


COMPARED = ("model", "data", "optimizer", "trainer", "eval")  # what a resumed sweep must share


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The keys whose values differ between two configs, ``a.b.c: old -> new``; a key only one
    side has (a setting added since) is not a difference."""
    out = []
    for key in old.keys() & new.keys():
        a, b, name = old[key], new[key], f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return sorted(out)


def check_same_protocol(out: Path, rows: Sequence[dict], compose_fn=None) -> None:
    """Refuse to add jobs to a sweep whose jobs ran under other settings (another step count,
    another model, changed defaults): its rows would be ranked together as if comparable. For
    each corpus, the first finished row's overrides are composed again and compared with the
    config the row ran with."""
    from omegaconf import OmegaConf

    compose_fn = compose_fn or compose
    seen = set()
    for row in rows:
        corpus = _overrides(row).get("data")
        if corpus in seen or not row.get("config") or not row.get("overrides"):
            continue
        seen.add(corpus)
        now = OmegaConf.to_container(compose_fn(list(row["overrides"])), resolve=True)
        diff = [
            d
            for section in COMPARED
            for d in differences({section: row["config"].get(section) or {}},
                                 {section: now.get(section) or {}})
        ]  # fmt: skip
        if diff:
            raise SystemExit(
                f"cpu_bench: {out} holds jobs run under other settings than the protocol's now "
                f"(data={corpus}: {'; '.join(diff[:6])}{'; ...' if len(diff) > 6 else ''}); "
                "their results would be ranked as if comparable. Use another --out, or remove "
                "that sweep to run it again from the start"
            )


def run_protocol(
    out: Path,
    methods: Sequence[str],
    corpora: Sequence[str],
    seeds: int,
    extra: Sequence[str] = (),
    retry_failed: bool = False,
    runner: Callable[[Job, Path, Sequence[str]], None] = run_job,
    lr_of: Callable[[str], float] | None = None,
) -> int:
    """Run every job the protocol still needs; returns how many ran."""
    lr_of = lr_of or (lambda m: config_lr(m, extra))
    if any("eval_curve" in r for r in read_rows(out)):  # (before any row is rewritten)
        raise SystemExit(
            f"cpu_bench: {out} is an archive (--archive): its rows have no configs to resume "
            "from and no run directories; use --report-only with it, or another --out to run"
        )
    drop_rows(out, "preempted", "preempted jobs (stopped by a signal, not a result) run again")
    if retry_failed:
        drop_rows(out, "failed", "--retry-failed: failed jobs run again")
    if runner is run_job:  # (a stand-in runner writes no configs)
        check_same_protocol(out, [r for r in read_rows(out) if r.get("status") == "ok"])
    ran = 0
    for corpus in corpora:
        for method in methods:
            base = lr_of(method)
            while jobs := next_jobs(
                corpus, method, base, outcomes_of(read_rows(out), corpus, method), seeds
            ):
                for job in jobs:
                    print(f"cpu_bench: {corpus} {method} lr {job.lr_text} seed {job.seed}")
                    runner(job, out, extra)
                    ran += 1
                    if not any(_is(row, job) for row in read_rows(out)):
                        raise SystemExit(f"cpu_bench: the job {job} wrote no row; stopping")
    return ran


def _is(row: dict, job: Job) -> bool:
    o = _overrides(row)
    return (o.get("data"), o.get("optimizer"), o.get("optimizer.lr"), o.get("trainer.seed")) == (
        job.corpus,
        job.method,
        job.lr_text,
        str(job.seed),
    )


def drop_rows(out: Path, status: str, why: str) -> None:
    """Remove the rows with ``status`` (their directories go when the job runs again), so that
    the protocol runs those jobs again; ``why`` is printed with their count."""
    path = out / "results.jsonl"
    if not path.is_file():
        return
    rows = read_rows(out)
    kept = [r for r in rows if r.get("status") != status]
    if len(kept) != len(rows):
        print(f"cpu_bench: {len(rows) - len(kept)} {why}")
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b of two score lists (1: the same order, -1: reversed)."""
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    n = concordant + discordant
    denom = math.sqrt((n + ties_a) * (n + ties_b))
    return (concordant - discordant) / denom if denom else float("nan")


def eval_curve(run_dir: Path) -> dict[int, float]:
    """A run's validation loss at each evaluation step (``metrics.jsonl``)."""
    curve = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "eval/loss" in rec:
                curve[rec["step"]] = rec["eval/loss"]
    return curve


def row_curve(row: dict | None, run_dir: Path) -> dict[int, float]:
    """A job's validation curve: the one its archived row carries, else its ``metrics.jsonl``."""
    if row is not None and "eval_curve" in row:
        return {int(step): float(loss) for step, loss in row["eval_curve"].items()}
    return eval_curve(run_dir)


ARCHIVED_DROP = ("config",)  # (each row's full config: the protocol's files say it)


def archive(out: Path, dest: Path) -> Path:
    """Write ``dest/results.jsonl``: the sweep's rows, each with its validation curve and the
    corpus's source entropy but without its full config, so that ``--out dest --report-only``
    gives the same report without the run directories (a few hundred KB to commit, not the
    sweep's checkpoints and logs)."""
    rows = read_rows(out)
    if not rows:
        raise SystemExit(f"--archive: {out} has no results.jsonl rows to archive")
    dest.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in rows:
        kept = {k: v for k, v in row.items() if k not in ARCHIVED_DROP}
        curve = row_curve(row, Path(row.get("run_dir", "")))
        kept["eval_curve"] = {str(t): v for t, v in curve.items()}
        kept["source_entropy"] = _source_entropy_of(row)
        lines.append(json.dumps(kept) + "\n")
    path = dest / "results.jsonl"
    path.write_text("".join(lines))
    return path


def stability_table(out: Path, methods: Sequence[str], corpora: Sequence[str]) -> str:
    """Per corpus: each method's rank (by mean validation loss over the seeds of its best lr)
    at every evaluation step, Kendall's tau of each step's order against the final one, and
    how many of the pairs the final step separates beyond the seeds' spread are still in
    another order (Kendall's tau also counts swaps within ties, which no more steps settle)."""
    rows = read_rows(out)
    parts = []
    for corpus in corpora:
        curves: dict[str, dict[int, float]] = {}
        spread: dict[str, tuple[float, float]] = {}  # final loss, min and max over seeds
        for method in methods:
            outcomes = outcomes_of(rows, corpus, method)
            best = best_lr(outcomes)
            if best is None:
                continue
            n_seeds = len(next(o for o in outcomes if o.lr == best).ppl)
            jobs = [Job(corpus, method, best, s) for s in range(n_seeds)]
            seeds = [row_curve(_row_of(rows, job), job.run_dir(out)) for job in jobs]
            steps = set.intersection(*(set(c) for c in seeds)) if seeds else set()
            curves[method] = {t: statistics.fmean(c[t] for c in seeds) for t in steps}
            if steps:
                last = [c[max(steps)] for c in seeds]
                spread[method] = (min(last), max(last))
        steps = sorted(set.intersection(*(set(c) for c in curves.values()))) if curves else []
        if len(curves) < 2 or not steps:
            continue
        names = sorted(curves, key=lambda m: curves[m][steps[-1]])
        final = [curves[m][steps[-1]] for m in names]
        taus = [kendall_tau([curves[m][t] for m in names], final) for t in steps]
        separated = [
            (a, b)  # a ahead of b at the end, every seed of a below every seed of b
            for i, a in enumerate(names)
            for b in names[i + 1:]
            if spread[a][1] < spread[b][0]
        ]  # fmt: skip
        swapped = [sum(curves[a][t] > curves[b][t] for a, b in separated) for t in steps]
        head = " | ".join(f"step {t}" for t in steps)
        lines = [
            f"\nranking along the way, data={corpus} (mean validation loss of the best lr's "
            "seeds; rank at each evaluation)\n",
            f"| method | {head} |",
            "| --- |" + " ---: |" * len(steps),
        ]
        for m in names:
            ranks = []
            for t in steps:
                order = sorted(curves, key=lambda x, t=t: curves[x][t])
                ranks.append(f"{order.index(m) + 1} ({curves[m][t]:.3f})")
            lines.append(f"| {m} | " + " | ".join(ranks) + " |")
        lines.append("| Kendall's tau vs final | " + " | ".join(f"{x:.2f}" for x in taus) + " |")
        lines.append(
            f"| of the {len(separated)} pairs apart beyond the seeds at the end, in the other "
            "order | " + " | ".join(str(n) for n in swapped) + " |"
        )
        floor = source_entropy(out, corpus, rows)
        if floor is not None:
            best = curves[names[0]][steps[-1]]
            lines.append(
                f"\nThe source's entropy, the loss no model can beat: {floor:.4f} nats per token "
                f"(ppl {math.exp(floor):.2f}); the best method is {best - floor:.4f} nats above "
                "it."
            )
        parts.append("\n".join(lines))
    return "\n".join(parts)


def source_entropy(out: Path, corpus: str, rows: Sequence[dict]) -> float | None:
    """The corpus's source entropy (nats per token) from any finished run's summary: known for
    the built-in language, None for real text."""
    for row in rows:
        if _overrides(row).get("data") == corpus and row.get("status") == "ok":
            return _source_entropy_of(row)
    return None


def _source_entropy_of(row: dict) -> float | None:
    """From an archived row, else from its run's ``summary.json``."""
    if "source_entropy" in row:
        return row["source_entropy"]
    path = Path(row.get("run_dir", "")) / "summary.json"
    if path.is_file():
        return (json.loads(path.read_text()).get("eval") or {}).get("source_entropy")
    return None


def _row_of(rows: Sequence[dict], job: Job) -> dict | None:
    """The job's row (the last, should it have run twice)."""
    mine = [r for r in rows if _is(r, job)]
    return mine[-1] if mine else None


def budget_line(out: Path) -> str:
    """What the sweep cost: its runs' wall times (``summary.json``'s, in the rows), which
    include any pause of the process, so the median is the honest per-run figure."""
    rows = read_rows(out)
    times = sorted(r["wall_time_s"] for r in rows if r.get("wall_time_s"))
    if not times:
        return ""
    median = statistics.median(times)
    slow = sum(t > 2 * median for t in times)
    return (
        f"\nbudget: {len(rows)} runs ({len(times)} timed); wall time per run median "
        f"{median:.0f} s, {times[0]:.0f}-{times[-1]:.0f} s ({slow} over twice the median: "
        "slowed or paused); "
        f"{len(rows)} x median = {len(rows) * median / 3600:.1f} h, the wall times' sum "
        f"{sum(times) / 3600:.1f} h"
    )


def ensure_tokenizer(corpora: Sequence[str]) -> None:
    if "c4_sample" not in corpora or TOKENIZER.is_file():
        return
    from llm_pretrain.tokenizer_training import train_sentencepiece

    corpus = str(compose(["data=c4_sample"]).data.path)
    print(f"cpu_bench: training data=c4_sample's tokenizer {TOKENIZER} on {corpus}")
    train_sentencepiece(corpus, TOKENIZER, vocab_size=2048, held_out=200)


def pretraining_methods() -> list[str]:
    from llm_pretrain.optim import METHODS

    return [name for name, m in METHODS.items() if m.pretraining]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("outputs/sweeps/cpu_bench"))
    ap.add_argument("--methods", help="comma list (default: every pretraining method)")
    ap.add_argument("--corpora", default=",".join(CORPORA))
    ap.add_argument("--seeds", type=int, default=2, help="seeds at each method's best lr")
    ap.add_argument("--retry-failed", action="store_true", help="run failed jobs again")
    ap.add_argument("--report-only", action="store_true", help="run nothing, report")
    ap.add_argument(
        "--archive",
        type=Path,
        metavar="DIR",
        help="write DIR/results.jsonl, the rows with their curves, from which --out DIR "
        "--report-only reports without the run directories; then stop",
    )
    ap.add_argument("overrides", nargs="*", help="key=value for every job")
    args = ap.parse_args(argv)
    known = pretraining_methods()
    methods = args.methods.split(",") if args.methods else known
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise SystemExit(
            f"--methods: {', '.join(unknown)} not a pretraining method; use {', '.join(known)}"
        )
    corpora = args.corpora.split(",")
    bad = [c for c in corpora if c not in CORPORA]
    if bad:
        raise SystemExit(f"--corpora: {', '.join(bad)} unknown; use {', '.join(CORPORA)}")
    if args.seeds < 1:
        raise SystemExit("--seeds must be at least 1")
    if args.archive is not None:
        print(f"cpu_bench: archived {archive(args.out, args.archive)}")
        return
    if not args.report_only:
        ensure_tokenizer(corpora)
        ran = run_protocol(
            args.out, methods, corpora, args.seeds, args.overrides, args.retry_failed
        )
        print(f"cpu_bench: {ran} jobs run; every job of the protocol has its row")
    by_corpus = ["--by-corpus"] if len(corpora) > 1 else []
    # (no tokens/s: the protocol's runs span hours and were not timed side by side)
    report.main([str(args.out), "--best-of", "optimizer.lr", "--no-throughput", *by_corpus])
    print(stability_table(args.out, methods, corpora))
    print(budget_line(args.out))


if __name__ == "__main__":
    main()
