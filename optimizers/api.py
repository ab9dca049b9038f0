"""The library's entry points in one import: ``from llmpt.optimizers import api``.

``api.build(cfg, model)`` turns a method's settings (any object with its attributes, such as the
app's ``conf/optimizer/<name>.yaml``) into a ``torch.optim.Optimizer``; ``state_nbytes`` reports
its state memory by category and ``memory_formula`` gives the same bytes in closed form.
Importing this module registers every method (``baselines``, ``low_rank``, ``layerwise``,
``projection_family``, ``rso``, ``microadam``, ``ldadam``).

The library needs torch only: it never imports the application (``llm_pretrain``), Hydra or an
optional package at import time. Its import names live under the ``llmpt`` namespace
(``llmpt.optimizers``, ``llmpt.kernels``) so that neither shadows another distribution's
top-level module (Hugging Face's ``kernels``, PyPI's ``optimizers``).
"""

from llmpt.optimizers import (  # noqa: F401  (they register the methods)
    baselines,
    layerwise,
    ldadam,
    low_rank,
    microadam,
    projection_family,
    rso,
)
from llmpt.optimizers.projectors import SvdProjector
from llmpt.optimizers.registry import (
    REGISTRY,
    build,
    memory_formula,
    split_targets,
    state_nbytes,
)

__all__ = [
    "REGISTRY",
    "SvdProjector",
    "build",
    "memory_formula",
    "split_targets",
    "state_nbytes",
]
