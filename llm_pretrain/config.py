"""Structured config schemas (Hydra ConfigStore).

Every YAML file under ``conf/`` extends one of these dataclasses, so a misspelled key or a value
of the wrong type fails at composition time with Hydra's own message, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class ModelConfig:
    """LLaMA shapes as in the GaLore/APOLLO ``configs/llama_*.json`` files."""

    name: str = MISSING
    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_heads: int = MISSING
    num_layers: int = MISSING
    vocab_size: int = 32000
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02
    attention: str = "auto"  # auto | sdpa | flash


@dataclass
class DataConfig:
    """Where documents come from and how they become fixed-length rows."""

    source: str = MISSING  # builtin | files | c4
    tokenizer: str = MISSING  # builtin | path to spiece.model | tokenizer.json | HF tokenizer dir
    seq_len: int = 256
    layout: str = "packed"  # packed | paper
    path: str | None = None  # files: glob(s) of train documents, comma-separated
    val_path: str | None = None  # files: glob(s) of held-out documents
    val_docs: int = 200  # files without val_path: the first N documents are held out
    text_field: str = "text"
    hf_name: str = "allenai/c4"  # c4 source
    hf_config: str = "en"
    shuffle_shards: bool = True
    seed: int = 42
    num_workers: int = 0
    builtin_seed: int = 1234  # builtin corpus: which language is generated
    builtin_vocab_size: int = 2048


@dataclass
class OptimizerConfig:
    """What every optimizer has; each method's schema adds only the keys it reads."""

    name: str = MISSING
    lr: float = 1e-3
    weight_decay: float = 0.0


@dataclass
class AdamConfig(OptimizerConfig):
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class AdamWConfig(AdamConfig):
    implementation: str = "auto"  # auto | foreach | fused | for_loop


@dataclass
class AdamMiniConfig(AdamConfig):
    """Adam-mini: dim and heads come from the model config."""


@dataclass
class Adam8bitConfig(AdamConfig):
    min_8bit_size: int = 4096  # smaller tensors keep 32-bit state (bitsandbytes' rule)
    block_size: int = 256  # bitsandbytes' blockwise quantisation block (fixed on CPU and GPU)


@dataclass
class AdafactorConfig(OptimizerConfig):
    beta2_decay: float = -0.8
    eps1: float | None = None  # None: the parameter dtype's machine epsilon (torch's default)
    eps2: float = 1e-3
    clip_threshold: float = 1.0


@dataclass
class CameConfig(OptimizerConfig):
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999, 0.9999])
    eps1: float = 1e-30
    eps2: float = 1e-16
    clip_threshold: float = 1.0


@dataclass
class MuonConfig(OptimizerConfig):
    """Muon on the targeted matrices, AdamW on everything else (embeddings, lm_head, norms)."""

    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    adjust_lr_fn: str = "match_rms_adamw"  # original | match_rms_adamw (torch.optim.Muon)
    ns_dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float32
    target_modules: list[str] = field(default_factory=lambda: ["attn", "mlp"])
    adamw_lr: float | None = None  # None: the same lr
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adamw_eps: float = 1e-8


@dataclass
class GaLoreConfig(AdamConfig):
    """Low-rank projection with an SVD basis (GaLore); Fira extends it."""

    rank: int = 128
    update_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"  # std | reverse_std | left | right | full
    svd_backend: str = "exact"  # exact | randomized (torch.svd_lowrank)
    svd_power_iters: int = 1  # randomized only: subspace (power) iterations
    refresh_phase: int = 0  # 1 reproduces pytorch-optimizer's GaLore (refresh at T-1, 2T-1, ...)
    # Linear weights whose qualified name contains one of these strings are projected.
    target_modules: list[str] = field(default_factory=lambda: ["attn", "mlp"])


@dataclass
class GaLore8bitConfig(GaLoreConfig):
    min_8bit_size: int = 4096  # smaller (projected) tensors keep fp32 moments


