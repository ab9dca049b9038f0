"""The head's linear and cross-entropy fused and chunked over tokens (``model.loss_impl``).

The dense head computes every logit at once, ``(B, T-1, V)`` in the compute dtype plus the fp32
copy the loss reads and keeps for backward: at llama_60m in bf16, micro-batch 128 of 256 tokens,
3.9 GiB of fp32 logits, 40% of all the activations kept. Here the logits of ``chunk_tokens``
tokens at a time are computed, reduced to the loss, and dropped (Liger-Kernel's fused linear
cross-entropy, and Wijmans et al. 2024, "Cut your losses in large-vocabulary language models",
without their custom kernels). Two ways to get the gradient:

- ``chunked`` (the default): while a chunk's logits exist, its softmax gradient
  ``softmax(z) - onehot(y)`` becomes the chunk's rows of dh and its share of dW, in the forward
  pass; backward only scales them by the incoming gradient. Three products, as the dense head
  (none recomputed: faster than the dense head, which also moves the (N, V) fp32 tensors through
  memory). Kept for backward: dh (N x C, the compute dtype) and dW (V x C, the weight's dtype).
- ``chunked_recompute``: keeps h, the targets and one fp32 log-sum-exp per token; backward
  computes each chunk's logits again (a fourth product). The least memory: no weight-sized dW
  between forward and backward, which matters for a large vocabulary at a small micro-batch.

The arithmetic is the dense path's: logits in the compute dtype (bf16 under autocast), the loss
in fp32 from them, the softmax gradient cast to the compute dtype before the two matmuls; only
the order of the sums over tokens differs (the weight's gradient is summed chunk by chunk in
fp32), and ``chunked`` scales the finished dh and dW by the incoming gradient (1 for a loss
that is not scaled) instead of the softmax gradient.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum")
CHUNKED = ("chunked", "chunked_recompute")  # the model.loss_impl values this module computes
KERNELS = ("auto", "torch", "liger")  # model.loss_kernel


def liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def choose_kernel(kernel: str, device_type: str, recompute: bool) -> str:
    """Which code computes ``model.loss_impl=chunked``: Liger-Kernel's fused linear
    cross-entropy (Triton, CUDA only; the same gradient-in-forward scheme) or this module's
    PyTorch path. ``auto``: Liger where it can run, on CUDA with the package installed, for the
    gradient-in-forward head (``chunked_recompute`` has no Liger counterpart); ``liger`` insists,
    and says what is missing."""
    if kernel not in KERNELS:
        raise ValueError(f"model.loss_kernel={kernel!r}: use {', '.join(KERNELS)}")
    usable = device_type == "cuda" and not recompute and liger_installed()
    if kernel == "liger" and not usable:
        why = (
            "model.loss_impl=chunked_recompute has no Liger counterpart (use model.loss_impl="
            "chunked)"
            if recompute
            else "it runs on CUDA only"
            if device_type != "cuda"
            else "liger-kernel is not installed (pip install -e '.[liger]')"
        )
        raise RuntimeError(f"model.loss_kernel=liger: {why}; or set model.loss_kernel=auto")
    return "liger" if kernel != "torch" and usable else "torch"


def liger_loss(h, weight, targets, ignore_index: int, reduction: str) -> torch.Tensor:
    """The loss through Liger-Kernel's ``liger_fused_linear_cross_entropy`` (it forms the
    gradients in forward, chunk by chunk, as ``LinearCrossEntropyFunction``)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(
        h, weight, targets, ignore_index=ignore_index, reduction=reduction
    )


def compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` would compute ``h``'s product in: autocast's, else ``h``'s own."""
    device = h.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype


def _chunk_grads(p, safe, valid, scale, dtype, hc, w, grad_h, grad_w, rows: slice) -> None:
    """One chunk's share of the gradients, from ``p``, its (n, V) fp32 softmax (overwritten):
    g = (p - onehot(targets)) * scale where valid, cast to the compute dtype, then dh's rows
    ``rows`` = g W and dW += g^T h, summed in fp32 (a bf16 product per chunk)."""
    p[torch.arange(safe.shape[0], device=safe.device), safe] -= 1.0  # - onehot(y)
    g = p.mul_(torch.where(valid, scale, 0.0)[:, None]).to(dtype)  # (n, V)
    if grad_h is not None:
        grad_h[rows] = g @ w
    if grad_w is not None and g.dtype == torch.float32:
        grad_w.addmm_(g.t(), hc)  # (V, C)
    elif grad_w is not None:
        grad_w += (g.t() @ hc).float()


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``cross_entropy(h W^T, targets)`` without the ``(N, V)`` logits alive at once.

    When a gradient is wanted, each chunk's softmax gradient is formed right after its loss,
    while its logits exist, and turned into the chunk's rows of dh and its share of dW; backward
    only scales them by the incoming gradient. So the head costs the dense path's three
    products (h W^T, g W, g^T h), none recomputed, and keeps dh (the size of h) and dW (the size
    of W) instead of h and the fp32 logits."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, reduction, chunk_tokens):
        # h: (N, C) in the compute dtype, weight: (V, C), targets: (N,)
        w = weight.to(h.dtype)
        valid = targets != ignore_index
        count = valid.sum()
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # d(loss)/d(logits) per token: 1 (sum) or 1 / count (mean), 0 where ignored
        unit = 1.0 if reduction == "sum" else 1.0 / count.clamp(min=1).float()
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        n = chunk_tokens
        for s in range(0, h.shape[0], n):
            hc, t, v = h[s : s + n], targets[s : s + n], valid[s : s + n]
            z = (hc @ w.t()).float()  # (n, V): the dense path's logits.float()
            lse = torch.logsumexp(z, dim=-1)
            safe = torch.where(v, t, 0)
            picked = z.gather(1, safe[:, None]).squeeze(1)
            total += torch.where(v, lse - picked, 0.0).sum()
            if not (want_h or want_w):
                continue
            p = z.sub_(lse[:, None]).exp_()  # (n, V) softmax, in z's storage
            _chunk_grads(p, safe, v, unit, h.dtype, hc, w, grad_h, grad_w, slice(s, s + n))
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        if reduction == "sum":
            return total
        return total / count  # all ignored: 0/0 = nan, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
            grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None,
            None,
            None,
            None,
            None,
        )


class RecomputingLinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(h W^T, targets)`` keeping only h and one log-sum-exp per token: backward
    computes each chunk's logits again (a fourth product, ``model.loss_impl=chunked_recompute``)."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, reduction, chunk_tokens):
        # h: (N, C) in the compute dtype, weight: (V, C), targets: (N,)
        w = weight.to(h.dtype)
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)  # (N,)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk_tokens):
            t = targets[s : s + chunk_tokens]
            z = (h[s : s + chunk_tokens] @ w.t()).float()  # (n, V): the dense path's logits.float()
            lse[s : s + chunk_tokens] = torch.logsumexp(z, dim=-1)
            valid = t != ignore_index
            picked = z.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)
            total += torch.where(valid, lse[s : s + chunk_tokens] - picked, 0.0).sum()
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.ignore_index, ctx.reduction, ctx.chunk_tokens = ignore_index, reduction, chunk_tokens
        if reduction == "sum":
            return total
        return total / (targets != ignore_index).sum()  # all ignored: 0/0 = nan, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, targets, lse = ctx.saved_tensors
        n = ctx.chunk_tokens
        valid = targets != ctx.ignore_index
        scale = grad_out if ctx.reduction == "sum" else grad_out / valid.sum().clamp(min=1)
        w = weight.to(h.dtype)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if ctx.needs_input_grad[1]
            else None
        )
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], n):
                hc, t, v = h[s : s + n], targets[s : s + n], valid[s : s + n]
                p = (hc @ w.t()).float().sub_(lse[s : s + n, None]).exp_()  # (n, V) softmax
                safe = torch.where(v, t, 0)
                _chunk_grads(p, safe, v, scale, h.dtype, hc, w, grad_h, grad_w, slice(s, s + n))
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_tokens: int = 256,
    recompute: bool = False,
    kernel: str = "auto",
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(h, weight).float(), targets, ...)`` chunk by chunk of tokens.

    ``h``: (N, C); ``weight``: (V, C); ``targets``: (N,), ``ignore_index`` where no token is
    predicted (it adds neither loss nor gradient). ``reduction``: ``mean`` over the tokens not
    ignored (nan when all are, as ``F.cross_entropy``) or ``sum``. Under autocast the logits are
    computed in autocast's dtype, as ``nn.Linear`` would. ``recompute``: the gradient in backward
    from recomputed logits (``chunked_recompute``), not in forward. ``kernel``: ``choose_kernel``
    (Liger-Kernel on CUDA when installed, for ``auto``).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: the chunked loss takes mean or sum")
    if chunk_tokens < 1:
        raise ValueError(f"model.loss_chunk_tokens={chunk_tokens} must be at least 1")
    h = h.to(compute_dtype(h))
    use = choose_kernel(kernel, h.device.type, recompute)
    with torch.autocast(h.device.type, enabled=False):
        if use == "liger":
            return liger_loss(h, weight.to(h.dtype), targets, ignore_index, reduction)
        fn = RecomputingLinearCrossEntropy if recompute else LinearCrossEntropyFunction
        return fn.apply(h, weight, targets, ignore_index, reduction, chunk_tokens)
