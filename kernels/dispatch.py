"""Which implementation a kernel call takes: Triton on CUDA when it is installed, else PyTorch.

Triton's ``@triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, so the Triton source of
each kernel (``kernels/triton_src/<name>.py``, kernels at module level as Triton expects) is
loaded on first use by ``triton_kernels`` and cached per interpreter mode: importing this package
never imports triton, and a test can turn the interpreter on (CPU tensors) after other code
imported the package.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors, in numpy (slow; tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """The dispatch rule: every tensor on CUDA and triton installed."""
    return triton_installed() and all(t.is_cuda for t in tensors)


def check_triton(*tensors: torch.Tensor) -> None:
    """Refuse to launch where Triton cannot run: explains instead of failing inside triton."""
    if not triton_installed():
        raise RuntimeError(
            "triton is not installed: use the PyTorch reference (pip install triton)"
        )
    if not interpreting() and not all(t.is_cuda for t in tensors):
        raise RuntimeError(
            "Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1"
        )


SOURCES = Path(__file__).with_name("triton_src")
_LOADED: dict[tuple[str, bool], ModuleType] = {}


def triton_kernels(name: str) -> ModuleType:
    """The module ``kernels/triton_src/<name>.py``, imported once per interpreter mode."""
    key = (name, interpreting())
    if key not in _LOADED:
        module_name = f"llmpt.kernels.triton_src.{name}{'_interpreted' if key[1] else ''}"
        spec = importlib.util.spec_from_file_location(module_name, SOURCES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        _LOADED[key] = module
    return _LOADED[key]
