import math

import pytest
import torch

from llm_pretrain.config import TrainerConfig
from llm_pretrain.schedule import build_scheduler, lr_multiplier


def test_warmup_cosine_to_min_ratio():
    cfg = TrainerConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1, scheduler="cosine")
    assert lr_multiplier(0, cfg) == 0.0  # the references train step 0 at lr 0
    assert lr_multiplier(5, cfg) == 0.5
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(110, cfg) == pytest.approx(0.1)
    assert lr_multiplier(500, cfg) == pytest.approx(0.1)


def test_linear_and_constant():
    lin = TrainerConfig(max_steps=20, warmup_steps=0, min_lr_ratio=0.0, scheduler="linear")
    assert lr_multiplier(10, lin) == pytest.approx(0.5)
    const = TrainerConfig(max_steps=20, warmup_steps=4, scheduler="constant")
    assert lr_multiplier(2, const) == 0.5 and lr_multiplier(15, const) == 1.0


def test_scheduler_drives_an_optimizer_and_round_trips():
    cfg = TrainerConfig(max_steps=50, warmup_steps=5, min_lr_ratio=0.2)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = build_scheduler(opt, cfg)
    for _ in range(30):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * lr_multiplier(30, cfg))
    sd = sched.state_dict()
    opt2 = torch.optim.AdamW([p], lr=2.0)
    sched2 = build_scheduler(opt2, cfg)
    sched2.load_state_dict(sd)
    assert sched2.last_epoch == 30 and not math.isnan(sched2.get_last_lr()[0])


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="trainer.scheduler='step'"):
        build_scheduler(
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
            TrainerConfig(scheduler="step", warmup_steps=0),
        )
