"""The CPU benchmark protocol (``llm_pretrain/cpu_bench.py``): which jobs it runs (the lr grid,
its extension at an edge, the seeds at the best), that it resumes, and its report; and the
tokenizer it trains for ``data=c4_sample``."""

import gzip
import itertools
import json
import shutil
from pathlib import Path

import pytest

from llm_pretrain import cpu_bench
from llm_pretrain.cpu_bench import Job, Outcome, kendall_tau, next_jobs
from llm_pretrain.tokenizer_training import train_sentencepiece
from tests.conftest import SHARED_DATA


def lrs(jobs):
    return [(j.lr_text, j.seed) for j in jobs]


def test_the_grid_is_three_lrs_around_the_config_lr():
    assert lrs(next_jobs("builtin", "adamw", 0.003, [], 2)) == [
        ("0.001", 0),
        ("0.003", 0),
        ("0.009", 0),
    ]
    # only the missing ones, after a partial run
    done = [Outcome(0.001, [40.0])]
    assert lrs(next_jobs("builtin", "adamw", 0.003, done, 2)) == [("0.003", 0), ("0.009", 0)]


def test_a_best_lr_at_the_edge_extends_the_grid_at_most_twice_per_side():
    grid = [Outcome(0.001, [50.0]), Outcome(0.003, [45.0]), Outcome(0.009, [40.0])]
    assert lrs(next_jobs("c4_sample", "adamw", 0.003, grid, 2)) == [("0.027", 0)]
    grid += [Outcome(0.027, [39.0])]
    assert lrs(next_jobs("c4_sample", "adamw", 0.003, grid, 2)) == [("0.081", 0)]
    grid += [Outcome(0.081, [38.0])]  # lr x 27: no further, though still the best
    assert lrs(next_jobs("c4_sample", "adamw", 0.003, grid, 2)) == [("0.081", 1)]
    low = [Outcome(0.001, [40.0]), Outcome(0.003, [45.0]), Outcome(0.009, [50.0])]
    assert lrs(next_jobs("c4_sample", "adamw", 0.003, low, 2)) == [("0.000333", 0)]


def test_a_diverged_lr_above_the_best_stops_the_extension():
    grid = [Outcome(0.001, [50.0]), Outcome(0.003, [45.0]), Outcome(0.009, [40.0])]
    grid += [Outcome(0.027, [None])]  # diverged: 0.009 is interior among the lrs tried
    assert lrs(next_jobs("builtin", "galore", 0.003, grid, 2)) == [("0.009", 1)]


def test_the_seeds_follow_the_best_until_it_has_them_all():
    grid = [Outcome(0.001, [50.0]), Outcome(0.003, [40.0, 60.0]), Outcome(0.009, [45.0])]
    grid.append(Outcome(0.027, [70.0]))
    # 0.003's second seed moved its mean (50) above 0.009's: 0.009 gets its seed too
    assert lrs(next_jobs("builtin", "adamw", 0.003, grid, 2)) == [("0.009", 1)]
    grid[2].ppl.append(46.0)
    assert next_jobs("builtin", "adamw", 0.003, grid, 2) == []
    assert lrs(next_jobs("builtin", "adamw", 0.003, grid, 3)) == [("0.009", 2)]


def test_a_method_whose_every_lr_diverged_is_done():
    grid = [Outcome(lr, [None]) for lr in (0.001, 0.003, 0.009)]
    assert next_jobs("builtin", "adamw", 0.003, grid, 2) == []


def test_kendall_tau():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == -1.0
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)


def fake_runner(ppl_of):
    """A runner that writes the row a job would, with ppl_of(job) as its result (None:
    diverged)."""
    calls = []

    def run(job, out, extra):
        calls.append(job)
        ppl = ppl_of(job)
        run_dir = job.run_dir(out)
        run_dir.mkdir(parents=True)
        with open(run_dir / "metrics.jsonl", "w") as f:
            for step, scale in ((2, 1.5), (4, 1.0)):
                if ppl is not None:
                    f.write(json.dumps({"step": step, "eval/loss": scale * ppl / 10}) + "\n")
        row = {
            "run_dir": str(run_dir),
            "overrides": job.overrides(extra),
            "model": "llama_tiny",
            "optimizer": job.method,
            "status": "ok" if ppl is not None else "diverged",
            "final_val_ppl": ppl,
            "tokens_per_s": 1000.0,
            "memory": {"optimizer_state": 100, "weights": 10, "gradients": 10,
                       "activations": 10},
        }  # fmt: skip
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        entropy = 3.0 if job.corpus == "builtin" else None  # (known for the built-in language)
        (run_dir / "summary.json").write_text(json.dumps({"eval": {"source_entropy": entropy}}))

    return run, calls


