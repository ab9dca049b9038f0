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

Ranking methods, not learning rates or lucky seeds (a sweep over seeds, lrs or corpora):

    python -m llm_pretrain.report SWEEP --best-of trainer.lr [--best-of KEY ...] [--by-corpus [KEY]]

- Seeds: runs that differ only in ``trainer.seed`` or ``data.seed`` (the init and the data
  order: replicates of one method) are pooled into one row, ``mean (min–max, n=seeds)``.
- ``--best-of KEY`` (repeatable): runs are grouped by every varying override but KEY, the seeds
  and the optimizer's own name; each group keeps the value of KEY (with several keys, the
  combination) whose seeds' mean val ppl is lowest, shown in a ``best KEY`` column beside how
  many values were tried. A value wins only if every one of its seeds finished: a diverged or
  failed seed rules it out (it is counted under ``tried``), so an lr that blows up on one seed
  in two is never reported as the best. KEY must be an override that varies in the sweep.
- Ties: a method's range is [min, max] of its seeds' ppl (one seed: the point itself). Two
  methods tie when their ranges overlap (``a.min <= b.max and b.min <= a.max``): their gap is no
  larger than their seeds' own spread. A method's rank is 1 + the number of methods whose whole
  range lies below its own (the rule of rankings with confidence intervals, e.g. Chatbot
  Arena), prefixed ``=`` when it ties with any other. On the Pareto front a method is dominated
  only by one that uses no more optimizer-state memory and whose whole range lies below its own;
  a front point that a cheaper-or-equal, lower-mean method merely ties with is marked
  ``tied: <that method>`` (in the table and the plot, which draws min–max error bars).
- Corpora: the ``data`` group override and any ``data.`` key that varies (seeds aside) tell
  corpora apart; ``--by-corpus KEY`` names another key (KEY and its ``KEY.`` sub-keys), a bare
  ``--by-corpus`` insists on ``data``. Each (model, corpus) gets its own table (perplexities of
  different corpora are not comparable), and a rank-per-corpus table has one column per corpus
  and flags ``↕ <other>`` where two methods swap order: one's range lies wholly below the
  other's on one corpus and wholly above it on another (a reversal inside a tie is not a flip).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

BASELINE = "adamw"
# Overrides whose runs are replicates of one method: pooled, never picked or ranked apart.
SEED_KEYS = ("trainer.seed", "data.seed")
CORPUS_KEY = "data"  # the data group and its data.* keys tell corpora apart


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
    overrides: dict[str, str] = field(default_factory=dict)  # the job's key=value overrides
    dup: int = 1  # 2, 3, ...: a repeat of a job with the very same overrides


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
    runs = []
    for n, line in enumerate(results_file(path).read_text().splitlines(), start=1):
        if not line.strip():
            runs.append(Run(f"line {n}", "?", "?", False, error="empty row (crashed run?)"))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            runs.append(
                Run(f"line {n}", "?", "?", False, error=f"unreadable row (crashed run?): {e}")
            )
            continue
        run = _run(row, n)
        run.overrides = dict(o.split("=", 1) for o in row.get("overrides") or [] if "=" in o)
        runs.append(run)
    _label_by_varying_overrides(runs)
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


def varying_keys(runs: list[Run]) -> list[str]:
    """The override keys whose value differs between the sweep's jobs (a key that some jobs
    lack varies too); ``optimizer`` aside, since every label starts with the optimizer."""
    parsed = [r.overrides for r in runs if r.overrides]
    keys = {k for p in parsed for k in p} - {"optimizer"}
    return sorted(k for k in keys if len({p.get(k) for p in parsed}) > 1)


def _with(label: str, overrides: dict[str, str], keys: Sequence[str]) -> str:
    return " ".join([label, *(f"{k}={overrides[k]}" for k in keys if k in overrides)])


def _label_by_varying_overrides(runs: list[Run]) -> None:
    """A run's label is its optimizer plus the sweep's overrides that vary between jobs (e.g.
    ``trainer.lr=0.003``), so every point of a sweep is told apart."""
    varying = varying_keys(runs)
    for run in runs:
        run.label = _with(run.label, run.overrides, varying)
    seen: dict[tuple[str, str], int] = {}
    for run in runs:  # still alike (e.g. two runs with the same overrides): number them
        key = (run.model, run.label)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            run.dup = seen[key]
            run.label = f"{run.label} #{seen[key]}"


class SweepKeys(NamedTuple):
    """What each varying override is to the report: a replicate (seeds, pooled), a
    hyperparameter to tune away (best_of), a corpus (ranked apart), or part of the method."""

    seeds: list[str]
    best_of: list[str]
    corpus: list[str]
    method: list[str]


