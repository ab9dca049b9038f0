"""Several torch optimizers over disjoint parameters, behaving as one ``torch.optim.Optimizer``.

Muon (torch's) only takes 2-D matrices, so embeddings, lm_head and norms need another optimizer;
the training loop, the LR scheduler and checkpoints still see a single object: ``param_groups``
is the parts' own group dicts (a scheduler's lr changes reach every part), ``state`` is the union
of their states, and ``state_dict`` nests theirs (plain tensors and numbers only).
"""

from __future__ import annotations

import torch

from llmpt.optimizers.accounting import state_nbytes


class CompositeOptimizer(torch.optim.Optimizer):
    def __init__(self, parts: dict[str, torch.optim.Optimizer]) -> None:
        params = [p for opt in parts.values() for g in opt.param_groups for p in g["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("the parts of a composite optimizer must not share parameters")
        super().__init__(params, {})
        self.parts = parts
        self.param_groups = [g for opt in parts.values() for g in opt.param_groups]

    @property
    def state(self) -> dict:
        merged = {}
        for opt in self.parts.values():
            merged.update(opt.state)
        return merged

    @state.setter
    def state(self, value) -> None:  # torch.optim.Optimizer.__init__ assigns an empty state
        if value:
            raise AttributeError("a composite optimizer's state lives in its parts")

    def step(self, closure=None):
        """Step every part; a closure is evaluated once, by the first part (torch's rule)."""
        parts = iter(self.parts.values())
        loss = next(parts).step(closure)
        for opt in parts:
            opt.step()
        return loss

    def state_dict(self) -> dict:
        return {"parts": {name: opt.state_dict() for name, opt in self.parts.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("parts", {})
        if set(saved) != set(self.parts):
            raise ValueError(
                f"optimizer state has parts {sorted(saved)}, expected {sorted(self.parts)}"
            )
        for name, opt in self.parts.items():
            opt.load_state_dict(saved[name])
        # torch rebuilds each part's group dicts on load: point at the new ones
        self.param_groups = [g for opt in self.parts.values() for g in opt.param_groups]

    def state_nbytes(self) -> dict[str, int]:
        return state_nbytes(self.state.values())
