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

``seeding="reference"`` reproduces ``apollo-torch``: the first seed is the parameter's 1-based
ordinal over the optimizer's parameters and each refresh advances it to the last of 15 int64
draws of a CPU generator seeded with it; P is kept in the state, as the reference caches it.
``seeding="flora"`` reproduces ``flora-opt``: the same chain offset by the optimizer's seed, the
left matrix drawn as r x m from the first of two seeds split off, the right one as n x r from
the second, and nothing stored.

State per matrix (ints and tensors): ``side``, ``draws`` (how many P have been drawn), for the
reference ``proj_seed`` (the next seed) and, when stored, ``basis``.
"""

from __future__ import annotations

import math

import torch

from optimizers.projectors.svd import LEFT, check_one_sided, check_rank_fits, side_for

SEEDINGS = ("paper", "reference", "flora")
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


class GaussianProjector:
    def __init__(
        self,
        rank: int,
        update_gap: int,
        proj_type: str = "std",
        store: bool = False,
        seeding: str = "paper",
    ) -> None:
        check_one_sided(rank, update_gap, proj_type, "a random projection")
        if seeding not in SEEDINGS:
            raise ValueError(f"projection seeding {seeding!r}: use one of {SEEDINGS}")
        self.rank, self.update_gap, self.proj_type = rank, update_gap, proj_type
        self.seeding = seeding
        self.store = store or seeding == "reference"
        self.uses_context = seeding != "paper"  # the chains start from the parameter's ordinal

    def describe(self) -> str:
        kept = "stored" if self.store else "regenerated from its seed"
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
        if self.store:
            state.pop("basis", None)
            state["basis"] = self.basis(state, grad)

    def basis(self, state: dict, like: torch.Tensor) -> torch.Tensor:
        """P of the current draw, on ``like``'s device and in its dtype: the stored one, or
        regenerated from the seeds."""
        if "basis" in state:
            return state["basis"]
        d, r = state["full_dim"], self.rank
        if self.seeding == "flora":
            left_seed, right_seed = split_seed(state["seed_used"])
            if state["side"] == LEFT:
                return gaussian((r, d), r, left_seed, like.device, like.dtype).T
            return gaussian((d, r), r, right_seed, like.device, like.dtype).T
        if self.seeding == "reference":
            seed = state["seed_used"]
        else:
            seed = draw_seed(state.get("seed", 0), state["draws"] - 1)
        shape = (d, r) if state["side"] == LEFT else (r, d)
        return gaussian(shape, r, seed, like.device, like.dtype)

    def project(self, state: dict, grad: torch.Tensor) -> torch.Tensor:
        p = self.basis(state, grad)
        return p.T @ grad if state["side"] == LEFT else grad @ p.T

    def add_back(self, state: dict, out: torch.Tensor, low: torch.Tensor, alpha: float) -> None:
        p = self.basis(state, out)
        if state["side"] == LEFT:
            out.addmm_(p, low, alpha=alpha)
        else:
            out.addmm_(low, p, alpha=alpha)

    def project_back(self, state: dict, low: torch.Tensor) -> torch.Tensor:
        p = self.basis(state, low)
        return p @ low if state["side"] == LEFT else low @ p