def _covers(prefix: str, key: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def sweep_keys(
    runs: list[Run], best_of: Sequence[str] = (), by_corpus: Sequence[str] | None = None
) -> SweepKeys:
    """Sort the sweep's varying overrides into roles. ``by_corpus``: the keys (each with its
    ``KEY.`` sub-keys) that tell corpora apart; None: ``data`` and ``data.*`` where they vary.
    A key no run varies is refused by name, with the keys that do vary, so a typo cannot
    silently report the sweep unranked."""
    varying = varying_keys(runs)

    def refuse(flag: str, key: str, why: str) -> ValueError:
        return ValueError(
            f"{flag} {key}: {why}; the overrides that vary in this sweep: "
            f"{', '.join(varying) or 'none'}"
        )

    def check(flag: str, key: str) -> None:
        if key == "optimizer":
            raise refuse(flag, key, "the optimizer is the method the report ranks")
        if key in SEED_KEYS:
            raise refuse(flag, key, "seeds are pooled into a mean and a range, never picked")
        if flag == "--by-corpus" and any(_covers(key, k) for k in varying):
            return
        if key not in varying:
            values = {r.overrides.get(key) for r in runs if r.overrides} - {None}
            why = (
                f"every run sets {key}={values.pop()}"
                if values
                else f"no run's overrides set {key}"
            )
            raise refuse(flag, key, f"it does not vary ({why})")

    for key in best_of:
        check("--best-of", key)
    for key in by_corpus or ():
        check("--by-corpus", key)
    seeds = [k for k in varying if k in SEED_KEYS]
    corpus = [
        k
        for k in varying
        if any(_covers(c, k) for c in by_corpus or [CORPUS_KEY])
        and k not in SEED_KEYS
        and k not in best_of
    ]
    method = [k for k in varying if k not in seeds and k not in best_of and k not in corpus]
    return SweepKeys(seeds, list(best_of), corpus, method)


@dataclass
class Entry:
    """One row of the ranked table: a method on a corpus, its seeds pooled and, under
    ``--best-of``, only its best setting of the tuned keys."""

    label: str  # the optimizer and the method's own varying overrides
    model: str
    optimizer: str
    corpus: str  # its corpus overrides (data=c4), "default" where the sweep has none
    runs: list[Run]  # the seeds that finished; empty: no setting of the best-of keys did
    lost: dict[str, int] = field(default_factory=dict)  # seeds that failed | diverged
    picked: dict[str, str | None] = field(default_factory=dict)  # best-of key -> its value
    tried: int = 1  # settings of the best-of keys tried
    tried_lost: dict[str, int] = field(default_factory=dict)  # of which ruled out, and why

    @property
    def ppl(self) -> float:
        return statistics.fmean(r.ppl for r in self.runs)

    @property
    def lo(self) -> float:
        return min(r.ppl for r in self.runs)

    @property
    def hi(self) -> float:
        return max(r.ppl for r in self.runs)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def state_bytes(self) -> int:
        return max(r.state_bytes for r in self.runs)

    @property
    def peak(self) -> Run:
        return max(self.runs, key=lambda r: r.peak_bytes)

    @property
    def tokens_per_s(self) -> float:
        return statistics.fmean(r.tokens_per_s for r in self.runs)

    @property
    def paper_ppl(self) -> float | None:
        return self.runs[0].paper_ppl

    @property
    def paper(self) -> str | None:
        return self.runs[0].paper


def _lost(runs: list[Run]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in runs:
        if not r.ok:
            out[r.status] = out.get(r.status, 0) + 1
    return out


def aggregate(
    runs: list[Run], best_of: Sequence[str] = (), by_corpus: Sequence[str] | None = None
) -> list[Entry]:
    """The sweep as methods: runs that differ only in their seeds pooled, and per method and
    corpus the setting of the ``best_of`` keys with the lowest mean ppl among those whose every
    seed finished (a diverged seed disqualifies its setting, it does not just drop out of the
    mean: an lr that diverges one time in two is not a good lr)."""
    keys = sweep_keys(runs, best_of, by_corpus)
    settings: dict[tuple, list[Run]] = {}
    for r in runs:
        if not r.ok and not r.overrides:  # an unreadable row: only in the failed list
            continue
        group = tuple(
            tuple((k, r.overrides.get(k)) for k in ks)
            for ks in (keys.method, keys.corpus, keys.best_of)
        )
        settings.setdefault((r.model, r.optimizer, r.dup, *group), []).append(r)
    methods: dict[tuple, list[list[Run]]] = {}
    for (model, optimizer, dup, method, corpus, _), members in settings.items():
        methods.setdefault((model, optimizer, dup, method, corpus), []).append(members)
    entries = []
    for (model, optimizer, dup, _, corpus), candidates in methods.items():
        first = candidates[0][0]
        label = _with(optimizer, first.overrides, keys.method) + (f" #{dup}" if dup > 1 else "")
        corpus_name = " ".join(f"{k}={v}" for k, v in corpus if v is not None) or "default"
        if not keys.best_of:
            (members,) = candidates
            ok = [r for r in members if r.ok]
            if ok:
                entries.append(Entry(label, model, optimizer, corpus_name, ok, _lost(members)))
            continue
        finished = [c for c in candidates if all(r.ok for r in c)]
        best = min(finished, key=lambda c: statistics.fmean(r.ppl for r in c), default=[])
        tried_lost: dict[str, int] = {}
        for c in candidates:
            if not all(r.ok for r in c):
                why = "diverged" if any(r.status == "diverged" for r in c) else "failed"
                tried_lost[why] = tried_lost.get(why, 0) + 1
        picked = {k: best[0].overrides.get(k) for k in keys.best_of} if best else {}
        entries.append(
            Entry(label, model, optimizer, corpus_name, best, {}, picked, len(candidates),
                  tried_lost)
        )  # fmt: skip
    return entries


def ties(a: Entry, b: Entry) -> bool:
    """Their ppl ranges over seeds overlap: the gap between them is within the seeds' spread."""
    return a.lo <= b.hi and b.lo <= a.hi


def ranks(entries: list[Entry]) -> list[str]:
    """1 + the number of entries whose whole range lies below this one's; ``=``: it ties with
    another. Single-seed entries are points, so this is plain competition ranking."""
    return [
        ("=" if any(ties(e, o) for o in entries if o is not e) else "")
        + str(1 + sum(o.hi < e.lo for o in entries if o is not e))
        for e in entries
    ]


def pareto_front(
    points: list[tuple[float, float]], ranges: list[tuple[float, float]] | None = None
) -> list[int]:
    """Indices of the points (memory, ppl) that no other point beats on both (lower is better),
    in order of memory. With ppl ``ranges`` (min, max over seeds) a point is beaten only by one
    with no more memory whose whole range lies below its own: a tie on ppl dominates nothing."""
    ranges = ranges or [(p, p) for _, p in points]
    front = [
        i
        for i, (mem, _) in enumerate(points)
        if not any(
            j != i and points[j][0] <= mem and ranges[j][1] < ranges[i][0]
            for j in range(len(points))
        )
    ]
    return sorted(front, key=lambda i: points[i])


def pareto_ties(entries: list[Entry]) -> dict[int, list[str]]:
    """The Pareto front (index -> the labels it is tied with, in order of memory): a front
    entry is tied with each method that would dominate it by the means alone (no more memory,
    lower mean ppl) but whose range overlaps its own, i.e. it is on the front within the
    noise."""
    points = [(e.state_bytes, e.ppl) for e in entries]
    front = pareto_front(points, [(e.lo, e.hi) for e in entries])
    return {
        i: [
            o.label
            for j, o in enumerate(entries)
            if j != i and points[j][0] <= points[i][0] and points[j][1] <= points[i][1]
            and points[j] != points[i]
        ]
        for i in front
    }  # fmt: skip


def _sections(entries: list[Entry]) -> dict[tuple[str, str], list[Entry]]:
    """The finished entries per (model, corpus), best mean ppl first."""
    out: dict[tuple[str, str], list[Entry]] = {}
    for e in sorted((e for e in entries if e.runs), key=lambda e: (e.model, e.corpus, e.ppl)):
        out.setdefault((e.model, e.corpus), []).append(e)
    return out


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.3f}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(counts.items()))


