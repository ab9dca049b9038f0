"""Every setting is checked before work starts (issue 20, case 4): each constrained key with a bad
value is refused by name (``config.VALUES``), every typed field of every schema refuses a value
of the wrong type by name (Hydra's structured configs), and the free-form strings left are
listed here on purpose."""

import math
import typing
from dataclasses import fields, is_dataclass

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from llm_pretrain.config import (
    VALUES,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LoggerConfig,
    ModelConfig,
    TasksConfig,
    TrainerConfig,
    check_values,
    optimizer_schema,
)
from llm_pretrain.optim import METHODS
from llm_pretrain.train import train
from tests.conftest import TINY, compose_cfg

SCHEMAS = {
    "model": ModelConfig,
    "data": DataConfig,
    "data.tasks": TasksConfig,
    "trainer": TrainerConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
    "logger": LoggerConfig,
}
# free-form strings: paths and names, checked where they are opened or used
FREE_STRINGS = {
    "model.name",
    "data.tokenizer",
    "data.path",
    "data.val_path",
    "data.text_field",
    "data.encoding",  # (codecs.lookup, when the files are checked)
    "data.hf_name",
    "data.hf_config",
    "data.tasks.root",
    "data.tasks.prompt_field",
    "data.tasks.response_field",
    "trainer.init_from",
    "checkpoint.resume",
    "logger.project",
    "logger.entity",
    "logger.group",
}


def bad_value(allowed):
    if allowed.choices is not None:
        return "no_such_choice"
    if allowed.high is not None:
        return allowed.high + 1
    return allowed.low - 1 if not allowed.open_low else allowed.low


def method_with(key: str) -> str | None:
    """An optimizer whose schema has ``key`` (optimizer.<key>)."""
    name = key.split(".", 1)[1]
    return next((m for m in METHODS if name in {f.name for f in fields(optimizer_schema(m))}), None)


@pytest.fixture(scope="module")
def configs():
    cache = {}

    def get(method: str = "adamw"):
        if method not in cache:
            cache[method] = compose_cfg([f"optimizer={method}"])
        return cache[method].copy()

    return get


def test_every_constrained_key_refuses_a_bad_value_by_name(configs):
    checked = 0
    for key, allowed in VALUES.items():
        method = method_with(key) if key.startswith("optimizer.") else "adamw"
        assert method is not None, f"{key} is in VALUES but no optimizer has it"
        cfg = configs(method)
        bad = bad_value(allowed)
        OmegaConf.update(cfg, key, [bad, bad] if key.endswith("betas") else bad)
        with pytest.raises(ValueError, match=rf"^{key}=.* must "):
            check_values(cfg)
        checked += 1
    assert checked == len(VALUES) > 60


@pytest.mark.parametrize(
    "key,value",
    [
        ("trainer.min_lr_ratio", -1),  # gradient ascent after warmup
        ("trainer.min_lr_ratio", 5),  # an lr that grows
        ("trainer.warmup_steps", -5),
        ("checkpoint.every", -1),
        ("trainer.eval_every", -1),
        ("trainer.grad_clip", -1),
        ("trainer.max_time_s", -1),
        ("trainer.log_every", 0),  # ZeroDivisionError after step 1
        ("eval.batch_size", 0),  # ValueError after all of training
        ("eval.compat", "foo"),  # failed only at the final evaluation
        ("trainer.lr", math.nan),
        ("trainer.lr", math.inf),
        ("optimizer.lr", math.inf),
    ],
)
def test_the_issues_harmful_values_are_refused(configs, key, value):
    cfg = configs("galore")
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ValueError, match=rf"^{key}="):
        check_values(cfg)


def test_galore_with_a_negative_scale_is_refused_before_the_run_directory_is_touched(tmp_path):
    cfg = compose_cfg([*TINY, "optimizer=galore", "optimizer.scale=-1"])
    with pytest.raises(ValueError, match=r"optimizer.scale=-1(\.0)? must be in \(0, inf\)"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _typed(hint) -> type | None:
    if typing.get_origin(hint) in (list, dict):
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = args[0] if len(args) == 1 else None
    return base if base in (int, float, bool, str) else None


def test_every_typed_field_refuses_a_wrong_type_by_name_and_every_string_is_decided(configs):
    cfg, strings = configs(), set()
    for prefix, schema in SCHEMAS.items():
        hints = typing.get_type_hints(schema)
        for f in fields(schema):
            key, kind = f"{prefix}.{f.name}", _typed(hints[f.name])
            if is_dataclass(hints[f.name]) or kind is None:
                continue  # (nested schemas are walked themselves; lists hold free strings)
            if kind is str:
                strings.add(key)
                continue
            with pytest.raises(ValidationError, match=rf"full_key: {key}"):
                OmegaConf.update(cfg.copy(), key, "not_a_number_nor_a_bool")
    choice_strings = {k for k, a in VALUES.items() if a.choices is not None}
    assert strings - choice_strings == FREE_STRINGS  # a new string setting must be decided
