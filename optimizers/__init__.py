"""Memory-efficient optimizers for LLaMA pretraining, one registry.

``optimizers.build(cfg, model)`` turns ``conf/optimizer/<name>.yaml`` into a
``torch.optim.Optimizer``; ``state_nbytes`` reports its state memory by category and
``memory_formula`` gives the same bytes in closed form. Importing the package registers every
method (``baselines``, ``low_rank``, ``layerwise``, ``projection_family``, ``rso``,
``microadam``, ``ldadam``).
"""

from optimizers import (  # noqa: F401  (they register the methods)
    baselines,
    layerwise,
    ldadam,
    low_rank,
    microadam,
    projection_family,
    rso,
)
from optimizers.projectors import SvdProjector
from optimizers.registry import (
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