@dataclass
class QGaLoreConfig(GaLore8bitConfig):
    """Q-GaLore: 8-bit GaLore with a 4-bit projector, lazy refresh and INT8 weights."""

    proj_bits: int = 4  # 4 (codes packed two per byte) | 8
    proj_group_size: int = 256
    cos_threshold: float = 0.4  # lazy refresh: grow the gap when the mean cosine reaches this
    queue_size: int = 5  # over the last this many refreshes
    growth: float = 2.0  # gap <- floor(gap x growth)
    abs_cos: bool = True  # |cos| (SVD signs are arbitrary); false: the reference's signed cos
    weight_quant: bool = True  # INT8 weights for the projected matrices
    weight_storage: str = "simulated"  # simulated (any world size) | int8 (codes: 1 B/weight)
    stochastic_round: bool = True
    weight_group_size: int = 256
    compat: str = "none"  # none | reference: q-galore-torch's integer zero points, signed cos


@dataclass
class FiraConfig(GaLoreConfig):
    mode: str = "paper"  # paper | code (the pip fira 1.0.2 arithmetic)
    limiter_gamma: float = 1.01


@dataclass
class FrugalConfig(AdamConfig):
    """FRUGAL: Adam on a state-full subspace, a state-free step (signSGD) on the rest."""

    projection: str = "block"  # block | svd | random | columns | rows
    density: float = 0.25  # fraction of matrices (block) or of the projected dimension
    update_gap: int = 200
    proj_type: str = "std"  # svd / random: which side is projected
    block_order: str = "descending"  # block: random | ascending | descending | mirror
    inactive_rule: str = "sign"  # sign | sgd | none (none: GaLore-like or BAdam-like)
    inactive_lr_scale: float = 1.0
    proj_lr_scale: float = 1.0  # lr multiplier of the projectable matrices (both parts)
    reset_statistics: bool = True  # fresh moments at every subspace change
    seed: int = 0
    target_modules: list[str] = field(default_factory=lambda: ["attn", "mlp"])


@dataclass
class LisaConfig(AdamConfig):
    """LISA: full AdamW on a few sampled decoder layers, the others frozen."""

    active_layers: int = 2
    interval: int = 20  # steps between layer switches
    sampling_order: str = "uniform"  # uniform | shuffled | ascending | descending
    seed: int = 0


@dataclass
class BAdamConfig(LisaConfig):
    """BAdam: block coordinate Adam, one block of layers at a time, state cleared at a switch."""

    active_layers: int = 1
    interval: int = 50
    sampling_order: str = "shuffled"  # shuffled (BAdam's random) | ascending | descending


@dataclass
class OwLoreConfig(GaLoreConfig):
    """OwLore: GaLore on sampled layers, drawn with outlier-weighted probabilities."""

    active_layers: int = 2
    interval: int = 200
    outlier_ratio: float = 13.0  # OWL's M: a score is an outlier above M x the layer mean
    sampling_order: str = "weighted"  # weighted | uniform (LISA's draw with GaLore)
    seed: int = 0


@dataclass
class GumConfig(OptimizerConfig):
    """GUM: GaLore with Muon and unbiased layerwise sampling of full-rank complements."""

    momentum: float = 0.95
    ns_steps: int = 5
    adjust_lr_fn: str = "match_rms_adamw"  # original | match_rms_adamw (as torch.optim.Muon)
    ns_dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float32
    target_modules: list[str] = field(default_factory=lambda: ["attn", "mlp"])
    adamw_lr: float | None = None  # embeddings, lm_head, norms; None: the same lr
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adamw_eps: float = 1e-8
    rank: int = 128
    update_gap: int = 200  # K: projector and layer sample both refresh every K steps
    proj_type: str = "left"
    svd_backend: str = "exact"
    svd_power_iters: int = 1
    active_layers: int = 2  # gamma: layers in the full-rank branch per period, q = gamma / layers
    seed: int = 0


