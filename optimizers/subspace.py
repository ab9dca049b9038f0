"""The generic low-rank optimizer: projector x rule x residual x layer sampling, one
``torch.optim.Optimizer``.

For a targeted 2-D weight W with gradient G, one step is (GaLore Alg. 1 with Fira's or FRUGAL's
residual):

1. the projector refreshes its basis when due (its own per-matrix step counter); with
   ``reset_on_refresh`` the rule's state and step counter restart (FRUGAL), else they are kept
   (GaLore);
2. R = project(G) (GORP: without its component in past tasks' subspace); the rule turns R into a
   low-rank direction N (Adam: M / (sqrt(V) + eps));
3. the residual decides the update: none gives scale * back(N) (GaLore); ``norm_scaled`` adds
   Fira's scaled, limited G - back(R); ``state_free`` adds FRUGAL's signSGD step on it;
4. W <- W - lr * correction * update, with decoupled weight decay before (``decay_first``,
   torch's and FRUGAL's order) or after it (GaLore's).

Every other parameter (embeddings, lm_head, norms) sits in a plain group of the same optimizer
and takes ``plain_rule`` (Adam) on its full gradient, as in the reference optimizers.

With a ``Sampling`` policy, some parameters are grouped into units (decoder layers or single
matrices) and a ``LayerSampler`` activates some units per period: active units take their
group's step (``inherit``) or GUM's full-rank complement step (``complement``); inactive ones
are frozen (LISA, OwLore, BAdam), take a state-free step (FRUGAL's block mode) or take their
group's step (GUM's low-rank branch). State of units that leave the active set is freed.

All state is tensors, ints and strings, so ``state_dict()`` survives
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from llmpt.optimizers.accounting import CATEGORIES, state_nbytes
from llmpt.optimizers.per_parameter import PerParameterOptimizer, closure_loss
from llmpt.optimizers.refresh import check_refresh, cycle_of, stagger_offsets
from llmpt.optimizers.rules import AdamRule
from llmpt.optimizers.sampling import LayerSampler


def as_groups(params: Iterable) -> list[dict]:
    """torch.optim's ``params`` as a list of group dicts a constructor may edit: tensors or
    (name, tensor) pairs become one group; dicts are copied (their parameter lists too)."""
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "params must be an iterable of tensors or of param groups, not a tensor: pass [w]"
        )
    items = list(params)
    if not items:
        raise ValueError("the optimizer got an empty parameter list")
    if all(isinstance(item, dict) for item in items):
        return [  # torch's {"params": tensor} form is one tensor, not its rows
            {
                **g,
                "params": [g["params"]]
                if isinstance(g["params"], torch.Tensor)
                else list(g["params"]),
            }
            for g in items
        ]
    if any(isinstance(item, dict) for item in items):
        raise TypeError("params mixes param groups (dicts) with parameters; use one form")
    return [{"params": items}]


def tensor_of(item) -> torch.Tensor:
    """The tensor of a parameter given as a tensor or as a (name, tensor) pair."""
    return item[1] if isinstance(item, tuple) else item


def layer_units(layers: Iterable, candidates: Iterable) -> list[list[torch.Tensor]]:
    """For each layer (a module, or an iterable of its parameters), the parameters of
    ``candidates`` (tensors or (name, tensor) pairs) that belong to it, in their order: the
    units a layer sampler switches."""
    candidates = [tensor_of(c) for c in candidates]
    units = []
    for layer in layers:
        owned = layer.parameters() if isinstance(layer, torch.nn.Module) else layer
        ids = {id(tensor_of(q)) for q in owned}
        units.append([p for p in candidates if id(p) in ids])
    if not units:
        raise ValueError("layers is empty: a layer sampler needs the model's decoder layers")
    return units


ACTIVE_MODES = ("inherit", "complement")
INACTIVE_MODES = ("frozen", "state_free", "inherit")


@dataclass
class RefreshContext:
    """What a projector may need beyond the gradient: the parameter's ordinal in the optimizer
    (apollo-torch's seeds), the rule (COAP reads the first moment), the scheduled and initial
    learning rates (OSD's projector step follows the weights' schedule) and the matrix's refresh
    offset (``refresh.py``: COAP and Flora place their own refreshes at step - offset)."""

    index: int
    rule: object
    lr: float
    initial_lr: float
    seed: int = 0
    offset: int = 0


@dataclass
class Sampling:
    """What a method does with sampled units.

    ``units``: lists of parameters sampled together; ``active_weight`` / ``inactive_weight``
    multiply the gradient of active / inactive units (GUM's importance weights 1/q, 1/(1-q));
    ``reset_active``: clear the state of every unit at each switch, also of those that stay
    active (BAdam, FRUGAL's block mode); ``weights``: sampling probabilities for the
    ``weighted`` order (OwLore), with ``attach()`` to hook the model and ``collect(bool)`` to
    switch its statistics on and off.
    """

    sampler: LayerSampler
    units: list[list[torch.Tensor]]
    active_mode: str = "inherit"
    inactive_mode: str = "frozen"
    active_weight: float = 1.0
    inactive_weight: float = 1.0
    reset_active: bool = False
    freeze_grads: bool = True
    weights: Callable[[], torch.Tensor | None] | None = None
    collect: Callable[[bool], None] | None = None
    attach: Callable[[], None] | None = None
    detach: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        if self.active_mode not in ACTIVE_MODES:
            raise ValueError(f"active mode {self.active_mode!r}: use {ACTIVE_MODES}")
        if self.inactive_mode not in INACTIVE_MODES:
            raise ValueError(f"inactive mode {self.inactive_mode!r}: use {INACTIVE_MODES}")
        if len(self.units) != self.sampler.n_units:
            raise ValueError(f"{len(self.units)} units for a sampler of {self.sampler.n_units}")


class SubspaceOptimizer(PerParameterOptimizer):
    """``params``: param groups (named parameters welcome: errors then name the matrix); a group
    with ``projected=True`` is projected, the others take ``plain_rule``.

    Components are shared by all parameters; per-parameter state lives in ``self.state``.
    ``refresh``: ``synchronous`` (every matrix refreshes its basis at the same steps, as the
    references) or ``staggered`` (each at its own offset, spread over the interval:
    ``refresh.py``).
    """

    def __init__(
        self,
        params: Iterable[dict],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        projector=None,
        scale: float = 1.0,
        residual=None,
        rule=None,
        plain_rule=None,
        reset_on_refresh: bool = False,
        decay_first: bool = False,
        sampling: Sampling | None = None,
        seed: int = 0,
        state_free=None,
        weight_quant=None,
        transition=None,
        error_feedback=None,
        projection: dict | None = None,
        make_projector=None,
        task_filter=None,
        refresh: str = "synchronous",
    ) -> None:
        check_refresh(refresh)
        if not lr > 0:  # also refuses NaN
            raise ValueError(f"lr={lr} must be positive")
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay} must be >= 0")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            projected=False,
            lr_scale=1.0,  # multiplies the group's steps, not its weight decay (FRUGAL)
            scale=scale,
            **(projection or {}),
        )
        super().__init__(params, defaults)
        if make_projector is not None:
            projector = make_projector(dict(projection or {}))
        if residual is not None and projector is not None and projector.proj_type == "full":
            raise ValueError(
                "proj_type=full: a residual needs a one-sided projection; "
                "use std, reverse_std, left or right"
            )
        self.projector, self.residual = projector, residual
        self.rule = rule if rule is not None else AdamRule()
        self.plain_rule = plain_rule if plain_rule is not None else self.rule
        self.reset_on_refresh, self.decay_first, self.seed = reset_on_refresh, decay_first, seed
        self.sampling, self.state_free, self.weight_quant = sampling, state_free, weight_quant
        if transition is not None and reset_on_refresh:
            raise ValueError("moments are either reset or carried into the new basis, not both")
        self.transition = transition
        self.error_feedback = error_feedback
        self.task_filter = task_filter  # GORP: past tasks' subspace out of R, before the rule
        self._index = {p: i for i, p in enumerate(self._all_params())}
        self._projectors = self._group_projectors(projection or {}, make_projector)
        if projector is None and any(g["projected"] for g in self.param_groups):
            raise ValueError("a projected group needs a projector")
        if projector is not None and not any(g["projected"] for g in self.param_groups):
            raise ValueError(
                f"a projector ({projector.describe()}) was given, but no param group has "
                "projected=True, so nothing would be projected and every matrix would take full "
                "Adam: mark the matrices to project with a group {'params': [...], "
                "'projected': True}"
            )
        for group in self.param_groups:  # each group's own values, checked before any step
            rule = self.rule if group["projected"] else self.plain_rule
            if hasattr(rule, "check_group"):
                rule.check_group(group)
        for name, p in self.projected_matrices():
            self.projector_for(p).check(tuple(p.shape), name)
        self.refresh = refresh
        self._offsets = self._refresh_offsets()
        self._batched = self._can_batch()
        self._steps = 0  # optimizer steps taken: drives the sampler's periods
        self._attached = False
        # freezing or weighing layers acts on the model: it waits for attach()
        self._needs_attach = sampling is not None and (
            sampling.inactive_mode == "frozen" or sampling.weights is not None
        )
        self._unit: dict[torch.Tensor, int] = {}
        self._active: set[int] = set()
        if sampling is not None:
            if sampling.inactive_mode == "state_free" and state_free is None:
                raise ValueError("a state-free inactive mode needs a state_free rule")
            for u, unit in enumerate(sampling.units):
                for p in unit:
                    if p not in self.group_number:
                        raise ValueError("a sampled unit holds a parameter not in the optimizer")
                    self._unit[p] = u
            self._active = set(sampling.sampler.choose(0))

    def _group_projectors(self, projection: dict, make_projector) -> dict[int, object]:
        """Each projected group's projector: the shared one, or, for a group whose projection
        settings (``projection``'s keys: rank, update_gap, proj_type, ...) differ, its own, built
        by ``make_projector`` from the group's values (so layers can take different ranks).
        These settings are read when the optimizer is built."""
        out = {}
        self._projection_values: dict[int, dict] = {}
        for i, group in enumerate(self.param_groups):
            if not group["projected"]:
                continue
            own = {key: group[key] for key in projection}
            out[i] = self.projector if own == projection else make_projector(own)
            self._projection_values[i] = own
        return out

    def _check_projection_unchanged(self, p: torch.Tensor, group: dict) -> None:
        """Projection settings are read when the optimizer is built: a later change (by hand,
        or a checkpoint's groups written at another rank) is refused before any update, not
        silently ignored."""
        i = self.group_number[p]
        built = self._projection_values.get(i)
        if built:
            for key, value in built.items():
                if group[key] != value:
                    raise ValueError(
                        f"param group {i} has {key}={group[key]!r}, but its projector was built "
                        f"with {key}={value!r}: projection settings are fixed when the optimizer "
                        "is built (resume with the settings the checkpoint was written with, or "
                        "build a new optimizer)"
                    )

    def projector_for(self, p: torch.Tensor):
        """The projector of ``p``'s group."""
        return self._projectors.get(self.group_number[p], self.projector)

    def _refresh_offsets(self) -> dict[torch.Tensor, int]:
        """Each projected matrix's refresh offset: none when synchronous; when staggered, spread
        over its projector's cycle in parameter order (``refresh.stagger_offsets``), so every
        rank and every resume derive the same ones."""
        if self.refresh == "synchronous":
            return {}
        projected = [p for g in self.param_groups if g["projected"] for p in g["params"]]
        cycles = [cycle_of(self.projector_for(p)) for p in projected]
        return dict(zip(projected, stagger_offsets(cycles), strict=True))

    def refresh_offset(self, p: torch.Tensor) -> int:
        """The step offset of ``p``'s refresh schedule (0 when synchronous or not projected)."""
        return self._offsets.get(p, 0)

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _can_batch(self) -> bool:
        """Whether the projected matrices can step together (APOLLO's composition: a residual
        and a rule with multi-tensor forms, nothing per-matrix between projection and update)."""
        return (
            getattr(self.residual, "batchable", False)
            and hasattr(self.rule, "directions")
            and not hasattr(self.rule, "lr_factor")
            and not getattr(self.rule, "full_space", False)
            and not any(hasattr(pr, "post_step") for pr in self._projectors.values())
            and self.sampling is None
            and self.weight_quant is None
            and self.transition is None
            and self.error_feedback is None
            and self.task_filter is None
            and not self.reset_on_refresh
        )

    # ------------------------------------------------------------------ stepping
    def end_step(self) -> None:
        """Count the step; at a period boundary, switch the sampled units for the next one."""
        self._steps += 1
        if self.sampling is None:
            return
        interval = self.sampling.sampler.interval
        if self._steps % interval == 0:
            self._switch(self._steps // interval)
        self._set_collecting()

    def _set_collecting(self) -> None:
        """OwLore's statistics are gathered during the last step of each period."""
        if self.sampling is not None and self.sampling.collect is not None:
            self.sampling.collect((self._steps + 1) % self.sampling.sampler.interval == 0)

    def _mode(self, p: torch.Tensor, group: dict, active: set[int] | None = None):
        """How ``p`` steps while ``active`` (default: the current units) are active, and the
        weight on its gradient."""
        mode = "projected" if group["projected"] else "plain"
        if self.sampling is None or p not in self._unit:
            return mode, 1.0
        s = self.sampling
        if self._unit[p] in (self._active if active is None else active):
            return ("complement" if s.active_mode == "complement" else mode), s.active_weight
        if s.inactive_mode == "inherit":
            return mode, s.inactive_weight
        return s.inactive_mode, 1.0

    @torch.no_grad()
    def step(self, closure=None):
        """As ``PerParameterOptimizer.step``; a batchable composition steps each projected group's
        matrices of one dtype together (``_update_many``): the same arithmetic, bit for bit, as
        stepping them one by one, which per-layer updates still do."""
        if not self._batched:
            return super().step(closure)
        loss = closure_loss(closure)
        for group in self.param_groups:
            ready = [p for p in group["params"] if p.grad is not None]
            if not group["projected"]:
                for p in ready:
                    self._update(p, group)
                continue
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for p in ready:
                by_dtype.setdefault(p.dtype, []).append(p)
            for params in by_dtype.values():
                self._update_many(params, group)
        self.end_step()
        return loss

    def _update_many(self, params: list[torch.Tensor], group: dict) -> None:
        """``_update`` for projected matrices of one dtype, batched through the rule's and the
        residual's multi-tensor forms (only for ``_can_batch`` compositions)."""
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("sparse gradients are not supported")
        self._check_projection_unchanged(params[0], group)
        lr, wd = group["lr"], group["weight_decay"]
        if wd > 0 and self.decay_first:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        grads = [p.grad for p in params]
        states, lows, steps, grad_norms = [], [], [], []
        projector = self.projector_for(params[0])  # one group: one projector
        for p, grad in zip(params, grads, strict=True):
            state = self.state[p]
            state.setdefault("seed", self.seed * 1_000_003 + self._index[p])
            step = state.get("step", 0)
            if projector.due(state, step - self.refresh_offset(p)):
                if getattr(projector, "uses_context", False):
                    projector.refresh(state, grad, self._context(p, lr, group))
                else:
                    projector.refresh(state, grad)
            lows.append(projector.project(state, grad))
            grad_norms.append(self.residual.grad_norm(grad))  # while G is still in cache
            state["step"] = step + 1
            states.append(state)
            steps.append(step + 1)
        directions, corrections = self.rule.directions(states, lows, steps, group)
        step_lr = lr * group["lr_scale"]
        self.residual.apply_many(
            params,
            states,
            grads,
            lows,
            directions,
            grad_norms,
            group["scale"],
            [-step_lr * c for c in corrections],
        )
        if wd > 0 and not self.decay_first:
            torch._foreach_add_(params, params, alpha=-lr * wd)

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("sparse gradients are not supported")
        self._check_projection_unchanged(p, group)
        if self._needs_attach and not self._attached:
            raise RuntimeError(
                f"{type(self).__name__} freezes or weighs decoder layers: call "
                "optimizer.attach() once before training (optimizer.detach() undoes it)"
            )
        mode, weight = self._mode(p, group)
        if mode == "frozen":
            return
        lr, wd = group["lr"], group["weight_decay"]
        # Q-GaLore's INT8 weights: the step goes to a float view of the weight (the parameter
        # itself when simulated, a dequantized temporary when stored as codes)
        quantized = self.weight_quant is not None and group["projected"]
        w = self.weight_quant.begin(p) if quantized else p
        if wd > 0 and self.decay_first:
            w.mul_(1.0 - lr * wd)
        grad = p.grad if weight == 1.0 else p.grad * weight
        step_lr = lr * group["lr_scale"]
        if mode == "state_free":
            self.state_free.step(w, grad, step_lr)
        else:
            self._stateful_update(p, w, grad, mode, step_lr, group)
        if wd > 0 and not self.decay_first:
            w.add_(w, alpha=-lr * wd)
        if quantized:
            self.weight_quant.end(p, w, self.state[p])  # back onto the INT8 grid

    def _stateful_update(
        self,
        p: torch.Tensor,
        w: torch.Tensor,
        grad: torch.Tensor,
        mode: str,
        lr: float,
        group: dict,
    ) -> None:
        """One step of ``p``'s state with ``grad``, applied to the weight ``w`` (``p`` itself
        unless its weight is stored elsewhere, see ``_update``)."""
        state = self.state[p]
        projector = self.projector_for(p) if group["projected"] else None
        state.setdefault("seed", self.seed * 1_000_003 + self._index[p])
        step = state.get("step", 0)
        full_space = self.rule if mode == "projected" else self.plain_rule
        if mode in ("plain", "projected") and getattr(full_space, "full_space", False):
            # Flora: the rule steps the weight itself; the projector compresses its momentum
            state["step"] = step + 1
            projector = projector if mode == "projected" else None
            full_space.step(w, state, grad, lr, projector, self._context(p, lr, group))
            return
        if mode == "plain":
            state["step"] = step = step + 1
            direction, correction = self.plain_rule.direction(state, grad, step, group)
            w.add_(direction, alpha=-lr * correction)
            return
        ef = self.error_feedback if mode == "projected" else None
        if ef is not None:  # A = G + E: the projector selects and projects A
            grad = ef.corrected(state, grad)
        # the refresh schedule runs on the matrix's step count; a reset at refresh (FRUGAL)
        # restarts the rule's count, so those compositions keep the schedule's in "clock"
        clock = state.get("clock", step)
        if self.reset_on_refresh:
            state["clock"] = clock + 1
        refreshed = projector.due(state, clock - self.refresh_offset(p))
        if refreshed:
            # the basis entries before the refresh (a refresh assigns new tensors, never
            # writes into the old ones), for carrying the moments over
            old = dict(state) if self.transition is not None and "side" in state else None
            if getattr(projector, "uses_context", False):
                projector.refresh(state, grad, self._context(p, lr, group))
            else:
                projector.refresh(state, grad)
            if self.reset_on_refresh:  # FRUGAL: fresh moments, bias correction restarts
                for key in self.rule.state_keys:
                    state.pop(key, None)
                step = 0
            elif old is not None:
                self.transition.apply(state, old, projector)
        low = projector.project(state, grad)
        if ef is not None:  # E <- A - back(project(A))
            ef.record(state, grad, projector, low)
        if self.task_filter is not None and mode == "projected":
            low = self.task_filter.apply(state, low)
        state["step"] = step = step + 1
        factor = self.rule.lr_factor(tuple(p.shape)) if hasattr(self.rule, "lr_factor") else 1.0
        if mode == "complement":  # GUM's full-rank branch: the rule on G - P P^T G
            residual = grad.clone()  # G - P P^T G, in one buffer
            projector.add_back(state, residual, low, -1.0)
            direction, correction = self.rule.direction(state, residual, step, group)
            w.add_(direction, alpha=-lr * correction * factor)
            return
        direction, correction = self.rule.direction(state, low, step, group)
        step_size = -lr * correction * factor
        if self.residual is None:  # GaLore: W += step_size * scale * back(N), in one GEMM
            projector.add_back(state, w, direction, step_size * group["scale"])
        else:
            self.residual.apply(
                w, state, grad, low, direction, projector, group["scale"], step_size, lr
            )
        if hasattr(projector, "post_step") and not refreshed:  # OSD: P_t -> P_{t+1}
            projector.post_step(state, grad, self._context(p, lr, group))

    def _context(self, p: torch.Tensor, lr: float, group: dict) -> RefreshContext:
        return RefreshContext(
            self._index[p],
            self.rule,
            lr,
            group.get("initial_lr", group["lr"]),
            self.seed,
            self.refresh_offset(p),
        )

    # ------------------------------------------------------------------ sampling
    def _switch(self, period: int) -> None:
        s = self.sampling
        weights = s.weights() if s.weights is not None else None
        new = set(s.sampler.choose(period, weights))
        for u, unit in enumerate(s.units):
            was, now = u in self._active, u in new
            for p in unit:
                if not now and s.inactive_mode != "inherit":
                    self.state.pop(p, None)  # frozen or state-free from now on: free it
                elif now and (s.reset_active or not was):
                    self.state.pop(p, None)  # a fresh start for a newly active unit
                elif was != now:  # GUM: the branch changed, the momentum changes shape
                    for key in self.rule.state_keys:
                        self.state[p].pop(key, None)
        self._active = new
        self.apply_freeze()

    def attach(self) -> None:
        """The model surgery a layer sampler needs, made explicit and reversible (``detach``):
        freeze the inactive units (the gradients LISA, OwLore and BAdam save; under DDP they are
        only marked, as DDP needs the same parameters in every backward) and hook OwLore's
        outlier statistics. From then on each switch re-freezes. Call it once before training;
        a method that freezes or weighs layers refuses to step without it."""
        self._attached = True
        if self.sampling is not None and self.sampling.attach is not None:
            self.sampling.attach()
        self.apply_freeze()
        self._set_collecting()

    def detach(self) -> None:
        """Undo ``attach``: every unit trainable again, statistics hooks removed."""
        self._attached = False
        s = self.sampling
        if s is None:
            return
        if s.detach is not None:
            s.detach()
        for unit in s.units:
            for p in unit:
                p.frozen_by_sampler = False
                p.requires_grad_(True)

    def apply_freeze(self) -> None:
        """Stop autograd computing gradients of frozen units, once ``attach`` was called."""
        s = self.sampling
        if s is None or s.inactive_mode != "frozen" or not self._attached:
            return
        for u, unit in enumerate(s.units):
            for p in unit:
                # also under DDP, where their gradients exist: clipping must leave them out
                p.frozen_by_sampler = u not in self._active
                if s.freeze_grads:
                    p.requires_grad_(u in self._active)
                    if u not in self._active:
                        p.grad = None

    def active_units(self) -> list[int]:
        return sorted(self._active)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        out = super().state_dict()
        out["sampling"] = {
            "steps": self._steps,
            "active": torch.tensor(sorted(self._active), dtype=torch.int64),
        }
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """The base class's (saved dtypes kept), plus the sampler's position."""
        extra = state_dict.get("sampling")
        if extra is None:
            raise ValueError("optimizer state has no 'sampling' entry: not from this optimizer")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "sampling"})
        self._steps = int(extra["steps"])
        if self.sampling is not None:
            active = extra["active"].tolist()
            sampler = self.sampling.sampler
            if len(active) != sampler.n_active or any(not 0 <= u < sampler.n_units for u in active):
                raise ValueError(
                    f"optimizer state has active units {active}, but this optimizer samples "
                    f"{sampler.n_active} of {sampler.n_units}: the checkpoint is from another "
                    "sampling setup (active layers, density or model depth)"
                )
            self._active = set(active)
            self.apply_freeze()
            self._set_collecting()

    # ------------------------------------------------------------------ memory
    def shared_state(self) -> dict[str, list[torch.Tensor]]:
        """Tensors the components hold once for every parameter (e.g. 8-bit code maps)."""
        return self._shared_tensors() if self.state else {}

    def _shared_tensors(self, projector: bool = True) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {}
        parts = [self.rule, self.plain_rule] + (self._distinct_projectors() if projector else [])
        for part in {id(c): c for c in parts}.values():
            if hasattr(part, "shared_tensors"):
                for key, tensors in part.shared_tensors().items():
                    out.setdefault(key, []).extend(tensors)
        return out

    def _distinct_projectors(self) -> list:
        found = [self.projector, *self._projectors.values()]
        return list({id(pr): pr for pr in found if pr is not None}.values())

    def state_nbytes(self) -> dict[str, int]:
        out = state_nbytes(self.state.values())
        seen = set()
        for key, tensors in self.shared_state().items():
            for t in tensors:
                if t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    out[key] += t.nbytes
        return out

    def memory_formula(self, steps: int = 1) -> dict[str, int]:
        """Closed-form state bytes after ``steps`` steps, from the components' declared sizes
        and the sampler's schedule: no state is touched, so this works on a ``meta`` model.
        After the last step of a period the switch has happened: outgoing units are freed and
        incoming ones have no state yet. For the ``weighted`` order the units are taken as
        drawn uniformly: exact off period boundaries when the units have equal sizes (as
        LLaMA's decoder layers do), an estimate at the boundaries (it depends on which units
        stay active)."""
        total = dict.fromkeys(CATEGORIES, 0)
        for group in self.param_groups:
            for p in group["params"]:
                mode = self._held_mode(p, group, steps)
                projector = self.projector_for(p)
                for key, n in self._param_memory(tuple(p.shape), mode, p.dtype, projector).items():
                    total[key] += n
        for key, tensors in self._shared_tensors(projector=False).items():
            total[key] += sum(t.nbytes for t in tensors)
        for projector in self._distinct_projectors():
            if not hasattr(projector, "shared_memory"):  # e.g. DCT bases, built at first use
                continue
            by_dtype: dict[torch.dtype, list] = {}
            for group in self.param_groups:
                if group["projected"]:
                    for p in group["params"]:
                        if self.projector_for(p) is projector:
                            by_dtype.setdefault(p.dtype, []).append(tuple(p.shape))
            for dtype, shapes in by_dtype.items():
                for key, n in projector.shared_memory(shapes, dtype).items():
                    total[key] += n
        return total

    def _held_mode(self, p: torch.Tensor, group: dict, steps: int) -> str:
        """Which state ``p`` holds after ``steps`` steps, mirroring ``_switch``."""
        if self.sampling is None or p not in self._unit:
            return self._mode(p, group)[0]
        s, u = self.sampling, self._unit[p]
        interval = s.sampler.interval
        old = set(s.sampler.choose((steps - 1) // interval))
        held = self._mode(p, group, old)[0]
        if steps % interval:
            return held
        new = set(s.sampler.choose(steps // interval))
        was, now = u in old, u in new
        if not now and s.inactive_mode != "inherit":
            return "none"
        if now and (s.reset_active or not was):
            return "none"
        if was != now:
            return "projector_only"  # GUM: the momentum went with the branch, the basis stays
        return held

    def _param_memory(self, shape, mode: str, dtype: torch.dtype, projector) -> dict[str, int]:
        if mode in ("frozen", "state_free", "none"):
            return {}
        if mode == "projector_only":
            return dict(projector.memory(shape, dtype))
        if mode == "plain":
            return self.plain_rule.memory(shape, dtype)
        out = dict(projector.memory(shape, dtype))
        if getattr(self.rule, "full_space", False):
            low = projector.reduced_shape(shape)
            for key, n in self.rule.memory(shape, dtype, low).items():
                out[key] = out.get(key, 0) + n
            return out
        moment_shape = shape if mode == "complement" else projector.reduced_shape(shape)
        for key, n in self.rule.memory(moment_shape, dtype).items():
            out[key] = out.get(key, 0) + n
        if mode == "projected" and self.residual is not None:
            for key, n in self.residual.extra_memory(dtype).items():
                out[key] = out.get(key, 0) + n
        if mode == "projected" and self.error_feedback is not None:
            for key, n in self.error_feedback.memory(shape, dtype).items():
                out[key] = out.get(key, 0) + n
        return out

    def projection_report(self) -> str:
        """One line for the start-up log: what is projected, at what rank, what is sampled."""
        projected = [p for g in self.param_groups if g["projected"] for p in g["params"]]
        plain = [p for g in self.param_groups if not g["projected"] for p in g["params"]]
        n_proj = sum(p.numel() for p in projected)
        n_plain = sum(p.numel() for p in plain)
        parts = []
        if projected:
            bases = "; ".join(
                f"{pr.describe()}, refresh every {pr.update_gap} steps"
                + (" (staggered)" if self.refresh == "staggered" else "")
                + (f" ({sum(self.projector_for(p) is pr for p in projected)} matrices)"
                   if len(self._distinct_projectors()) > 1 else "")
                for pr in self._distinct_projectors()
            )  # fmt: skip
            parts.append(
                f"{len(projected)} matrices ({n_proj / 1e6:.2f}M params) projected: {bases}"
            )
        sampled = sum(1 for p in plain if p in self._unit)
        only_active = f" ({sampled} of them only while sampled)" if sampled else ""
        parts.append(
            f"{len(plain)} tensors ({n_plain / 1e6:.2f}M params) take plain Adam{only_active}"
        )
        if self.weight_quant is not None:
            parts.append(f"projected matrices as {self.weight_quant.describe()}")
        if self.error_feedback is not None:
            parts.append(f"projected matrices with {self.error_feedback.describe()}")
        if self.sampling is not None:
            s = self.sampling
            active = {"inherit": "their usual step", "complement": "the full-rank complement"}
            inactive = {
                "frozen": "frozen (state freed, "
                + ("no gradients)" if s.freeze_grads else "gradients still computed under DDP)"),
                "state_free": f"a state-free {getattr(self.state_free, 'rule', '')} step",
                "inherit": "their usual step",
            }
            parts.append(
                f"sampling: {s.sampler.describe()}; active units take "
                f"{active[s.active_mode]}, inactive ones {inactive[s.inactive_mode]}"
            )
        return "; ".join(parts)