def _ppl_cell(e: Entry, seeds: bool) -> str:
    """``mean (min–max, n=seeds)`` when seeds are pooled; the plain ppl of a one-run row."""
    if not seeds and not e.lost:
        return f"{e.ppl:.2f}"
    spread = [f"{e.lo:.2f}–{e.hi:.2f}"] if e.n > 1 else []
    lost = [_counts(e.lost)] if e.lost else []
    return f"{e.ppl:.2f} ({', '.join([*spread, f'n={e.n}', *lost])})"


def table(
    runs: list[Run],
    best_of: Sequence[str] = (),
    by_corpus: Sequence[str] | None = None,
    throughput: bool = True,
) -> str:
    """The markdown report: per model (and corpus) one row per method, best ppl first. With
    seeds, ``best_of`` keys or corpora in the sweep it ranks the methods (ties marked, module
    docstring); a sweep of single runs keeps the plain table, one row per run. Without
    ``throughput`` the tokens/s columns are left out: runs spread over hours of a shared
    machine were not timed side by side, and their ratios would not be a measurement."""
    keys = sweep_keys(runs, best_of, by_corpus)
    entries = aggregate(runs, best_of, by_corpus)
    ranked = bool(keys.seeds or keys.best_of or keys.corpus)
    out = []
    for (model, corpus), ok in _sections(entries).items():
        base = next((e for e in ok if e.optimizer == BASELINE), None)
        front = pareto_ties(ok)
        papers = any(e.paper_ppl is not None for e in ok)
        cols = [
            *(["rank"] if ranked else []),
            "run",
            *(f"best {k}" for k in keys.best_of),
            *(["tried"] if keys.best_of else []),
            "val ppl",
            *(["paper ppl"] if papers else []),
            "ppl gap to AdamW", "state MiB", "state / AdamW", "peak MiB",
            *(["tokens/s", "tokens/s / AdamW"] if throughput else []), "Pareto",
        ]  # fmt: skip
        out.append(f"### {model}" + (f", {corpus}" if keys.corpus else "") + "\n")
        out.append("| " + " | ".join(cols) + " |")
        out.append(
            "| " + " | ".join(":---:" if c == "Pareto" else "---" if c == "run" else "---:"
                              for c in cols) + " |"
        )  # fmt: skip
        for i, (e, rank) in enumerate(zip(ok, ranks(ok), strict=True)):
            peak = e.peak
            tied = front.get(i)
            cells = [
                *([rank] if ranked else []),
                e.label,
                *(str(e.picked[k]) for k in keys.best_of),
                *([str(e.tried) + (f" ({_counts(e.tried_lost)})" if e.tried_lost else "")]
                  if keys.best_of else []),
                _ppl_cell(e, bool(keys.seeds)),
                *([f"{e.paper_ppl:.2f}" if e.paper_ppl is not None else "-"] if papers else []),
                "-" if base is None else f"{e.ppl - base.ppl:+.2f}",
                _mib(e.state_bytes),
                _ratio(e.state_bytes, base.state_bytes if base else None),
                _mib(peak.peak_bytes) + ("" if peak.peak_is_cuda else " (sum)"),
                *([f"{e.tokens_per_s:,.0f}",
                   _ratio(e.tokens_per_s, base.tokens_per_s if base else None)]
                  if throughput else []),
                "" if tied is None else "yes" + (f" (tied: {', '.join(tied)})" if tied else ""),
            ]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
        if base is None:
            out.append(f"\n(no `{BASELINE}` run for {model}: no ratios)")
        sources = sorted({e.paper for e in ok if e.paper_ppl is not None and e.paper})
        if sources:
            out.append(
                f"\npaper ppl: {'; '.join(sources)} (the papers' estimator, eval.compat=galore)"
            )
        out.append("")
    if ranked:
        out.append(
            "rank: 1 + the methods whose every seed beat this one's every seed; '=': its "
            "min–max ppl range over seeds overlaps another's (a tie). Pareto 'tied: X': X uses "
            "no more state and has a lower mean ppl, but within the seeds' spread."
            + (" val ppl: mean over seeds (min–max, n=seeds)." if keys.seeds else "")
            + "\n"
        )
    ranks_by_corpus = corpus_table(entries)
    if ranks_by_corpus:
        out.append(ranks_by_corpus)
    unfinished = [e for e in entries if not e.runs]
    if unfinished:
        out.append(f"### no setting of {', '.join(keys.best_of)} finished every seed\n")
        out += [
            f"- {e.model} / {e.label}" + (f" ({e.corpus})" if keys.corpus else "")
            + f": {e.tried} tried, {_counts(e.tried_lost)}"
            for e in unfinished
        ]  # fmt: skip
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