@dataclass
class ApolloConfig(AdamConfig):
    """APOLLO and APOLLO-Mini: Adam moments on a seeded random projection give a channel-wise
    (or tensor-wise) scale for the raw gradient."""

    rank: int = 128
    update_gap: int = 200
    scale: float = 1.0  # alpha, applied as is (compat=reference: the code's scale, applied as sqrt)
    proj_type: str = "std"  # std | reverse_std | left | right
    scale_type: str = "channel"  # channel (APOLLO) | tensor (APOLLO-Mini)
    scale_front: bool = False  # apply the scale before the norm-growth limiter
    limiter: bool = True  # Fira's norm-growth limiter on the update
    limiter_gamma: float = 1.01
    store_projection: bool = False  # keep P in the state instead of regenerating it from a seed
    projection_rng: str = "torch"  # torch (fast draw, per device type) | philox (any device)
    compat: str = "none"  # none | reference: apollo-torch's seeds, sqrt(scale), stored P
    seed: int = 0
    target_modules: list[str] = field(default_factory=lambda: ["attn", "mlp"])


@dataclass
class GrassConfig(AdamConfig):
    """GRASS: Adam on r selected rows (or columns) of the gradient; indices are the projector."""

    rank: int = 128
    update_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"  # which side is selected: std takes coordinates of the shorter one
    selection: str = "norm"  # top | norm (multinomial on squared norms) | uniform
    replacement: bool = False  # with replacement: unbiasing scales 1 / sqrt(r q)
    reset_on_refresh: bool = True  # new rows start with fresh moments
    seed: int = 0
    target_modules: list[str] = field(default_factory=lambda: ["attn", "mlp"])


@dataclass
class I3SConfig(GaLoreConfig):
    """I3S: GaLore whose r singular vectors are sampled in proportion to the singular values."""

    seed: int = 0


@dataclass
class DctConfig(AdamConfig):
    """DCT-AdamW: Adam on the r DCT columns most aligned with the gradient; indices only."""

    rank: int = 128
    update_gap: int = 1  # the reference re-selects at every step
    refresh_phase: int = 0  # 1: the reference's schedule for update_gap > 1 (steps 1, T, 2T, ...)
    scale: float = 1.0
    proj_type: str = "std"
    selection_norm: float = 1.0  # l_p norm of the columns of S = G C that ranks them
    transform: str = "matmul"  # matmul (stored DCT basis, GEMMs) | fft (Makhoul, no basis)
    rotate_subspace: bool = False  # carry the moments to the new columns (0/1 matching)
    use_ef: bool = False  # error feedback: what the columns drop goes into the next gradient
    ef_bits: int = 0  # 0: the error in full (parameter dtype) | 4 | 8: quantized per group
    ef_group_size: int = 0  # 0: one quantization group per row (the reference's bucket)
    target_modules: list[str] = field(default_factory=lambda: ["attn", "mlp"])


@dataclass
class FloraConfig(OptimizerConfig):
    """Flora: Adafactor with its momentum compressed by a seeded random projection."""

    rank: int = 128
    kappa: int = 1000  # steps between resamplings of the projection
    beta1: float = 0.9
    decay_rate: float = -0.8
    eps1: float = 1e-30
    eps2: float = 1e-3
    clip_threshold: float = 1.0
    scale_parameter: bool = True  # lr relative to RMS(W), as Adafactor
    proj_type: str = "std"
    compat: str = "none"  # none | reference: flora-opt's seeds
    projection_rng: str = "torch"  # torch (fast draw, per device type) | philox (any device)
    seed: int = 0
    target_modules: list[str] = field(default_factory=lambda: ["attn", "mlp"])


@dataclass
class CoapConfig(AdamConfig):
    """COAP: GaLore whose basis follows a correlation-aware gradient step every update_gap
    steps and a warm-started range finder every reproject_factor x update_gap."""

    rank: int = 128
    update_gap: int = 40  # T_u
    reproject_factor: int = 5
    scale: float = 0.25
    proj_type: str = "std"
    proj_lr: float = 0.1  # the correlation step on P
    restore_state: bool = False  # carry M and V into the new basis
    min_8bit_size: int = 4096  # coap_8bit only
    target_modules: list[str] = field(default_factory=lambda: ["attn", "mlp"])


