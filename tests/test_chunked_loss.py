"""The fused, chunked head (llm_pretrain/chunked_loss.py, ``model.loss_impl=chunked`` and
``chunked_recompute``) against the dense ``F.cross_entropy(lm_head(x).float())``: the same loss
and gradients, without the (B, T, V) logits."""

import functools
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llm_pretrain.chunked_loss import linear_cross_entropy
from llm_pretrain.config import ModelConfig
from llm_pretrain.evaluate import evaluate
from llm_pretrain.model import IGNORE_INDEX, build_model

V, C = 97, 24


def head_inputs(rows: int = 45, seed: int = 0):
    """h and W at the model's scale (N(0, 1) h, N(0, 0.02) W) and targets with ignored tokens."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, C, generator=g).requires_grad_()
    w = (0.02 * torch.randn(V, C, generator=g)).requires_grad_()
    t = torch.randint(0, V, (rows,), generator=g)
    t[[0, 7, 8, rows - 1]] = IGNORE_INDEX
    return h, w, t


def dense(h, w, t, reduction):
    return F.cross_entropy(
        F.linear(h, w).float(), t, ignore_index=IGNORE_INDEX, reduction=reduction
    )


RECOMPUTE = pytest.mark.parametrize("recompute", [False, True], ids=["chunked", "recompute"])


def chunked(recompute: bool):
    return functools.partial(linear_cross_entropy, recompute=recompute)


def loss_and_grads(fn, h, w, *args):
    loss = fn(h, w, *args)
    return (loss, *torch.autograd.grad(loss, (h, w)))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 7, 16, 45, 1000])  # 45 rows: remainders 3, 13; one chunk
@RECOMPUTE
def test_loss_and_gradients_equal_the_dense_head_in_fp32(reduction, chunk, recompute):
    h, w, t = head_inputs()
    ours = loss_and_grads(chunked(recompute), h, w, t, IGNORE_INDEX, reduction, chunk)
    ref = loss_and_grads(dense, h, w, t, reduction)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert ours[1][[0, 7, 8, 44]].abs().max() == 0  # ignored tokens: no gradient


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@RECOMPUTE
def test_an_all_ignored_batch_gives_what_f_cross_entropy_gives(reduction, recompute):
    h, w, _ = head_inputs()
    t = torch.full((45,), IGNORE_INDEX)
    loss, gh, gw = loss_and_grads(chunked(recompute), h, w, t, IGNORE_INDEX, reduction, 8)
    ref = dense(h, w, t, reduction)
    assert math.isnan(loss.item()) if reduction == "mean" else loss.item() == 0.0
    assert math.isnan(ref.item()) if reduction == "mean" else ref.item() == 0.0
    assert not gh.any() and not gw.any()  # (the dense head's gradients are zero too)


@RECOMPUTE
def test_bf16_autocast_computes_the_logits_in_bf16_as_the_dense_head(recompute):
    h, w, t = head_inputs(rows=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss_and_grads(chunked(recompute), h, w, t, IGNORE_INDEX, "mean", 16)
        ref = loss_and_grads(dense, h, w, t, "mean")
    assert [x.dtype for x in ours] == [x.dtype for x in ref] == [torch.float32] * 3
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-6)  # same bf16 logits
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=1e-6)  # same bf16 matmul
    # W's gradient: bf16 products of 16 tokens summed in fp32, not one bf16 product of 200
    torch.testing.assert_close(ours[2], ref[2], rtol=0, atol=1e-2 * ref[2].abs().max().item())


@RECOMPUTE
def test_a_bf16_model_keeps_bf16_gradients(recompute):
    h, w, t = head_inputs()
    h = h.detach().bfloat16().requires_grad_()
    w = w.detach().bfloat16().requires_grad_()
    ours = loss_and_grads(chunked(recompute), h, w, t, IGNORE_INDEX, "sum", 16)
    ref = loss_and_grads(dense, h, w, t, "sum")
    assert ours[1].dtype == ours[2].dtype == torch.bfloat16
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_bad_arguments_are_refused():
    h, w, t = head_inputs()
    with pytest.raises(ValueError, match="takes mean or sum"):
        linear_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(ValueError, match="model.loss_chunk_tokens=0"):
        linear_cross_entropy(h, w, t, chunk_tokens=0)


def model_pair(impl: str = "chunked", **overrides):
    """The same weights behind a dense and a chunked head (``impl``; chunks of 40 of the batch's
    57 tokens: more elements than any parameter)."""
    shape = dict(
        name="t",
        hidden_size=32,
        intermediate_size=48,
        num_heads=4,
        num_layers=2,
        vocab_size=V,
        max_position_embeddings=64,
        loss_chunk_tokens=40,
    )
    models = []
    for loss_impl in ("dense", impl):
        torch.manual_seed(0)
        models.append(build_model(ModelConfig(**(shape | overrides), loss_impl=loss_impl)))
    return models


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (3, 20), generator=g)
    y = x.clone()
    y[1, 11:] = IGNORE_INDEX  # right padding
    y[2] = IGNORE_INDEX  # a row of padding only
    return x, y


def grads(model, reduction="mean", scale=1.0):
    x, y = batch()
    loss = model(x, y, reduction=reduction)
    (loss * scale).backward()
    return loss, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("impl", ["chunked", "chunked_recompute"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_models_loss_and_every_gradient_equal_the_dense_heads(tied, reduction, impl):
    dense_model, chunked = model_pair(impl, tie_embeddings=tied)
    assert (chunked.lm_head.weight is chunked.model.embed_tokens.weight) == tied
    ref_loss, ref = grads(dense_model, reduction, scale=0.37)
    loss, ours = grads(chunked, reduction, scale=0.37)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert ours.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-6, atol=1e-6, msg=name)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operator returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("impl", ["chunked", "chunked_recompute"])
def test_the_full_logits_never_exist(impl):
    dense_model, chunked = model_pair(impl)
    x, y = batch()
    sizes = []
    for model in (dense_model, chunked):
        with LargestTensor() as largest:
            model(x, y).backward()
        sizes.append(largest.numel)
    assert sizes[0] == 3 * 19 * V  # the dense head's (B, T-1, V)
    assert sizes[1] == 40 * V  # one chunk of logits


def hooked_grads(model) -> dict[str, torch.Tensor]:
    """Each parameter's gradient as its post-accumulate-grad hook sees it in one backward."""
    names = {p: n for n, p in model.named_parameters()}
    got = {}

    def hook(p):
        assert names[p] not in got  # once per backward
        got[names[p]] = p.grad.clone()

    for p in names:
        p.register_post_accumulate_grad_hook(hook)
    x, y = batch()
    model(x, y).backward()
    return got


