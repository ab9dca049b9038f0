"""Activation checkpointing (``trainer.activation_checkpointing``), applied from outside the model.

Activations grow with the batch and are most of a small model's training memory. Here each
decoder block's forward is replaced by one that runs the block under
``torch.utils.checkpoint.checkpoint`` (non-reentrant): the tensors its ops save for backward are
dropped, and backward computes them again, one block at a time, just before the block's own
backward.

- ``none``: every op keeps what its backward needs (the default);
- ``blocks``: a block keeps only its input (the residual stream, C values per token); backward
  runs each block's forward once more (about a third more compute per step);
- ``selective``: torch's selective checkpointing (SAC) keeps, beside the input, the outputs of
  the expensive ops, every matmul and the attention kernel (its output and fp32 log-sum-exp),
  which are few values per token but the bulk of the FLOPs, and recomputes only the cheap
  elementwise ones (RMSNorm, RoPE, SiLU, the SwiGLU product, residual adds, autocast's casts).

Only the instance's ``forward`` changes: parameter names, the state dict and every submodule stay
as they are, so model surgery (RSO, Q-GaLore's INT8 weights, WeLore) may happen before or after,
``torch.compile`` of a block traces the checkpoint (checkpoint, then compile, as torchtitan), and
FSDP2's ``fully_shard`` of the block, applied later, wraps it from outside (torch's recommended
order: its hooks gather the weights before the forward and again before the recompute).
What each mode keeps, byte for byte: ``memory_estimate.activation_bytes_formula``; how the
bytes are measured under it: ``memory`` (the module docstring).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from llm_pretrain import memory
from llm_pretrain import model as llama

MODES = ("none", "blocks", "selective")


def _saved_ops() -> frozenset:
    """The ops whose outputs ``selective`` keeps: matmuls and every attention kernel that
    returns its log-sum-exp (SDPA's flash kernels on CPU and CUDA, memory-efficient and cuDNN
    on CUDA; flash-attn's registered op when it is installed)."""
    aten = torch.ops.aten
    names = (
        "mm",
        "addmm",
        "bmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    flash = flash_attn_op()
    return frozenset(ops if flash is None else {*ops, flash})


def flash_attn_op():
    """flash-attn's forward as a registered torch op (recent flash-attn, 2.7 on, with torch 2.4
    on), or None: an op SAC can see and keep; older versions call their CUDA kernel directly,
    out of SAC's sight."""
    if llama.flash_attn_func is None or not hasattr(torch.ops, "flash_attn"):
        return None
    op = getattr(torch.ops.flash_attn, "_flash_attn_forward", None)
    return getattr(op, "default", None)


SAVED_OPS = _saved_ops()
# while a checkpointed forward runs under a SavedTensorCounter: the op outputs SAC caches
_KEPT: list[list[torch.Tensor]] = []


def _tensors(output) -> Iterator[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)


def keep_expensive_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """SAC's policy for ``selective``: keep matmul and attention outputs, recompute the rest.
    While the memory probe counts, the kept outputs are recorded for it (SAC caches them itself,
    where ``saved_tensors_hooks`` never see them)."""
    if op not in SAVED_OPS:
        return CheckpointPolicy.PREFER_RECOMPUTE
    if _KEPT and not ctx.is_recompute:
        output = getattr(ctx, "op_output", None)
        if output is None:
            raise RuntimeError(
                f"torch {torch.__version__} does not pass op outputs to checkpoint policies, so "
                "the bytes trainer.activation_checkpointing=selective keeps cannot be measured; "
                "upgrade torch or use trainer.activation_checkpointing=blocks"
            )
        _KEPT[-1].extend(_tensors(output))
    return CheckpointPolicy.MUST_SAVE


ContextFn = Callable[[], tuple[AbstractContextManager, AbstractContextManager]]
SELECTIVE: ContextFn = functools.partial(
    create_selective_checkpoint_contexts, keep_expensive_outputs
)


def checkpointed_forward(
    forward: Callable[..., torch.Tensor], context_fn: ContextFn | None, *args
) -> torch.Tensor:
    """``forward`` (a block's own, bound) under a non-reentrant checkpoint, selective with
    ``context_fn`` (torch.compile takes no explicit ``noop_context_fn``: None for ``blocks``).

    A block whose output needs no gradient (no input nor parameter requires one, or grad mode
    is off, as in evaluation) runs plainly: a checkpoint would still save its input for a
    backward that never comes."""
    block = forward.__self__
    needs_graph = torch.is_grad_enabled() and (
        any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        or any(p.requires_grad for p in block.parameters())
    )
    if not needs_graph:
        return forward(*args)
    selective = {} if context_fn is None else {"context_fn": context_fn}
    if torch.compiler.is_compiling() or not memory.counting():
        return checkpoint(forward, *args, use_reentrant=False, **selective)
    _KEPT.append([])
    try:
        out = checkpoint(forward, *args, use_reentrant=False, **selective)
    finally:
        kept = _KEPT.pop()
    memory.count_kept_for_backward(kept)
    return out


def check_selective(model: llama.Llama, precision: str, device_type: str) -> None:
    """Refuse ``selective`` where the attention kernel would be invisible to SAC: a flash-attn
    whose kernel is not a registered torch op, which SAC would silently recompute."""
    flash = (
        model.cfg.attention != "sdpa"
        and llama.flash_attn_func is not None
        and device_type == "cuda"
        and precision != "fp32"
    )
    if flash and flash_attn_op() is None:
        raise ValueError(
            "trainer.activation_checkpointing=selective keeps the attention kernel's output, but "
            "this flash-attn calls its CUDA kernel outside torch's op registry (no "
            "torch.ops.flash_attn._flash_attn_forward), so it would be recomputed unseen; use "
            "model.attention=sdpa, trainer.activation_checkpointing=blocks, or flash-attn >= 2.7"
        )


def apply_activation_checkpointing(model: llama.Llama, mode: str, precision: str = "fp32") -> None:
    """Checkpoint every decoder block of ``model`` in ``mode`` (``none``: leave it as it is).
    Call it once, before ``fully_shard`` (FSDP2) and before the first compiled forward."""
    if mode not in MODES:
        raise ValueError(
            f"trainer.activation_checkpointing={mode!r}: use one of {', '.join(MODES)}"
        )
    if mode == "none":
        return
    if mode == "selective":
        check_selective(model, precision, next(model.parameters()).device.type)
    context_fn = SELECTIVE if mode == "selective" else None
    for i, block in enumerate(model.model.layers):
        if "forward" in vars(block):
            raise RuntimeError(
                f"model.layers.{i} already has a forward of its own (activation checkpointing "
                "applied twice?); apply it once, to a model built by build_model"
            )
        block.forward = functools.partial(checkpointed_forward, block.forward, context_fn)
