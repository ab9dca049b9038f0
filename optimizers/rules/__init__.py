"""Rules: turn a (projected) gradient into an update using their own state."""

from llmpt.optimizers.rules.adam import AdamRule
from llmpt.optimizers.rules.adam8bit import BlockwiseAdam8bitRule
from llmpt.optimizers.rules.muon import MuonRule

__all__ = ["MuonRule", "AdamRule", "BlockwiseAdam8bitRule"]
