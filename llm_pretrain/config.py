"""Structured config schemas (Hydra ConfigStore).

Every YAML file under ``conf/`` extends one of these dataclasses, so a misspelled key or a value
of the wrong type fails at composition time with Hydra's own message, before any work starts.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from llm_pretrain.optim import METHODS, signature_defaults

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
    num_kv_heads: int | None = None  # grouped-query attention's k/v heads; null: num_heads
    tie_embeddings: bool = False  # lm_head shares the embedding matrix (some HF checkpoints)
    # chunked: the head's linear and loss fused, chunk by chunk of tokens, without the
    # (B, T, V) logits, the gradient formed in forward (llm_pretrain/chunked_loss.py);
    # chunked_recompute: the same, the logits computed again in backward (least memory);
    # dense: all logits, then F.cross_entropy
    loss_impl: str = "chunked"
    # tokens per chunk of loss_impl=chunked (256: the fastest on 2 CPU cores, docs/benchmarks.md)
    loss_chunk_tokens: int = 256
    # who computes loss_impl=chunked: auto (Liger-Kernel's fused linear cross-entropy on CUDA
    # when liger-kernel is installed, else PyTorch) | torch | liger (refused where it cannot run)
    loss_kernel: str = "auto"


@dataclass
class TasksConfig:
    """``data=tasks``: fine-tuning on labelled tasks (llm_pretrain/tasks.py)."""

    # benchmark task names (dbpedia, amazon, ...: a folder <root>/<family>/<name>/), task
    # folders of the same format (train.json, test.json, labels.json), or .jsonl files of
    # prompt/response records
    names: list[str] = field(default_factory=list)
    root: str | None = None  # the benchmark folder (its instruction_config.json)
    order: str = "mixed"  # mixed: one stream of every task; sequential: a phase per task (CL)
    epochs: int = 1  # passes over a task's training examples (per phase under sequential)
    steps_per_task: int = 0  # sequential: steps of each phase; 0: from data.tasks.epochs
    # sequential: each task starts from fresh optimizer state, as the papers' new optimizer per
    # task (an optimizer with end_task(), GORP, restarts itself, keeping its task subspace)
    restart_optimizer: bool = True
    train_per_class: int | None = None  # the first N training examples of each label
    eval_per_class: int | None = None  # the first N test examples of each label
    train_fraction: float = 0.7  # a task with one file: its first 70% per label train
    unknown_labels: str = "error"  # error | drop: an example whose label is not in labels.json
    truncate_prompts: bool = True  # cut an over-long prompt's left side (counted); false: refuse
    metric: str = "generate"  # generate: greedy decoding, exact match | options: best-scored label
    prompt_field: str = "prompt"  # .jsonl tasks
    response_field: str = "response"


@dataclass
class DataConfig:
    """Where documents come from and how they become fixed-length rows."""

    source: str = MISSING  # builtin | files | c4 | tasks
    tokenizer: str = MISSING  # builtin | path to spiece.model | tokenizer.json | HF tokenizer dir
    seq_len: int = 256
    layout: str = "packed"  # packed | paper
    path: str | None = None  # files: glob(s) of train documents, comma-separated
    val_path: str | None = None  # files: glob(s) of held-out documents
    val_docs: int = 200  # files without val_path: the first N documents are held out
    text_field: str = "text"
    encoding: str = "utf-8"  # files: their text encoding (latin-1, cp1252, ...)
    # files: a byte the encoding cannot decode stops before training, naming the file and the
    # position (stop), or becomes U+FFFD (replace)
    on_decode_error: str = "stop"
    hf_name: str = "allenai/c4"  # c4 source
    hf_config: str = "en"
    shuffle_shards: bool = True
    # How files and c4 go to the data nodes (ranks x workers): shards (HF's split by shard: each
    # node reads only its own) or documents (document i of the one global order goes to node
    # i mod nodes: every node reads, and tokenizes only its own; a checkpoint then resumes on
    # any number of ranks). null: shards; the built-in corpus is always split by document.
    split: str | None = None
    seed: int = 42
    num_workers: int = 0
    builtin_seed: int = 1234  # builtin corpus: which language is generated
    builtin_vocab_size: int = 2048
    tasks: TasksConfig = field(default_factory=TasksConfig)


@dataclass
class OptimizerConfig:
    """What every optimizer has; each method's schema adds only the keys it reads."""

    name: str = MISSING
    lr: float = 1e-3
    weight_decay: float = 0.0


