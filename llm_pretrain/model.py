"""LLaMA, as in the GaLore/APOLLO pretraining configs, in one readable file.

RMSNorm (eps 1e-6) -> RoPE -> causal attention (SDPA; flash-attn when installed, on CUDA, in
16-bit) -> SwiGLU MLP, pre-norm blocks, untied embedding and lm_head, N(0, 0.02) init. Loaded
Hugging Face checkpoints may add grouped-query attention (``num_kv_heads``) and a head tied to the
embedding (``tie_embeddings``). Parameter
names follow Hugging Face's ``LlamaForCausalLM`` so weights export without renaming, and so the
papers' target rule ("linear weights whose names contain attn or mlp") selects the same matrices.
Parallelism, compile and quantization are applied from outside; nothing here knows about them.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from llm_pretrain.chunked_loss import CHUNKED, KERNELS, REDUCTIONS, linear_cross_entropy
from llm_pretrain.config import ModelConfig

try:  # optional: only used on CUDA with 16-bit activations
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as the reference LlamaRMSNorm does, then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim: int, max_pos: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    t = torch.arange(max_pos, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd), HF "rotate_half" layout
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = kv_heads(cfg)
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.backend = cfg.attention
        h, kv = cfg.hidden_size, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, kv, bias=False)
        self.v_proj = nn.Linear(h, kv, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, nh, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        cos, sin = cos[:T, None, :].to(q.dtype), sin[:T, None, :].to(q.dtype)  # (T, 1, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self._use_flash(q):
            y = flash_attn_func(q, k, v, causal=True)  # (B, T, nh, hd); GQA built in
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
            # Right padding with masked labels needs only the causal mask (as in the references).
            gqa = self.num_kv_heads != self.num_heads  # (each k/v head serves a group of q's)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            y = y.transpose(1, 2)
        return self.o_proj(y.reshape(B, T, C))

    def _use_flash(self, q: torch.Tensor) -> bool:
        if self.backend == "sdpa":
            return False
        usable = (
            flash_attn_func is not None
            and q.is_cuda
            and q.dtype
            in (
                torch.float16,
                torch.bfloat16,
            )
        )
        if self.backend == "flash" and not usable:
            raise RuntimeError(
                "model.attention=flash needs the flash-attn package, a CUDA device and 16-bit "
                "activations (trainer.precision=bf16 or bf16_autocast); use model.attention=auto"
            )
        return usable


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The ``model.`` prefix of HF's LlamaForCausalLM: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        validate_model_config(cfg)
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if getattr(cfg, "tie_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(
            cfg.hidden_size // cfg.num_heads, cfg.max_position_embeddings, cfg.rope_theta
        )
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) for every linear and embedding, ones for the norms (HF LLaMA init)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, self.cfg.init_std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        reduction: str = "mean",
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits, or the next-token loss when ``labels`` are given.

        ``labels`` are aligned with ``input_ids`` (the shift happens here, as in HF); positions
        equal to -100 are ignored. ``reduction="sum"`` lets the caller weight by its own token
        count. ``logits_at`` (one position per row, (B,), or n per row, (B, n)) returns the logits
        at those positions only, (B, V) or (B, n, V): what decoding and label scoring need,
        without a (B, T, V) tensor (and through ``forward``, so FSDP2's hooks gather the head).
        With ``model.loss_impl=chunked`` the loss never forms the (B, T-1, V) logits either
        (``llm_pretrain/chunked_loss.py``: the same numbers, chunk by chunk of tokens).
        """
        T = input_ids.shape[1]
        if self.cfg.max_position_embeddings < T:
            raise ValueError(
                f"sequence length {T} exceeds model.max_position_embeddings="
                f"{self.cfg.max_position_embeddings}; lower data.seq_len"
            )
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        for layer in self.model.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        x = self.model.norm(x)
        if logits_at is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            return self.lm_head(x[rows[:, None] if logits_at.dim() == 2 else rows, logits_at])
        if labels is None:
            return self.lm_head(x)  # (B, T, V)
        if self._chunked_loss(reduction):  # the same loss without the (B, T-1, V) logits
            return linear_cross_entropy(
                x[:, :-1].reshape(-1, x.shape[-1]),  # (B (T-1), C)
                self.lm_head.weight,
                labels[:, 1:].reshape(-1),
                IGNORE_INDEX,
                reduction,
                self.cfg.loss_chunk_tokens,
                recompute=self.cfg.loss_impl == "chunked_recompute",
                kernel=getattr(self.cfg, "loss_kernel", "auto"),
            )
        logits = self.lm_head(x[:, :-1])  # (B, T-1, V)
        return F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction=reduction,
        )

    def _chunked_loss(self, reduction: str) -> bool:
        """``model.loss_impl=chunked`` where it computes what ``lm_head`` would: a plain
        ``nn.Linear`` head (not one a method replaced, e.g. by INT8 codes) and a reduced loss."""
        # (a config saved before the setting existed computes as it did then: dense)
        if getattr(self.cfg, "loss_impl", "dense") not in CHUNKED or reduction not in REDUCTIONS:
            return False
        if not fused_head(self):
            if not getattr(self, "_dense_head_logged", False):
                log.info(
                    f"model.loss_impl={self.cfg.loss_impl}: lm_head "
                    f"({type(self.lm_head).__name__}) is not a plain nn.Linear; the loss "
                    "computes the dense logits"
                )
                self._dense_head_logged = True
            return False
        return True

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # (a tied matrix once)
        if non_embedding:
            n -= sum({id(p): p.numel() for p in self._vocab_matrices()}.values())
        return n

    def _vocab_matrices(self) -> list[torch.Tensor]:
        return [self.model.embed_tokens.weight, self.lm_head.weight]

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N (all but the embedding lookup, the head's matmul
        included, tied or not) + attention (torchtitan's rule)."""
        c = self.cfg
        n = self.num_params(non_embedding=True) + self.lm_head.weight.numel()
        return 6.0 * n + 12.0 * c.num_layers * c.hidden_size * seq_len


def validate_model_config(cfg: ModelConfig) -> None:
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(
            f"model.hidden_size={cfg.hidden_size} is not divisible by model.num_heads="
            f"{cfg.num_heads}; pick a head count that divides the width"
        )
    if (cfg.hidden_size // cfg.num_heads) % 2:
        raise ValueError(
            f"head_dim={cfg.hidden_size // cfg.num_heads} is odd; RoPE needs an even head_dim"
        )
    if cfg.attention not in ("auto", "sdpa", "flash"):
        raise ValueError(f"model.attention={cfg.attention!r}: use auto, sdpa or flash")
    if getattr(cfg, "loss_impl", "dense") not in (*CHUNKED, "dense"):
        raise ValueError(
            f"model.loss_impl={cfg.loss_impl!r}: use chunked, chunked_recompute or dense"
        )
    if getattr(cfg, "loss_kernel", "auto") not in KERNELS:
        raise ValueError(f"model.loss_kernel={cfg.loss_kernel!r}: use {', '.join(KERNELS)}")
    if getattr(cfg, "loss_chunk_tokens", 1) < 1:
        raise ValueError(f"model.loss_chunk_tokens={cfg.loss_chunk_tokens} must be at least 1")
    for key in ("hidden_size", "intermediate_size", "num_heads", "num_layers", "vocab_size"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"model.{key}={getattr(cfg, key)} must be positive")
    kv = kv_heads(cfg)
    if kv <= 0 or cfg.num_heads % kv:
        raise ValueError(
            f"model.num_kv_heads={cfg.num_kv_heads} must be positive and divide model.num_heads="
            f"{cfg.num_heads} (each k/v head serves a group of query heads); null: num_heads"
        )


def fused_head(model: Llama) -> bool:
    """Whether ``model.lm_head`` is a plain ``nn.Linear``, which ``loss_impl=chunked`` fuses
    with the loss (a head a method wrapped or replaced computes its own logits)."""
    return type(model.lm_head) is nn.Linear


def kv_heads(cfg: ModelConfig) -> int:
    """Key/value heads: ``num_kv_heads``, or one per query head (plain multi-head attention)."""
    kv = getattr(cfg, "num_kv_heads", None)
    return cfg.num_heads if kv is None else kv


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> Llama:
    """Build on ``device``; ``meta`` gives exact shapes and counts for any size without memory."""
    with torch.device(device):
        return Llama(cfg)
