"""Kernel tests: every Triton kernel runs on CPU in Triton's interpreter against its reference
(the ``interpret`` fixture is in tests/conftest.py: optimizer tests use it too)."""
