"""When each projected matrix refreshes its basis (spec galore-family.md section 9.2, "refresh
policies"; the SVD-cost pitfall of section 1(f)).

``synchronous`` (the references): every matrix refreshes when its own step counter is a multiple
of the interval T, so all N matrices of a model refresh at the same step and that one step pays
N SVDs (llama_60m: 56 bases, seconds, against a ~40 ms AdamW step on a CPU).

``staggered``: matrix k of the N matrices that share an interval T (counted in parameter order)
gets the offset o_k = floor(k T / N). It still takes its first basis at its first step (a basis
must exist before the first update); after that it refreshes at the steps s of its own counter
with (s - o_k) mod T = 0. The offsets are spread evenly over [0, T), so no step refreshes more
than ceil(N / T) matrices, and each matrix still refreshes once per T steps. The offsets depend
only on the parameter order and the intervals, which every rank and every resume rebuild the
same; the step counters are saved with the state, so a resumed or sharded run refreshes at the
same steps as an uninterrupted one. Matrix 0 has offset 0, so with T = 1 or a single matrix the
two schedules are the same.

A projector whose refreshes follow a longer cycle than ``update_gap`` (COAP: a cheap basis step
every T_u, a range finder every k T_u) declares it as ``cycle``; the offsets are then spread over
the cycle, which spreads both kinds of refresh.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

REFRESH_MODES = ("staggered", "synchronous")


def check_refresh(refresh: str) -> None:
    if refresh not in REFRESH_MODES:
        raise ValueError(f"refresh={refresh!r}: use one of {', '.join(REFRESH_MODES)}")


def check_reference_schedule(reference: bool, refresh: str, package: str) -> None:
    """``compat=reference`` reproduces ``package``, whose bases all refresh at the same steps."""
    if reference and refresh != "synchronous":
        raise ValueError(
            f"compat=reference reproduces {package}, which refreshes every basis at the same "
            f"step, but refresh={refresh!r}: set refresh=synchronous with it"
        )


def cycle_of(projector) -> int:
    """The steps over which ``projector``'s refreshes repeat: its ``cycle``, else its gap."""
    return getattr(projector, "cycle", projector.update_gap)


def stagger_offsets(cycles: Sequence[int]) -> list[int]:
    """The offset of each matrix, given each matrix's cycle in parameter order: the k-th of the
    N matrices that share cycle T gets floor(k T / N)."""
    total = Counter(cycles)
    seen: Counter = Counter()
    offsets = []
    for t in cycles:
        offsets.append(seen[t] * t // total[t])
        seen[t] += 1
    return offsets
