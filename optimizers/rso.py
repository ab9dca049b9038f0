"""RSO: randomized subspace optimization (Chen, Zhang, Liu, Yuan, Wen; ICML 2025; arXiv
2502.07222; spec projection-family.md section 8).

RSO changes the model, not only the optimizer: each targeted linear ``y = x W^T`` becomes
``y = x W0^T + (x P) B^T`` with W0 frozen, P (d_in x r) drawn N(0, 1/r) from a seed and B
(d_out x r) trainable, starting at zero. Adam trains B (and, as usual, the embeddings, norms and
lm_head) for ``update_gap`` (tau) steps; then ``W0 <- W0 + B P^T``, a new P is drawn, B returns
to zero and its moments restart. So the optimizer state of a wrapped linear is 2 r d_out, its
gradient r d_out, and its backward keeps ``x P`` (tokens x r) instead of x (tokens x d_in): the
activation and gradient memory shrink too, which no gradient-projection method can do.

P is never stored by default: forward and backward each regenerate it from (seed, draw), the
same on every DDP rank and after a resume; ``store_projection=true`` keeps it as a
(non-persistent) buffer to save the draws, counted as projector memory. ``projection_rng``
picks the generator: ``torch`` draws P with ``torch.Generator`` (the buffer ``rso_draw_device``
records the device type of the current P's first draw, and a forward on another type is
refused, since W0 + P B would silently become another model), ``philox`` with Triton's
Philox, the same P on every device; on CUDA with Triton, x P and (dy B) P^T are then computed
tile by tile (``kernels/seeded_projection.py``) and P never exists. The seed of a linear
mixes ``seed`` with a hash of its qualified name, so it does not depend on the order
in which the model was built.

The paper's proximal term (1 / 2 eta) ||B||^2 is an L2 penalty on B (``proximal`` = 1 / eta,
added to B's gradient); its LLaMA value was not retrievable (spec 8d), so it defaults to off.
Decoupled weight decay shrinks the effective weight W0 + P B (both parts), as AdamW would.
``unwrap(model)`` merges every B and gives back plain ``nn.Linear`` modules for export.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llmpt.optimizers.accounting import CATEGORIES, state_nbytes
from llmpt.optimizers.groups import DEFAULT_TARGETS
from llmpt.optimizers.per_parameter import PerParameterOptimizer
from llmpt.optimizers.projectors.gaussian import (
    check_draw_device,
    check_rng,
    device_code,
    draw,
    draw_seed,
    gaussian,
    philox_times,
)
from llmpt.optimizers.rules.adam import AdamRule

SEED_BYTES = 24  # the int64 buffers (seed, draw, draw device) that identify a linear's P


class RsoLinearFunction(torch.autograd.Function):
    """y = x W0^T + (x P) B^T + bias, saving x P (not x) for backward.

    ``proj`` is the stored P or None, in which case P is drawn from ``seed`` by ``rng`` here and
    drawn again in backward (with philox on CUDA, inside the matmuls). W0 is frozen: no
    gradient is computed for it. Under autocast the forward matmuls run in the autocast dtype;
    backward computes in the gradient's dtype and returns each gradient in its input's dtype,
    as autocast's casts would.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, b, proj, seed, rank, rng="torch"):
        d_out, d_in = weight.shape
        x2 = x.reshape(-1, d_in)
        if proj is None and rng == "philox":
            xp = philox_times(x2, seed, (d_in, rank), rank)
        else:
            p = proj if proj is not None else gaussian((d_in, rank), rank, seed, x.device, b.dtype)
            xp = x2 @ p
        y = torch.addmm(F.linear(x2, weight, bias), xp, b.t())
        ctx.save_for_backward(xp, weight, b, proj)
        ctx.seed, ctx.rank, ctx.rng, ctx.x_shape, ctx.x_dtype = seed, rank, rng, x.shape, x.dtype
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx, grad_y):
        xp, weight, b, proj = ctx.saved_tensors
        d_out, d_in = weight.shape
        dt = grad_y.dtype
        g = grad_y.reshape(-1, d_out)
        grad_x = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            if proj is None and ctx.rng == "philox":  # (dy B) P^T, P drawn inside the matmul
                back = philox_times(g @ b.to(dt), ctx.seed, (d_in, ctx.rank), ctx.rank, True)
                gx = (g @ weight.to(dt)).add_(back)
            else:
                p = (
                    proj
                    if proj is not None
                    else gaussian((d_in, ctx.rank), ctx.rank, ctx.seed, g.device, b.dtype)
                )
                gx = torch.addmm(g @ weight.to(dt), g @ b.to(dt), p.to(dt).t())
            grad_x = gx.reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_b = (g.t() @ xp.to(dt)).to(b.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, grad_b, None, None, None, None


def check_rank(rank: int, shape: tuple[int, int]) -> None:
    d_in = shape[1]
    if not 1 <= rank <= d_in:
        raise ValueError(
            f"rank={rank}: RSO's rank must lie in [1, d_in={d_in}] for a linear of "
            f"shape {shape}; lower rank or leave it out of target_modules"
        )


class RsoLinear(nn.Module):
    """A linear reparametrized as W0 + P B (see the module docstring). It takes over the
    wrapped linear's ``weight`` (frozen: it is W0) and ``bias`` (still trained), so the model's
    state-dict keys for them do not change; B is ``rso_b``, the projection's identity the
    buffers ``rso_seed``, ``rso_draw`` and ``rso_draw_device`` (-1 until P is first drawn)."""

    def __init__(
        self,
        linear: nn.Linear,
        rank: int,
        seed: int,
        store_projection: bool,
        rng: str = "torch",
    ) -> None:
        super().__init__()
        check_rng(rng)
        d_out, d_in = linear.weight.shape
        check_rank(rank, (d_out, d_in))
        self.in_features, self.out_features, self.rank = d_in, d_out, rank
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        w = self.weight
        self.rso_b = nn.Parameter(torch.zeros(d_out, rank, dtype=w.dtype, device=w.device))
        self.register_buffer("rso_seed", torch.tensor(seed, dtype=torch.int64, device=w.device))
        self.register_buffer("rso_draw", torch.tensor(0, dtype=torch.int64, device=w.device))
        self.register_buffer(
            "rso_draw_device", torch.tensor(-1, dtype=torch.int64, device=w.device)
        )
        self.store_projection, self.rng = store_projection, rng
        self.register_buffer("rso_projection", None, persistent=False)
        self._seed, self._draw, self._draw_device = seed, 0, -1
        self._sync_seed()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync_seed())

    def _sync_seed(self) -> None:
        """Mirror the buffers in Python ints (no device sync per forward) and redraw a stored P
        (a ``meta`` model, built for a memory estimate, has neither values nor P)."""
        if self.weight.device.type == "meta":
            return
        self._seed, self._draw = int(self.rso_seed), int(self.rso_draw)
        self._draw_device = int(self.rso_draw_device)
        if self.store_projection:  # (re)draw: a loaded state may be at another draw
            self.rso_projection = None
            self.rso_projection = self.projection()

    def draw_seed(self) -> int:
        return draw_seed(self._seed, self._draw)

    def _check_device(self, device: torch.device) -> None:
        """A torch-drawn P belongs to the device type it was first drawn on (see the module
        docstring): record it at the first draw of a subspace, refuse any other afterwards."""
        if self.rng != "torch" or device.type == "meta":
            return
        if self._draw_device < 0:
            self._draw_device = device_code(device)
            self.rso_draw_device.fill_(self._draw_device)
        else:
            check_draw_device(
                self._draw_device,
                device,
                "RSO's P",
                also="or merge the model there first (optimizers.rso.unwrap)",
            )

    def projection(self) -> torch.Tensor:
        """The current P (d_in x r), in B's dtype: the stored one, or drawn from its seed."""
        if self.rso_projection is not None:
            return self.rso_projection
        w = self.weight
        self._check_device(w.device)
        shape = (self.in_features, self.rank)
        return draw(shape, self.rank, self.draw_seed(), w.device, w.dtype, self.rng)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_device(x.device)
        return RsoLinearFunction.apply(
            x,
            self.weight,
            self.bias,
            self.rso_b,
            self.rso_projection,
            self.draw_seed(),
            self.rank,
            self.rng,
        )

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + B P^T; B is left as is (``resample`` zeroes it). Under FSDP2, W0 and B are
        split by the same rows (d_out), so each rank merges its own rows."""
        w, b = self.weight, self.rso_b
        if hasattr(w, "to_local"):  # DTensors, Shard(0) both
            w, b = w.to_local(), b.to_local()
        w.addmm_(b, self.projection().t())

    @torch.no_grad()
    def resample(self) -> None:
        """The next outer iteration: a new P (the next draw of this linear's seed), B = 0."""
        self.rso_draw.add_(1)
        self.rso_draw_device.fill_(-1)
        self.rso_b.zero_()
        self.rso_projection = None
        self._sync_seed()

    def merged_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.addmm(self.weight, self.rso_b, self.projection().t())

    def extra_repr(self) -> str:
        stored = "stored" if self.store_projection else "regenerated"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}, projection={stored} ({self.rng})"
        )


