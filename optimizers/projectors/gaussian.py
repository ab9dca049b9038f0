"""Seeded Gaussian projections (APOLLO, Flora; spec projection-family.md sections 1, 2 and 9).

P has i.i.d. N(0, 1/r) entries, so E[P P^T] = I and up(down(X)) is unbiased. On the LEFT side P
is m x r and R = P^T G; on the RIGHT side P is r x n and R = G P^T (the SVD projector's
convention). A new P is drawn at steps 0, T, 2T, ... of the matrix's own counter.

``seeding="paper"``: the k-th matrix of the refresh sequence is drawn from a generator seeded by
(the matrix's ``seed``, k), so nothing but two integers is stored, every DDP rank draws the same
P without communication, and a resume draws it again exactly. With ``store=False`` P is never
kept: it is regenerated on the gradient's device each time it is applied (a few microseconds on
a GPU; on a CPU the draw costs about as much as the projection). ``store=True`` keeps it in the
state (``basis``, counted as projector memory) to save the draws.

``rng`` picks the generator of the paper seeding. ``torch`` (default): ``torch.Generator`` on the
gradient's device, the fastest draw, but CPU and CUDA generators give different matrices, so the
state records the device type it drew on and refuses to continue on another one. ``philox``:
Triton's counter-based Philox (``kernels/philox.py``), the same P on every device; on CUDA with
Triton installed P is never built, each tile is drawn inside the projection matmul
(``kernels/seeded_projection.py``), while on CPU the PyTorch reference builds it at each use,
several times slower than ``torch`` (docs/optimizers.md has the measurement).

``seeding="reference"`` reproduces ``apollo-torch``: the first seed is the parameter's 1-based
ordinal over the optimizer's parameters and each refresh advances it to the last of 15 int64
draws of a CPU generator seeded with it; P is kept in the state, as the reference caches it.
``seeding="flora"`` reproduces ``flora-opt``: the same chain offset by the optimizer's seed, the
left matrix drawn as r x m from the first of two seeds split off, the right one as n x r from
the second, and nothing stored.

State per matrix (ints and tensors): ``side``, ``draws`` (how many P have been drawn), for the
reference ``proj_seed`` (the next seed), when stored ``basis``, and for ``torch`` draws that are
not stored ``draw_device`` (the device type's index in ``DEVICE_TYPES``).
"""

from __future__ import annotations

import math

import torch

from llmpt.kernels import seeded_projection
from llmpt.optimizers.projectors.svd import LEFT, check_one_sided, check_rank_fits, side_for

SEEDINGS = ("paper", "reference", "flora")
RNGS = ("torch", "philox")
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "meta")
_SEED_MASK = (1 << 63) - 1


def reference_next_seed(seed: int) -> int:
    """apollo-torch's seed chain: the last of 15 int64 draws of a CPU generator."""
    g = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=g)[-1])


def split_seed(seed: int) -> tuple[int, int]:
    """flora-opt's two seeds (left, right) split off one: two int64 draws of a CPU generator."""
    g = torch.Generator().manual_seed(seed)
    left, right = torch.randint(0, torch.iinfo(torch.int64).max, (2,), generator=g).tolist()
    return left, right


