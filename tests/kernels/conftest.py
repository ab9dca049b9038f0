"""Kernel tests: every Triton kernel runs on CPU in Triton's interpreter against its reference."""

import pytest

from kernels.dispatch import triton_installed


@pytest.fixture
def interpret(monkeypatch):
    """Triton's interpreter for this test (CPU tensors); triton is a test dependency."""
    if not triton_installed():
        pytest.fail("triton is not installed: it is a test dependency (pip install -e '.[dev]')")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