@pytest.mark.parametrize("impl", ["chunked", "chunked_recompute"])
@pytest.mark.parametrize("tied", [False, True])
def test_per_parameter_hooks_see_the_dense_heads_gradients(tied, impl):
    """Per-layer updates step each parameter in its post-accumulate-grad hook
    (``trainer.per_layer_update``): the head's weight arrives there once, whole (tied: the
    embedding's and the head's gradients summed)."""
    ref, ours = (hooked_grads(m) for m in model_pair(impl, tie_embeddings=tied))
    assert ours.keys() == ref.keys() and ("lm_head.weight" in ours) != tied
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("impl", ["chunked", "chunked_recompute"])
def test_evaluation_uses_the_chunked_head_and_gets_the_same_perplexity(impl):
    x, y = batch()
    val = {"input_ids": x, "labels": y}
    dense_model, chunked = model_pair(impl)
    out = [evaluate(m, val, batch_size=2, device=torch.device("cpu")) for m in model_pair(impl)]
    assert out[0]["tokens"] == out[1]["tokens"] == int((y[:, 1:] != IGNORE_INDEX).sum())
    assert math.isclose(out[1]["loss"], out[0]["loss"], rel_tol=1e-6)
    with LargestTensor() as largest, torch.no_grad():
        chunked(x, y, reduction="sum")
    assert largest.numel == 40 * V