def optimizer_schema(name: str) -> type:
    """The config schema of ``optimizer=<name>``, derived from the library's signature (one
    source of defaults: the class), plus the app's own keys: ``target_modules`` for methods
    whose parameters are grouped by module name, and Q-GaLore's ``weight_storage``. A tuple
    argument (betas) is a list here; a misspelled key is still refused at composition."""
    method = METHODS[name]
    fields_: list = []
    seen = {"name"}
    for fn in method.sources():
        hints = typing.get_type_hints(fn)
        for key, param in signature_defaults(fn).items():
            if key in seen:
                continue
            seen.add(key)
            if param.default is inspect.Parameter.empty:
                raise TypeError(f"{fn.__qualname__}({key}) has no default: it cannot be a setting")
            fields_.append(_schema_field(key, hints.get(key, typing.Any), param.default))
    if method.params == "projected" or method.surgery in ("rso", "welore"):
        fields_.append(
            ("target_modules", list[str], field(default_factory=lambda: ["attn", "mlp"]))
        )
    if method.surgery == "int8":
        fields_.append(("weight_storage", str, field(default="simulated")))
    cls_name = "".join(part.title() for part in name.split("_")) + "Config"
    return make_dataclass(cls_name, fields_, bases=(OptimizerConfig,))


def optimizer_settings(name: str, **values):
    """An instance of ``optimizer=<name>``'s schema: the class defaults with ``values`` set
    (for scripts that build optimizers without Hydra)."""
    return optimizer_schema(name)(name=name, **values)


def _schema_field(key: str, hint, default) -> tuple:
    """A dataclass field OmegaConf can type-check: tuples become lists."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = {a for a in typing.get_args(hint) if a is not Ellipsis}
        hint = list[args.pop() if len(args) == 1 else typing.Any]
    elif origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = typing.Optional[args[0]] if len(args) == 1 else typing.Any  # noqa: UP045
    if isinstance(default, (tuple, list)):
        return (key, hint, field(default_factory=lambda d=list(default): list(d)))
    return (key, hint, field(default=default))


@dataclass
class TrainerConfig:
    lr: float | None = None  # peak lr; null: the optimizer config's own (its paper default)
    max_steps: int | None = 1000  # null: data=tasks' length (data.tasks.epochs, steps_per_task)
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
    # gradient: full gradients never coexist. Any accumulation, DDP or FSDP2; no clipping.
    per_layer_update: bool = False
    # Keep fewer activations for backward and compute them again there, per decoder block
    # (llm_pretrain/checkpointing.py): none | blocks (each block keeps only its input) |
    # selective (also its matmul and attention outputs; norms, RoPE, SiLU, products recomputed)
    activation_checkpointing: str = "none"
    # Start from trained weights (only the weights: not optimizer, schedule or data position,
    # unlike checkpoint.resume): a Hugging Face LlamaForCausalLM directory (safetensors), or one
    # of our checkpoints (a run directory, a checkpoint file or a sharded checkpoint directory).
    # model=hf takes every shape from the Hugging Face directory's config.json.
    init_from: str | None = None
    # ddp: a replica of the model on every rank; fsdp: FSDP2, parameters, gradients and optimizer
    # state split over the ranks (every method exact; see llm_pretrain/parallel.py)
    parallelism: str = "ddp"
    # CUDA only: record the allocator's history from the start and save it after the first 3
    # steps (step 0's refresh included) as memory_snapshot_rank<r>.pickle in the run directory,
    # for pytorch.org/memory_viz
    memory_snapshot: bool = False
    # a NaN or infinite loss (or gradient): stop (exit non-zero, status "diverged", no checkpoint
    # from then on) | skip_step (drop that update; stop after max_nonfinite_skips in a row)
    on_nonfinite: str = "stop"
    max_nonfinite_skips: int = 10
    # several ranks: a collective that waits longer than this fails on every rank (a rank that
    # stalled or died), instead of hanging for torch's default 30 minutes
    dist_timeout_s: float = 600.0
    # several ranks: a training step that runs stall_factor x the median step (and at least
    # stall_min_s) while one rank is silent or behind fails every rank, naming that rank
    # (llm_pretrain/watchdog.py); every rank slow at the same place only warns. 0: off
    stall_factor: float = 20.0
    stall_min_s: float = 60.0
    # every N steps, the targeted matrices' gradient rank, energy in the optimizer's subspace
    # and in the best rank-r one, and the change of bases (llm_pretrain/gradient_analysis.py,
    # grad/* in metrics.jsonl). 0: off
    gradient_analysis_every: int = 0


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
    # start over in a run directory that holds another run's checkpoints, metrics.jsonl or
    # summary.json, deleting them (without it such a directory is refused, unless resumed)
    overwrite: bool = False


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


@dataclass(frozen=True)
class Allowed:
    """The values a setting may take: a numeric range (finite; ``open_low``/``open_high``
    exclude the end) or a set of choices; ``null`` only where ``nullable``. A list value (betas)
    is checked element by element."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    note: str = ""  # what 0 (or null) means, for the message

    def problem(self, value: typing.Any) -> str | None:
        if value is None:
            return None if self.nullable else "must be set (null is not allowed)"
        if isinstance(value, (list, tuple)):
            return next((p for p in map(self.problem, value) if p), None)
        if self.choices is not None:
            return None if value in self.choices else f"must be one of {', '.join(self.choices)}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, not {type(value).__name__}"
        if not math.isfinite(value):
            return "must be finite"
        below = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        above = self.high is not None and (
            value >= self.high if self.open_high else value > self.high
        )
        if below or above:
            lo = "(-inf" if self.low is None else "(["[not self.open_low] + f"{self.low:g}"
            hi = "inf)" if self.high is None else f"{self.high:g}" + ")]"[not self.open_high]
            return f"must be in {lo}, {hi}" + (f" ({self.note})" if self.note else "")
        return None


