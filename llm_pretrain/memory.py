"""Where the bytes go during training: weights, gradients, optimizer state, activations.

Weights and gradients are summed over distinct storages; optimizer state comes from
``optimizers.state_nbytes``; activations are the tensors autograd saves for backward, counted
with ``torch.autograd.graph.saved_tensors_hooks`` (parameters and buffers excluded, each
storage once) and reported at their peak within one forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

import optimizers


def _unique_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def weight_bytes(model: nn.Module) -> int:
    return _unique_nbytes(model.parameters())


def grad_bytes(model: nn.Module) -> int:
    return _unique_nbytes(p.grad for p in model.parameters() if p.grad is not None)


class SavedTensorCounter:
    """Counts bytes autograd keeps for backward while the context is active."""

    def __init__(self, model: nn.Module) -> None:
        # model state, not activations: parameters and buffers (e.g. a stored RSO projection)
        state = [*model.parameters(), *model.buffers()]
        self.param_ptrs = {t.untyped_storage().data_ptr() for t in state}
        self.seen: set[int] = set()
        self.bytes = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.param_ptrs and ptr not in self.seen:
                self.seen.add(ptr)
                self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> SavedTensorCounter:
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def activation_bytes(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    autocast: torch.autocast | None = None,
) -> int:
    """Bytes saved for backward by one forward pass of ``model`` on this micro-batch.

    Runs forward and backward once and zeroes the gradients afterwards, so it changes nothing.
    """
    counter = SavedTensorCounter(model)
    with counter:
        if autocast is not None:
            with autocast:
                loss = model(input_ids, labels)
        else:
            loss = model(input_ids, labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.bytes


@dataclass
class MemoryReport:
    weights: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0
    optimizer_state_by_category: dict[str, int] = field(default_factory=dict)
    cuda_peak_allocated: int | None = None
    cuda_peak_reserved: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def measure_training_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Call after a step's backward and optimizer step, before gradients are zeroed."""
        self.weights = weight_bytes(model)
        self.gradients = max(self.gradients, grad_bytes(model))
        by_cat = optimizers.state_nbytes(optimizer)
        self.optimizer_state_by_category = by_cat
        self.optimizer_state = sum(by_cat.values())

    def measure_cuda_peaks(self, device: torch.device) -> None:
        if device.type == "cuda":
            self.cuda_peak_allocated = torch.cuda.max_memory_allocated(device)
            self.cuda_peak_reserved = torch.cuda.max_memory_reserved(device)