@dataclass
class OsdConfig(AdamConfig):
    """Online Subspace Descent: GaLore whose basis takes one online-PCA AdamW step per step."""

    rank: int = 128
    update_gap: int = 200  # only sets the code form's projector lr (1 / update_gap)
    scale: float = 0.25
    proj_type: str = "std"
    mode: str = "paper"  # paper (penalty 0.1, lr 5 x lr_t) | code (the repository's)
    proj_lr_ratio: float = 5.0
    ortho_penalty: float = 0.1
    proj_weight_decay: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["attn", "mlp"])


@dataclass
class RsoConfig(AdamConfig):
    """RSO: the targeted linears become W0 + P B (P seeded Gaussian, B trained by Adam), merged
    and resampled every ``update_gap`` steps."""

    rank: int = 128
    update_gap: int = 200  # tau: inner Adam steps per random subspace
    proximal: float = 0.0  # 1 / eta of the subproblem's (1 / 2 eta) ||B||^2; 0: off
    store_projection: bool = False  # keep P as a buffer instead of redrawing it from its seed
    projection_rng: str = "torch"  # torch (fast draw, per device type) | philox (any device)
    seed: int = 0
    target_modules: list[str] = field(default_factory=lambda: ["attn", "mlp"])


@dataclass
class MicroAdamConfig(AdamConfig):
    """MicroAdam: Adam rebuilt from a window of Top-K gradients, 4-bit error feedback."""

    window: int = 10  # m: sparse gradients kept
    density: float = 0.01  # k: share of each Top-K block kept per step
    block_size: int = 16384  # Top-K block (fixed: the reference's depends on the GPU)
    quant_group_size: int = 100_000  # q: values per error-feedback scale and zero point
    alpha: float = 0.0  # > 0: add alpha x the error to the update, keep (1 - alpha) of it


@dataclass
class LDAdamConfig(AdamConfig):
    """LDAdam: Adam in a subspace moved every step, moments transported, error feedback."""

    rank: int = 16
    rho: float = 0.908  # weight of the momentum in the matrix the subspace is fitted to
    proj_method: str = "power_iteration"  # power_iteration (warm-started) | svd (every step)
    error_feedback: bool = True
    error_dtype: str = "param"  # param | float32 | bfloat16: the error buffer's dtype
    target_modules: list[str] = field(default_factory=lambda: ["attn", "mlp"])


@dataclass
class TrainerConfig:
    lr: float | None = None  # peak lr; null: the optimizer config's own (its paper default)
    max_steps: int = 1000
    global_batch_size: int = 64  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 16  # sequences per forward pass on one rank
    warmup_steps: int = 100
    scheduler: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "auto"  # auto | fp32 | bf16_autocast | bf16
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the start and the end
    eval_at_start: bool = True
    progress: bool = True
    max_time_s: float = 0.0  # stop early (and still evaluate) after this wall time; 0: off
    phase_timing: bool = True  # time data / fwd+bwd / step (syncs the GPU between phases)
    # Step each parameter inside backward, as soon as its gradient is complete, and free that
    # gradient: full gradients never coexist. One micro-batch per step, one rank, no clipping.
    per_layer_update: bool = False
    # CUDA only: record the allocator's history from the start and save it after the first 3
    # steps (step 0's refresh included) as memory_snapshot_rank<r>.pickle in the run directory,
    # for pytorch.org/memory_viz
    memory_snapshot: bool = False


@dataclass
class EvalConfig:
    tokens: int = 100_000  # non-pad validation tokens evaluated (fixed, materialised once)
    batch_size: int = 16
    compat: str = "none"  # none | galore


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N optimizer steps; 0: never during the run
    at_end: bool = False
    resume: str | None = None  # null | auto (latest in this run dir) | path to file or run dir
    keep_last: int = 2


@dataclass
class LoggerConfig:
    wandb: bool = False
    project: str = "llm_pretrain"
    entity: str | None = None
    mode: str = "offline"  # online | offline | disabled
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class RecipeSize:
    """One model size of a paper recipe; unset fields leave the config as it is."""

    max_steps: int | None = None
    warmup_steps: int | None = None
    micro_batch_size: int | None = None  # the paper's per-GPU batch (memory), not the math
    grad_clip: float | None = None
    lr: float | None = None
    rank: int | None = None
    update_gap: int | None = None
    scale: float | None = None
    scale_front: bool | None = None
    paper_ppl: float | None = None  # the paper's validation perplexity at this size


