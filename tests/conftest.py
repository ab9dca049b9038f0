"""Shared fixtures: the repository's shared data, Hydra composition and a tiny training config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Tests run Triton kernels only in Triton's interpreter (CPU tensors). triton.language's own
# @jit functions (tl.randn, ...) are decorated when triton is first imported, which torch may do
# at any point, so the interpreter has to be on before that, for the whole session.
os.environ["TRITON_INTERPRET"] = "1"

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from llm_pretrain.config import CONF_DIR, ModelConfig, register_configs
from llm_pretrain.model import Llama, build_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LLM_PRETRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))
C4_SAMPLE = SHARED_DATA / "c4" / "c4_en_sample_2000.jsonl.gz"
T5_SPIECE = SHARED_DATA / "t5_tokenizer" / "spiece.model"

# A model and batch small enough that a training step takes milliseconds on a CPU.
TINY = [
    "model=llama_tiny",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "data.seq_len=32",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=4",
    "trainer.warmup_steps=2",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.progress=false",
    "eval.tokens=1000",
    "eval.batch_size=8",
]


@pytest.fixture
def interpret(monkeypatch):
    """Triton's interpreter for this test (CPU tensors); triton is a test dependency."""
    from llmpt.kernels.dispatch import triton_installed

    if not triton_installed():
        pytest.fail("triton is not installed: it is a test dependency (pip install -e '.[dev]')")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_dispatch(interpret, monkeypatch):
    """The kernels' dispatch takes Triton for CPU tensors too (under the interpreter): code that
    calls a kernel runs its CUDA path on this machine."""
    from llmpt.kernels import microadam_update, quant_blockwise, seeded_projection

    class Dispatch:
        modules = (seeded_projection, quant_blockwise, microadam_update)

        def __init__(self) -> None:
            self.original = {m: m.use_triton for m in self.modules}
            for module in self.modules:
                monkeypatch.setattr(module, "use_triton", lambda *tensors: True)

        def undo(self) -> None:
            """Back to the normal rule (the reference, on CPU) within the test."""
            for module, rule in self.original.items():
                module.use_triton = rule

    return Dispatch()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not C4_SAMPLE.is_file() or not T5_SPIECE.is_file():
        pytest.fail(f"shared test data missing under {SHARED_DATA} (set LLM_PRETRAIN_SHARED_DATA)")
    return SHARED_DATA


def compose_cfg(overrides: list[str]):
    """The config ``python -m llm_pretrain.train <overrides>`` would see."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_cli(
    args: list[str],
    cwd: Path,
    env: dict | None = None,
    timeout: int = 300,
    module: str = "llm_pretrain.train",
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def toy_llama(layers: int = 2, seed: int = 0) -> Llama:
    """A LLaMA small enough for optimizer tests: per layer 4 square (32 x 32), 2 tall (48 x 32)
    and 1 wide (32 x 48) targeted matrices."""
    import torch

    torch.manual_seed(seed)
    return build_model(
        ModelConfig(
            name="toy",
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            num_layers=layers,
            vocab_size=64,
            max_position_embeddings=64,
        )
    )
