"""The stepping protocol shared by our engine and RSO: each parameter steps on its own.

``step()`` updates every parameter that has a gradient (``_update``) and then counts the step
(``end_step``: refreshes, layer switches, RSO's merges). Under ``trainer.per_layer_update`` the
training loop calls ``update_parameter`` from each parameter's gradient hook and then a
gradient-free ``step()``, which only counts: the two paths give the same updates.
"""

from __future__ import annotations

import torch


class PerParameterOptimizer(torch.optim.Optimizer):
    _group_of: dict[torch.Tensor, dict]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        self.end_step()
        return loss

    @torch.no_grad()
    def update_parameter(self, p: torch.Tensor) -> None:
        """Step one parameter (per-layer updates, from its post-accumulate-grad hook); the
        training loop calls ``step()`` once all of them are done."""
        if p.grad is not None:
            self._update(p, self._group_of[p])

    def _update(self, p: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    def end_step(self) -> None:
        raise NotImplementedError