def linear_seed(seed: int, name: str) -> int:
    """A linear's projection seed: the run's seed mixed with a hash of its qualified name."""
    return draw_seed(seed, zlib.crc32(name.encode()))


def rso_targets(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The modules RSO reparametrizes: those whose name contains a target and that hold
    parameters of their own (containers such as ``mlp`` are walked into, not wrapped). Each
    must be a plain ``nn.Linear`` (or already an ``RsoLinear``); anything else is refused."""
    if not targets:
        raise ValueError("target_modules is empty: name the linears RSO reparametrizes")
    found = []
    for name, module in model.named_modules():
        if not any(t in name for t in targets):
            continue
        if isinstance(module, RsoLinear) or type(module) is nn.Linear:
            found.append((name, module))
        elif any(True for _ in module.parameters(recurse=False)):
            raise TypeError(
                f"RSO reparametrizes nn.Linear modules only: {name} is a "
                f"{type(module).__name__}; leave it out of target_modules "
                f"({list(targets)})"
            )
    if not found:
        raise ValueError(
            f"target_modules={list(targets)} matches no nn.Linear of the model; "
            "use substrings of its module names (e.g. attn, mlp)"
        )
    return found


def wrap(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    rank: int = 128,
    seed: int = 0,
    store_projection: bool = False,
    projection_rng: str = "torch",
) -> list[RsoLinear]:
    """RSO's model surgery: replace the targeted linears of ``model`` by ``RsoLinear`` in place
    (linears already wrapped are kept) and return the wrappers in module order, for
    ``Rso(model.parameters() trainable, linears=...)``. ``unwrap`` merges them back. Rank 128
    and the targets follow GaLore's 60M setting that RSO compares against (no official code)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank} must be a positive integer")
    rng = projection_rng
    check_rng(rng)
    shared = _tied_weights(model)
    found = rso_targets(model, targets)
    for name, module in found:  # check them all first: a refusal leaves the model untouched
        if isinstance(module, RsoLinear):
            continue
        if id(module.weight) in shared:
            raise ValueError(
                f"{name}.weight is shared with another module (tied weights): RSO would freeze "
                "both; leave it out of target_modules"
            )
        check_rank(rank, tuple(module.weight.shape))
    wrapped = []
    for name, module in found:
        if isinstance(module, RsoLinear):
            wrapped.append(module)
            continue
        new = RsoLinear(module, rank, linear_seed(seed, name), store_projection, rng)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        wrapped.append(new)
    return wrapped


def _tied_weights(model: nn.Module) -> set[int]:
    seen, tied = set(), set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    return tied


def unwrap(model: nn.Module) -> nn.Module:
    """Merge every ``RsoLinear`` (W0 + B P^T) back into a plain, trainable ``nn.Linear``, in
    place: the model to export or to go on training with another optimizer."""
    for name, module in list(model.named_modules()):
        if isinstance(module, RsoLinear):
            linear = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device=module.weight.device,
                dtype=module.weight.dtype,
            )
            with torch.no_grad():
                linear.weight.copy_(module.merged_weight())
                if module.bias is not None:
                    linear.bias = module.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


