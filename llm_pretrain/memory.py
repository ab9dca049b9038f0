"""Where the bytes go during training: weights, gradients, optimizer state, activations.

Weights and gradients are summed over distinct storages; optimizer state comes from
``optimizers.state_nbytes``; activations are the tensors autograd saves for backward, counted
with ``torch.autograd.graph.saved_tensors_hooks`` (parameters and buffers excluded, each
storage once) and reported at their peak within one forward pass.

Under activation checkpointing (``llm_pretrain/checkpointing.py``) the tensors saved inside a
checkpointed block go to the checkpoint's own hooks and are dropped, which is the point; what
the block keeps is its input, which the checkpoint saves through the hooks active around it
(so it is counted here like any saved tensor), and under ``selective`` the op outputs that
torch's selective checkpointing caches itself, outside autograd: the checkpoint wrapper hands
those to ``count_kept_for_backward``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn

from llm_pretrain import optim as optimizers


def unique_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``: views of one buffer (FSDP2's sharded
    gradients of a block, DDP's bucket views) count once, and whole."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if hasattr(t, "to_local"):  # an FSDP2 shard: this rank's rows
            t = t.to_local()
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def weight_bytes(model: nn.Module) -> int:
    """Parameters' storages, plus the codes, scales and zero points of weights stored as INT8
    (Q-GaLore's ``Int8Linear``, whose parameter is a one-element placeholder)."""
    from llmpt.optimizers.int8_linear import stored_weight_tensors

    return unique_nbytes([*model.parameters(), *stored_weight_tensors(model)])


def grad_bytes(model: nn.Module) -> int:
    return unique_nbytes(p.grad for p in model.parameters() if p.grad is not None)


class SavedTensorCounter:
    """Counts bytes autograd keeps for backward while the context is active."""

    active: ClassVar[list[SavedTensorCounter]] = []  # the counters whose context is open

    def __init__(self, model: nn.Module) -> None:
        # model state, not activations: parameters and buffers (e.g. a stored RSO projection)
        state = [*model.parameters(), *model.buffers()]
        self.param_ptrs = {t.untyped_storage().data_ptr() for t in state}
        self.seen: set[int] = set()
        self.bytes = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def count(self, t: torch.Tensor) -> None:
        """Add ``t``'s storage, unless it is model state or already counted."""
        if t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.param_ptrs and ptr not in self.seen:
                self.seen.add(ptr)
                self.bytes += t.untyped_storage().nbytes()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.count(t)
        return t

    def __enter__(self) -> SavedTensorCounter:
        self._ctx.__enter__()
        SavedTensorCounter.active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        SavedTensorCounter.active.remove(self)
        self._ctx.__exit__(*exc)


def counting() -> bool:
    """Whether a ``SavedTensorCounter`` is open (code that keeps tensors for backward outside
    autograd's hooks then reports them through ``count_kept_for_backward``)."""
    return bool(SavedTensorCounter.active)


def count_kept_for_backward(tensors: Iterable[torch.Tensor]) -> None:
    """Count tensors kept for backward outside ``saved_tensors_hooks`` (selective
    checkpointing's cache of op outputs) in every open counter, each storage once."""
    for t in tensors:
        for counter in SavedTensorCounter.active:
            counter.count(t)


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
    # under FSDP2, every rank's weights, gradients and optimizer_state (the fields above: rank 0)
    per_rank: list[dict] | None = None

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
        """The allocator's peaks since the reset before step 0, the maximum over ranks."""
        if device.type == "cuda":
            from llm_pretrain.distributed import max_over_ranks

            peaks = [
                torch.cuda.max_memory_allocated(device),
                torch.cuda.max_memory_reserved(device),
            ]
            self.cuda_peak_allocated, self.cuda_peak_reserved = map(
                int, max_over_ranks([float(x) for x in peaks], device)
            )

    def record(self, step: int) -> dict:
        """The measured categories as one metrics record (``metrics.jsonl`` and wandb)."""
        out = {
            "step": step,
            "memory/weights": self.weights,
            "memory/gradients": self.gradients,
            "memory/optimizer_state": self.optimizer_state,
            "memory/activations": self.activations,
        }
        for key, n in self.optimizer_state_by_category.items():
            if n:
                out[f"memory/state/{key}"] = n
        if self.cuda_peak_allocated is not None:
            out["memory/cuda_peak_allocated"] = self.cuda_peak_allocated
            out["memory/cuda_peak_reserved"] = self.cuda_peak_reserved
        return out


# ---------------------------------------------------------------------- the estimator's CLI
USAGE = """python -m llm_pretrain.memory [overrides ...] [--compare key=a,b,...] [--world-size N]

Predicts weights, gradients, optimizer state (by category) and activations of the training job
that ``python -m llm_pretrain.train <overrides>`` would run, without allocating (meta device), e.g.

    python -m llm_pretrain.memory model=llama_7b optimizer=galore_8bit \\
        trainer.per_layer_update=true trainer.micro_batch_size=1 data.seq_len=256
    python -m llm_pretrain.memory model=llama_1b trainer.precision=bf16 \\
        --compare optimizer=adamw,galore,apollo_mini
    python -m llm_pretrain.memory model=llama_60m \\
        --compare trainer.activation_checkpointing=none,blocks,selective
"""


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from llm_pretrain.config import CONF_DIR, check_known_keys, check_values, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    check_known_keys(cfg)
    check_values(cfg)
    return cfg


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f}"


