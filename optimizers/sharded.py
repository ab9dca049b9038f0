"""Any optimizer of the library on FSDP2-sharded parameters, exactly as on one process.

FSDP2 (``torch.distributed.fsdp.fully_shard``) splits every parameter by rows over the ranks.
An element-wise rule could step each rank's rows alone, but most methods here need the whole
matrix: SVD and power-iteration bases, Newton-Schulz, Top-K blocks, norm-based row or column
selection, per-matrix scales. So each parameter gets one *owner* rank (torchtitan's approach for
Muon, for every method), and each step

1. gathers the parameter's rows and its reduced gradient rows on the owner,
2. lets the optimizer update the whole matrix there, with its whole state, and
3. scatters the updated rows back to the ranks that hold them.

The optimizer is the one built on the unsharded model, unchanged: it keeps its original parameter
objects as *shadows*, whose storage is released between steps (``resize_(0)``: same identity,
shape and dtype, no bytes) and lent the gathered matrix during its owner's update. Its state
exists only on the owner, so each rank holds the state of its share of the parameters (assigned
largest first to the least-loaded rank). Steps are counted once on every rank, so refreshes,
layer switches and sampler draws happen on the same step everywhere.

Per step this moves three parameter-sized payloads (the owner gathers rows and gradient rows,
then scatters rows) on top of FSDP2's all-gathers and reduce-scatters; ``make bench-dist``
measures it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from llmpt.optimizers.distributed import full_tensor
from llmpt.optimizers.per_parameter import closure_loss

__all__ = [
    "ShardedOptimizer",
    "assign_owners",
    "full_tensor",
    "memory_formula_per_rank",
    "owners_of",
    "row_counts",
    "shard_model",
]


def row_counts(rows: int, world: int) -> list[int]:
    """Rows of each rank under FSDP2's ``Shard(0)`` (``torch.chunk``: ceil-sized, the last ranks
    may get fewer or none)."""
    size = math.ceil(rows / world) if rows else 0
    return [max(0, min(size, rows - r * size)) for r in range(world)]


def assign_owners(sizes: list[int], world: int) -> list[int]:
    """Owner rank of each parameter: largest first to the least-loaded rank (ties: lowest index,
    lowest rank), the same on every rank."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