def draw_seed(seed: int, draw: int) -> int:
    """The generator seed of draw ``draw`` of a matrix seeded ``seed`` (a 64-bit mix, so nearby
    (seed, draw) pairs give unrelated streams)."""
    x = (seed * 0x9E3779B97F4A7C15 + draw * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _SEED_MASK
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & _SEED_MASK
    return x ^ (x >> 29)


def gaussian(
    shape: tuple[int, int], rank: int, seed: int, device, dtype: torch.dtype
) -> torch.Tensor:
    """N(0, 1/rank) entries drawn in fp32 on ``device`` (as apollo-torch does), then cast."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    return out.div_(math.sqrt(rank)).to(dtype)


def device_code(device: torch.device) -> int:
    """A device type as an int, for state that must stay plain numbers."""
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"seeded projections on device type {device.type!r} are not supported")
    return DEVICE_TYPES.index(device.type)


def check_draw_device(drawn_on: int, device: torch.device, what: str, also: str = "") -> None:
    """Refuse to redraw a torch-generated P on another device type than it was drawn on: the
    CPU and CUDA generators give different matrices from the same seed."""
    if drawn_on != device_code(device) and device.type != "meta":
        raise RuntimeError(
            f"{what} was drawn by torch's {DEVICE_TYPES[drawn_on]} generator; on "
            f"{device.type} the same seed draws a different matrix, so continuing here would not "
            f"be the same run. Continue on {DEVICE_TYPES[drawn_on]}, or train with "
            f"projection_rng=philox (the same P on every device)" + (f", {also}" if also else "")
        )


def check_rng(rng: str) -> None:
    if rng not in RNGS:
        raise ValueError(f"projection_rng={rng!r}: use one of {RNGS}")


def draw(
    shape: tuple[int, int], rank: int, seed: int, device, dtype: torch.dtype, rng: str = "torch"
) -> torch.Tensor:
    """P itself, N(0, 1/rank), from ``rng``'s stream for ``seed``."""
    if rng == "philox":
        p = seeded_projection.gaussian(seed, shape, 1.0 / math.sqrt(rank), device)
        return p.to(dtype)
    return gaussian(shape, rank, seed, device, dtype)


def philox_times(
    x: torch.Tensor, seed: int, shape: tuple[int, int], rank: int, transpose: bool = False
) -> torch.Tensor:
    """x @ P (or x @ P^T) for the philox P of ``shape``, N(0, 1/rank): on CUDA P is drawn tile
    by tile inside the matmul and never exists as a whole."""
    scale = 1.0 / math.sqrt(rank)
    return seeded_projection.seeded_matmul(x, seed, shape, scale, transpose)


class GaussianProjector:
    def __init__(
        self,
        rank: int,
        update_gap: int,
        proj_type: str = "std",
        store: bool = False,
        seeding: str = "paper",
        rng: str = "torch",
    ) -> None:
        check_one_sided(rank, update_gap, proj_type, "a random projection")
        if seeding not in SEEDINGS:
            raise ValueError(f"projection seeding {seeding!r}: use one of {SEEDINGS}")
        check_rng(rng)
        if rng == "philox" and seeding != "paper":
            raise ValueError(
                f"projection_rng=philox draws the paper's seeded P; compat=reference "
                f"reproduces the reference code's torch draws ({seeding} seeding): use "
                f"projection_rng=torch with it"
            )
        self.rank, self.update_gap, self.proj_type = rank, update_gap, proj_type
        self.seeding, self.rng = seeding, rng
        self.store = store or seeding == "reference"
        self.uses_context = seeding != "paper"  # the chains start from the parameter's ordinal

    def describe(self) -> str:
        kept = "stored" if self.store else f"regenerated from its seed by {self.rng}"
        return f"Gaussian projection at rank {self.rank} ({self.proj_type}, {kept})"

    # -------------------------------------------------------------- shapes and memory
    def side(self, shape: tuple[int, int]) -> int:
        return side_for(self.proj_type, shape)

    def check(self, shape: tuple[int, int], name: str) -> None:
        check_rank_fits(self.rank, shape, name)

    def reduced_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        m, n = shape
        return (self.rank, n) if self.side(shape) == LEFT else (m, self.rank)

    def basis_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        m, n = shape
        return (m, self.rank) if self.side(shape) == LEFT else (self.rank, n)

    def memory(self, shape: tuple[int, int], dtype: torch.dtype) -> dict[str, int]:
        if not self.store:
            return {}
        size = torch.empty((), dtype=dtype).element_size()
        return {"projector": math.prod(self.basis_shape(shape)) * size}

    # -------------------------------------------------------------- the step
    def due(self, state: dict, step: int) -> bool:
        return "side" not in state or step % self.update_gap == 0

    def refresh(self, state: dict, grad: torch.Tensor, ctx=None) -> None:
        shape = tuple(grad.shape)
        side = self.side(shape)
        state["side"], state["full_dim"] = side, shape[0] if side == LEFT else shape[1]
        if self.seeding != "paper":
            first = ctx.index + 1 + (ctx.seed if self.seeding == "flora" else 0)
            seed = state.get("proj_seed", first)
            state["proj_seed"] = reference_next_seed(seed)
            state["seed_used"] = seed
        state["draws"] = state.get("draws", 0) + 1
        if self.rng == "torch" and not self.store:
            state["draw_device"] = device_code(grad.device)
        if self.store:
            state.pop("basis", None)
            state["basis"] = self.basis(state, grad)

    def _seed_and_shape(self, state: dict, device: torch.device) -> tuple[int, tuple[int, int]]:
        """The paper seeding's draw: its generator seed and P's shape."""
        if "draw_device" in state:
            check_draw_device(state["draw_device"], device, "The random projection P")
        d, r = state["full_dim"], self.rank
        shape = (d, r) if state["side"] == LEFT else (r, d)
        return draw_seed(state.get("seed", 0), state["draws"] - 1), shape

    def basis(self, state: dict, like: torch.Tensor) -> torch.Tensor:
        """P of the current draw, on ``like``'s device and in its dtype: the stored one, or
        regenerated from the seeds."""
        if "basis" in state:
            return state["basis"]
        d, r = state["full_dim"], self.rank
        if self.seeding == "flora":
            if "draw_device" in state:
                check_draw_device(state["draw_device"], like.device, "The random projection P")
            left_seed, right_seed = split_seed(state["seed_used"])
            if state["side"] == LEFT:
                return gaussian((r, d), r, left_seed, like.device, like.dtype).T
            return gaussian((d, r), r, right_seed, like.device, like.dtype).T
        if self.seeding == "reference":
            shape = (d, r) if state["side"] == LEFT else (r, d)
            return gaussian(shape, r, state["seed_used"], like.device, like.dtype)
        seed, shape = self._seed_and_shape(state, like.device)
        return draw(shape, r, seed, like.device, like.dtype, self.rng)

    def _tiled(self, state: dict) -> bool:
        """Apply P without building it: a philox P that is not stored (and not a view that holds
        this step's P, as Flora's rule makes)."""
        return self.rng == "philox" and "basis" not in state

    def project(self, state: dict, grad: torch.Tensor) -> torch.Tensor:
        if self._tiled(state):
            seed, shape = self._seed_and_shape(state, grad.device)
            if state["side"] == LEFT:  # P^T G = (G^T P)^T
                return philox_times(grad.T, seed, shape, self.rank).T
            return philox_times(grad, seed, shape, self.rank, transpose=True)
        p = self.basis(state, grad)
        return p.T @ grad if state["side"] == LEFT else grad @ p.T

    def project_back(self, state: dict, low: torch.Tensor) -> torch.Tensor:
        if self._tiled(state):
            seed, shape = self._seed_and_shape(state, low.device)
            if state["side"] == LEFT:  # P L = (L^T P^T)^T
                return philox_times(low.T, seed, shape, self.rank, transpose=True).T
            return philox_times(low, seed, shape, self.rank)
        p = self.basis(state, low)
        return p @ low if state["side"] == LEFT else low @ p

    def add_back(self, state: dict, out: torch.Tensor, low: torch.Tensor, alpha: float) -> None:
        if self._tiled(state):
            out.add_(self.project_back(state, low), alpha=alpha)
            return
        p = self.basis(state, out)
        if state["side"] == LEFT:
            out.addmm_(p, low, alpha=alpha)
        else:
            out.addmm_(low, p, alpha=alpha)