def test_the_protocol_runs_what_is_missing_and_resumes(tmp_path):
    def ppl(job: Job):
        if job.lr > 0.05:
            return None  # diverged
        best = {"adamw": 0.009, "galore": 0.003}[job.method]
        return 30 + 100 * abs(job.lr - best) + 0.01 * job.seed + (job.corpus == "c4_sample")

    run, calls = fake_runner(ppl)
    args = dict(runner=run, lr_of=lambda m: 0.003)
    ran = cpu_bench.run_protocol(tmp_path, ["adamw", "galore"], ["builtin", "c4_sample"], 2, **args)
    # adamw: 3 lrs, +0.027 (best at the top edge), seed 1 at 0.009; galore: 3 + seed 1
    assert ran == len(calls) == 2 * (5 + 4)
    assert lrs(c for c in calls if c.method == "adamw" and c.corpus == "builtin") == [
        ("0.001", 0),
        ("0.003", 0),
        ("0.009", 0),
        ("0.027", 0),
        ("0.009", 1),
    ]
    calls.clear()
    assert cpu_bench.run_protocol(tmp_path, ["adamw", "galore"], CORPORA, 2, **args) == 0
    assert calls == []
    # a third seed asks for one more job per method and corpus
    assert cpu_bench.run_protocol(tmp_path, ["adamw", "galore"], CORPORA, 3, **args) == 4


CORPORA = ["builtin", "c4_sample"]


def test_the_report_picks_each_methods_best_lr_and_ranks_along_the_way(tmp_path, capsys):
    run, _ = fake_runner(lambda job: {"adamw": 40.0, "galore": 35.0}[job.method] + job.seed
                         + 10 * abs(job.lr - 0.003))  # fmt: skip
    cpu_bench.run_protocol(tmp_path, ["adamw", "galore"], CORPORA, 2, runner=run,
                           lr_of=lambda m: 0.003)  # fmt: skip
    cpu_bench.main(["--out", str(tmp_path), "--methods", "adamw,galore", "--report-only"])
    out = capsys.readouterr().out
    assert "best optimizer.lr" in out and "| data=builtin | data=c4_sample |" in out
    assert "tokens/s" not in out  # (not timed side by side)
    assert "35.50 (35.00–36.00, n=2)" in out  # galore at 0.003, seeds 0 and 1
    assert "ranking along the way, data=builtin" in out
    assert "| galore | 1 (5.325) | 1 (3.550) |" in out
    assert "| Kendall's tau vs final | 1.00 | 1.00 |" in out
    pairs = "| of the 1 pairs apart beyond the seeds at the end, in the other order |"
    assert f"{pairs} 0 | 0 |" in out
    # the built-in language's floor, under its table only (C4's entropy is unknown)
    assert out.count("the loss no model can beat: 3.0000 nats per token (ppl 20.09)") == 1
    assert "the best method is 0.5500 nats above it" in out