class ShardedOptimizer(torch.optim.Optimizer):
    """``inner`` (built on the unsharded parameters) stepping FSDP2-sharded ones.

    ``pairs``: (the parameter ``inner`` was built on, the sharded ``DTensor`` that replaced it in
    the model), for every parameter ``inner`` holds; ``shard_model`` makes them. The learning-rate
    schedule, ``param_groups``, ``state_dict`` and the method's own helpers are ``inner``'s; a
    rank's ``state`` and ``state_dict()['state']`` hold only the parameters it owns (their indices
    are the same on every rank).
    """

    def __init__(self, inner: torch.optim.Optimizer, pairs: Iterable[tuple[nn.Parameter, DTensor]]):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ShardedOptimizer needs an initialised torch.distributed group")
        pairs = list(pairs)
        shadow_of = {id(s): d for s, d in pairs}
        params = [p for g in inner.param_groups for p in g["params"]]
        missing = [tuple(p.shape) for p in params if id(p) not in shadow_of]
        if missing:
            raise ValueError(
                f"{len(missing)} parameter(s) of the optimizer (shapes {missing[:3]}) have no "
                "sharded counterpart: build the optimizer on the model that is then sharded, "
                "and pass every (original, sharded) pair (shard_model does)"
            )
        for s, d in pairs:
            if not isinstance(d, DTensor) or tuple(d.shape) != tuple(s.shape):
                raise ValueError(
                    f"the sharded counterpart of a {tuple(s.shape)} parameter must be a DTensor "
                    f"of the same global shape, got {type(d).__name__} {tuple(d.shape)}"
                )
            if any(not pl.is_shard(0) for pl in d.placements) or d.device_mesh.ndim != 1:
                raise ValueError(
                    f"a {tuple(s.shape)} parameter is placed {d.placements} on a "
                    f"{d.device_mesh.ndim}-D mesh: only FSDP2's row sharding (Shard(0)) over "
                    "one mesh dimension is supported"
                )
        self.inner = inner
        self.pg = pairs[0][1].device_mesh.get_group() if pairs else dist.group.WORLD
        self.rank, self.world = dist.get_rank(self.pg), dist.get_world_size(self.pg)
        self.owner = owners_of(inner, self.world)
        self.pairs = [(p, shadow_of[id(p)]) for p in params]
        self._shadow_of = {id(d): p for p, d in self.pairs}
        self._rows = {p: row_counts(p.shape[0], self.world) for p in params}  # (per step: fixed)
        for state in _state_dicts(inner):  # state built before sharding: the owner's only
            for p in [p for p in state if self.owner.get(p, self.rank) != self.rank]:
                del state[p]
        for p in params:
            _release(p)
        self._per_parameter = hasattr(inner, "update_parameter")
        super().__init__(params, {})
        self.param_groups = inner.param_groups
        self._mirror_flags()

    # the training loop, the scheduler and checkpoints see the inner optimizer
    @property
    def state(self) -> dict:
        return self.inner.state if "inner" in self.__dict__ else {}

    @state.setter
    def state(self, value) -> None:  # torch.optim.Optimizer.__init__ assigns an empty state
        if value:
            raise AttributeError("a sharded optimizer's state lives in its inner optimizer")

    def __getattr__(self, name: str):
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(inner, name)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for shadow, sharded in self.pairs:
            if sharded.grad is not None:  # (the same on every rank: one graph)
                self._step_pair(shadow, sharded)
        # count the step everywhere (ours: refreshes and switches; torch's: no gradients left)
        self.inner.step()
        self._mirror_flags()
        return loss

    @torch.no_grad()
    def update_parameter(self, p: DTensor) -> None:
        """Step one sharded parameter of the model on its reduced gradient (per-layer updates:
        FSDP2 runs a shard's post-accumulate-grad hooks after its reduce-scatter). Every rank
        must call it for the same parameters in the same order, as FSDP2's hooks do; the
        gradient-free ``step()`` afterwards counts the step."""
        shadow = self._shadow_of.get(id(p))
        if shadow is None:
            raise ValueError(
                f"a {tuple(p.shape)} tensor is not one of this optimizer's sharded parameters: "
                "pass the model's parameter (the DTensor FSDP2 put in place of the original)"
            )
        if p.grad is not None:
            self._step_pair(shadow, p)

    def _step_pair(self, shadow: nn.Parameter, sharded: DTensor) -> None:
        owner = self.owner[shadow]
        whole = self._gather(sharded.to_local(), shadow, owner)
        grad = self._gather(sharded.grad.to_local(), shadow, owner)
        if self.rank == owner:
            _lend(shadow, whole)
            shadow.grad = grad
            self._update(shadow)
            shadow.grad = None
        self._scatter(shadow, sharded.to_local(), owner)
        if self.rank == owner:
            _release(shadow)

    def _update(self, shadow: nn.Parameter) -> None:
        if self._per_parameter:
            self.inner.update_parameter(shadow)
        else:  # a torch optimizer steps the only parameter that has a gradient now
            self.inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, sharded in self.pairs:
            if set_to_none:
                sharded.grad = None
            elif sharded.grad is not None:
                sharded.grad.zero_()

    def _mirror_flags(self) -> None:
        """A layer sampler marks its frozen units on the shadows; the training loop reads the
        mark (to clip only applied gradients) on the model's parameters."""
        for shadow, sharded in self.pairs:  # (also after an attach() made once sharded)
            sharded.frozen_by_sampler = getattr(shadow, "frozen_by_sampler", False)

    # ------------------------------------------------------------------ collectives
    def _gather(self, local: torch.Tensor, shadow: nn.Parameter, owner: int) -> torch.Tensor | None:
        counts = self._rows[shadow]
        padded = _pad_rows(local, max(counts))
        parts = (
            [torch.empty_like(padded) for _ in range(self.world)] if self.rank == owner else None
        )
        dist.gather(padded, parts, dst=dist.get_global_rank(self.pg, owner), group=self.pg)
        if parts is None:
            return None
        return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])

    def _scatter(self, shadow: nn.Parameter, local: torch.Tensor, owner: int) -> None:
        counts = self._rows[shadow]
        size = max(counts)
        recv = torch.empty((size, *local.shape[1:]), dtype=local.dtype, device=local.device)
        parts = None
        if self.rank == owner:
            rows = shadow.detach().to(local.dtype).split(counts)
            parts = [_pad_rows(r, size) for r in rows]
        dist.scatter(recv, parts, src=dist.get_global_rank(self.pg, owner), group=self.pg)
        local.copy_(recv[: local.shape[0]])

    # ------------------------------------------------------------------ checkpoints, memory
    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """The inner optimizer's, keeping only the state of the parameters this rank owns (a
        state dict may hold every parameter's: one written on another number of ranks)."""
        # (torch's load casts and moves state by each parameter's dtype and device only: the
        # released shadows keep both)
        self.inner.load_state_dict(self.narrow_state_dict(state_dict))
        self.param_groups = self.inner.param_groups

    def narrow_state_dict(self, state_dict: dict) -> dict:
        """``state_dict`` (of the inner optimizer, from any number of ranks) with ``state`` kept
        for the parameters this rank owns: what it loads."""
        return self._narrow(self.inner, state_dict)

    def _narrow(self, opt: torch.optim.Optimizer, state_dict: dict) -> dict:
        """``state_dict`` with ``state`` narrowed to this rank's parameters, also inside a
        composite's parts (each numbers its parameters apart)."""
        parts = getattr(opt, "parts", None)
        if parts is not None and "parts" in state_dict:
            narrowed = {
                n: self._narrow(parts[n], s) if n in parts else s
                for n, s in state_dict["parts"].items()
            }
            return {**state_dict, "parts": narrowed}
        params = [p for g in opt.param_groups for p in g["params"]]
        mine = {i for i, p in enumerate(params) if self.owner.get(p) == self.rank}
        state = state_dict.get("state", {})
        return {**state_dict, "state": {i: s for i, s in state.items() if int(i) in mine}}