@dataclass
class ExperimentConfig:
    """A named experiment (``experiment=<name>``); paper recipes add a table by model name."""

    name: str = MISSING
    optimizer: str | None = None  # the method the paper's perplexities are for
    paper: str | None = None  # where ``paper_ppl`` comes from (paper and table)
    sizes: dict[str, RecipeSize] = field(default_factory=dict)  # model name -> recipe


@dataclass
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    experiment: ExperimentConfig | None = None
    run_name: str | None = None


def check_known_keys(cfg: DictConfig, path: str = "") -> None:
    """Refuse keys the schema does not define, including ones added with Hydra's ``+key=``."""
    schema = OmegaConf.get_type(cfg)
    if is_dataclass(schema):
        unknown = sorted(set(cfg.keys()) - {f.name for f in fields(schema)})
        if unknown:
            raise ValueError(
                f"unknown config key {path}{unknown[0]} (not in {schema.__name__}); check the "
                "spelling against conf/ and llm_pretrain/config.py"
            )
    for key in cfg:
        child = cfg._get_node(key)
        if isinstance(child, DictConfig):
            check_known_keys(child, f"{path}{key}.")


def check_experiment(cfg: DictConfig) -> None:
    """A paper recipe has settings for some model sizes only: name them, rather than let an
    interpolation of the recipe table fail on the first key it reads."""
    exp = cfg.get("experiment")
    if exp is None or not exp.sizes or cfg.model.name in exp.sizes:
        return
    raise ValueError(
        f"experiment={exp.name} has recipes for {', '.join(exp.sizes)}, not for "
        f"model={cfg.model.name}; pick one of those with model=<name>"
    )


def register_configs() -> None:
    """Register the schemas that the YAML files under ``conf/`` extend."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="optimizer", name="base_adamw", node=AdamWConfig)
    cs.store(group="optimizer", name="base_adam8bit", node=Adam8bitConfig)
    cs.store(group="optimizer", name="base_adam_mini", node=AdamMiniConfig)
    cs.store(group="optimizer", name="base_adafactor", node=AdafactorConfig)
    cs.store(group="optimizer", name="base_came", node=CameConfig)
    cs.store(group="optimizer", name="base_muon", node=MuonConfig)
    cs.store(group="optimizer", name="base_galore", node=GaLoreConfig)
    cs.store(group="optimizer", name="base_fira", node=FiraConfig)
    cs.store(group="optimizer", name="base_galore_8bit", node=GaLore8bitConfig)
    cs.store(group="optimizer", name="base_q_galore", node=QGaLoreConfig)
    cs.store(group="optimizer", name="base_frugal", node=FrugalConfig)
    cs.store(group="optimizer", name="base_lisa", node=LisaConfig)
    cs.store(group="optimizer", name="base_badam", node=BAdamConfig)
    cs.store(group="optimizer", name="base_owlore", node=OwLoreConfig)
    cs.store(group="optimizer", name="base_gum", node=GumConfig)
    cs.store(group="optimizer", name="base_apollo", node=ApolloConfig)
    cs.store(group="optimizer", name="base_grass", node=GrassConfig)
    cs.store(group="optimizer", name="base_i3s", node=I3SConfig)
    cs.store(group="optimizer", name="base_dct", node=DctConfig)
    cs.store(group="optimizer", name="base_flora", node=FloraConfig)
    cs.store(group="optimizer", name="base_coap", node=CoapConfig)
    cs.store(group="optimizer", name="base_osd", node=OsdConfig)
    cs.store(group="optimizer", name="base_rso", node=RsoConfig)
    cs.store(group="optimizer", name="base_microadam", node=MicroAdamConfig)
    cs.store(group="optimizer", name="base_ldadam", node=LDAdamConfig)
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)
    cs.store(group="logger", name="base_logger", node=LoggerConfig)
