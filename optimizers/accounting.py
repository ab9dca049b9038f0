"""Optimizer-state bytes by category: one table of state keys for every optimizer here.

Categories: ``moments`` (Adam's M and V, Adafactor's factored statistics, 8-bit codes),
``projector`` (subspace bases), ``quantization`` (blockwise absmax and code maps), ``error``
(error-feedback buffers), ``indices`` (selected rows/columns), ``other`` (step counters, scalars).
Python numbers in the state (step counts, seeds, side flags) cost no tensor memory and are not
counted.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

CATEGORIES = ("moments", "projector", "quantization", "error", "indices", "other")
KEY_CATEGORY = {
    "exp_avg": "moments",
    "exp_avg_sq": "moments",
    "max_exp_avg_sq": "moments",
    "momentum_buffer": "moments",
    "m": "moments",  # Adam-mini
    "vmean": "moments",
    "state1": "moments",
    "state2": "moments",
    "row_var": "moments",
    "col_var": "moments",
    "variance": "moments",
    "exp_avg_sq_row": "moments",
    "exp_avg_sq_col": "moments",
    "exp_avg_res_row": "moments",
    "exp_avg_res_col": "moments",
    "indices": "indices",  # coordinate projectors (FRUGAL, GRASS), DCT columns
    "scales": "projector",  # GRASS's unbiasing scales (sampling with replacement)
    "basis": "projector",
    "basis_right": "projector",
    "task_basis": "projector",  # GORP: the subspace of past tasks
    "basis_exp_avg": "projector",  # OSD: the projector's own Adam moments
    "basis_exp_avg_sq": "projector",
    "basis_codes": "projector",
    "basis_scale": "quantization",
    "basis_zero": "quantization",
    "qmap1": "quantization",
    "qmap2": "quantization",
    "absmax1": "quantization",
    "absmax2": "quantization",
    "window_indices": "indices",  # MicroAdam: the sparse gradients' positions ...
    "window_values": "moments",  # ... and values, from which M and V are rebuilt
    "error_codes": "error",  # MicroAdam's 4-bit error feedback
    "error_scale": "quantization",
    "error_zero": "quantization",
    "error_feedback": "error",  # LDAdam's error buffer (in its own dtype)
}


def state_nbytes(states: Iterable[dict]) -> dict[str, int]:
    """Bytes of the tensors in per-parameter state dicts, each storage counted once."""
    out = dict.fromkeys(CATEGORIES, 0)
    seen: set[int] = set()
    for state in states:
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            storage = value.untyped_storage()
            if storage.nbytes() and storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            out[KEY_CATEGORY.get(key, "other")] += storage.nbytes()
    return out
