"""Predicted training memory, without allocating: the same categories ``MemoryReport`` measures.

The model is built on the ``meta`` device in the run's precision and the optimizer is built on it
(RSO wraps its linears there too), so weights and gradients are exact parameter arithmetic and
the optimizer state is the method's closed form (``optimizers.memory_formula``). Activations
come from ``activation_bytes_formula``: the tensors our LLaMA (``llm_pretrain/model.py``) saves
for backward, term by term, for one micro-batch, which the tests check against the
saved-tensor count of a real forward; under ``trainer.activation_checkpointing`` what the
checkpointed blocks keep instead, and the transient of recomputing one block
(``recompute_bytes_formula``, ``Estimate.recompute``).

Precision modes (``trainer.precision``), the papers' numbers depend on them:
- ``bf16``: pure bf16 weights, gradients and optimizer state (the GaLore/APOLLO scripts);
- ``bf16_autocast``: fp32 master weights, bf16 compute: autocast keeps bf16 copies of every
  linear weight and input for backward;
- ``fp32``: everything in fp32.
``auto`` resolves as in training on a CUDA device with bf16 (bf16_autocast); pass the mode to
estimate for another device.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn

from llm_pretrain import optim as optimizers
from llm_pretrain.config import ModelConfig
from llm_pretrain.model import build_model, fused_head, kv_heads
from llmpt.optimizers import api
from llmpt.optimizers.int8_linear import stored_weight_tensors

PRECISIONS = ("fp32", "bf16_autocast", "bf16")
LINEARS = {
    "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}


@dataclass
class Estimate:
    precision: str
    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    optimizer_state_by_category: dict[str, int] = field(default_factory=dict)
    # trainer.parallelism=fsdp on several ranks: each rank's weights, gradients and
    # optimizer_state (the fields above are then rank 0's, as the measured ones are)
    per_rank: list[dict] | None = None
    # trainer.activation_checkpointing=blocks|selective: the transient of recomputing one block
    # in backward, on top of the activations (``recompute_bytes_formula``; 0 without it)
    recompute: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations

    def paper_convention(self) -> int:
        """Weights + optimizer state: GaLore Table 2's quantity (when the precision is bf16)."""
        return self.weights + self.optimizer_state

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16_autocast"
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r}: use auto, fp32, bf16_autocast or bf16")
    return precision


def activation_bytes_formula(
    cfg: ModelConfig,
    precision: str,
    micro_batch: int,
    seq_len: int,
    rso_rank: int | None = None,
    rso_targets: list[str] | tuple[str, ...] = (),
    frozen_layers: int = 0,
    int8_targets: list[str] | tuple[str, ...] = (),
    weight_norm_targets: list[str] | tuple[str, ...] = (),
    low_rank: list[dict[str, int]] | None = None,
    loss_impl: str | None = None,
    checkpointing: str = "none",
) -> int:
    """Bytes saved for backward by one forward of ``micro_batch`` sequences of ``seq_len``.

    Per token and layer (C hidden, F intermediate, h heads; e the compute dtype's bytes): each
    RMSNorm keeps its fp32 input, 1/rms and its normalised output; attention keeps the linears'
    input, q, k, v, the output (also o_proj's input) and the fp32 log-sum-exp per head (SDPA's
    flash kernels and flash-attn alike); the MLP keeps gate, silu(gate), up and down_proj's input.
    Under autocast every linear keeps its own bf16 copy of its input and of its weight (per
    micro-batch, not per token), and RoPE's cos and sin in bf16. An RSO-wrapped linear keeps
    x P (r values) instead of its input, and no weight copy. A linear whose weight is stored as
    INT8 codes (Q-GaLore, ``int8_targets``) keeps its input as it arrives (under autocast the
    fp32 norm output, shared by the linears that read it, instead of one bf16 cast each) and
    no weight copy: it dequantizes the weight again in backward (an INT8 lm_head, its whole
    input: the slice x[:, :-1] is a view). A weight-normalized linear
    (GradNormLoRP, ``weight_norm_targets``) keeps its input as a plain one does, and no weight
    copy: it recomputes g V / ||V|| in backward. In a layer a sampler has frozen
    (LISA, BAdam, OwLore), no weight needs a gradient, so the linears' inputs and the norms'
    outputs are not kept. The head keeps the token ids and the final norm, then by ``loss_impl``
    (default ``cfg.loss_impl``): ``dense``, lm_head's input, the targets and the fp32 logits the
    loss reads (under autocast also lm_head's bf16 weight copy); ``chunked_recompute``, the
    input, the targets and one fp32 log-sum-exp per token (it casts the weight again in
    backward); ``chunked``, which forms the gradients in forward, dh (the input's size, the
    compute dtype) and dW (the weight's size and dtype), and neither input nor targets.

    WeLore (``low_rank``: per layer, the low-rank components' ranks by linear name, e.g.
    ``{"self_attn.q_proj": 120}``): a low-rank component B (A x) keeps its input as a plain
    linear does and A x (k values per token); a targeted linear that is not one is dense and
    frozen and keeps no input (under autocast still its weight's bf16 copy, for the input's
    gradient); the frozen embedding keeps no ids, so the first norm, whose input needs no
    gradient, keeps only its normalised output; the frozen dense head keeps no input
    (``chunked_recompute`` does: backward computes the logits again from it; ``chunked`` keeps
    dh and no dW, and the embedding's ids are then kept by nothing).

    Activation checkpointing (``checkpointing``, ``llm_pretrain/checkpointing.py``) replaces
    every decoder layer's terms above, frozen or not (its input still needs a gradient); the
    head's stay. ``blocks``: a layer keeps its input, the residual stream (C values per token in
    fp32, in bf16 for a bf16 model: autocast's residual adds stay fp32). ``selective``: also,
    in the compute dtype, the output of each matmul (q C, k and v Ckv each, o C, gate F, up F,
    down C; an RSO linear's three, x P, x W0^T and their sum: r + 2 d_out; a WeLore low-rank
    component's two, A x and B (A x): k + d_out) and the attention kernel's output (C) with its
    fp32 log-sum-exp (h). What backward adds for a moment is ``recompute_bytes_formula``.
    """
    layers, head = _activation_terms(
        cfg, precision, micro_batch, seq_len, rso_rank, rso_targets, frozen_layers,
        int8_targets, weight_norm_targets, low_rank, loss_impl, checkpointing,
    )  # fmt: skip
    return sum(layers) + head