def _ahead(by: dict[tuple[str, str], Entry], a: str, b: str, corpus: str) -> bool:
    """On this corpus a's whole ppl range lies below b's."""
    return (a, corpus) in by and (b, corpus) in by and by[a, corpus].hi < by[b, corpus].lo


def corpus_table(entries: list[Entry]) -> str | None:
    """Each method's rank on each corpus, and ``↕ X`` where it and X swap order between two
    corpora beyond the seeds' spread (a ranking that holds on one corpus only is not a
    ranking of methods). None when no model was run on two corpora."""
    out = []
    for model in sorted({e.model for e in entries if e.runs}):
        sections = {c: es for (m, c), es in _sections(entries).items() if m == model}
        if len(sections) < 2:
            continue
        rank, by = {}, {}
        for corpus, es in sections.items():
            for e, r in zip(es, ranks(es), strict=True):
                rank[e.label, corpus], by[e.label, corpus] = r, e
        labels = list(dict.fromkeys(label for label, _ in by))

        flips = {
            a: [b for b in labels if any(_ahead(by, a, b, c1) and _ahead(by, b, a, c2)
                                         for c1 in sections for c2 in sections)]
            for a in labels
        }  # fmt: skip
        mean_rank = {
            a: statistics.fmean(int(rank[a, c].lstrip("=")) for c in sections if (a, c) in rank)
            for a in labels
        }
        out.append(f"### {model}: rank per corpus\n")
        out.append("| run | " + " | ".join(sections) + " | rank flips |")
        out.append("| --- | " + " | ".join("---:" for _ in sections) + " | --- |")
        for a in sorted(labels, key=lambda a: mean_rank[a]):
            cells = [rank.get((a, c), "-") for c in sections]
            flip = f"↕ {', '.join(flips[a])}" if flips[a] else ""
            out.append(f"| {a} | " + " | ".join(cells) + f" | {flip} |")
        out.append(
            "\nrank flips: '↕ X': this method is ahead of X on one corpus and behind it on "
            "another, beyond the seeds' spread on both.\n"
        )
    return "\n".join(out) if out else None


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


