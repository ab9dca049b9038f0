"""Rules: turn a (projected) gradient into an update using their own state."""

from optimizers.rules.adam import AdamRule
from optimizers.rules.adam8bit import BlockwiseAdam8bitRule
from optimizers.rules.muon import MuonRule

__all__ = ["MuonRule", "AdamRule", "BlockwiseAdam8bitRule"]
