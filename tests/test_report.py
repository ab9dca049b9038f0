"""python -m llm_pretrain.report on a fixture sweep: the table, the failed rows, the plot."""

import json

import pytest

from llm_pretrain.report import aggregate, load_runs, main, pareto_front, plot, table

MiB = 2**20


def row(optimizer, ppl, state_mib, tps, model="llama_20m", cuda=None):
    return {
        "status": "ok",
        "model": model,
        "optimizer": optimizer,
        "overrides": [f"optimizer={optimizer}"],
        "final_val_ppl": ppl,
        "final_val_loss": 3.0,
        "tokens_seen": 1000,
        "tokens_per_s": tps,
        "wall_time_s": 10.0,
        "memory": {
            "weights": 10 * MiB,
            "gradients": 10 * MiB,
            "optimizer_state": state_mib * MiB,
            "activations": 5 * MiB,
            "cuda_peak_allocated": cuda,
            "cuda_peak_reserved": cuda,
        },
    }


@pytest.fixture
def sweep(tmp_path):
    lines = [
        json.dumps(row("adamw", 80.0, 20, 1000.0)),
        json.dumps(row("galore", 81.0, 12, 800.0)),
        json.dumps(row("apollo_mini", 85.0, 4, 1100.0, cuda=64 * MiB)),
        json.dumps(row("flora", 90.0, 14, 500.0)),  # beaten by galore on both: off the front
        json.dumps({"status": "failed", "model": "llama_20m", "optimizer": "osd", "error": "OOM"}),
        '{"status": "ok", "model": "llama_20m", "optimizer": "gr',  # the run died mid-write
        "",  # an empty row
        "{}",  # a row with nothing in it
    ]
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_the_table_has_ratios_to_adamw_the_front_and_every_failure(sweep):
    runs = load_runs(sweep)
    assert [r.ok for r in runs] == [True, True, True, True, False, False, False, False]
    text = table(runs)
    lines = text.splitlines()
    galore = next(line for line in lines if line.startswith("| galore |"))
    assert galore == ("| galore | 81.00 | +1.00 | 12.0 | 0.600 | 37.0 (sum) | 800 | 0.800 | yes |")
    mini = next(line for line in lines if line.startswith("| apollo_mini |"))
    assert "| 64.0 |" in mini and mini.endswith("| yes |")  # the CUDA peak when there is one
    flora = next(line for line in lines if line.startswith("| flora |"))
    assert flora.endswith("|  |")  # not on the front
    assert "- llama_20m / osd: OOM" in text
    assert "line 6" in text and "unreadable row" in text
    assert "line 7: empty row" in text and "? / ?: no status" in text
    # sorted by ppl within the model
    order = [
        line.split("|")[1].strip() for line in lines if line.startswith("| ") and "---" not in line
    ]
    assert order[1:] == ["adamw", "galore", "apollo_mini", "flora"]


def test_the_pareto_front():
    points = [(20, 80.0), (12, 81.0), (4, 85.0), (14, 90.0), (4, 86.0)]
    assert pareto_front(points) == [2, 1, 0]