def check_outer_loop(update_gap: int, proximal: float) -> None:
    if update_gap < 1:
        raise ValueError(f"update_gap={update_gap} must be >= 1 (steps per subspace)")
    if proximal < 0:
        raise ValueError(f"proximal={proximal} must be >= 0 (it is 1 / eta)")


class Rso(PerParameterOptimizer):
    """RSO's optimizer: Adam (torch's AdamW arithmetic) on each B and on every other trainable
    tensor of ``params``; every ``update_gap`` steps, merge, resample and reset (in place, so
    memory does not move). ``linears``: the ``RsoLinear`` modules that ``wrap(model, ...)`` made
    (an explicit, reversible model surgery: ``unwrap`` merges them back); their B must be among
    ``params``. lr, betas, eps and weight decay may differ per group.

    Steps are counted once per ``step()`` (``optimizers/per_parameter.py``).
    """

    def __init__(
        self,
        params: Iterable,
        linears: Sequence[RsoLinear],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        update_gap: int = 200,
        proximal: float = 0.0,
    ) -> None:
        check_outer_loop(update_gap, proximal)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            AdamRule.check_group(group)
        self.check_fixed(dict(update_gap=update_gap, proximal=proximal))
        linears = list(linears)
        trained = {id(q) for g in self.param_groups for q in g["params"]}
        missing = [lin for lin in linears if id(lin.rso_b) not in trained]
        if missing:
            raise ValueError(
                f"{len(missing)} of the {len(linears)} RSO linears have their B (rso_b) outside "
                "params: pass the model's trainable parameters after wrap(model, ...)"
            )
        self.rule = AdamRule(eps_placement="torch")
        self.linears, self.update_gap, self.proximal = linears, update_gap, proximal
        self._linear_of = {lin.rso_b: lin for lin in linears}
        self._steps = 0

    def end_step(self) -> None:
        self._steps += 1
        if self._steps % self.update_gap == 0:
            self._next_subspace()

    def _update(self, p: torch.Tensor, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        grad = p.grad
        linear = self._linear_of.get(p)
        if linear is not None and self.proximal > 0:
            grad = grad.add(p, alpha=self.proximal)
        if wd > 0:  # decoupled, on the effective weight: W0 + P B shrinks as a whole
            p.mul_(1.0 - lr * wd)
            if linear is not None:
                linear.weight.mul_(1.0 - lr * wd)
        state = self.state[p]
        state["step"] = step = state.get("step", 0) + 1
        direction, correction = self.rule.direction(state, grad, step, group)
        p.add_(direction, alpha=-lr * correction)

    def _next_subspace(self) -> None:
        # by the B this optimizer was built on: under FSDP2 the module's rso_b is its shard, the
        # state is keyed by the whole parameter (on its owner)
        for b, linear in self._linear_of.items():
            linear.merge()
            linear.resample()
            state = self.state.get(b)
            if state:  # a fresh inner Adam: moments zeroed in place, bias correction restarts
                for key in self.rule.state_keys:
                    state[key].zero_()
                state["step"] = 0

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        out = super().state_dict()
        out["rso"] = {"steps": self._steps}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        extra = state_dict.get("rso")
        if extra is None:
            raise ValueError("optimizer state has no 'rso' entry: it is not from RSO")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "rso"})
        self._steps = int(extra["steps"])
        draws = {int(lin.rso_draw) for lin in self.linears}
        if draws != {self._steps // self.update_gap}:
            raise ValueError(
                f"the model's RSO projections are at draw(s) {sorted(draws)} but the optimizer "
                f"state is at step {self._steps} (update_gap {self.update_gap}): load the model "
                "state of the same checkpoint, after building the optimizer"
            )

    # ------------------------------------------------------------------ memory
    def shared_state(self) -> dict[str, list[torch.Tensor]]:
        """The projections' identities (and stored P): model buffers that exist for RSO."""
        tensors = []
        for lin in self.linears:
            tensors += [lin.rso_seed, lin.rso_draw, lin.rso_draw_device]
            if lin.rso_projection is not None:
                tensors.append(lin.rso_projection)
        return {"projector": tensors}

    def state_nbytes(self) -> dict[str, int]:
        out = state_nbytes(self.state.values())
        out["projector"] += sum(t.nbytes for t in self.shared_state()["projector"])
        return out

    def memory_formula(self, steps: int = 1) -> dict[str, int]:
        """Closed form: per linear, Adam on B (2 r d_out) plus the seed and draw buffers (and P
        when stored); Adam on every other trained tensor. Moments are zeroed in place at a
        resample, so the bytes do not depend on ``steps``."""
        total = dict.fromkeys(CATEGORIES, 0)
        for lin in self.linears:
            size = lin.weight.element_size()
            stored = lin.in_features * lin.rank * size if lin.store_projection else 0
            total["projector"] += SEED_BYTES + stored
        for group in self.param_groups:
            for p in group["params"]:
                total["moments"] += 2 * p.numel() * p.element_size()
        return total

    def projection_report(self) -> str:
        n_b = sum(lin.rso_b.numel() for lin in self.linears)
        n_frozen = sum(lin.weight.numel() for lin in self.linears)
        plain = [p for g in self.param_groups for p in g["params"] if p not in self._linear_of]
        kept = "stored" if self.linears and self.linears[0].store_projection else "regenerated"
        return (
            f"{len(self.linears)} linears reparametrized as W0 + P B at rank "
            f"{self.linears[0].rank if self.linears else 0} ({n_frozen / 1e6:.2f}M frozen, "
            f"{n_b / 1e6:.2f}M trained in B; P {kept} from seeds), merged and resampled every "
            f"{self.update_gap} steps; {len(plain)} tensors "
            f"({sum(p.numel() for p in plain) / 1e6:.2f}M params) take plain Adam"
        )