def _state_dicts(opt: torch.optim.Optimizer) -> Iterable[dict]:
    """The dicts that hold ``opt``'s per-parameter state (a composite's are its parts')."""
    parts = getattr(opt, "parts", None)
    if parts is None:
        yield opt.state
    else:
        for part in parts.values():
            yield from _state_dicts(part)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def _release(p: torch.Tensor) -> None:
    p.untyped_storage().resize_(0)


def _lend(p: torch.Tensor, whole: torch.Tensor) -> None:
    p.untyped_storage().resize_(p.numel() * p.element_size())
    p.detach().copy_(whole.view_as(p))


def owners_of(optimizer: torch.optim.Optimizer, world: int) -> dict[nn.Parameter, int]:
    """The owner rank of each parameter of ``optimizer`` (an unsharded one, or one built on a
    ``meta`` model) that ``ShardedOptimizer`` would assign on ``world`` ranks."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return dict(zip(params, assign_owners([p.numel() for p in params], world), strict=True))


def memory_formula_per_rank(
    optimizer: torch.optim.Optimizer, world: int, steps: int = 1
) -> list[dict[str, int]]:
    """Closed-form state bytes of each rank under ``ShardedOptimizer`` on ``world`` ranks: the
    optimizer's formula over the parameters each rank owns (shared tensors, such as 8-bit code
    maps, counted on every rank that owns a parameter using them)."""
    from llmpt.optimizers.api import memory_formula

    owner = owners_of(optimizer, world)
    opts = [optimizer, *getattr(optimizer, "parts", {}).values()]
    saved = [o.param_groups for o in opts]
    out = []
    try:
        for rank in range(world):
            for o, groups in zip(opts, saved, strict=True):
                o.param_groups = [
                    {**g, "params": [p for p in g["params"] if owner[p] == rank]} for g in groups
                ]
            out.append(memory_formula(optimizer, steps))
    finally:
        for o, groups in zip(opts, saved, strict=True):
            o.param_groups = groups
    return out


def shard_model(
    model: nn.Module, optimizer: torch.optim.Optimizer, shard: Callable[[nn.Module], None]
) -> ShardedOptimizer:
    """Shard ``model`` in place with ``shard`` (e.g. ``fully_shard`` on each block, then on the
    root) and return ``optimizer``, built on the unsharded model, stepping its shards."""
    before = dict(model.named_parameters())
    shard(model)
    after = dict(model.named_parameters())
    if before.keys() != after.keys():
        raise ValueError("sharding changed the model's parameter names; shard_model needs them")
    return ShardedOptimizer(optimizer, [(before[n], after[n]) for n in before])