def recompute_bytes_formula(
    cfg: ModelConfig, precision: str, micro_batch: int, seq_len: int, **features
) -> int:
    """Backward's transient under ``blocks`` and ``selective``: while a block's backward runs,
    its forward has run again and its activations are alive as they are without checkpointing,
    one block at a time. The largest decoder layer's bytes of ``activation_bytes_formula`` with
    ``checkpointing="none"`` (``features``: its other keyword arguments); an upper bound, since
    the recompute shares the block's kept input and, under ``selective``, the cached outputs."""
    features["checkpointing"] = "none"
    layers, _ = _activation_terms(cfg, precision, micro_batch, seq_len, **features)
    return max(layers, default=0)


def _activation_terms(
    cfg: ModelConfig,
    precision: str,
    micro_batch: int,
    seq_len: int,
    rso_rank: int | None = None,
    rso_targets: list[str] | tuple[str, ...] = (),
    frozen_layers: int = 0,
    int8_targets: list[str] | tuple[str, ...] = (),
    weight_norm_targets: list[str] | tuple[str, ...] = (),
    low_rank: list[dict[str, int]] | None = None,
    loss_impl: str | None = None,
    checkpointing: str = "none",
) -> tuple[list[int], int]:
    """``activation_bytes_formula``'s terms: each decoder layer's bytes, and the head's (the
    embedding's ids, the final norm, lm_head and the loss)."""
    if checkpointing not in ("none", "blocks", "selective"):
        raise ValueError(
            f"trainer.activation_checkpointing={checkpointing!r}: use none, blocks or selective"
        )
    precision = resolve_precision(precision)
    impl = loss_impl or getattr(cfg, "loss_impl", "dense")
    dense_loss = impl == "dense"
    grad_in_forward = impl == "chunked"  # (chunked_recompute keeps h and the lse instead)
    C, F, h, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.vocab_size
    L, hd = cfg.num_layers, cfg.hidden_size // cfg.num_heads
    Ckv = kv_heads(cfg) * hd  # grouped-query attention: narrower k and v
    e = 4 if precision == "fp32" else 2
    autocast = precision == "bf16_autocast"
    wrapped = {
        name
        for group in LINEARS.values()
        for name in group
        if rso_rank is not None and any(t in f"model.layers.0.{name}" for t in rso_targets)
    }
    r = rso_rank or 0
    stored = {
        name
        for group in LINEARS.values()
        for name in group
        if any(t in f"model.layers.0.{name}" for t in int8_targets)
    }
    normed = {
        name
        for group in LINEARS.values()
        for name in group
        if any(t in f"model.layers.0.{name}" for t in weight_norm_targets)
    }

    def norm() -> int:  # fp32 input (a copy when the model is bf16), 1/rms, normalised output
        return 4 * C + 4 + (2 * C if precision == "bf16" else 4 * C)

    def linear_inputs(names: tuple[str, ...], width: int, input_bytes: int) -> int:
        """Per-token input bytes the linears ``names`` (reading one tensor of ``input_bytes``
        per value) keep: one shared copy in fp32 and bf16, one bf16 cast each under autocast
        (INT8-stored ones share the input as it is); x P instead under RSO."""
        plain = [n for n in names if n not in wrapped and n not in stored]
        int8 = [n for n in names if n in stored]
        out = e * r * (len(names) - len(plain) - len(int8))
        if autocast:
            out += e * width * len(plain) + (input_bytes * width if int8 else 0)
        elif plain or int8:
            out += e * width
        return out

    def weight_copies(names: tuple[str, ...], shapes: dict[str, int]) -> int:
        kept = [n for n in names if n not in wrapped and n not in stored and n not in normed]
        return sum(2 * shapes[n] for n in kept) if autocast else 0

    shapes = {
        "self_attn.q_proj": C * C,
        "self_attn.k_proj": C * Ckv,
        "self_attn.v_proj": C * Ckv,
        "self_attn.o_proj": C * C,
        "mlp.gate_proj": C * F,
        "mlp.up_proj": C * F,
        "mlp.down_proj": C * F,
    }
    qkv = LINEARS["attn"][:3]
    o, gate_up, down = LINEARS["attn"][3:], LINEARS["mlp"][:2], LINEARS["mlp"][2:]
    per_token = (
        norm()
        + linear_inputs(qkv, C, 4)
        + e * (C + 2 * Ckv)  # q, k, v after RoPE (SDPA shares each k/v head in GQA)
        + 4 * h  # log-sum-exp
        + e * C  # attention output = o_proj's input (its view)
        + (e * r if o[0] in wrapped else 0)
        + norm()
        + linear_inputs(gate_up, C, 4)
        + 3 * e * F  # gate, silu(gate), up
        + linear_inputs(down, F, e)  # silu(gate) * up, in the compute dtype
    )
    # frozen: the norms' outputs (kept for their weights' gradients) and the plain linears'
    # inputs (for theirs) go; x P stays, as RSO's B is trained in every layer
    frozen_saving = 2 * (4 * C if precision != "bf16" else 2 * C) + (
        linear_inputs(qkv, C, 4)
        + linear_inputs(gate_up, C, 4)
        + linear_inputs(down, F, e)
        - e * r * len(wrapped - set(o))
    )
    per_layer = weight_copies(qkv + o + gate_up + down, shapes)
    if autocast:
        per_layer += 2 * 2 * seq_len * hd  # RoPE's cos and sin cast to bf16
    tokens, predicted = micro_batch * seq_len, micro_batch * (seq_len - 1)
    if not 0 <= frozen_layers <= L:
        raise ValueError(f"frozen_layers={frozen_layers} must lie in [0, {L}]")
    # x[:, :-1] and labels[:, 1:] are copies when micro_batch > 1; with one sequence they are
    # views that keep their whole storage (the labels' is the ids' own in the training loop's
    # activation probe, which passes the inputs as labels)
    one = micro_batch == 1
    int8_head = any(t in "lm_head" for t in int8_targets)  # (its loss reads dense logits)
    ids = 8 * tokens  # token ids (embedding backward)
    if grad_in_forward:
        # the chunked head keeps dh (h's size, the compute dtype) and dW (the weight's size
        # and dtype), neither its input nor the targets (llm_pretrain/chunked_loss.py)
        head = ids + norm() * tokens + e * C * predicted
        if low_rank is None:
            head += (2 if precision == "bf16" else 4) * V * C
        else:  # frozen embedding and head: no ids (nothing else keeps them), no dW
            head -= ids
        return _layer_terms(locals()), head
    head = (
        ids
        + norm() * tokens
        # lm_head's input, x[:, :-1] (under autocast its bf16 cast, a copy of the slice; an
        # INT8 head keeps the slice as it arrives, a view that keeps the whole x)
        + (
            (4 if autocast else e) * C * tokens
            if int8_head
            else e * C * (tokens if one and not autocast else predicted)
        )
        + (0 if one else 8 * predicted)  # targets
    )
    if dense_loss:
        head += (2 * C * V if autocast and not int8_head else 0) + 4 * V * predicted + 4  # logits
    else:
        head += 4 * predicted  # chunked_recompute: the fp32 log-sum-exp per token
    if low_rank is not None:
        # frozen embedding and head: no ids for the embedding (one sequence: the targets' view
        # keeps their storage anyway) and no lm_head input
        head -= (0 if one else 8 * tokens) + dense_loss * e * C * (
            tokens if one and not autocast else predicted
        )
    return _layer_terms(locals()), head