POSITIVE = Allowed(0, open_low=True)
AT_LEAST_1 = Allowed(1)
NON_NEGATIVE = Allowed(0)
FRACTION = Allowed(0, 1)
BETA = Allowed(0, 1, open_high=True)

# Every constrained setting, checked before any work (``check_values``); a key absent from a
# config (an optimizer without ``rank``) is skipped. Free-form strings (paths, names) are checked
# where they are opened; types are Hydra's (the schemas above).
VALUES: dict[str, Allowed] = {
    "model.hidden_size": AT_LEAST_1,
    "model.intermediate_size": AT_LEAST_1,
    "model.num_heads": AT_LEAST_1,
    "model.num_layers": AT_LEAST_1,
    "model.vocab_size": AT_LEAST_1,
    "model.max_position_embeddings": AT_LEAST_1,
    "model.rms_norm_eps": POSITIVE,
    "model.rope_theta": POSITIVE,
    "model.init_std": POSITIVE,
    "model.attention": Allowed(choices=("auto", "sdpa", "flash")),
    "model.num_kv_heads": Allowed(1, nullable=True),
    "model.loss_impl": Allowed(choices=("chunked", "chunked_recompute", "dense")),
    "model.loss_chunk_tokens": AT_LEAST_1,
    "model.loss_kernel": Allowed(choices=("auto", "torch", "liger")),
    "data.source": Allowed(choices=("builtin", "files", "c4", "tasks")),
    "data.seq_len": Allowed(2),
    "data.layout": Allowed(choices=("packed", "paper")),
    "data.val_docs": Allowed(0, note="0: none held out, with data.val_path"),
    "data.split": Allowed(choices=("shards", "documents"), nullable=True),
    "data.num_workers": NON_NEGATIVE,
    "data.on_decode_error": Allowed(choices=("stop", "replace")),
    "data.builtin_vocab_size": AT_LEAST_1,
    "data.tasks.order": Allowed(choices=("mixed", "sequential")),
    "data.tasks.epochs": AT_LEAST_1,
    "data.tasks.steps_per_task": Allowed(0, note="0: from data.tasks.epochs"),
    "data.tasks.train_per_class": Allowed(1, nullable=True),
    "data.tasks.eval_per_class": Allowed(1, nullable=True),
    "data.tasks.train_fraction": Allowed(0, 1, open_low=True, open_high=True),
    "data.tasks.unknown_labels": Allowed(choices=("error", "drop")),
    "data.tasks.metric": Allowed(choices=("generate", "options")),
    "trainer.lr": Allowed(0, open_low=True, nullable=True),
    "trainer.max_steps": Allowed(1, nullable=True),
    "trainer.global_batch_size": AT_LEAST_1,
    "trainer.micro_batch_size": AT_LEAST_1,
    "trainer.warmup_steps": NON_NEGATIVE,
    "trainer.scheduler": Allowed(choices=("cosine", "linear", "constant")),
    "trainer.min_lr_ratio": FRACTION,
    "trainer.grad_clip": Allowed(0, note="0: no clipping"),
    "trainer.precision": Allowed(choices=("auto", "fp32", "bf16_autocast", "bf16")),
    "trainer.device": Allowed(choices=("auto", "cpu", "cuda")),
    "trainer.log_every": AT_LEAST_1,
    "trainer.eval_every": Allowed(0, note="0: only at the start and the end"),
    "trainer.max_time_s": Allowed(0, note="0: no time limit"),
    "trainer.parallelism": Allowed(choices=("ddp", "fsdp")),
    "trainer.activation_checkpointing": Allowed(choices=("none", "blocks", "selective")),
    "trainer.on_nonfinite": Allowed(choices=("stop", "skip_step")),
    "trainer.max_nonfinite_skips": AT_LEAST_1,
    "trainer.dist_timeout_s": POSITIVE,
    "trainer.stall_factor": Allowed(0, note="0: no step watchdog"),
    "trainer.stall_min_s": POSITIVE,
    "trainer.gradient_analysis_every": Allowed(0, note="0: off"),
    "eval.tokens": AT_LEAST_1,
    "eval.batch_size": AT_LEAST_1,
    "eval.compat": Allowed(choices=("none", "galore")),
    "checkpoint.every": Allowed(0, note="0: no checkpoint during the run"),
    "checkpoint.keep_last": Allowed(0, note="0: keep every checkpoint"),
    "logger.mode": Allowed(choices=("online", "offline", "disabled")),
    # the optimizers' common settings, whichever method has them
    "optimizer.lr": POSITIVE,
    "optimizer.adamw_lr": Allowed(0, open_low=True, nullable=True),
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.eps": Allowed(0, open_low=True, nullable=True),
    "optimizer.adamw_eps": POSITIVE,
    "optimizer.eps2": POSITIVE,
    "optimizer.betas": BETA,
    "optimizer.adamw_betas": BETA,
    "optimizer.momentum": BETA,
    "optimizer.scale": POSITIVE,
    "optimizer.rank": Allowed(1, nullable=True),
    "optimizer.update_gap": AT_LEAST_1,
    "optimizer.refresh": Allowed(choices=("staggered", "synchronous")),
    "optimizer.interval": AT_LEAST_1,
    "optimizer.active_layers": AT_LEAST_1,
    "optimizer.density": Allowed(0, 1, open_low=True),
    "optimizer.threshold": Allowed(0, 1, open_low=True),
    "optimizer.ns_steps": AT_LEAST_1,
    "optimizer.window": AT_LEAST_1,
    "optimizer.queue_size": AT_LEAST_1,
}