def render(columns: dict, baseline: str | None) -> str:
    """A markdown table: one column per estimate (GiB), with ratios to ``baseline``."""
    from llmpt.optimizers.accounting import CATEGORIES

    names = list(columns)
    rows = [("weights", lambda e: e.weights), ("gradients", lambda e: e.gradients)]
    rows.append(("optimizer state", lambda e: e.optimizer_state))
    for cat in CATEGORIES:
        if any(e.optimizer_state_by_category.get(cat) for e in columns.values()):
            rows.append(
                (f"  state: {cat}", lambda e, c=cat: e.optimizer_state_by_category.get(c, 0))
            )
    rows += [("activations (1 micro-batch)", lambda e: e.activations)]
    if any(e.recompute for e in columns.values()):  # (activation checkpointing)
        rows.append(("  + recompute of one block (backward, transient)", lambda e: e.recompute))
    rows += [
        ("total", lambda e: e.total),
        ("weights + state (GaLore Table 2's quantity in bf16)", lambda e: e.paper_convention()),
    ]
    head = "| GiB | " + " | ".join(names) + " |"
    if baseline is not None:
        head = (
            "| GiB | "
            + " | ".join(n if n == baseline else f"{n} | / {baseline}" for n in names)
            + " |"
        )
    width = len(head.split("|")) - 2
    lines = [head, "| --- |" + " ---: |" * (width - 1)]
    for label, get in rows:
        cells = []
        for n in names:
            value = get(columns[n])
            cells.append(_gib(value))
            if baseline is not None and n != baseline:
                base = get(columns[baseline])
                cells.append(f"{value / base:.3f}" if base else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import sys

    from llm_pretrain.memory_estimate import estimate

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return
    world = 1
    if "--world-size" in args:
        i = args.index("--world-size")
        if i + 1 >= len(args) or not args[i + 1].isdigit() or int(args[i + 1]) < 1:
            raise SystemExit("--world-size needs a positive number of ranks (GPUs), e.g. 8")
        world = int(args[i + 1])
        del args[i : i + 2]
    compare = None
    if "--compare" in args:
        i = args.index("--compare")
        if i + 1 >= len(args) or "=" not in args[i + 1]:
            raise SystemExit("--compare needs key=a,b,... (e.g. --compare optimizer=adamw,galore)")
        compare = args[i + 1]
        del args[i : i + 2]
    unknown = [a for a in args if a.startswith("-")]
    if unknown:
        raise SystemExit(f"unknown option(s) {unknown}\n\n{USAGE}")
    if compare is None:
        variants = {"": args}
    else:
        key, _, values = compare.partition("=")
        variants = {v: [*args, f"{key}={v}"] for v in values.split(",") if v}
    estimates, cfg = {}, None
    for label, overrides in variants.items():
        cfg = _compose(overrides)
        estimates[label or cfg.optimizer.name] = estimate(cfg, world_size=world)
    baseline = None
    if compare is not None:
        baseline = "adamw" if "adamw" in estimates else next(iter(estimates))
    first = next(iter(estimates.values()))
    checkpointing = cfg.trainer.activation_checkpointing
    if compare is not None and compare.startswith("trainer.activation_checkpointing="):
        checkpointing = "by column"
    print(
        f"model {cfg.model.name}, precision {first.precision}, micro-batch "
        f"{cfg.trainer.micro_batch_size} x {cfg.data.seq_len} tokens, per-layer updates "
        f"{'on' if cfg.trainer.per_layer_update else 'off'}, activation checkpointing "
        f"{checkpointing}, {world} rank(s), "
        f"{cfg.trainer.parallelism} (predicted per rank, nothing allocated)\n"
    )
    print(render(estimates, baseline))
    for name, e in estimates.items():
        if e.per_rank:  # FSDP2: rank 0 above; the most loaded rank may hold more state
            fixed = [r["weights"] + r["gradients"] + r["optimizer_state"] for r in e.per_rank]
            print(
                f"\n{name}: weights + gradients + state per rank {_gib(min(fixed))}-"
                f"{_gib(max(fixed))} GiB over {len(fixed)} ranks (the table: rank 0); the most "
                f"loaded rank in all {_gib(max(fixed) + e.activations)} GiB"
            )


if __name__ == "__main__":
    main()