def _layer_terms(v: dict) -> list[int]:
    """The decoder layers' bytes, from ``_activation_terms``'s locals."""
    L, low_rank, tokens = v["L"], v["low_rank"], v["tokens"]
    if low_rank is not None and len(low_rank) != L:
        raise ValueError(f"low_rank has {len(low_rank)} layers, the model {L}")
    checkpointing, precision, e, C, h = (
        v["checkpointing"], v["precision"], v["e"], v["C"], v["h"]
    )  # fmt: skip
    if checkpointing != "none":
        qkv, o, gate_up, down, F, Ckv = (v[k] for k in ("qkv", "o", "gate_up", "down", "F", "Ckv"))
        wrapped, r = v["wrapped"], v["r"]
        outputs = dict(zip(qkv + o + gate_up + down, (C, Ckv, Ckv, C, F, F, C), strict=True))

        def kept(ranks: dict[str, int]) -> int:  # a checkpointed layer's bytes per token
            out = (2 if precision == "bf16" else 4) * C  # its input, the residual stream
            if checkpointing == "selective":
                for name, width in outputs.items():  # each matmul's output
                    out += e * (width + ranks.get(name, 0))  # (WeLore's A x too)
                    out += e * (r + width) if name in wrapped else 0  # RSO: x P and x W0^T
                out += e * C + 4 * h  # the attention output and its log-sum-exp
            return out * tokens

        return [kept(ranks) for ranks in (low_rank or [{}] * L)]
    if low_rank is not None:
        return _welore_layers(low_rank, v)
    layer = v["per_token"] * tokens + v["per_layer"]
    frozen, saving = v["frozen_layers"], v["frozen_saving"]
    return [layer - saving * tokens] * frozen + [layer] * (L - frozen)


