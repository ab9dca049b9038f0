"""python -m llm_pretrain.report on a fixture sweep: the table, the failed rows, the plot."""

import json

import pytest

from llm_pretrain.report import load_runs, main, pareto_front, plot, table

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
