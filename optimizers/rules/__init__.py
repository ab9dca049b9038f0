"""Rules: turn a (projected) gradient into an update using their own state."""

from optimizers.rules.adam import AdamRule

__all__ = ["AdamRule"]