def test_the_archive_reports_the_same_without_the_run_directories(tmp_path, capsys):
    """``--archive DIR`` keeps the rows with their curves and the source entropy, but not the
    configs; ``--out DIR --report-only`` then gives the same report, ranking along the way
    and entropy floor included."""
    sweep, kept = tmp_path / "sweep", tmp_path / "archive"
    run, _ = fake_runner(lambda job: {"adamw": 40.0, "galore": 35.0}[job.method] + job.seed
                         + 10 * abs(job.lr - 0.003))  # fmt: skip
    cpu_bench.run_protocol(sweep, ["adamw", "galore"], CORPORA, 2, runner=run,
                           lr_of=lambda m: 0.003)  # fmt: skip
    with open(sweep / "results.jsonl") as f:  # (the real rows carry their config)
        rows = [json.loads(line) | {"config": {"model": {"name": "llama_tiny"}}} for line in f]
    (sweep / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    report = ["--methods", "adamw,galore", "--report-only"]
    cpu_bench.main(["--out", str(sweep), *report])
    before = capsys.readouterr().out
    cpu_bench.main(["--out", str(sweep), "--archive", str(kept)])
    capsys.readouterr()
    archived = cpu_bench.read_rows(kept)
    assert len(archived) == len(rows) and not any("config" in r for r in archived)
    shutil.rmtree(sweep)
    cpu_bench.main(["--out", str(kept), *report])
    after = capsys.readouterr().out
    assert "ranking along the way, data=c4_sample" in after and "3.0000 nats" in after
    assert after.replace(str(kept), "X") == before.replace(str(sweep), "X")
    with pytest.raises(SystemExit, match="is an archive .*use --report-only with it"):
        cpu_bench.run_protocol(kept, ["adamw"], CORPORA, 2, runner=run, lr_of=lambda m: 0.003)
    with pytest.raises(SystemExit, match="has no results.jsonl rows to archive"):
        cpu_bench.main(["--out", str(sweep), "--archive", str(tmp_path / "none")])


def test_the_ranking_along_the_way_counts_swaps_that_the_seeds_cannot_explain(tmp_path):
    """Three methods, two seeds each (archived rows, curves inline): a and b end apart beyond
    their seeds, and so do a and c; c ends tied with b. At step 1 b and c lead a (two swaps that
    count) and c leads b (a swap within a tie: Kendall's tau counts it, the separated-pairs row
    does not)."""

    def rows(method, curves):
        return [
            {"overrides": ["experiment=cpu_bench", "data=builtin", f"optimizer={method}",
                           "optimizer.lr=0.001", f"trainer.seed={seed}"],
             "run_dir": "gone", "status": "ok", "final_val_ppl": curve["2"],
             "eval_curve": curve, "source_entropy": None}
            for seed, curve in enumerate(curves)
        ]  # fmt: skip

    sweep = [
        *rows("a", [{"1": 5.0, "2": 3.0}, {"1": 5.2, "2": 3.1}]),
        *rows("b", [{"1": 4.5, "2": 3.5}, {"1": 4.6, "2": 3.7}]),
        *rows("c", [{"1": 4.0, "2": 3.6}, {"1": 4.1, "2": 3.8}]),
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sweep))
    table = cpu_bench.stability_table(tmp_path, ["a", "b", "c"], ["builtin"])
    assert "| a | 3 (5.100) | 1 (3.050) |" in table
    assert "| Kendall's tau vs final | -1.00 | 1.00 |" in table
    pairs = "| of the 2 pairs apart beyond the seeds at the end, in the other order |"
    assert f"{pairs} 2 | 0 |" in table


def test_the_budget_line_takes_the_median_run_and_counts_the_slowed_ones(tmp_path):
    """A paused run (600 s) does not move the median; it is counted as slowed, and the sum
    keeps it, so both figures of the docs come from this line."""
    times = [40.0, 42.0, 44.0, 600.0, None]  # (None: a diverged run has no wall time)
    rows = [{"status": "ok", "wall_time_s": t} for t in times]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cpu_bench.budget_line(tmp_path) == (
        "\nbudget: 5 runs (4 timed); wall time per run median 43 s, 40-600 s (1 over twice the "
        "median: slowed or paused); 5 x median = 0.1 h, the wall times' sum 0.2 h"
    )
    assert cpu_bench.budget_line(tmp_path / "none") == ""


def test_bad_arguments_say_what_to_use(tmp_path):
    with pytest.raises(SystemExit, match="not a pretraining method; use adamw"):
        cpu_bench.main(["--out", str(tmp_path), "--methods", "adamw,welore", "--report-only"])
    with pytest.raises(SystemExit, match="--corpora: c4 unknown; use builtin, c4_sample"):
        cpu_bench.main(["--out", str(tmp_path), "--corpora", "c4", "--report-only"])


def test_a_job_cut_off_mid_run_runs_again(tmp_path):
    """A job's directory without a row (the process was killed) is cleared before it runs."""
    job = Job("builtin", "adamw", 0.001, 0)
    stale = job.run_dir(tmp_path)
    stale.mkdir(parents=True)
    (stale / "metrics.jsonl").write_text('{"step": 1}\n')
    assert cpu_bench.clear_stale(job, tmp_path) and not stale.exists()
    assert not cpu_bench.clear_stale(job, tmp_path)


def test_a_preempted_job_runs_again_on_resume(tmp_path):
    """A job stopped by SIGTERM writes a ``preempted`` row; it is not a result (its ppl is
    None), so resuming drops the row and runs the job again instead of counting a seed."""
    run, calls = fake_runner(lambda job: 30.0 + 100 * abs(job.lr - 0.003) + job.seed)
    args = dict(runner=run, lr_of=lambda m: 0.003)
    cpu_bench.run_protocol(tmp_path, ["adamw"], ["builtin"], 2, **args)
    rows = cpu_bench.read_rows(tmp_path)
    seed1 = next(r for r in rows if "trainer.seed=1" in r["overrides"])
    seed1.update(status="preempted", final_val_ppl=None, error="stopped by SIGTERM")
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.rmtree(Path(seed1["run_dir"]))  # (the fake runner refuses an existing directory)
    calls.clear()
    assert cpu_bench.run_protocol(tmp_path, ["adamw"], ["builtin"], 2, **args) == 1
    assert lrs(calls) == [("0.003", 1)]
    statuses = [r["status"] for r in cpu_bench.read_rows(tmp_path)]
    assert "preempted" not in statuses and len(statuses) == len(rows)


