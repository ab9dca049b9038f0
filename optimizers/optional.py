"""Optional packages: a method built on one imports it when it is constructed, never when the
library is imported, and says which extra brings it when it is missing."""

from __future__ import annotations


def missing_extra(package: str, extra: str, what: str) -> ImportError:
    """The error of a method whose optional package is not installed."""
    return ImportError(
        f"{what} needs the optional package {package}: pip install 'llm_pretrain[{extra}]' "
        f"(or pip install {package})"
    )
