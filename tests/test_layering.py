"""The library (``optimizers/`` and ``kernels/``, imported as ``llmpt.optimizers`` and
``llmpt.kernels``) is usable on its own: it imports nothing from the application, needs torch
only at import time, and its import names shadow no other distribution's, from the repository
root or from anywhere else."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

LIBRARY = ["optimizers", "kernels"]
OPTIONAL = ["hydra", "omegaconf", "llm_pretrain", "adam_mini", "bitsandbytes", "pytorch_optimizer"]


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from`` statement of ``path`` names, at any depth."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_no_library_file_imports_the_application():
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for folder in LIBRARY
        for path in sorted((REPO / folder).rglob("*.py"))
        for name in imported_modules(path)
        if name.split(".")[0] == "llm_pretrain"
    ]
    assert not offenders


def test_the_application_has_no_import_cycles():
    """A module graph of llm_pretrain (imports at any depth, lazy ones included) without cycles:
    train.py and memory.py used to import each other."""
    modules = {p.stem: p for p in (REPO / "llm_pretrain").glob("*.py") if p.stem != "__init__"}
    graph = {
        m: {
            n.split(".")[1]
            for n in imported_modules(p)
            if n.startswith("llm_pretrain.") and n.split(".")[1] in modules
        }
        for m, p in modules.items()
    }
    done, path = set(), []

    def visit(m: str) -> None:
        if m in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(m) :] + [m])}")
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_the_library_folders_are_not_top_level_packages():
    """From the repository root, Python puts the root on sys.path: a kernels/ or optimizers/
    folder with an __init__.py there would be imported as ``kernels`` or ``optimizers``."""
    for folder in LIBRARY:
        assert not (REPO / folder / "__init__.py").exists()


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("where", ["repository root", "another directory"])
def test_our_imports_sit_next_to_hugging_faces_kernels(where, tmp_path):
    """Issue 15: from the root, transformers' hub_kernels failed (our kernels/ shadowed HF's
    ``kernels``) and bitsandbytes fell back to its slow path for the same reason."""
    cwd = REPO if where == "repository root" else tmp_path
    code = (
        "from llmpt.optimizers import api\n"
        "from llmpt.kernels import quant_blockwise\n"
        "from transformers.integrations import hub_kernels\n"
        "import bitsandbytes, kernels\n"
        "assert hasattr(kernels, 'get_kernel'), kernels\n"
        "print(kernels.__file__)\n"
    )
    done = run_python(code, cwd)
    assert done.returncode == 0, done.stderr
    assert not done.stdout.strip().startswith(str(REPO) + "/kernels")
    assert "cannot import name" not in done.stdout + done.stderr


def test_importing_the_library_needs_torch_only():
    code = (
        "import sys\n"
        "from llmpt.optimizers import api\n"
        "import llmpt.kernels.quant_blockwise, llmpt.kernels.seeded_projection\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(OPTIONAL)!r}))\n"
    )
    done = run_python(code, REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("package", "construct", "extra"),
    [
        ("adam_mini", "api.AdamMini(model.named_parameters(), dim=32, n_heads=2)", "adam_mini"),
        ("bitsandbytes", "api.adamw8bit(model.parameters())", "bnb"),
        ("bitsandbytes", "api.GaLore8bit(api.param_groups(model), rank=8)", "bnb"),
        ("pytorch_optimizer", "api.came(model.parameters())", "came"),
    ],
)
def test_a_missing_optional_package_names_its_extra_at_construction(package, construct, extra):
    """The library imports with the package absent; building the method says what to install."""
    code = (
        "import sys\n"
        f"sys.modules[{package!r}] = None  # as if not installed\n"
        "from llmpt.optimizers import api\n"
        "from tests.conftest import toy_llama\n"
        "model = toy_llama()\n"
        "try:\n"
        f"    {construct}\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    done = run_python(code, REPO)
    assert done.returncode == 0, done.stderr
    assert f"pip install 'llm_pretrain[{extra}]'" in done.stdout
