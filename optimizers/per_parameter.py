"""The stepping protocol shared by our engine and RSO: each parameter steps on its own.

``step()`` updates every parameter that has a gradient (``_update``) and then counts the step
(``end_step``: refreshes, layer switches, RSO's merges). Under ``trainer.per_layer_update`` the
training loop calls ``update_parameter`` from each parameter's gradient hook and then a
gradient-free ``step()``, which only counts: the two paths give the same updates.
"""

from __future__ import annotations

import torch


def closure_loss(closure):
    """The loss of ``step(closure)``: the closure re-evaluated with gradients on, or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class PerParameterOptimizer(torch.optim.Optimizer):
    def add_param_group(self, param_group: dict) -> None:
        """torch's, keeping ``group_number`` (parameter -> index of its group) up to date."""
        super().add_param_group(param_group)
        self.group_number = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}

    def group_of(self, p: torch.Tensor) -> dict:
        """The param group of ``p``, by index: ``load_state_dict`` replaces the group dicts."""
        return self.param_groups[self.group_number[p]]

    def check_fixed(self, fixed: dict) -> None:
        """Settings of the whole optimizer (constructor arguments that cannot vary per group):
        a group that sets one to another value is refused by name, not silently ignored."""
        for i, group in enumerate(self.param_groups):
            for key, value in fixed.items():
                if key in group and group[key] != value:
                    raise ValueError(
                        f"param group {i} sets {key}={group[key]!r}, but {type(self).__name__} "
                        f"takes {key} for all groups ({key}={value!r}, the constructor's); "
                        f"remove it from the group"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
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
            self._update(p, self.group_of(p))

    def _update(self, p: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    def end_step(self) -> None:
        raise NotImplementedError

    def projected_matrices(self):
        """(name, parameter) of every parameter in a ``projected`` group, refusing any that is
        not a 2-D matrix (names come from named parameter groups)."""
        for group in self.param_groups:
            if not group.get("projected"):
                continue
            names = group.get("param_names") or ["a matrix"] * len(group["params"])
            for name, p in zip(names, group["params"], strict=True):
                if p.dim() != 2:
                    raise ValueError(
                        f"{name}: a projected parameter must be a 2-D matrix, got shape "
                        f"{tuple(p.shape)}; leave it out of target_modules"
                    )
                yield name, p

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but every state tensor keeps the dtype it was saved with: torch casts
        floating-point state to the parameter's dtype, which would turn fp32 block scales, bf16
        window values or an fp32 error buffer of a bf16 model into the parameter's dtype and
        break an exact resume."""
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for index, saved in state_dict["state"].items():
            live = self.state[params[index]]
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and live[key].dtype != value.dtype:
                    live[key] = value.to(device=params[index].device)