def check_values(cfg: DictConfig) -> None:
    """Refuse a setting outside its range or choices (``VALUES``), naming the key, before any
    work: a negative ``min_lr_ratio`` would ascend, ``log_every=0`` divide by zero after a
    step, ``eval.batch_size=0`` fail after all of training."""
    for key, allowed in VALUES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        problem = allowed.problem(value)
        if problem is not None:
            raise ValueError(f"{key}={value!r} {problem}")


_ABSENT = object()


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


def _hf_model_field(key: str, _root_) -> typing.Any:
    """``${hf_model:<field>}`` (conf/model/hf.yaml): the field of the Hugging Face checkpoint at
    ``trainer.init_from``."""
    from llm_pretrain import hf

    return hf.read_config(hf.model_source(_root_.trainer.init_from))[key]


def help_groups() -> str:
    """``--help``'s list of config groups: the YAML files a user picks from, without the schemas
    (``base_*``) and the per-experiment settings (``experiment_optimizer/``) Hydra would list."""
    lines = []
    for group in sorted(p for p in CONF_DIR.rglob("*") if p.is_dir()):
        name = group.relative_to(CONF_DIR).as_posix()
        options = sorted(f.stem for f in group.glob("*.yaml"))
        if options and not name.startswith("experiment_optimizer"):
            lines.append(f"{name}: {', '.join(options)}")
    return "\n".join(lines)


def register_configs() -> None:
    """Register the schemas that the YAML files under ``conf/`` extend."""
    OmegaConf.register_new_resolver("hf_model", _hf_model_field, replace=True)
    OmegaConf.register_new_resolver("help_groups", help_groups, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    for name in METHODS:
        cs.store(group="optimizer", name=f"base_{name}", node=optimizer_schema(name))
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)
    cs.store(group="logger", name="base_logger", node=LoggerConfig)