def test_a_preempted_job_stops_the_protocol(tmp_path, monkeypatch):
    """SIGTERM to the protocol stops it with the requeue code, rather than starting the next
    job (which the signal was meant to prevent)."""
    from llm_pretrain import train as train_module
    from llm_pretrain.preemption import REQUEUE_EXIT, Preempted

    def preempted(*args, **kwargs):
        raise Preempted("stopped by SIGTERM after step 3", "SIGTERM", None)

    monkeypatch.setattr(train_module, "train", preempted)
    with pytest.raises(SystemExit) as stop:
        cpu_bench.run_job(Job("builtin", "adamw", 0.001, 0), tmp_path, [])
    assert stop.value.code == REQUEUE_EXIT


def c4_docs(tmp_path, n: int):
    path = tmp_path / "c4.jsonl"
    with gzip.open(SHARED_DATA / "c4" / "c4_en_sample_2000.jsonl.gz", "rt") as f:
        path.write_text("".join(itertools.islice(f, n)))
    return path


def test_the_tokenizer_is_trained_on_the_training_documents_only(tmp_path):
    import sentencepiece as spm

    docs = c4_docs(tmp_path, 40)
    texts = [json.loads(line)["text"] for line in docs.read_text().splitlines()]
    a = train_sentencepiece(str(docs), tmp_path / "a" / "sp.model", vocab_size=300, held_out=10)
    sp = spm.SentencePieceProcessor(model_file=str(a))
    assert (sp.get_piece_size(), sp.pad_id(), sp.eos_id()) == (300, 0, 1)
    plain = next(t for t in texts[10:] if t.isascii())
    assert sp.decode(sp.encode(plain)) == " ".join(plain.split())  # round trip
    assert sorted(p.name for p in a.parent.iterdir()) == ["sp.model"]  # no leftovers
    again = train_sentencepiece(str(docs), a, vocab_size=300, held_out=10)
    assert again.read_bytes() == a.read_bytes() or pytest.fail("not deterministic")
    # held-out documents are not training text: the same model from the 30 documents alone
    rest = tmp_path / "rest.jsonl"
    rest.write_text("".join(docs.read_text().splitlines(keepends=True)[10:]))
    b = train_sentencepiece(str(rest), tmp_path / "a" / "sp.model", vocab_size=300, held_out=0)
    assert b.read_bytes() == a.read_bytes()


def test_the_tokenizer_trainer_refuses_what_it_cannot_use(tmp_path):
    docs = c4_docs(tmp_path, 5)
    with pytest.raises(ValueError, match="must be a .model file"):
        train_sentencepiece(str(docs), tmp_path / "sp.json")
    with pytest.raises(ValueError, match="no document is left after the 5 held out"):
        train_sentencepiece(str(docs), tmp_path / "sp.model", held_out=5)
    with pytest.raises(KeyError, match="no field 'body'"):
        train_sentencepiece(str(docs), tmp_path / "sp.model", held_out=0, text_field="body")


def test_a_sweep_run_under_other_settings_is_not_resumed():
    """A row's config against the protocol's now: a changed setting is refused by name; a
    setting added since (absent from the row) is not a difference."""
    from omegaconf import OmegaConf

    from llm_pretrain.cpu_bench import check_same_protocol, differences

    then = {"trainer": {"max_steps": 300, "seed": 0}, "model": {"name": "llama_tiny"}}
    now = {"trainer": {"max_steps": 400, "seed": 0, "new_key": 1}, "model": {"name": "llama_tiny"}}
    assert differences(then, now) == ["trainer.max_steps: 300 -> 400"]
    row = {"overrides": ["data=builtin", "optimizer=adamw"], "config": then, "status": "ok"}
    same = {**then, "trainer": {**then["trainer"], "added_since": True}}
    check_same_protocol(Path("sweep"), [row], lambda o: OmegaConf.create(same))
    with pytest.raises(SystemExit, match=r"data=builtin: trainer.max_steps: 300 -> 400\); their"):
        check_same_protocol(Path("sweep"), [row], lambda o: OmegaConf.create(now))