def _welore_layers(low_rank: list[dict[str, int]], f: dict) -> list[int]:
    """Each decoder layer's saved bytes under WeLore (see ``activation_bytes_formula``; ``f``:
    its local values)."""
    C, F, h, e, Ckv = f["C"], f["F"], f["h"], f["e"], f["Ckv"]
    autocast, norm = f["autocast"], f["norm"]
    qkv, o, gate_up, down = f["qkv"], f["o"], f["gate_up"], f["down"]
    dims = dict(zip(qkv + o + gate_up + down, [(C, C), (Ckv, C), (Ckv, C), (C, C), (F, C),
                                              (F, C), (C, F)], strict=True))  # fmt: skip
    layers = []
    for i, ranks in enumerate(low_rank):

        def inputs(names: tuple[str, ...], width: int, ranks=ranks) -> int:
            lrc = [n for n in names if n in ranks]
            kept = e * width * len(lrc) if autocast else (e * width if lrc else 0)
            return kept + e * sum(ranks[n] for n in lrc)  # + A x of each

        first_norm = (2 * C if f["precision"] == "bf16" else 4 * C) if i == 0 else norm()
        per_token = (
            first_norm
            + inputs(qkv, C)
            + e * (C + 2 * Ckv)
            + 4 * h
            + e * C
            + e * ranks.get(o[0], 0)  # (o_proj's input is the attention output, kept anyway)
            + norm()
            + inputs(gate_up, C)
            + 3 * e * F
            + inputs(down, F)
        )
        per_layer = 0
        if autocast:
            for name, (rows, cols) in dims.items():  # bf16 copies: A and B, or the frozen W
                per_layer += 2 * (ranks[name] * (rows + cols) if name in ranks else rows * cols)
            per_layer += 2 * 2 * f["seq_len"] * (C // h)  # RoPE's cos and sin
        layers.append(per_token * f["tokens"] + per_layer)
    return layers


def low_rank_layout(model: nn.Module) -> list[dict[str, int]]:
    """Per decoder layer, the ranks of its WeLore low-rank components by linear name."""
    from llmpt.optimizers.welore import LowRankLinear

    return [
        {n: m.rank for n, m in layer.named_modules() if isinstance(m, LowRankLinear)}
        for layer in model.model.layers
    ]


def shard_bytes(t: torch.Tensor, world: int) -> int:
    """Bytes of one rank's FSDP2 shard of ``t``: ``ceil(rows / world)`` rows (FSDP2 pads every
    rank's shard to that size)."""
    rows = t.shape[0] if t.dim() else 1
    per_row = t.numel() // max(rows, 1)
    return -(-rows // world) * per_row * t.element_size()


def fsdp_groups(model: nn.Module) -> list[list[torch.Tensor]]:
    """The trained parameters of each FSDP2 group ``parallel.fully_shard_model`` makes: one per
    decoder block, then the root's (embeddings, final norm, head)."""
    blocks = [[p for p in b.parameters() if p.requires_grad] for b in model.model.layers]
    in_block = {id(p) for b in model.model.layers for p in b.parameters()}
    root = [p for p in model.parameters() if p.requires_grad and id(p) not in in_block]
    return [*blocks, root]


def estimate(cfg: DictConfig, precision: str | None = None, world_size: int = 1) -> Estimate:
    """Predict the training memory of the job ``cfg`` (a composed training config) on each of
    ``world_size`` ranks; ``precision`` overrides ``trainer.precision`` (training passes the mode
    it resolved). Under ``trainer.parallelism=fsdp`` on several ranks, weights and gradients are
    each rank's FSDP2 shards and the optimizer state that of the matrices it owns."""
    precision = resolve_precision(precision or cfg.trainer.precision)
    model = build_model(copy.deepcopy(cfg.model), "meta")
    if precision == "bf16":
        model.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. bitsandbytes' notices about the meta device
        optimizer = optimizers.build(cfg.optimizer, model)
    params = {id(p): p for p in model.parameters()}.values()
    # storages, not numel: Q-GaLore's INT8 weights are codes behind a one-element placeholder
    weights = sum(t.untyped_storage().nbytes() for t in [*params, *stored_weight_tensors(model)])
    trained = [p for p in params if p.requires_grad]
    if cfg.trainer.per_layer_update:  # each gradient is consumed in its own hook
        gradients = max((p.numel() * p.element_size() for p in trained), default=0)
    else:
        gradients = sum(p.numel() * p.element_size() for p in trained)
    by_cat = {k: v for k, v in api.memory_formula(optimizer).items() if v}
    per_rank = None
    if cfg.trainer.get("parallelism", "ddp") == "fsdp" and world_size > 1:
        from llmpt.optimizers.sharded import memory_formula_per_rank

        states = memory_formula_per_rank(optimizer, world_size)
        w = sum(shard_bytes(p, world_size) for p in params)
        g = sum(shard_bytes(p, world_size) for p in trained)
        if cfg.trainer.per_layer_update:
            # a shard's gradient is a view of its FSDP2 group's reduce-scatter output, alive
            # until the group's last hook has stepped: one group's shards at a time
            g = max(sum(shard_bytes(p, world_size) for p in grp) for grp in fsdp_groups(model))
        per_rank = [
            {"weights": w, "gradients": g, "optimizer_state": sum(s.values())} for s in states
        ]
        weights, gradients = w, g
        by_cat = {k: v for k, v in states[0].items() if v}
    del optimizer
    frozen = sum(
        1 for layer in model.model.layers if not any(p.requires_grad for p in layer.parameters())
    )
    rso = cfg.optimizer.name == "rso"
    opt = cfg.optimizer
    int8 = (
        opt.name == "q_galore" and opt.get("weight_quant") and opt.get("weight_storage") == "int8"
    )
    normed = optimizers.METHODS[opt.name].surgery == "weight_norm"
    low_rank = low_rank_layout(model) if optimizers.METHODS[opt.name].surgery == "welore" else None
    features = dict(
        rso_rank=cfg.optimizer.rank if rso else None,
        rso_targets=list(cfg.optimizer.target_modules) if rso else (),
        frozen_layers=frozen,
        int8_targets=list(opt.target_modules) if int8 else (),
        weight_norm_targets=list(opt.target_modules) if normed else (),
        low_rank=low_rank,
        # a head a method replaced (INT8 codes, RSO) computes dense logits (Llama._chunked_loss)
        loss_impl=None if fused_head(model) else "dense",
    )
    shape = (cfg.model, precision, cfg.trainer.micro_batch_size, cfg.data.seq_len)
    # (a config saved before the setting existed ran without it)
    checkpointing = cfg.trainer.get("activation_checkpointing", "none")
    activations = activation_bytes_formula(*shape, **features, checkpointing=checkpointing)
    recompute = 0 if checkpointing == "none" else recompute_bytes_formula(*shape, **features)
    return Estimate(
        precision=precision,
        weights=weights,
        gradients=gradients,
        optimizer_state=sum(by_cat.values()),
        activations=activations,
        optimizer_state_by_category=by_cat,
        per_rank=per_rank,
        recompute=recompute,
    )