def plot(
    runs: list[Run],
    path: Path,
    best_of: Sequence[str] = (),
    by_corpus: Sequence[str] | None = None,
) -> Path:
    """Val ppl against optimizer-state memory, one marker per method (min–max error bars over
    its seeds), the Pareto front joined and its tied points labelled as such."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sweep_keys(runs, best_of, by_corpus)
    sections = _sections(aggregate(runs, best_of, by_corpus))
    if not sections:
        raise ValueError("no successful run to plot")
    # one panel per model and corpus: their perplexities are on scales of their own
    fig, axes = plt.subplots(1, len(sections), figsize=(7 * len(sections), 5), squeeze=False)
    for ax, ((model, corpus), mine) in zip(axes[0], sections.items(), strict=True):
        xs = [e.state_bytes / 2**20 for e in mine]
        ys = [e.ppl for e in mine]
        if any(e.n > 1 for e in mine):
            err = [[e.ppl - e.lo for e in mine], [e.hi - e.ppl for e in mine]]
            ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, zorder=3)
        else:
            ax.scatter(xs, ys, zorder=3)
        front = pareto_ties(mine)
        for i, (e, x, y) in enumerate(zip(mine, xs, ys, strict=True)):
            tied = f" (tied: {', '.join(front[i])})" if front.get(i) else ""
            ax.annotate(e.label + tied, (x, y), textcoords="offset points", xytext=(4, 3),
                        fontsize=7)  # fmt: skip
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", alpha=0.6, zorder=2)
        ax.set_xlabel("optimizer state (MiB)")
        ax.set_ylabel("validation perplexity")
        where = f"{model}, {corpus}" if keys.corpus else model
        ax.set_title(f"{where}: ppl vs optimizer state (dashed: Pareto front)", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("sweep", type=Path, help="a multirun directory or its results.jsonl")
    ap.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to it)")
    ap.add_argument(
        "--best-of",
        action="append",
        default=[],
        metavar="KEY",
        help="keep, per method, the value of this swept override (e.g. trainer.lr) with the "
        "lowest mean ppl over seeds; repeatable",
    )
    ap.add_argument(
        "--by-corpus",
        action="append",
        nargs="?",
        const=CORPUS_KEY,
        metavar="KEY",
        help="rank per corpus, corpora told apart by KEY and its KEY.* overrides (default, "
        "and automatic when it varies: data); repeatable, give it after the sweep",
    )
    ap.add_argument(
        "--no-throughput",
        action="store_true",
        help="leave out the tokens/s columns, for runs that were not timed side by side "
        "(spread over a shared machine or a cluster's nodes)",
    )
    args = ap.parse_args(argv)
    try:
        runs = load_runs(args.sweep)
        report = table(runs, args.best_of, args.by_corpus, throughput=not args.no_throughput)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    print(report)
    tasks = task_table(runs)
    if tasks:
        print(tasks)
    if any(r.ok for r in runs):
        where = args.sweep if args.sweep.is_dir() else args.sweep.parent
        target = args.plot or where / "report.png"
        print(f"\nplot: {plot(runs, target, args.best_of, args.by_corpus)}")
        heat = plot_accuracy_matrices(runs, target.with_name(f"{target.stem}_tasks.png"))
        if heat is not None:
            print(f"accuracy matrices: {heat}")


if __name__ == "__main__":
    main()
