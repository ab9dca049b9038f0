"""What the run logger sends: jsonl always; to wandb the config, step metrics and summary."""

import json
import sys
import types

from llm_pretrain.config import LoggerConfig
from llm_pretrain.loggers import RunLogger


class FakeRun:
    def __init__(self, **kwargs):
        self.init = kwargs
        self.id = kwargs.get("id") or "abc123"
        self.logged, self.summary, self.metrics, self.finished = [], {}, [], False

    def define_metric(self, name, **kwargs):
        self.metrics.append(name)

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


def test_wandb_receives_config_metrics_and_summary(tmp_path, monkeypatch):
    runs = []
    fake = types.SimpleNamespace(init=lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = LoggerConfig(wandb=True, mode="offline", group="sweep-1", tags=["adamw"])
    logger = RunLogger(tmp_path, cfg, {"optimizer": {"name": "adamw"}}, "run-a")
    logger.log({"step": 5, "train/loss": 3.5, "train/tokens_seen": 640})
    logger.summary({"eval": {"final_ppl": 33.1}, "tokens_seen": 640, "nan": float("nan")})
    logger.close()
    run = runs[0]
    assert run.init["config"] == {"optimizer": {"name": "adamw"}}
    assert (run.init["mode"], run.init["group"], run.init["name"]) == (
        "offline",
        "sweep-1",
        "run-a",
    )
    assert run.init["dir"] == str(tmp_path) and run.init["id"] is None
    assert run.logged == [(5, {"train/loss": 3.5, "train/tokens_seen": 640})]
    assert run.summary == {"eval/final_ppl": 33.1, "tokens_seen": 640, "nan": None}
    assert run.finished and logger.wandb_id == "abc123"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 5, "train/loss": 3.5, "train/tokens_seen": 640}
    assert json.loads((tmp_path / "summary.json").read_text())["nan"] is None

    RunLogger(tmp_path, cfg, {}, resume_id="abc123").close()
    assert runs[1].init["id"] == "abc123" and runs[1].init["resume"] == "allow"


def test_other_ranks_write_nothing(tmp_path):
    logger = RunLogger(None, LoggerConfig(wandb=True))
    logger.log({"step": 1, "train/loss": 1.0})
    logger.summary({"a": 1})
    logger.close()
    assert not logger.enabled and list(tmp_path.iterdir()) == []