def test_the_plot_is_a_png(sweep, tmp_path):
    path = plot(load_runs(sweep), tmp_path / "p.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_the_cli_prints_and_plots(sweep, capsys):
    main([str(sweep)])
    out = capsys.readouterr().out
    assert "### llama_20m" in out and (sweep / "report.png").is_file()


def test_a_missing_sweep_is_explained(tmp_path):
    with pytest.raises(SystemExit, match="no results.jsonl"):
        main([str(tmp_path)])


def test_without_adamw_there_are_no_ratios(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps(row("galore", 81.0, 12, 800.0)) + "\n")
    text = table(load_runs(tmp_path))
    assert "| galore | 81.00 | - | 12.0 | - |" in text and "no `adamw` run" in text


def test_a_sweeps_wandb_runs_share_a_group_and_carry_ppl_and_memory(tmp_path, monkeypatch):
    """Each job of a sweep joins the group named after the sweep directory, and its wandb summary
    holds what the report plots (the UI can draw the same scatter)."""
    import wandb

    from llm_pretrain.train import train
    from tests.conftest import TINY, compose_cfg

    calls = []

    class FakeRun:
        id = "fake"

        def __init__(self):
            self.summary = {}

        def define_metric(self, *args, **kwargs):
            pass

        def log(self, *args, **kwargs):
            pass

        def finish(self):
            pass

    def fake_init(**kwargs):
        calls.append((kwargs, FakeRun()))
        return calls[-1][1]

    monkeypatch.setattr(wandb, "init", fake_init)
    for job in ("0", "1"):
        cfg = compose_cfg([*TINY, "trainer.max_steps=1", "logger=wandb"])
        train(cfg, tmp_path / "sweep7" / job, sweep_dir=tmp_path / "sweep7")
    assert [kw["group"] for kw, _ in calls] == ["sweep-sweep7", "sweep-sweep7"]
    summary = calls[0][1].summary
    assert "eval/final_ppl" in summary and "memory/optimizer_state" in summary


def test_a_paper_recipe_run_gets_the_papers_perplexity_in_its_own_column(tmp_path):
    """Only the recipe's own optimizer gets the figure (the paper ran nothing else)."""
    experiment = {
        "name": "galore_c4",
        "optimizer": "galore",
        "paper": "GaLore (Zhao et al. 2024), Table 2",
        "sizes": {"llama_60m": {"rank": 128, "paper_ppl": 34.88}, "llama_130m": {"rank": 256}},
    }
    rows = [
        row("adamw", 36.0, 20, 1000.0, model="llama_60m"),
        row("galore", 35.5, 12, 900.0, model="llama_60m"),
        row("galore", 26.0, 30, 500.0, model="llama_130m"),  # no paper figure at this size
    ]
    for r in rows:
        r["config"] = {"experiment": experiment}
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = table(load_runs(tmp_path))
    lines = text.splitlines()
    assert "| run | val ppl | paper ppl | ppl gap to AdamW |" in text
    assert "| galore | 35.50 | 34.88 | -0.50 |" in text
    assert next(line for line in lines if line.startswith("| adamw |")).startswith(
        "| adamw | 36.00 | - |"
    )
    assert "paper ppl: GaLore (Zhao et al. 2024), Table 2" in text
    section_130m = text.split("### llama_130m")[1]
    assert "paper ppl |" not in section_130m.split("\n\n")[1]  # no column without a figure


def test_task_runs_get_accuracy_aa_bwt_and_heatmaps(tmp_path, capsys):
    def cl_row(optimizer, matrix):
        r = row(optimizer, 5.0, 10, 100.0)
        names = ["dbpedia", "agnews"]
        r["tasks"] = {
            "names": names,
            "metric": "generate",
            "accuracy": dict(zip(names, matrix[-1], strict=True)),
            "continual": {"matrix": matrix, "aa": sum(matrix[-1]) / 2,
                          "bwt": matrix[-1][0] - matrix[0][0]},
        }  # fmt: skip
        return r

    lines = [cl_row("adamw", [[0.9, 0.1], [0.5, 0.8]]), cl_row("gorp", [[0.9, 0.2], [0.8, 0.8]])]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    main([str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    header = out.index("### tasks (exact-match accuracy, %)")
    gorp, adamw = out[header + 4], out[header + 5]  # best AA first
    want = "| gorp | llama_20m | generate | 80.0 | -10.0 | 80.0 | 80.0 | 10.0 | 1.000 | 100 |"
    assert gorp == want
    assert adamw.startswith("| adamw | llama_20m | generate | 65.0 | -40.0 | 50.0 | 80.0 |")
    assert (tmp_path / "report_tasks.png").read_bytes()[:4] == b"\x89PNG"


def swept(optimizer, ppl, *overrides, state_mib=10, tps=1000.0, status="ok"):
    """A sweep row with its overrides; a diverged or failed one has no ppl, as sweep_row writes
    it."""
    r = row(optimizer, ppl, state_mib, tps)
    r["overrides"] = [f"optimizer={optimizer}", *overrides]
    if status != "ok":
        return {k: r[k] for k in ("model", "optimizer", "overrides")} | {
            "status": status,
            "error": "non-finite loss" if status == "diverged" else "OOM",
        }
    return r


def write(tmp_path, rows):
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def cells(text, label):
    """The cells of the table row whose run column is ``label`` (after a rank column or not)."""
    for line in text.splitlines():
        parts = [c.strip() for c in line.split("|")[1:-1]]
        if label in parts[:2]:
            return parts
    raise AssertionError(f"no row {label!r} in\n{text}")


def lr_seeds(optimizer, lr, *ppls, **kw):
    return [swept(optimizer, p, f"trainer.lr={lr}", f"trainer.seed={s}", **kw)
            for s, p in enumerate(ppls)]  # fmt: skip


def test_best_of_keeps_the_lr_with_the_lowest_mean_over_seeds(tmp_path, capsys):
    """lr=0.01 has adamw's single best run (90) but the worst mean (105): 0.003 (mean 97) wins."""
    rows = [
        *lr_seeds("adamw", "0.001", 100.0, 104.0),
        *lr_seeds("adamw", "0.003", 95.0, 99.0),
        *lr_seeds("adamw", "0.01", 90.0, 120.0),
        *lr_seeds("galore", "0.003", 96.0, 98.0),
        *lr_seeds("galore", "0.01", 92.0, 94.0),
    ]
    main([str(write(tmp_path, rows)), "--best-of", "trainer.lr"])
    out = capsys.readouterr().out
    assert "| rank | run | best trainer.lr | tried | val ppl | ppl gap to AdamW |" in out
    assert cells(out, "galore")[:6] == ["1", "galore", "0.01", "2", "93.00 (92.00–94.00, n=2)",
                                        "-4.00"]  # fmt: skip
    assert cells(out, "adamw")[:6] == ["2", "adamw", "0.003", "3", "97.00 (95.00–99.00, n=2)",
                                       "+0.00"]  # fmt: skip
    # without --best-of every lr is a row of its own, its seeds still pooled
    text = table(load_runs(tmp_path))
    assert cells(text, "adamw trainer.lr=0.01")[2] == "105.00 (90.00–120.00, n=2)"
    assert "| tokens/s | tokens/s / AdamW | Pareto |" in text


def test_no_throughput_leaves_the_tokens_per_s_columns_out(tmp_path, capsys):
    """Runs spread over a shared machine were not timed side by side: no tokens/s."""
    rows = [*lr_seeds("adamw", "0.003", 95.0, 99.0), *lr_seeds("galore", "0.01", 92.0, 94.0)]
    main([str(write(tmp_path, rows)), "--best-of", "trainer.lr", "--no-throughput"])
    out = capsys.readouterr().out
    assert "tokens/s" not in out
    assert "| state / AdamW | peak MiB | Pareto |" in out
    assert cells(out, "galore")[-1] == "yes"


def test_a_second_best_of_key_picks_the_best_combination(tmp_path):
    rows = [
        swept("galore", ppl, f"trainer.lr={lr}", f"optimizer.rank={rank}")
        for lr, rank, ppl in [("0.01", 64, 90.0), ("0.01", 128, 85.0), ("0.001", 64, 95.0),
                              ("0.001", 128, 88.0)]
    ]  # fmt: skip
    text = table(load_runs(write(tmp_path, rows)), best_of=["trainer.lr", "optimizer.rank"])
    assert "| rank | run | best trainer.lr | best optimizer.rank | tried | val ppl |" in text
    assert cells(text, "galore")[:5] == ["1", "galore", "0.01", "128", "4"]


def test_a_diverged_or_failed_seed_rules_its_lr_out_but_is_counted(tmp_path):
    rows = [
        # lr=0.01's finished seed (50) beats everything, but its other seed diverged
        swept("galore", 50.0, "trainer.lr=0.01", "trainer.seed=0"),
        swept("galore", None, "trainer.lr=0.01", "trainer.seed=1", status="diverged"),
        *lr_seeds("galore", "0.001", 80.0, 82.0),
        *lr_seeds("flora", "0.01", None, None, status="diverged"),
        swept("flora", 70.0, "trainer.lr=0.1", "trainer.seed=0"),
        swept("flora", None, "trainer.lr=0.1", "trainer.seed=1", status="failed"),
    ]
    text = table(load_runs(write(tmp_path, rows)), best_of=["trainer.lr"])
    assert cells(text, "galore")[2:5] == ["0.001", "2 (1 diverged)", "81.00 (80.00–82.00, n=2)"]
    assert "### no setting of trainer.lr finished every seed" in text
    assert "- llama_20m / flora: 2 tried, 1 diverged, 1 failed" in text
    assert "- llama_20m / galore trainer.lr=0.01 trainer.seed=1: non-finite loss" in text
    assert not any(line.startswith("| 1 | flora") for line in text.splitlines())


def test_seeds_are_pooled_into_a_mean_a_range_and_a_count(tmp_path):
    rows = [
        swept("adamw", 1210.0, "trainer.seed=0", tps=900.0),
        swept("adamw", 1260.0, "trainer.seed=1", tps=1100.0),
        swept("adamw", 1235.0, "trainer.seed=2", tps=1000.0),
        swept("galore", 1300.0, "trainer.seed=0"),
        swept("galore", 1320.0, "trainer.seed=1"),
        swept("galore", None, "trainer.seed=2", status="diverged"),
    ]
    runs = load_runs(write(tmp_path, rows))
    adamw, galore = aggregate(runs)
    assert (adamw.label, adamw.ppl, adamw.lo, adamw.hi, adamw.n) == ("adamw", 1235.0, 1210.0,
                                                                     1260.0, 3)  # fmt: skip
    assert adamw.tokens_per_s == 1000.0 and galore.lost == {"diverged": 1}
    text = table(runs)
    assert cells(text, "adamw")[:3] == ["1", "adamw", "1235.00 (1210.00–1260.00, n=3)"]
    assert cells(text, "galore")[:3] == [
        "2",
        "galore",
        "1310.00 (1300.00–1320.00, n=2, 1 diverged)",
    ]


@pytest.mark.parametrize("galore_lo", [105.0, 111.0])
def test_overlapping_ranges_tie_in_the_rank_and_on_the_front(tmp_path, galore_lo):
    """adamw [100, 110] at 20 MiB; galore [galore_lo, 115] at 30 MiB; flora [120, 130] at 40 MiB.
    Overlapping, galore ties with adamw: same rank, and adamw does not dominate it."""
    rows = [
        swept("adamw", 100.0, "trainer.seed=0", state_mib=20),
        swept("adamw", 110.0, "trainer.seed=1", state_mib=20),
        swept("galore", galore_lo, "trainer.seed=0", state_mib=30),
        swept("galore", 115.0, "trainer.seed=1", state_mib=30),
        swept("flora", 120.0, "trainer.seed=0", state_mib=40),
        swept("flora", 130.0, "trainer.seed=1", state_mib=40),
    ]
    text = table(load_runs(write(tmp_path, rows)))
    rank_and_front = {
        m: (cells(text, m)[0], cells(text, m)[-1]) for m in ("adamw", "galore", "flora")
    }
    if galore_lo < 110.0:
        assert rank_and_front == {"adamw": ("=1", "yes"), "galore": ("=1", "yes (tied: adamw)"),
                                  "flora": ("3", "")}  # fmt: skip
    else:
        assert rank_and_front == {"adamw": ("1", "yes"), "galore": ("2", ""), "flora": ("3", "")}


def test_the_pareto_front_with_ranges():
    points = [(20, 105.0), (30, 110.0), (40, 125.0)]
    assert pareto_front(points) == [0]
    assert pareto_front(points, [(100.0, 110.0), (105.0, 115.0), (120.0, 130.0)]) == [0, 1]


@pytest.mark.parametrize("galore_on_c4", [120.0, 100.0])
def test_a_rank_that_flips_between_corpora_is_flagged(tmp_path, capsys, galore_on_c4):
    """adamw beats galore on c4 and loses on builtin: both flagged; apollo is last on both. An
    exact tie on c4 (100 = 100) is no flip."""
    ppl = {"data=c4": {"adamw": 100.0, "galore": galore_on_c4, "apollo": 130.0},
           "data=builtin": {"galore": 50.0, "adamw": 60.0, "apollo": 70.0}}  # fmt: skip
    rows = [swept(m, p, corpus) for corpus, by in ppl.items() for m, p in by.items()]
    main([str(write(tmp_path, rows))])  # the corpus varies: per-corpus ranks without a flag
    out = capsys.readouterr().out
    assert "### llama_20m, data=c4" in out and "### llama_20m, data=builtin" in out
    c4 = out.split("### llama_20m, data=c4")[1]
    assert cells(c4, "adamw")[:3] == ["1" if galore_on_c4 > 100.0 else "=1", "adamw", "100.00"]
    ranks = out.split("### llama_20m: rank per corpus")[1]
    assert "| run | data=builtin | data=c4 | rank flips |" in ranks
    if galore_on_c4 > 100.0:
        assert cells(ranks, "adamw") == ["adamw", "2", "1", "↕ galore"]
        assert cells(ranks, "galore") == ["galore", "1", "2", "↕ adamw"]
    else:
        assert cells(ranks, "adamw") == ["adamw", "2", "=1", ""]
        assert cells(ranks, "galore") == ["galore", "1", "=1", ""]
    assert cells(ranks, "apollo") == ["apollo", "3", "3", ""]


def test_by_corpus_names_another_key(tmp_path):
    runs = [("a", "adamw", 1.0), ("a", "galore", 2.0), ("b", "adamw", 2.0), ("b", "galore", 1.0)]
    rows = [swept(m, p, f"experiment={e}") for e, m, p in runs]
    text = table(load_runs(write(tmp_path, rows)), by_corpus=["experiment"])
    assert cells(text.split("rank per corpus")[1], "adamw") == ["adamw", "1", "2", "↕ galore"]


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        (["--best-of", "trainer.lrr"],
         "--best-of trainer.lrr: it does not vary (no run's overrides set trainer.lrr)"),
        (["--best-of", "trainer.max_steps"],
         "--best-of trainer.max_steps: it does not vary (every run sets trainer.max_steps=100)"),
        (["--best-of", "trainer.seed"], "--best-of trainer.seed: seeds are pooled"),
        (["--by-corpus"], "--by-corpus data: it does not vary"),
    ],
)  # fmt: skip
def test_a_key_no_run_varies_is_refused_by_name_with_the_keys_that_do(tmp_path, flags, why):
    rows = [swept("adamw", 90.0 + i, f"trainer.lr={lr}", f"trainer.seed={s}",
                  "trainer.max_steps=100")
            for i, (lr, s) in enumerate([("0.001", 0), ("0.001", 1), ("0.01", 0)])]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        main([str(write(tmp_path, rows)), *flags])
    assert str(stop.value).startswith(why)
    assert str(stop.value).endswith(
        "the overrides that vary in this sweep: trainer.lr, trainer.seed"
    )


def test_a_sweep_of_single_runs_keeps_the_plain_table(tmp_path):
    rows = [swept("adamw", 90.0, "trainer.lr=0.001"), swept("adamw", 95.0, "trainer.lr=0.01")]
    text = table(load_runs(write(tmp_path, rows)))
    assert "| run | val ppl | ppl gap to AdamW |" in text and "rank" not in text
    assert cells(text, "adamw trainer.lr=0.001")[:2] == ["adamw trainer.lr=0.001", "90.00"]


def test_the_plot_draws_seed_ranges_and_labels_tied_front_points(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = {"errorbar": [], "annotate": []}
    for name in drawn:
        original = getattr(Axes, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            drawn[_name].append((args, kwargs))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Axes, name, spy)
    rows = [
        swept("adamw", 100.0, "trainer.seed=0", state_mib=20),
        swept("adamw", 110.0, "trainer.seed=1", state_mib=20),
        swept("galore", 105.0, "trainer.seed=0", state_mib=30),
        swept("galore", 115.0, "trainer.seed=1", state_mib=30),
    ]
    path = plot(load_runs(write(tmp_path, rows)), tmp_path / "p.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    ((args, kwargs),) = drawn["errorbar"]
    assert args[1] == [105.0, 110.0] and kwargs["yerr"] == [[5.0, 5.0], [5.0, 5.0]]
    assert [a[0] for a, _ in drawn["annotate"]] == ["adamw", "galore (tied: adamw)"]


def test_the_plot_has_a_panel_per_corpus(tmp_path, monkeypatch):
    """Each corpus's perplexities are on a scale of their own: a panel each, titled by it."""
    from matplotlib.axes import Axes

    titles = []
    original = Axes.set_title
    monkeypatch.setattr(
        Axes, "set_title", lambda self, t, *a, **k: titles.append(t) or original(self, t, *a, **k)
    )
    rows = [
        swept(opt, ppl, f"data={corpus}")
        for corpus, scale in (("builtin", 1.0), ("c4_sample", 4.0))
        for opt, ppl in (("adamw", 80.0 * scale), ("galore", 78.0 * scale))
    ]
    path = plot(load_runs(write(tmp_path, rows)), tmp_path / "p.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert [t.split(":")[0] for t in titles] == [
        "llama_20m, data=builtin",
        "llama_20m, data=c4_sample",
    ]