def test_an_int8_head_falls_back_to_the_dense_logits_and_says_so(caplog):
    from llmpt.optimizers.int8_linear import wrap_int8

    dense_model, chunked = model_pair()
    for model in (dense_model, chunked):
        wrap_int8(model, [("lm_head", model.lm_head)], 256, "exact")
    x, y = batch()
    with caplog.at_level(logging.INFO, logger="llm_pretrain"):
        loss = chunked(x, y)
        chunked(x, y)
    assert torch.equal(loss, dense_model(x, y))
    assert caplog.text.count("lm_head (Int8Linear) is not a plain nn.Linear") == 1


def test_a_bad_loss_setting_is_refused_by_name():
    shape = dict(name="t", hidden_size=32, intermediate_size=48, num_heads=4, num_layers=1)
    with pytest.raises(ValueError, match="'fused': use chunked, chunked_recompute or dense"):
        build_model(ModelConfig(**shape, loss_impl="fused"))
    with pytest.raises(ValueError, match="model.loss_kernel='cuda': use auto, torch, liger"):
        build_model(ModelConfig(**shape, loss_kernel="cuda"))
    with pytest.raises(ValueError, match="model.loss_chunk_tokens=0 must be at least 1"):
        build_model(ModelConfig(**shape, loss_chunk_tokens=0))


def test_the_kernel_choice_takes_liger_only_where_it_runs(monkeypatch):
    from llm_pretrain import chunked_loss

    choose = chunked_loss.choose_kernel
    monkeypatch.setattr(chunked_loss, "liger_installed", lambda: True)
    assert choose("auto", "cuda", recompute=False) == "liger"
    assert choose("auto", "cpu", recompute=False) == "torch"
    assert choose("auto", "cuda", recompute=True) == "torch"  # no Liger counterpart
    assert choose("torch", "cuda", recompute=False) == "torch"
    with pytest.raises(RuntimeError, match="loss_kernel=liger: it runs on CUDA only"):
        choose("liger", "cpu", recompute=False)
    with pytest.raises(RuntimeError, match="chunked_recompute has no Liger counterpart"):
        choose("liger", "cuda", recompute=True)
    monkeypatch.setattr(chunked_loss, "liger_installed", lambda: False)
    assert choose("auto", "cuda", recompute=False) == "torch"
    with pytest.raises(RuntimeError, match=r"not installed \(pip install -e '.\[liger\]'\)"):
        choose("liger", "cuda", recompute=False)
    with pytest.raises(ValueError, match="model.loss_kernel='triton': use auto, torch, liger"):
        choose("triton", "cuda", recompute=False)


def test_the_liger_path_gets_the_compute_dtype_inputs_and_the_settings(monkeypatch):
    """On CUDA with liger-kernel installed the loss goes through its functional API; here a
    stand-in records the call (Liger's Triton kernels need CUDA) and computes the dense loss."""
    import sys
    import types

    from llm_pretrain import chunked_loss

    seen = {}

    def fake(h, w, t, ignore_index, reduction):
        seen.update(dtypes=(h.dtype, w.dtype), ignore_index=ignore_index, reduction=reduction)
        return dense(h, w, t, reduction)

    module = types.ModuleType("liger_kernel.transformers.functional")
    module.liger_fused_linear_cross_entropy = fake
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", module)
    monkeypatch.setattr(chunked_loss, "choose_kernel", lambda kernel, device, recompute: "liger")
    h, w, t = head_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, gh, gw = loss_and_grads(linear_cross_entropy, h, w, t, IGNORE_INDEX, "sum", 8)
    assert seen == {"dtypes": (torch.bfloat16, torch.bfloat16), "ignore_index": IGNORE_INDEX,
                    "reduction": "sum"}  # fmt: skip
    assert gw.dtype == torch.float32 and gw.abs().sum() > 0  # back through the cast to W
