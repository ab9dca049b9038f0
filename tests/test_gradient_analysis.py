"""trainer.gradient_analysis_every (llm_pretrain/gradient_analysis.py): the statistics on
constructed gradients, and a training run that logs them."""

import json

import pytest
import torch

from llm_pretrain.gradient_analysis import LEFT, RIGHT, spectrum_stats, subspace_energy
from llm_pretrain.train import train
from tests.conftest import TINY, compose_cfg


def test_the_rank_of_a_sum_of_k_outer_products_is_k_and_the_best_k_subspace_holds_it_all():
    torch.manual_seed(0)
    deltas, xs = torch.randn(5, 40), torch.randn(5, 30)
    grad = deltas.T @ xs  # 5 tokens: sum_i delta_i x_i^T
    stats = spectrum_stats(grad, tokens=5, r=5)
    assert stats["rank"] == 5 and stats["bound"] == 5
    assert stats["energy_best_r"] == pytest.approx(1.0, abs=1e-6)
    assert 1 <= stats["k90"] <= 5
    assert spectrum_stats(grad, tokens=1000, r=2)["energy_best_r"] < 1.0


def test_the_subspace_share_is_one_inside_zero_outside_and_none_for_a_scaled_basis():
    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(40, 40))[0]
    inside, outside = q[:, :4], q[:, 4:8]
    grad = inside @ torch.randn(4, 30)
    assert subspace_energy(grad, inside, LEFT) == pytest.approx(1.0, abs=1e-5)
    assert subspace_energy(grad, outside, LEFT) == pytest.approx(0.0, abs=1e-5)
    assert subspace_energy(grad.T, inside, RIGHT) == pytest.approx(1.0, abs=1e-5)
    assert subspace_energy(grad, 3.0 * inside, LEFT) is None  # not a projection


def test_a_galore_run_logs_rank_bound_energies_and_basis_changes(tmp_path):
    # one 8-token row per step: 7 predicted tokens bound every gradient's rank below 32
    args = [*TINY, "data.seq_len=8", "trainer.global_batch_size=1", "trainer.micro_batch_size=1"]
    args += ["optimizer=galore", "optimizer.rank=4", "optimizer.update_gap=2"]
    args += ["trainer.max_steps=6", "trainer.gradient_analysis_every=2"]
    summary = train(compose_cfg(args), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if "grad/rank_mean" in r]
    assert [r["step"] for r in measured] == [2, 4, 6]
    for r in measured:
        ranks = {k: v for k, v in r.items() if k.endswith("/rank") and k.startswith("grad/layers")}
        assert len(ranks) == 2 * 7  # TINY: 2 layers x 7 matrices, all projected by GaLore
        for key, rank in ranks.items():
            assert 1 <= rank <= r[key.replace("/rank", "/bound")] == 7
            best = r[key.replace("/rank", "/energy_best_r")]
            assert r[key.replace("/rank", "/energy_subspace")] <= best + 1e-5
    later = [r for r in measured if "grad/basis_changes" in r]
    assert later and all(r["grad/basis_changes"] == 14 for r in later)  # every basis refreshed
    assert all(0.0 <= r["grad/basis_overlap_mean"] <= 1.0 + 1e-6 for r in later)
    assert summary["timing"]["gradient_analysis_s"] > 0


def test_the_analysis_refuses_per_layer_updates(tmp_path):
    args = [*TINY, "trainer.per_layer_update=true", "trainer.gradient_analysis_every=2"]
    with pytest.raises(ValueError, match="gradient_analysis_every needs the step's whole"):
        train(compose_cfg([*args, "trainer.max_steps=2"]), tmp_path)


def test_the_cli_tabulates_and_plots_a_runs_analysis(tmp_path, capsys):
    from llm_pretrain import gradient_analysis

    args = [*TINY, "optimizer=galore", "optimizer.rank=4", "optimizer.update_gap=2"]
    train(
        compose_cfg([*args, "trainer.max_steps=4", "trainer.gradient_analysis_every=2"]), tmp_path
    )
    gradient_analysis.main([str(tmp_path), "--plot", str(tmp_path / "g.png")])
    out = capsys.readouterr().out
    assert out.count("\n| 2 |") == 1 and "| 4 |" in out
    assert (tmp_path / "g.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="no grad/\\* rows"):
        (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')
        gradient_analysis.main([str(tmp_path)])
